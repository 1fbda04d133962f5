"""Reference-based baselines: DPO, IPO, SLiC, KTO (paired) and f-DPO.

f_w = ℓ_w − ℓ^ref_w, f_l = ℓ_l − ℓ^ref_l, h = f_w − f_l. Rewards reported are β·f_w and β·f_l (TRL).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_dil.losses.base import PairTerms, PreferenceLoss, ReducedLogProbs, clamped_metric, neg_log_sigmoid

FDPO_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


class _ReferenceLoss(PreferenceLoss):
    needs_reference = True
    default_logps = "sum"
    default_beta = 0.1

    def terms(self, logps: ReducedLogProbs, losses: Tensor, metrics: dict[str, Tensor] | None = None) -> PairTerms:
        return PairTerms(losses=losses, reward_chosen=self.beta * logps.f_chosen,
                         reward_rejected=self.beta * logps.f_rejected, metrics=metrics or {})


class Dpo(_ReferenceLoss):
    """DPO (Rafailov et al. 2023) with conservative label smoothing ε: −(1−ε)·log σ(β h) − ε·log σ(−β h)."""

    name = "dpo"
    hyperparameters = ("label_smoothing",)

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        h = logps.f_chosen - logps.f_rejected
        return self.terms(logps, neg_log_sigmoid(self.beta * h, self.cfg.label_smoothing))


class Ipo(_ReferenceLoss):
    """IPO (Azar et al. 2023): (h − 1/(2β))², on avg log-probs."""

    name = "ipo"
    default_logps = "avg"

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        h = logps.f_chosen - logps.f_rejected
        return self.terms(logps, (h - 1 / (2 * self.beta)) ** 2)


class Slic(_ReferenceLoss):
    """SLiC-HF hinge (Zhao et al. 2023), as in TRL: max(0, 1 − β h)."""

    name = "slic"

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        h = logps.f_chosen - logps.f_rejected
        return self.terms(logps, torch.relu(1 - self.beta * h))


class KtoPair(_ReferenceLoss):
    """KTO, paired form (Ethayarajh et al. 2024; TRL kto_pair): per pair
    ½·[(1 − σ(β(f_w − z_l))) + (1 − σ(β(z_w − f_l)))], z_w = max(0, mean f_w), z_l = max(0, mean f_l) over the pairs of
    this call (the micro-batch), detached. The ½ makes the mean over pairs equal TRL's mean over its 2n terms.
    """

    name = "kto_pair"

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        f_w, f_l = logps.f_chosen, logps.f_rejected
        z_w, z_l = f_w.detach().mean().clamp(min=0), f_l.detach().mean().clamp(min=0)
        losses = 0.5 * ((1 - torch.sigmoid(self.beta * (f_w - z_l))) + (1 - torch.sigmoid(self.beta * (z_w - f_l))))
        return self.terms(logps, losses)


class FDpo(_ReferenceLoss):
    """f-DPO (Wang et al. 2023): −log σ(β·[f′(u_w) − f′(u_l)]), u = π/π_ref = exp(f), with
    reverse KL f′(u) = log u = f (DPO); forward KL f′(u) = −1/u = −exp(−f); JS f′(u) = log(2u/(1+u)) = log 2 −
    softplus(−f); α-divergence f′(u) = (1 − u^{−α})/α = (1 − exp(−α f))/α.
    """

    name = "fdpo"
    hyperparameters = ("fdpo_divergence", "fdpo_alpha")

    def f_prime(self, f: Tensor, side: str, clamped: list[Tensor]) -> Tensor:
        divergence = self.cfg.fdpo_divergence
        if divergence == "reverse_kl":
            return f
        if divergence == "forward_kl":
            return -self.exp(f, -1.0, side, clamped)
        if divergence == "js":
            return math.log(2.0) - torch.nn.functional.softplus(-f)
        alpha = self.cfg.fdpo_alpha
        return (1 - self.exp(f, -alpha, side, clamped)) / alpha

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        clamped = [torch.zeros_like(logps.f_chosen, dtype=torch.bool)]
        margin = (self.f_prime(logps.f_chosen, "chosen", clamped)
                  - self.f_prime(logps.f_rejected, "rejected", clamped))
        return self.terms(logps, neg_log_sigmoid(self.beta * margin), clamped_metric(clamped))
