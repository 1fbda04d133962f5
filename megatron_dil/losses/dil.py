"""DIL: direct imitation learning by Bregman density-ratio estimation (Xiao et al., ICLR 2025, Table 1).

f_w = ℓ_w − ℓ^ref_w, f_l = ℓ_l − ℓ^ref_l, r = exp(f) estimates p_chosen/p_rejected. As released: avg (token-mean)
log-probs, no β, no clamp or margin. Rewards reported are f_w and f_l (the released code logged ℓ_w, ℓ_l instead).
Extra metrics: dil/f_chosen, dil/f_rejected, dil/exp_f_chosen, dil/exp_f_rejected.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from megatron_dil.losses.base import PairTerms, PreferenceLoss, ReducedLogProbs, clamped_metric


class _DilLoss(PreferenceLoss):
    needs_reference = True
    default_logps = "avg"

    def pair_terms(self, logps: ReducedLogProbs, losses: Tensor, clamped: list[Tensor] | None) -> PairTerms:
        f_w, f_l = logps.f_chosen, logps.f_rejected
        metrics = {
            "dil/f_chosen": f_w, "dil/f_rejected": f_l,
            "dil/exp_f_chosen": f_w.detach().exp(), "dil/exp_f_rejected": f_l.detach().exp(),
            **(clamped_metric(clamped) if clamped is not None else {}),
        }
        return PairTerms(losses=losses, reward_chosen=f_w, reward_rejected=f_l, metrics=metrics)


class DilLsif(_DilLoss):
    """DIL-LSIF (least-squares importance fitting, the headline variant): loss = −exp(f_w) + ½·exp(2·f_l).

    ∂/∂f_w = −e^{f_w}, ∂/∂f_l = e^{2 f_l}. Unbounded below by design.
    """

    name = "dil_lsif"

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        clamped = []
        losses = (-self.exp(logps.f_chosen, 1.0, "chosen", clamped)
                  + 0.5 * self.exp(logps.f_rejected, 2.0, "rejected", clamped))
        return self.pair_terms(logps, losses, clamped)


class DilBce(_DilLoss):
    """DIL-BCE: loss = −log σ(f_w) − log σ(−f_l) = softplus(−f_w) + softplus(f_l).

    ∂/∂f_w = −σ(−f_w), ∂/∂f_l = σ(f_l).
    """

    name = "dil_bce"

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        losses = F.softplus(-logps.f_chosen) + F.softplus(logps.f_rejected)
        return self.pair_terms(logps, losses, None)


class DilUkl(_DilLoss):
    """DIL-UKL (unnormalised KL): loss = −f_w + exp(f_l).

    ∂/∂f_w = −1, ∂/∂f_l = e^{f_l}. The released code used −ℓ_w instead of −f_w: same gradient, loss shifted by ℓ^ref_w.
    """

    name = "dil_ukl"

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        clamped = []
        losses = -logps.f_chosen + self.exp(logps.f_rejected, 1.0, "rejected", clamped)
        return self.pair_terms(logps, losses, clamped)
