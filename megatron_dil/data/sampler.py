"""Deterministic, epoch-shuffled, data-parallel-sharded sampler that resumes from a consumed-sample count.

The global sample stream is the concatenation over epochs e = 0, 1, ... of ``perm_e[:U]`` where ``perm_e`` is a
seeded permutation of the dataset (identity without shuffle) and ``U = N − N mod (b·D)`` the usable samples per epoch
(b micro-batch size, D data-parallel size; the ragged tail of an epoch is dropped, a different one each epoch).
Global step s covers stream positions ``[s·b·D, (s+1)·b·D)``; DP rank r takes the micro-batch
``[s·b·D + r·b, s·b·D + (r+1)·b)``. Gradient accumulation takes consecutive steps of this stream. Resuming from
``consumed_samples = c`` (pairs over ALL ranks, a multiple of b·D) starts at stream position c: the exact continuation.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class PreferenceSampler:
    """Yields, for DP rank ``dp_rank``, one list of ``micro_batch_size`` dataset indices per micro-batch.

    Use it as a DataLoader ``batch_sampler``. ``max_epochs=None`` iterates forever (the trainer stops by iteration
    count); validation uses ``shuffle=False, max_epochs=1``.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, seed: int = 1234, shuffle: bool = True, max_epochs: int | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        stride = micro_batch_size * dp_size
        if micro_batch_size < 1 or num_samples < stride:
            raise ValueError(f"{num_samples} samples cannot fill one step of micro_batch_size {micro_batch_size} x "
                             f"dp_size {dp_size}")
        if consumed_samples % stride:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of micro_batch_size x dp_size "
                             f"= {stride}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.seed = seed
        self.shuffle = shuffle
        self.max_epochs = max_epochs
        self.usable_per_epoch = num_samples - num_samples % stride

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The usable sample order of ``epoch`` (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.usable_per_epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)[:self.usable_per_epoch]

    def __iter__(self) -> Iterator[list[int]]:
        stride = self.micro_batch_size * self.dp_size
        position = self.consumed_samples
        while self.max_epochs is None or position < self.max_epochs * self.usable_per_epoch:
            epoch, offset = divmod(position, self.usable_per_epoch)
            order = self.epoch_order(epoch)
            for start in range(offset, self.usable_per_epoch, stride):
                first = start + self.dp_rank * self.micro_batch_size
                yield order[first:first + self.micro_batch_size].tolist()
            position = (epoch + 1) * self.usable_per_epoch

    def __len__(self) -> int:
        """Micro-batches left for this rank (finite ``max_epochs`` only)."""
        if self.max_epochs is None:
            raise TypeError("an endless sampler (max_epochs=None) has no length")
        left = self.max_epochs * self.usable_per_epoch - self.consumed_samples
        return max(left, 0) // (self.micro_batch_size * self.dp_size)
