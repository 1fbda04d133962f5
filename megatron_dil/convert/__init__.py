"""Hugging Face ↔ Megatron-Core checkpoint conversion with tensor/pipeline resharding, and the checkpoint format."""
from megatron_dil.convert.checkpoint import (CheckpointMismatchError, MegatronCheckpoint, is_megatron_checkpoint,
                                             load_megatron_checkpoint, save_megatron_checkpoint)
from megatron_dil.convert.hf_config import ConversionError, hf_config_from_model, model_config_from_hf
from megatron_dil.convert.hf_to_megatron import ConversionSummary, hf_to_megatron
from megatron_dil.convert.megatron_to_hf import megatron_to_hf

__all__ = ["CheckpointMismatchError", "ConversionError", "ConversionSummary", "MegatronCheckpoint",
           "hf_config_from_model", "hf_to_megatron", "is_megatron_checkpoint", "load_megatron_checkpoint",
           "megatron_to_hf", "model_config_from_hf", "save_megatron_checkpoint"]
