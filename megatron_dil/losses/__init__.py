"""Preference losses (DIL and the DPO family), their metrics and numerics guards."""
from megatron_dil.losses.base import LossOutput, PairLogProbs, PreferenceLoss
from megatron_dil.losses.config import LossConfig
from megatron_dil.losses.metrics import MetricAccumulator
from megatron_dil.losses.numerics import EXP_EXPONENT_LIMIT, assert_finite, find_nonfinite
from megatron_dil.losses.registry import LOSSES, build_loss

__all__ = ["EXP_EXPONENT_LIMIT", "LOSSES", "LossConfig", "LossOutput", "MetricAccumulator", "PairLogProbs",
           "PreferenceLoss", "assert_finite", "build_loss", "find_nonfinite"]
