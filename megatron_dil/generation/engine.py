"""Generation over many prompts on one model-parallel group: length-sorted batches through ``decode``."""
from __future__ import annotations

from typing import Callable

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_dil.generation.decode import Completion, DecodeLimits, DecodeRequest, decode
from megatron_dil.generation.sampler import SamplingConfig

BatchCallback = Callable[[list[DecodeRequest], list[Completion]], None]


def generate(model: GPTModel, requests: list[DecodeRequest], sampling: SamplingConfig, limits: DecodeLimits,
             vocab_size: int, batch_size: int, on_batch: BatchCallback | None = None) -> list[Completion] | None:
    """Completions for ``requests`` in their order (on the last pipeline stage; None elsewhere).

    Requests run in batches of ``batch_size`` sorted by prompt length, so a batch's prompts are close in length (its
    prefill covers the shortest). Results do not depend on the batching (noise is keyed per request).
    ``on_batch(requests, completions)`` is called on the last stage after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    results: list[Completion | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = [requests[i] for i in rows]
        completions = decode(model, batch, sampling, limits, vocab_size)
        if completions is None:
            continue
        for i, completion in zip(rows, completions):
            results[i] = completion
        if on_batch is not None:
            on_batch(batch, completions)
    return results if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None
