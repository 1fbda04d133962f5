"""Self-play preference pairs from token ids: chosen = the demonstration's response tokens, rejected = π_k's sample
for the same prompt as generated (``completion_token_ids``, terminating EOS included): no detokenise/retokenise, so
the rejected side is exactly what the sampling model produced and its reference log-prob is that of the sample.

A pair whose sample equals the demonstration token for token is dropped and counted (it carries no signal: the DIL
and DPO gradients vanish on it). A sample longer than ``max_length − len(prompt)`` keeps its first tokens (counted).
The dataset is a regular preference dataset (:mod:`megatron_dil.data.writer`, kind ``pairs``) whose metadata also
records the generator checkpoint, the iteration and the sampling settings.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from megatron.core.datasets.indexed_dataset import DType

from megatron_dil.data.dataset import PreferenceDataset
from megatron_dil.data.tokenizer import PreferenceTokenizer
from megatron_dil.data.writer import SplitWriter, publish_splits, remove_dead_staging


def demonstration_prompts(dataset: PreferenceDataset) -> dict[tuple[int, ...], int]:
    """Distinct prompts in dataset order → prompt index (the numbering ``megatron-dil-generate`` gives a dataset
    prefix's prompts)."""
    index: dict[tuple[int, ...], int] = {}
    for i in range(len(dataset)):
        index.setdefault(tuple(int(t) for t in dataset[i].prompt), len(index))
    return index


def write_selfplay_pairs(demonstrations: PreferenceDataset, samples_path: Path, output_prefix: str,
                         tokenizer: PreferenceTokenizer, max_length: int, provenance: dict[str, Any]) -> dict[str, int]:
    """Write ``OUTPUT_PREFIX_train.{bin,idx,json}`` (complete or absent) and return its counts."""
    samples = {}
    for line in samples_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["sample_index"] == 0:
            samples[row["prompt_index"]] = row["completion_token_ids"]
    prompts = demonstration_prompts(demonstrations)
    if set(samples) != set(prompts.values()):
        raise ValueError(f"{samples_path} holds samples of {len(samples)} prompts, the demonstrations "
                         f"{demonstrations.prefix!r} have {len(prompts)}: remove {samples_path} and rerun")
    remove_dead_staging(output_prefix)
    writer = SplitWriter(f"{output_prefix}_train", DType.optimal_dtype(tokenizer.vocab_size))
    counts = {"demonstrations": len(demonstrations), "pairs_written": 0, "dropped_equal": 0, "samples_truncated": 0}
    try:
        for i in range(len(demonstrations)):
            demo = demonstrations[i]
            prompt, chosen = demo.prompt.tolist(), demo.chosen.tolist()
            rejected = samples[prompts[tuple(prompt)]]
            if rejected == chosen:
                counts["dropped_equal"] += 1
                continue
            room = max_length - len(prompt)
            if len(rejected) > room:
                rejected = rejected[:room]
                counts["samples_truncated"] += 1
            writer.add(prompt, chosen, rejected)
            counts["pairs_written"] += 1
        if not counts["pairs_written"]:
            raise ValueError(f"every sample of {samples_path} equals its demonstration: nothing left to learn from "
                             f"(the policy reproduces the demonstrations)")
        writer.finalize({"layout": "one document per pair: sequences [prompt, demonstration, sample]",
                         "kind": "pairs", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "source": {"demonstrations": demonstrations.prefix, "samples": str(samples_path),
                                    **provenance},
                         "tokenizer": tokenizer.identity(), "counts": counts, "split": "train"})
        publish_splits([writer], output_prefix)
    finally:
        writer.discard()
    return counts
