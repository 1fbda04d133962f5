"""The checkpointer: when to save (``save_interval``, the last step, before an early exit, never twice for one step)
and what to resume from (the newest verified checkpoint, saying which and why newer ones were skipped).

Resume semantics: weights, optimizer state, RNG and data position come from the checkpoint; the LR schedule and the
optimizer's hyperparameters (``SCHEDULE_KEYS`` of ``train``) come from this run's config, continued at the
checkpoint's scheduler step count (Megatron-LM's ``override_opt_param_scheduler``): changed keys are honoured and
named in the log. A checkpoint directory that exists but cannot be verified is never silently replaced by a fresh start.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from megatron_dil.io import IntegrityError
from megatron_dil.training.cadence import Periodic
from megatron_dil.training.checkpoint import TrainState, find_resumable, load_checkpoint, save_checkpoint
from megatron_dil.training.config import RunConfig

SCHEDULE_KEYS = ("train_iters", "lr", "min_lr", "lr_schedule", "warmup_fraction", "weight_decay", "adam_beta1",
                 "adam_beta2", "adam_eps", "clip_grad")


def schedule_of(run: RunConfig, train_iters: int) -> dict:
    """The keys that shape the LR schedule and the optimizer update, as recorded in each checkpoint
    (``train.train_iters`` resolved)."""
    return {f"train.{k}": train_iters if k == "train_iters" else getattr(run.train, k) for k in SCHEDULE_KEYS}


class Checkpointer(Periodic):
    """Saves every ``checkpoint.save_interval`` steps and at ``last_step`` (``run(step)`` saves off-cadence)."""

    def __init__(self, run: RunConfig, last_step: int, chunks: list, optimizer, scheduler,
                 log: Callable[[str], None]):
        super().__init__(run.checkpoint.save_interval, last_step)
        self.root = Path(run.output_dir) / "checkpoints"
        self.config = run.checkpoint
        self.schedule = schedule_of(run, last_step)
        self.chunks, self.optimizer, self.scheduler, self.log = chunks, optimizer, scheduler, log
        self.state = TrainState()

    def run(self, step: int) -> None:
        if step != self.done_at:
            path = save_checkpoint(self.root, self.chunks, self.optimizer, self.scheduler, self.state,
                                   self.config.keep_last, self.schedule)
            self.log(f"saved checkpoint {path}")
            self.done_at = step

    def resume(self) -> TrainState:
        """Collective: restore the newest verified checkpoint (if ``checkpoint.resume``); the state to continue from."""
        if not self.config.resume:
            return self.state
        path, skipped, existing = find_resumable(self.root)
        if path is None and existing:
            raise IntegrityError(f"checkpoint.resume: none of the {existing} checkpoints in {self.root} can be "
                                 f"resumed: {' | '.join(skipped)}. Delete them (or set checkpoint.resume=false) to "
                                 f"start from step 0")
        for reason in skipped:
            self.log(f"resume: skipped {reason}")
        if path is None:
            return self.state
        self.state, saved_schedule = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler)
        self.done_at = self.state.iteration  # that step is saved already
        changed = [f"{k} {saved_schedule[k]} → {v}" for k, v in self.schedule.items()
                   if k in saved_schedule and saved_schedule[k] != v]
        self.log(f"resumed from {path} at step {self.state.iteration} ({self.state.consumed_samples} pairs seen)"
                 + (f"; honouring the changed {', '.join(changed)}: the LR schedule follows this config from step "
                    f"{self.state.iteration}" if changed else ""))
        return self.state
