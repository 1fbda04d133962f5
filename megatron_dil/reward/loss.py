"""Pooling per-position rewards to one scalar per sequence, and the Bradley–Terry loss.

The model's output on the last pipeline stage is [rows, S, 1]: r_t for every position. A sequence's reward is r at
its LAST REAL TOKEN: the largest position p with ``sequence_index[p] = j`` (``data.collator`` numbers the sequences of
a micro-batch 0..2n−1 and marks padding −1), so one rule serves right-padded rows, first-fit packed rows (``mask``)
and single-row ``thd`` packing alike. With causal attention, r there is a function of the whole sequence and
nothing after it.

Bradley–Terry: P(y_w ≻ y_l | x) = σ(r_w − r_l); per pair

    loss = −log σ(r_w − r_l − m) + c · (r_w + r_l)²

with margin m ≥ 0 and TRL's centring coefficient c (``reward:`` config). Metrics carry the names of every other loss
(``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``loss``), with r itself as
the reward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_dil.data.collator import PreferenceBatch
from megatron_dil.losses.base import LossOutput
from megatron_dil.reward.config import RewardConfig


@dataclass
class PairRewards:
    """Per-pair rewards (fp32) of the chosen and the rejected sequences."""

    chosen: Tensor
    rejected: Tensor


def sequence_rewards(outputs: Tensor, sequence_index: Tensor, num_sequences: int) -> Tensor:
    """[num_sequences] fp32: ``outputs`` [rows, S, 1] (or [rows, S]) read at each sequence's last position.
    Differentiable in ``outputs``; a sequence absent from ``sequence_index`` is an error."""
    flat = outputs.reshape(-1).float()
    index = sequence_index.reshape(-1).long()
    if flat.shape != index.shape:
        raise ValueError(f"rewards of {flat.numel()} positions but sequence_index of {index.numel()}")
    positions = torch.arange(index.numel(), device=index.device)
    last = torch.full((num_sequences,), -1, dtype=torch.long, device=index.device)
    valid = index >= 0
    last = last.scatter_reduce(0, index[valid], positions[valid], reduce="amax")
    if bool((last < 0).any()):
        missing = torch.nonzero(last < 0).flatten().tolist()[:4]
        raise ValueError(f"sequences {missing} have no position in the batch")
    return flat[last]


def pair_rewards(outputs: Tensor, batch: PreferenceBatch, setup=None) -> PairRewards:
    """Chosen and rejected rewards of a micro-batch (``setup`` unused: the signature of ``step.pair_logprobs``)."""
    n = batch.num_pairs
    rewards = sequence_rewards(outputs, batch.sequence_index, 2 * n)
    return PairRewards(chosen=rewards[:n], rejected=rewards[n:])


class BradleyTerryLoss:
    """The reward model's objective; called like a ``PreferenceLoss`` (``loss(rewards, None) -> LossOutput``)."""

    name: ClassVar[str] = "bradley_terry"
    needs_reference: ClassVar[bool] = False

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg

    def __call__(self, rewards: PairRewards, reference=None) -> LossOutput:
        chosen, rejected = rewards.chosen, rewards.rejected
        losses = F.softplus(-(chosen - rejected - self.cfg.margin))  # −log σ(r_w − r_l − m)
        if self.cfg.center_rewards_coefficient:
            losses = losses + self.cfg.center_rewards_coefficient * (chosen + rejected) ** 2
        c, r = chosen.detach(), rejected.detach()
        metrics = {"loss": losses.detach(), "rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
                   "rewards/accuracies": (c > r).float()}
        return LossOutput(losses=losses, metrics=metrics)
