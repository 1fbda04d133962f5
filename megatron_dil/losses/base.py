"""Inputs, outputs and the shared machinery of every preference loss."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_dil.losses.config import LossConfig
from megatron_dil.losses.numerics import guarded_exp
from megatron_dil.ops.logprobs import SequenceLogProbs


@dataclass
class PairLogProbs:
    """Per-pair sequence log-probs (fp32) of the chosen and the rejected responses under one model."""

    chosen: SequenceLogProbs
    rejected: SequenceLogProbs


@dataclass
class LossOutput:
    """``losses`` [n]: differentiable per-pair loss (SFT term included). ``metrics``: detached per-pair values [n].

    A metric is sample-weighted (averaged over pairs) unless ``token_counts`` holds a per-pair token count for it: then
    the metric is a per-pair token sum and its reduced value is Σ value / Σ tokens.
    """

    losses: Tensor
    metrics: dict[str, Tensor]
    token_counts: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ReducedLogProbs:
    """ℓ_w, ℓ_l (policy) and ℓ^ref_w, ℓ^ref_l (reference, None when reference-free) in the loss's reduction, and
    ℓ̄_w, the policy's token-mean on the chosen response (for NLL terms)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_token_mean: Tensor

    @property
    def f_chosen(self) -> Tensor:
        """f_w = ℓ_w − ℓ^ref_w."""
        return self.chosen - self.ref_chosen

    @property
    def f_rejected(self) -> Tensor:
        """f_l = ℓ_l − ℓ^ref_l."""
        return self.rejected - self.ref_rejected


@dataclass
class PairTerms:
    """What a loss's ``pair_losses`` returns: per-pair losses, implicit rewards of each side, extra metrics."""

    losses: Tensor
    reward_chosen: Tensor
    reward_rejected: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def neg_log_sigmoid(x: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x) = (1−ε)·softplus(−x) + ε·softplus(x)."""
    loss = F.softplus(-x)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * F.softplus(x)
    return loss


class PreferenceLoss:
    """Base of every loss: picks the avg/sum log-probs, adds the optional SFT term and the TRL metrics.

    Metrics (per pair): rewards/chosen, rewards/rejected (the loss's implicit reward, e.g. β·f for DPO), rewards/margins,
    rewards/accuracies (1 if reward_chosen > reward_rejected), logps/chosen, logps/rejected (policy, in the loss's
    reduction), loss; token-weighted: nll/chosen (−Σ_t log p over chosen tokens, reduced per token).
    """

    name: ClassVar[str]
    needs_reference: ClassVar[bool]
    default_logps: ClassVar[str]
    default_beta: ClassVar[float | None] = None
    """None: the loss takes no β."""
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    """Loss-specific LossConfig fields this loss reads."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.beta = cfg.beta if cfg.beta is not None else self.default_beta
        self.logps = cfg.logps or self.default_logps

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        raise NotImplementedError

    def exp(self, f: Tensor, scale: float, side: str, clamped: list[Tensor]) -> Tensor:
        """exp(scale·f) under the config's overflow policy; appends the per-pair overflow mask to ``clamped``."""
        value, over = guarded_exp(f, scale, policy=self.cfg.overflow, loss=self.name, side=side)
        clamped.append(over)
        return value

    def _reduce(self, seq: SequenceLogProbs) -> Tensor:
        return (seq.mean if self.logps == "avg" else seq.sum).float()

    def __call__(self, policy: PairLogProbs, reference: PairLogProbs | None = None) -> LossOutput:
        if self.needs_reference and reference is None:
            raise ValueError(f"loss {self.name!r} needs reference log-probs, got reference=None")
        logps = ReducedLogProbs(
            chosen=self._reduce(policy.chosen), rejected=self._reduce(policy.rejected),
            ref_chosen=self._reduce(reference.chosen) if self.needs_reference else None,
            ref_rejected=self._reduce(reference.rejected) if self.needs_reference else None,
            chosen_token_mean=policy.chosen.mean.float(),
        )
        terms = self.pair_losses(logps)
        losses = terms.losses
        if self.cfg.sft_weight:
            losses = losses + self.cfg.sft_weight * -logps.chosen_token_mean
        reward_chosen, reward_rejected = terms.reward_chosen.detach(), terms.reward_rejected.detach()
        metrics = {
            "loss": losses.detach(),
            "rewards/chosen": reward_chosen,
            "rewards/rejected": reward_rejected,
            "rewards/margins": reward_chosen - reward_rejected,
            "rewards/accuracies": (reward_chosen > reward_rejected).float(),
            "logps/chosen": logps.chosen.detach(),
            "logps/rejected": logps.rejected.detach(),
            "nll/chosen": -policy.chosen.sum.detach().float(),
            **{key: value.detach().float() for key, value in terms.metrics.items()},
        }
        return LossOutput(losses=losses, metrics=metrics, token_counts={"nll/chosen": policy.chosen.count.detach()})


def clamped_metric(clamped: list[Tensor]) -> dict[str, Tensor]:
    """numerics/exp_clamped: 1 for pairs where any guarded exp was clamped."""
    return {"numerics/exp_clamped": torch.stack(clamped).any(dim=0).float()}
