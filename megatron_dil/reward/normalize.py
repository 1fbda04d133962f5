"""Reward normalisation on demonstrations (the IRL paper): after training, μ and σ of r(x, y) over the
demonstrations' responses are stored with the final checkpoint (manifest ``reward_normalization``), and scoring
reports r̃ = (r − μ) / σ beside r, so rewards of models trained in different iterations share one scale (a
demonstration scores 0 on average and one standard deviation is 1).

    μ = Σ r_i / N,   σ = sqrt(Σ (r_i − μ)² / N)   over the chosen responses i of the dataset (population std)
"""
from __future__ import annotations

import math
from itertools import islice
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_dil.data.loader import build_dataloader
from megatron_dil.reward.scoring import reports_scores, score_batches, world_sum


def reward_statistics(chunks: list, dataset, data_config, tokenizer, micro_batch_size: int, window: int,
                      device: torch.device, name: str, max_pairs: int | None = None) -> dict[str, Any]:
    """Collective: μ, σ and N of the reward over the chosen responses of ``dataset`` (DP ranks split it; the ragged
    tail of micro_batch_size × DP pairs is left out, as in evaluation), on every rank."""
    dp_size = parallel_state.get_data_parallel_world_size()
    loader = build_dataloader(dataset, data_config, tokenizer, micro_batch_size,
                              parallel_state.get_data_parallel_rank(), dp_size, train=False)
    limit = None if max_pairs is None else max(1, max_pairs // (micro_batch_size * dp_size))
    batches = (b.to(device) for b in islice(loader, limit))
    total = [0.0, 0.0, 0.0]  # Σ r, Σ r², N
    while chunk := list(islice(batches, window)):
        for batch, rewards in zip(chunk, score_batches(chunks, chunk)):
            chosen = rewards[:batch.num_pairs].double()
            if reports_scores():
                total = [total[0] + float(chosen.sum()), total[1] + float((chosen ** 2).sum()),
                         total[2] + chosen.numel()]
    s, s2, n = world_sum(total, device)
    if not n:
        raise ValueError(f"reward normalisation: {name} gave no sequence to score (fewer pairs than "
                         f"micro_batch_size × data-parallel size = {micro_batch_size * dp_size})")
    mean = s / n
    return {"mean": mean, "std": math.sqrt(max(s2 / n - mean * mean, 0.0)), "count": int(n), "dataset": name}


def normalized(reward: float, stats: dict[str, Any] | None) -> float | None:
    """(r − μ) / σ, or None without statistics (or σ = 0)."""
    if not stats or not stats.get("std"):
        return None
    return (reward - stats["mean"]) / stats["std"]
