"""Overflow-guarded exp and NaN/Inf detection for the loss math (all fp32)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

EXP_EXPONENT_LIMIT = math.log(torch.finfo(torch.float32).max) - 20 * math.log(2)
"""Largest exponent allowed in the losses' exp(): exp(limit) = fp32 max / 2^20 (≈ 74.9), so sums of up to 2^20 such
terms (a global batch) stay finite."""

OVERFLOW_POLICIES = ("raise", "report")


def guarded_exp(f: Tensor, scale: float, *, policy: str, loss: str, side: str) -> tuple[Tensor, Tensor]:
    """exp(scale·f) in fp32, and a bool mask of the entries whose exponent exceeded ``EXP_EXPONENT_LIMIT``.

    policy "raise": FloatingPointError naming the loss, the side and the offending f. policy "report": the exponent is
    clamped to the limit (value saturates, gradient 0 there) and the mask tells the caller what to report.
    """
    exponent = scale * f.float()
    over = exponent.detach() > EXP_EXPONENT_LIMIT
    if bool(over.any()):
        if policy == "raise":
            worst = int(exponent.detach().argmax())
            raise FloatingPointError(
                f"{loss}: exp({scale:g}·f_{side}) would overflow fp32 in {int(over.sum())} pair(s): f_{side} = "
                f"{float(f.detach().reshape(-1)[worst]):.6g} gives exponent {float(exponent.detach().reshape(-1)[worst]):.6g}"
                f" > {EXP_EXPONENT_LIMIT:.4g}; use logps='avg' or overflow='report' to clamp and count such pairs")
        exponent = exponent.clamp(max=EXP_EXPONENT_LIMIT)
    return exponent.exp(), over


def find_nonfinite(values: Tensor, what: str) -> str | None:
    """A message describing the NaN/Inf entries of ``values`` (e.g. the per-pair losses), or None if all are finite."""
    bad = ~torch.isfinite(values.detach())
    if not bool(bad.any()):
        return None
    flat = values.detach().reshape(-1)
    positions = bad.reshape(-1).nonzero().squeeze(1)[:8].tolist()
    shown = ", ".join(f"[{i}]={float(flat[i])}" for i in positions)
    return (f"{what} has {int(torch.isnan(flat).sum())} NaN and {int(torch.isinf(flat).sum())} Inf of {flat.numel()}"
            f" entries; first: {shown}")


def assert_finite(values: Tensor, what: str) -> None:
    """NaN/Inf hook for the trainer: raise FloatingPointError describing the bad entries of ``values``."""
    message = find_nonfinite(values, what)
    if message is not None:
        raise FloatingPointError(message)
