"""Name → loss class, and ``build_loss`` with validation of the config against the chosen loss."""
from __future__ import annotations

import dataclasses

from megatron_dil.losses.base import PreferenceLoss
from megatron_dil.losses.config import LossConfig
from megatron_dil.losses.dil import DilBce, DilLsif, DilUkl
from megatron_dil.losses.numerics import OVERFLOW_POLICIES
from megatron_dil.losses.reference_based import FDPO_DIVERGENCES, Dpo, FDpo, Ipo, KtoPair, Slic
from megatron_dil.losses.reference_free import Cpo, Orpo, SimPo, Sft

LOSSES: dict[str, type[PreferenceLoss]] = {
    cls.name: cls for cls in (DilLsif, DilBce, DilUkl, Dpo, Ipo, Slic, FDpo, KtoPair, Cpo, SimPo, Orpo, Sft)
}

_SPECIFIC_FIELDS = ("label_smoothing", "simpo_gamma_beta_ratio", "fdpo_divergence", "fdpo_alpha", "cpo_alpha",
                    "orpo_lambda")


def build_loss(cfg: LossConfig) -> PreferenceLoss:
    """The loss named ``cfg.name``; ValueError for an unknown name (listing the valid ones) or a bad hyperparameter."""
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss {cfg.name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[cfg.name]
    defaults = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    for name in _SPECIFIC_FIELDS:
        if name not in cls.hyperparameters and getattr(cfg, name) != defaults[name]:
            raise ValueError(f"loss.{name} = {getattr(cfg, name)!r} is not used by loss {cfg.name!r} "
                             f"(it reads: {', '.join(('beta',) * (cls.default_beta is not None) + cls.hyperparameters) or 'no hyperparameters'})")
    if cfg.beta is not None:
        if cls.default_beta is None:
            raise ValueError(f"loss {cfg.name!r} takes no beta, got loss.beta = {cfg.beta}")
        if cfg.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {cfg.beta}")
    if cfg.logps not in (None, "avg", "sum"):
        raise ValueError(f"loss.logps must be 'avg', 'sum' or null, got {cfg.logps!r}")
    if cfg.overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"loss.overflow must be one of {OVERFLOW_POLICIES}, got {cfg.overflow!r}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.fdpo_divergence not in FDPO_DIVERGENCES:
        raise ValueError(f"loss.fdpo_divergence must be one of {FDPO_DIVERGENCES}, got {cfg.fdpo_divergence!r}")
    if cfg.fdpo_alpha <= 0:
        raise ValueError(f"loss.fdpo_alpha must be > 0, got {cfg.fdpo_alpha}")
    if cfg.sft_weight < 0:
        raise ValueError(f"loss.sft_weight must be >= 0, got {cfg.sft_weight}")
    return cls(cfg)
