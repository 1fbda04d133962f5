"""Leave cleanly on a termination signal, like Megatron-LM's ``DistributedSignalHandler``.

Every rank installs a handler that only records the signal. At each step boundary the flag is all-reduced (MAX), so
all ranks see it at the same step even if only some received it (torchrun forwards SIGTERM to its workers; Slurm's
``--signal`` sends it to every process of the step); the trainer then saves a checkpoint at that step and returns
normally (exit code 0). A second signal during that save is recorded too, not fatal: torchrun's own grace period
(``--shutdown-timeout`` / ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by default) bounds the wait before SIGKILL.
"""
from __future__ import annotations

import signal
import threading

import torch.distributed as dist

from megatron_dil.training.collectives import all_reduce_values


class ExitSignal:
    """Context manager: while inside, ``signals`` are recorded instead of killing the process."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _record(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> ExitSignal:
        if threading.current_thread() is threading.main_thread():  # Python installs handlers in the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def any_rank_received(self) -> signal.Signals | None:
        """Collective: the signal some rank has received (the highest number if several), else None; called at each
        step boundary."""
        number = int(all_reduce_values([float(self.received or 0)], dist.ReduceOp.MAX)[0])
        return signal.Signals(number) if number else None
