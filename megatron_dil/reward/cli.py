"""``megatron-dil-score``: score prompt/response rows with a reward model at any TP × PP (DP splits the rows).

    torchrun --nproc_per_node 2 -m megatron_dil.reward.cli --checkpoint runs/rm/final --input rows.jsonl \\
        --output scored.jsonl

Rows (.jsonl/.json/.parquet/datasets directory): ``prompt`` (a string or a TRL message list) and ``response`` (text,
tokenized as preprocessing tokenizes a demonstration: prompt and response jointly, EOS appended), or the generation
CLI's output rows (``prompt`` + ``completion_token_ids``: the sampled tokens as generated, no retokenising). Every row
is tokenized before the model is built; a bad row stops the run with one line naming FILE:ROW. The output holds the
input rows in order, each with ``reward`` and, when the checkpoint stores normalisation statistics, ``reward_normalized``
= (reward − μ) / σ; it appears only when complete.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_dil.runtime.cpu_compat import silence_expected_warnings

silence_expected_warnings()  # before Megatron-Core is imported (it warns at import time)

from megatron_dil.generation.model import GenerationInputError  # noqa: E402
from megatron_dil.runtime.errors import report_rank_error  # noqa: E402

PROG = "megatron-dil-score"


class ScoreInputError(ValueError):
    """Bad input to scoring (a row, the checkpoint, a flag); the message names it."""


@dataclass
class ScoreConfig:
    checkpoint: str
    input: str
    output: str
    prompt_column: str = "prompt"
    response_column: str = "response"
    template: str = "auto"
    input_format: str = "auto"
    input_split: str = "train"
    tensor_parallel: int | None = None  # None: the checkpoint's
    pipeline_parallel: int = 1
    batch_size: int = 16  # sequences per micro-batch per DP rank
    dtype: str = "auto"
    overwrite: bool = False
    progress: bool = True


def tokenize_rows(cfg: ScoreConfig, tokenizer, window: int) -> tuple[list[dict], list[list[int]]]:
    """(raw rows, token ids of prompt + response) of every row of ``cfg.input``; ``ScoreInputError`` names the first
    unusable row."""
    from megatron_dil.data.preprocess import iter_raw_rows
    from megatron_dil.data.rows import Columns, RowError, parse_demonstration, row_object
    from megatron_dil.data.templates import resolve_template
    from megatron_dil.data.tokenize import TruncationConfig, tokenize_pair
    from megatron_dil.generation.prompts import tokenize_prompt

    if not Path(cfg.input).exists():
        raise ScoreInputError(f"--input {cfg.input}: no such file or directory")
    template = resolve_template(cfg.template, tokenizer)[1]
    no_truncation = TruncationConfig(max_length=10**9, max_prompt_length=10**9 - 1)
    columns = Columns(prompt=cfg.prompt_column, response=cfg.response_column)
    rows, sequences = [], []
    for number, raw in iter_raw_rows(cfg.input, cfg.input_format, cfg.input_split):
        try:
            raw = row_object(raw)
            if "completion_token_ids" in raw and cfg.response_column not in raw:  # megatron-dil-generate output
                if raw.get(cfg.prompt_column) is None:
                    raise RowError("missing_field", f"no {cfg.prompt_column!r}")
                ids = tokenize_prompt(raw[cfg.prompt_column], tokenizer, template) + \
                    [int(t) for t in raw["completion_token_ids"]]
            else:
                pair = tokenize_pair(parse_demonstration(raw, columns), tokenizer, template, no_truncation)
                ids = pair.prompt + pair.chosen
        except RowError as err:
            raise ScoreInputError(f"{cfg.input}:{number}: {err.reason}: {err}") from None
        except (TypeError, ValueError) as err:
            raise ScoreInputError(f"{cfg.input}:{number}: {err}") from None
        if len(ids) > window:
            raise ScoreInputError(f"{cfg.input}:{number}: {len(ids)} tokens exceed the model's window of {window}")
        if max(ids) >= tokenizer.vocab_size or min(ids) < 0:
            raise ScoreInputError(f"{cfg.input}:{number}: token id {max(ids)} outside the vocabulary")
        rows.append(raw)
        sequences.append(ids)
    if not rows:
        raise ScoreInputError(f"--input {cfg.input}: no rows")
    return rows, sequences


def sequence_batches(sequences: list[list[int]], indices: list[int], size: int, pad_id: int):
    """(row indices, PreferenceBatch) of at most ``size`` sequences: sequence 2j is a pair's "chosen" side and 2j+1
    its "rejected" side (an odd last sequence is repeated; its copy is ignored), prompts empty."""
    import numpy as np

    from megatron_dil.data.collator import PreferenceCollator
    from megatron_dil.data.dataset import PreferencePair

    collator = PreferenceCollator(pad_id, 8, "none")
    size = max(2, size - size % 2)
    for start in range(0, len(indices), size):
        part = indices[start:start + size]
        padded = part + part[-1:] * (len(part) % 2)
        half = len(padded) // 2
        pairs = [PreferencePair(sample_id=i, prompt=np.zeros(0, dtype=np.int64),
                                chosen=np.asarray(sequences[padded[i]], dtype=np.int64),
                                rejected=np.asarray(sequences[padded[half + i]], dtype=np.int64))
                 for i in range(half)]
        yield padded, collator(pairs)


def run(cfg: ScoreConfig) -> list[float]:
    """Score (collective over the world); returns the raw rewards in row order (on every rank)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dil.generation.model import load_weights, resolve_checkpoint, resolve_tokenizer
    from megatron_dil.io.files import atomic_write_text
    from megatron_dil.models.builder import build_model
    from megatron_dil.reward.normalize import normalized
    from megatron_dil.reward.scoring import reports_scores, score_batches
    from megatron_dil.runtime.distributed import ParallelConfig, initialize, shutdown

    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise ScoreInputError(f"--output {output} already exists; remove it or pass --overwrite")
    if cfg.batch_size < 1:
        raise ScoreInputError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    source = resolve_checkpoint(cfg.checkpoint, head="reward")
    tokenizer = resolve_tokenizer(source, None)
    rows, sequences = tokenize_rows(cfg, tokenizer, source.model.max_position_embeddings)
    tp = cfg.tensor_parallel or source.tensor_parallel
    if tp != source.tensor_parallel:
        raise ScoreInputError(
            f"--tensor-parallel {tp}: {source.path} is stored for tensor parallel {source.tensor_parallel}; reshard it "
            f"with `megatron-dil-hf-to-megatron --source {source.path} --output NEW --tensor-parallel {tp}`")
    pp = source.pipeline_parallel or cfg.pipeline_parallel
    owns_process_group = not dist.is_initialized()
    dp = initialize(ParallelConfig(tensor=tp, pipeline=pp), source.model, seed=0)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dtype = {"auto": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "fp32": torch.float32,
                 "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
        chunks = build_model(source.model, params_dtype=dtype)
        load_weights(chunks, source)
        dp_rank = parallel_state.get_data_parallel_rank()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths batch together
        mine = order[dp_rank::dp]
        shows = cfg.progress and reports_scores() and dp_rank == 0
        if dist.get_rank() == 0:
            print(f"{PROG}: {len(rows)} rows | TP={tp} PP={pp} DP={dp} | {source.path}", file=sys.stderr, flush=True)
        scored: dict[int, float] = {}
        started = time.time()
        # forward-only: no collective spans DP ranks, so each runs its own number of batches
        for step, (index, batch) in enumerate(sequence_batches(sequences, mine, cfg.batch_size, tokenizer.pad_id)):
            rewards = score_batches(chunks, [batch.to(device)])
            if reports_scores():
                scored.update(zip(index, rewards[0].tolist()))
            if shows and (step + 1) % 10 == 0:
                print(f"{PROG}: {len(scored)}/{len(mine)} rows on DP rank 0 ({time.time() - started:.0f} s)",
                      file=sys.stderr, flush=True)
        gathered: list[dict] = [{}] * dist.get_world_size()
        dist.all_gather_object(gathered, scored)
        rewards = {k: v for part in gathered for k, v in part.items()}
        if len(rewards) != len(rows):
            raise RuntimeError(f"scored {len(rewards)} of {len(rows)} rows")
        if dist.get_rank() == 0:
            lines = []
            for i, raw in enumerate(rows):
                value = normalized(rewards[i], source.reward_normalization)
                lines.append(json.dumps({**raw, "reward": rewards[i],
                                         **({} if value is None else {"reward_normalized": value})}))
            atomic_write_text(output, "\n".join(lines) + "\n")
            print(f"{PROG}: wrote {len(rows)} scored rows to {output}", file=sys.stderr, flush=True)
        dist.barrier()
        return [rewards[i] for i in range(len(rows))]
    finally:
        if owns_process_group:
            shutdown()
        else:
            parallel_state.destroy_model_parallel()


def build_parser() -> argparse.ArgumentParser:
    d = ScoreConfig(checkpoint="", input="", output="")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a reward model: its final/, a run directory or checkpoint")
    p.add_argument("--input", required=True, help="rows to score (.jsonl/.json/.parquet/datasets directory)")
    p.add_argument("--output", required=True, help="JSONL file of scored rows (written when complete)")
    p.add_argument("--prompt-column", default=d.prompt_column)
    p.add_argument("--response-column", default=d.response_column,
                   help="text response column (rows with completion_token_ids and no such column use those ids)")
    p.add_argument("--template", default=d.template, help="chat template for message-list prompts (as preprocessing)")
    p.add_argument("--input-format", default=d.input_format, choices=["auto", "jsonl", "json", "parquet", "datasets"])
    p.add_argument("--input-split", default=d.input_split)
    p.add_argument("--tensor-parallel", type=int, help="default: the checkpoint's")
    p.add_argument("--pipeline-parallel", type=int, default=d.pipeline_parallel)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per forward per DP rank")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        run(ScoreConfig(**args))
    except (ScoreInputError, GenerationInputError, ValueError, FileNotFoundError, RuntimeError) as err:
        return report_rank_error(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
