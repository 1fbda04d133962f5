"""Configuration of the preference loss (the run config's ``loss:`` section)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossConfig:
    """Which preference loss to train with and its hyperparameters; ``None`` means the loss's literature default.

    Fields that a loss does not read must stay at their defaults (``build_loss`` rejects them otherwise), so a typo'd
    hyperparameter never passes silently.
    """

    name: str = "dil_lsif"
    """Registered loss name (see ``megatron_dil.losses.LOSSES``)."""
    beta: float | None = None
    """Inverse temperature β; None → the loss's default (DPO/IPO/SLiC/KTO/f-DPO/CPO 0.1, SimPO 2.0). DIL, ORPO and SFT
    take no β."""
    logps: str | None = None
    """Sequence log-prob reduction, "avg" (token mean) or "sum"; None → the loss's default (DIL, IPO, SimPO, ORPO, SFT
    avg; DPO, SLiC, KTO, f-DPO, CPO sum). NLL terms (SFT term, CPO, ORPO) are always token means."""
    label_smoothing: float = 0.0
    """ε of conservative DPO: −(1−ε)·log σ(x) − ε·log σ(−x); DPO, CPO and SimPO only, 0 ≤ ε < 0.5."""
    simpo_gamma_beta_ratio: float = 0.5
    """SimPO target margin γ as a multiple of β (γ = ratio·β)."""
    fdpo_divergence: str = "reverse_kl"
    """f-DPO divergence: "reverse_kl" (= DPO), "forward_kl", "js" or "alpha"."""
    fdpo_alpha: float = 0.5
    """α of the f-DPO α-divergence (used when fdpo_divergence = "alpha"), α > 0."""
    cpo_alpha: float = 1.0
    """Weight of CPO's NLL term on the chosen response."""
    orpo_lambda: float = 0.1
    """λ of ORPO's odds-ratio term."""
    sft_weight: float = 0.0
    """Weight of an extra NLL (token-mean, chosen response) term added to any loss; 0 disables it."""
    overflow: str = "raise"
    """An exp() whose exponent exceeds numerics.EXP_EXPONENT_LIMIT: "raise" (FloatingPointError naming loss, side and
    f) or "report" (clamp the exponent, zero gradient beyond it, count pairs in metric numerics/exp_clamped)."""
