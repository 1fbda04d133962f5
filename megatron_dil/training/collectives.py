"""Small collectives the training components agree through: reduced scalars and the first error of any rank."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_values(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM, group=None) -> list[float]:
    """``values`` reduced element-wise over ``group`` (the world by default), on the device the backend needs."""
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.tolist()


def first_error(local: str | None) -> str | None:
    """Collective: the error message of the lowest failing rank (prefixed with its rank), or None when all succeeded.
    Lets every rank raise together instead of leaving the others waiting in the next collective."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local)
    return next((f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None), None)
