"""megatron_dil: preference alignment (DIL and the DPO family) on Megatron-Core with TP/PP/DP."""

__version__ = "0.1.0"
