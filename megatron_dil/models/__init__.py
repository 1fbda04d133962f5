"""Model configs, presets and the Megatron-Core GPTModel builder."""
from megatron_dil.models.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig"]
