"""LoRA on Megatron-Core: TP-sharded adapters (``layers``), applying/merging them (``apply``), PEFT export
(``export``)."""
from megatron_dil.lora.apply import (adapters, apply_lora, base_model, load_trainable_state_dict, merged,
                                     trainable_state_dict)
from megatron_dil.lora.config import LoRAConfig

__all__ = ["LoRAConfig", "adapters", "apply_lora", "base_model", "load_trainable_state_dict", "merged",
           "trainable_state_dict"]
