"""Spawn real gloo ranks for distributed tests.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes with ``torch.multiprocessing``, initialises a
gloo process group in each (RANK/WORLD_SIZE/MASTER_* set as torchrun would), calls ``fn(rank, world_size, *args)``
and returns the list of per-rank return values (which must be picklable; tensors are fine). An exception on any
rank fails the caller with that rank's traceback.
"""
from __future__ import annotations

import io
import os
import queue as queue_lib
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(result, buffer)  # plain bytes: no shared-memory tensors outliving this process
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_PORT_CLASH = ("Address already in use", "EADDRINUSE", "failed to connect/validate")


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results ordered by rank.

    ``fn`` decides how to initialise torch.distributed (the environment is torchrun's), so it can go through the
    product's own runtime; it must be a module-level function (spawn pickles it). A rendezvous port taken by another
    process between ``free_port()`` and its use is retried once on a fresh port.
    """
    try:
        return _run_once(fn, world_size, args, timeout)
    except RuntimeError as err:
        if not any(marker in str(err) for marker in _PORT_CLASH):
            raise
        return _run_once(fn, world_size, args, timeout)


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, payload = queue.get(timeout=1.0)
        except queue_lib.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
            elif time.monotonic() > deadline:
                errors.append(f"no result within {timeout:.0f}s (a rank hung)")
            continue
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed test failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def init_gloo() -> None:
    """Plain gloo init from the torchrun environment, for tests that need no Megatron parallel state."""
    dist.init_process_group("gloo")
