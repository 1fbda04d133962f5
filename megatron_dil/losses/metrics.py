"""Accumulate per-pair metrics over micro-batches and reduce them over data-parallel ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class MetricAccumulator:
    """Σ of metric values and weights over micro-batches; ``reduce`` all-reduces both over the DP group.

    Sample-weighted metrics (default; every TRL metric): weight 1 per pair, result = Σ_pairs value / number of pairs.
    Token-weighted metrics (those with an entry in ``token_counts``, e.g. nll/chosen): value is a per-pair token sum,
    result = Σ value / Σ tokens. Every DP rank must add the same metric names (they run the same loss).
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, Tensor] = {}

    def add(self, metrics: dict[str, Tensor], token_counts: dict[str, Tensor] | None = None) -> None:
        """Add one micro-batch's per-pair metrics [n] (no host sync)."""
        token_counts = token_counts or {}
        for name, values in metrics.items():
            values = values.detach().double()
            weight = token_counts[name].detach().double().sum() if name in token_counts else \
                torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
            self._sums[name] = self._sums.get(name, 0) + values.sum()
            self._weights[name] = self._weights.get(name, 0) + weight

    def reduce(self, dp_group: ProcessGroup | None = None) -> dict[str, float]:
        """Means over all pairs (or tokens) of all micro-batches and DP ranks: one all-reduce of [2, K] float64."""
        names = sorted(self._sums)
        if not names:
            return {}
        packed = torch.stack([torch.stack([self._sums[n] for n in names]), torch.stack([self._weights[n] for n in names])])
        if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=dp_group)
        sums, weights = packed.tolist()
        return {name: s / w if w else float("nan") for name, s, w in zip(names, sums, weights)}
