"""Reward models on Megatron-Core (the IRL route): a scalar head on the decoder's last hidden state, the
Bradley–Terry objective, normalisation on demonstrations, scoring and Hugging Face export (see the README)."""
from megatron_dil.reward.config import RewardConfig
from megatron_dil.reward.head import RewardHead, attach_reward_heads
from megatron_dil.reward.loss import BradleyTerryLoss, PairRewards, pair_rewards, sequence_rewards

__all__ = ["BradleyTerryLoss", "PairRewards", "RewardConfig", "RewardHead", "attach_reward_heads", "pair_rewards",
           "sequence_rewards"]
