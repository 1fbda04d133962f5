"""The ``lora:`` section of a run config (absent = full-parameter training)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dil.config import at_least
from megatron_dil.models.config import ModelConfig

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters ΔW = (α/r)·B·A on Megatron linears named in ``targets``; only A and B train.

    ``final``: what ``OUTPUT_DIR/final`` holds at the end — ``merged`` (a normal megatron_dil checkpoint with
    W + ΔW, exportable to HF) or ``adapters`` (the adapters alone, ``megatron-dil-megatron-to-hf --adapter-only``
    turns them into a PEFT directory).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    final: str = "merged"  # merged | adapters

    def __post_init__(self) -> None:
        at_least(self, 1, "rank")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {list(TARGETS)}, got {self.targets}")
        if self.final not in ("merged", "adapters"):
            raise ValueError(f"final must be merged or adapters, not {self.final!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def num_parameters(self, model: ModelConfig) -> int:
        """Trainable adapter parameters, r·(in + out) per adapted linear: QKV [h → (nh + 2·ng)·d], proj [nh·d → h],
        fc1 [h → 2F], fc2 [F → h], on every layer."""
        h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
        heads = model.num_attention_heads
        sizes = {"linear_qkv": h + (heads + 2 * model.query_groups) * d, "linear_proj": heads * d + h,
                 "linear_fc1": h + 2 * f, "linear_fc2": f + h}
        return self.rank * model.num_layers * sum(sizes[t] for t in self.targets)
