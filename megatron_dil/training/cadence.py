"""Components that act on their own cadence: every ``interval`` optimizer steps and at the last step, once per step.

The trainer's loop asks each periodic component after every step (``maybe_run(step)``) and once more after the loop
(which only acts if the last step was not handled yet, e.g. a resumed run that was already complete). Adding one is
constructing it and appending it to ``Trainer.periodic``.
"""
from __future__ import annotations

from typing import Callable


class Periodic:
    """Runs ``action(step)`` when ``step`` is a multiple of ``interval`` (None: only at the end) or ``last_step``."""

    def __init__(self, interval: int | None, last_step: int, action: Callable[[int], None] | None = None):
        self.interval, self.last_step, self.action = interval, last_step, action
        self.done_at: int | None = None

    def should_run(self, step: int) -> bool:
        due = step == self.last_step or (self.interval is not None and step % self.interval == 0)
        return due and step != self.done_at

    def maybe_run(self, step: int) -> None:
        if self.should_run(step):
            self.run(step)

    def run(self, step: int) -> None:
        """Act at ``step`` now (also off-cadence, e.g. a save before exiting); never twice for one step."""
        if step != self.done_at:
            self.action(step)
            self.done_at = step
