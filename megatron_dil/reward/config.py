"""The run config's ``reward:`` section: train a reward model (Bradley–Terry) instead of a policy."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardConfig:
    """Present in a run config = the run trains a reward model r(x, y) ∈ ℝ on preference pairs.

    Per pair the loss is  −log σ(r_w − r_l − margin) + center_rewards_coefficient · (r_w + r_l)²
    (TRL RewardTrainer's centring term, which pins the rewards' mean near 0). ``init.checkpoint`` is a policy/SFT
    checkpoint (its trunk; the head is new, drawn from N(0, head_init_std²) with the run seed, the same on every
    layout) or a reward checkpoint (trunk and head). After training, the mean and standard deviation of r on
    ``normalize_on`` (a dataset prefix: its chosen responses, e.g. a demonstrations dataset; None = the chosen side of
    the train set) are stored with ``final/`` (the paper's normalisation); scoring reports (r − mean) / std as well.
    """

    margin: float = 0.0
    center_rewards_coefficient: float = 0.0
    head_init_std: float | None = None  # None: 1/sqrt(hidden_size + 1), as the IRL paper's reward head
    normalize_on: str | None = None
    normalize_max_pairs: int | None = None  # cap on the sequences the statistics read; None = the whole dataset

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
        if self.head_init_std is not None and not self.head_init_std > 0:
            raise ValueError(f"head_init_std must be > 0, got {self.head_init_std}")
        if self.normalize_max_pairs is not None and self.normalize_max_pairs < 1:
            raise ValueError(f"normalize_max_pairs must be >= 1, got {self.normalize_max_pairs}")
