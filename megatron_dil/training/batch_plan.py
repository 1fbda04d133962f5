"""The batch plan: how pairs become micro-batches, optimizer steps and evaluation passes. Derived and validated once
from the config and the dataset sizes, before any rank builds a model (no process group needed).

    accumulation       = global_batch_size / (micro_batch_size × DP)          (an integer, else refused)
    train_iters        = train.train_iters, or ⌊epochs · N_train / global_batch_size⌋ (≥ 1, else refused)
    eval_micro_batches = ⌊N_valid / (micro_batch_size × DP)⌋ per DP rank, capped at ⌊eval_pairs / (micro_batch_size
                         × DP)⌋ (at least 1); a validation split smaller than one micro-batch per DP rank is refused
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_dil.training.config import RunConfig


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int  # pairs per micro-batch per DP rank
    global_batch_size: int  # pairs per optimizer step
    data_parallel: int
    accumulation: int  # micro-batches per DP rank per optimizer step
    train_iters: int
    eval_micro_batches: int  # per DP rank per validation pass; 0 without a validation split
    epochs_note: str = ""  # how `train.epochs` became `train_iters`, when it did

    @property
    def pairs_per_micro_step(self) -> int:
        """Pairs one micro-batch covers over all DP ranks (the unit every split must hold at least once)."""
        return self.micro_batch_size * self.data_parallel

    @classmethod
    def from_config(cls, run: RunConfig, data_parallel: int, train_pairs: int, valid_pairs: int | None
                    ) -> BatchPlan:
        """Validate the batch geometry against the layout and the dataset sizes; every message names the keys."""
        train, per_step = run.train, run.train.micro_batch_size * data_parallel
        if train.global_batch_size % per_step:
            raise ValueError(f"train.global_batch_size {train.global_batch_size} pairs is not divisible by "
                             f"train.micro_batch_size {train.micro_batch_size} × data-parallel size {data_parallel}")
        accumulation = train.global_batch_size // per_step
        pipeline = run.parallel.pipeline
        if run.parallel.virtual_pipeline and accumulation % pipeline:
            raise ValueError(f"the interleaved schedule needs gradient accumulation ({accumulation} micro-batches) "
                             f"to be a multiple of parallel.pipeline {pipeline}: change train.global_batch_size")
        if train_pairs < per_step:
            raise ValueError(f"data.train holds {train_pairs} pairs, fewer than one micro-batch per data-parallel "
                             f"rank (train.micro_batch_size {train.micro_batch_size} × DP {data_parallel})")
        note = ""
        if train.train_iters is not None:
            iters = train.train_iters
        else:
            exact = train.epochs * train_pairs / train.global_batch_size
            if exact < 1:
                raise ValueError(f"train.epochs {train.epochs} × {train_pairs} pairs is less than one global batch "
                                 f"({train.global_batch_size} pairs): raise train.epochs or set train.train_iters")
            iters = int(exact)
            note = (f"train.epochs {train.epochs} × {train_pairs} pairs / global batch {train.global_batch_size} = "
                    f"{exact:.4g} steps" + (f" → {iters} (rounded down)" if iters != exact else ""))
        eval_micro_batches = 0
        if valid_pairs is not None:
            if valid_pairs < per_step:
                raise ValueError(f"data.valid holds {valid_pairs} pairs, fewer than one evaluation micro-batch per "
                                 f"data-parallel rank (train.micro_batch_size {train.micro_batch_size} × DP "
                                 f"{data_parallel} = {per_step} pairs): use a larger validation split, a smaller "
                                 f"micro-batch, or data.valid=null")
            eval_micro_batches = valid_pairs // per_step
            if run.logging.eval_pairs is not None:
                eval_micro_batches = min(eval_micro_batches, max(1, run.logging.eval_pairs // per_step))
        return cls(train.micro_batch_size, train.global_batch_size, data_parallel, accumulation, iters,
                   eval_micro_batches, note)

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch_size} pairs ({2 * self.micro_batch_size} sequences) × "
                f"{self.accumulation} accumulation × DP {self.data_parallel} = global batch "
                f"{self.global_batch_size} pairs | {self.train_iters} steps")
