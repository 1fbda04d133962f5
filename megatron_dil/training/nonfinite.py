"""The non-finite policy of a training step, decided on all ranks together before the optimizer steps.

A step is non-finite when any per-pair loss is NaN/inf (on any rank) or, with a finite loss, any gradient is: the
reduced gradient buffers of every rank are checked (Megatron's found-inf, without a loss scaler). ``skip`` drops the
step (no optimizer or scheduler update, the step still counts) and stops the run once ``max_consecutive_skips`` steps
in a row were dropped; ``stop`` raises at the first one. Either way the weights never take a non-finite update.
fp16 keeps Megatron's dynamic loss scaler, which skips overflowing steps and lowers the scale by itself.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megatron_dil.training.checkpoint import TrainState
from megatron_dil.training.collectives import all_reduce_values


def gradients_finite(chunks: list) -> bool:
    """Whether every gradient buffer of these Megatron DDP chunks holds only finite values (this rank)."""
    flags = [torch.isfinite(buffer.grad_data).all()
             for chunk in chunks for buffer in chunk.buffers + chunk.expert_parallel_buffers]
    return bool(torch.stack(flags).all()) if flags else True


class NonFinitePolicy:
    def __init__(self, mode: str, max_consecutive_skips: int, check_gradients: bool, log: Callable[[str], None]):
        self.mode, self.max_consecutive_skips, self.check_gradients, self.log = (
            mode, max_consecutive_skips, check_gradients, log)

    def skip_step(self, step: int, state: TrainState, loss_problems: list[str], chunks: list) -> bool:
        """Collective: True if step ``step`` must be dropped (counted in ``state``); raises under ``stop`` or when
        the consecutive-skip limit is reached."""
        bad_gradients = self.check_gradients and not gradients_finite(chunks)
        bad_loss, bad_grad = all_reduce_values([float(bool(loss_problems)), float(bad_gradients)], dist.ReduceOp.MAX)
        if not (bad_loss or bad_grad):
            state.consecutive_skips = 0
            return False
        cause = (f"non-finite loss: {'; '.join(loss_problems) or 'on another rank'}" if bad_loss
                 else "finite loss but non-finite gradient")
        if self.mode == "stop":
            raise FloatingPointError(f"step {step}: {cause} (train.nonfinite_loss=stop)")
        state.skipped_steps += 1
        state.consecutive_skips += 1
        if state.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"step {step}: {state.consecutive_skips} consecutive steps skipped for non-finite values "
                f"(train.max_consecutive_skips={self.max_consecutive_skips}), last: {cause}; the run diverged or the "
                f"data is bad: resume from the last checkpoint with a lower train.lr, or fix the named samples")
        self.log(f"step {step}: {cause}; step skipped ({state.skipped_steps} so far, "
                 f"{state.consecutive_skips} in a row, limit train.max_consecutive_skips={self.max_consecutive_skips})")
        return True
