"""Reference-free losses: CPO, SimPO, ORPO and SFT (they accept reference=None).

NLL(y_w) = −ℓ̄_w, the token-mean negative log-likelihood of the chosen response.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_dil.losses.base import PairTerms, PreferenceLoss, ReducedLogProbs, neg_log_sigmoid


class Cpo(PreferenceLoss):
    """CPO (Xu et al. 2024): −(1−ε)·log σ(β(ℓ_w − ℓ_l)) − ε·log σ(−β(ℓ_w − ℓ_l)) + α·NLL(y_w); rewards β·ℓ (TRL).

    NLL is the per-pair token mean (TRL averages tokens over the whole batch instead).
    """

    name = "cpo"
    needs_reference = False
    default_logps = "sum"
    default_beta = 0.1
    hyperparameters = ("label_smoothing", "cpo_alpha")

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        preference = neg_log_sigmoid(self.beta * (logps.chosen - logps.rejected), self.cfg.label_smoothing)
        losses = preference + self.cfg.cpo_alpha * -logps.chosen_token_mean
        return PairTerms(losses, self.beta * logps.chosen, self.beta * logps.rejected)


class SimPo(PreferenceLoss):
    """SimPO (Meng et al. 2024): −(1−ε)·log σ(β(ℓ̄_w − ℓ̄_l) − γ) − ε·log σ(−β(ℓ̄_w − ℓ̄_l) + γ), γ = ratio·β;
    rewards β·ℓ̄."""

    name = "simpo"
    needs_reference = False
    default_logps = "avg"
    default_beta = 2.0
    hyperparameters = ("label_smoothing", "simpo_gamma_beta_ratio")

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        gamma = self.cfg.simpo_gamma_beta_ratio * self.beta
        losses = neg_log_sigmoid(self.beta * (logps.chosen - logps.rejected) - gamma, self.cfg.label_smoothing)
        return PairTerms(losses, self.beta * logps.chosen, self.beta * logps.rejected)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    near_zero = x > -math.log(2.0)
    upper = torch.where(near_zero, x, torch.full_like(x, -1.0))
    lower = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(upper)), torch.log1p(-torch.exp(lower)))


class Orpo(PreferenceLoss):
    """ORPO (Hong et al. 2024): NLL(y_w) − λ·log σ(log odds_w − log odds_l), log odds = ℓ̄ − log(1 − exp(ℓ̄)) (ℓ̄ < 0);
    rewards λ·ℓ̄ (TRL). Extra metric orpo/log_odds_ratio."""

    name = "orpo"
    needs_reference = False
    default_logps = "avg"
    hyperparameters = ("orpo_lambda",)

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        log_odds_ratio = (logps.chosen - log1mexp(logps.chosen)) - (logps.rejected - log1mexp(logps.rejected))
        losses = -logps.chosen_token_mean + self.cfg.orpo_lambda * neg_log_sigmoid(log_odds_ratio)
        lam = self.cfg.orpo_lambda
        return PairTerms(losses, lam * logps.chosen, lam * logps.rejected, {"orpo/log_odds_ratio": log_odds_ratio})


class Sft(PreferenceLoss):
    """SFT: NLL(y_w) = −ℓ_w (token mean by default, summed with logps="sum"); rewards ℓ_w, ℓ_l (no β)."""

    name = "sft"
    needs_reference = False
    default_logps = "avg"

    def pair_losses(self, logps: ReducedLogProbs) -> PairTerms:
        return PairTerms(-logps.chosen, logps.chosen, logps.rejected)
