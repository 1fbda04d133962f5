"""One model config for Llama-2/3, Mistral, Qwen2 and Qwen3-style decoders, and the named presets.

All of these are the same pre-norm decoder: RMSNorm(eps) → attention with RoPE(theta[, Llama-3 scaling]) and GQA
(``num_query_groups`` key/value heads) → RMSNorm → SwiGLU MLP (silu(x W_gate) ⊙ x W_up) W_down; they differ only in
the numbers below, QKV bias (Qwen2), per-head QK RMSNorm (Qwen3), tied embeddings and Mistral's sliding window.

Mixture of experts (Qwen3-MoE, Mixtral), when ``num_moe_experts`` is set: every layer's MLP is E SwiGLU experts of
width ``moe_ffn_hidden_size`` and a router W_r [E, H]. Per token, p = softmax(x W_rᵀ) over all experts; the top
``moe_router_topk`` experts are kept and, with ``moe_norm_topk_prob``, their weights renormalised to sum to 1 (Mixtral
always, Qwen3 by ``norm_topk_prob``); the output is Σ_k p_k · expert_k(x). The load-balancing loss
E · Σ_e f_e · P̄_e (f_e = fraction of routed token slots that went to e, P̄_e = mean router probability of e) enters
the gradient with ``moe_aux_loss_coeff``; ``moe_z_loss_coeff`` adds mean (logsumexp x W_rᵀ)². Neither changes the
forward output, so log-probs and the preference loss are the same with or without them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


HEADS = ("lm", "reward")


@dataclass
class ModelConfig:
    """Decoder architecture. ``vocab_size`` is the tokenizer's real size; Megatron pads it (see ``padded_vocab_size``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    num_query_groups: int | None = None  # key/value heads (HF num_key_value_heads); None = one per attention head
    kv_channels: int | None = None  # head dim (HF head_dim); None = hidden_size / num_attention_heads
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3.x RoPE scaling (low 1, high 4, original 8192) when set
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False  # Qwen3: RMSNorm over each query/key head (weights [head_dim]) before RoPE
    sliding_window: int | None = None  # Mistral: a query attends to this many keys, itself included (as HF)
    num_moe_experts: int | None = None  # MoE: experts per layer (HF num_experts / num_local_experts); None = dense
    moe_ffn_hidden_size: int | None = None  # expert width (HF moe_intermediate_size; Mixtral intermediate_size)
    moe_router_topk: int = 2  # experts per token (HF num_experts_per_tok)
    moe_norm_topk_prob: bool = True  # renormalise the top-k probabilities (HF norm_topk_prob; Mixtral: always)
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss weight (HF router_aux_loss_coef)
    moe_z_loss_coeff: float | None = None  # router z-loss weight; None = off
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    head: str = "lm"  # "lm": logits over the vocabulary (a policy); "reward": one scalar per sequence (megatron_dil.reward)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        groups = self.query_groups
        if self.num_attention_heads % groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_query_groups ({groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                             f"({self.num_attention_heads}); set kv_channels")
        if self.num_moe_experts is not None and not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ValueError(f"moe_router_topk ({self.moe_router_topk}) must be in [1, num_moe_experts "
                             f"({self.num_moe_experts})]")

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """Megatron's padding: round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by × TP``."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the unpadded model (used for MFU: 6·N·tokens)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads + 2 * self.query_groups) + self.num_attention_heads * d * h
        if self.qkv_bias:
            attn += d * (self.num_attention_heads + 2 * self.query_groups)
        if self.qk_layernorm:
            attn += 2 * d
        mlp = 3 * h * self.ffn_hidden_size
        if self.is_moe:  # every expert counts (MFU from the active ones: see ``active_parameters``)
            mlp = self.num_moe_experts * 3 * h * self.expert_ffn_hidden_size + self.num_moe_experts * h
        per_layer = attn + mlp + 2 * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    def active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters one token passes through: the router and top-k experts instead of all experts."""
        if not self.is_moe:
            return self.num_parameters(include_embeddings)
        idle = (self.num_moe_experts - self.moe_router_topk) * 3 * self.hidden_size * self.expert_ffn_hidden_size
        return self.num_parameters(include_embeddings) - self.num_layers * idle

    @classmethod
    def presets(cls) -> dict[str, "ModelConfig"]:
        return dict(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # CPU tests and the quick start: sized for the bundled tiny tokenizer (examples/tiny).
    "tiny": ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                        vocab_size=47, max_position_embeddings=64, norm_epsilon=1e-5, rotary_base=10000.0,
                        make_vocab_size_divisible_by=32),
    "llama3-8b": ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                             num_query_groups=8, vocab_size=128256, max_position_embeddings=8192, norm_epsilon=1e-5,
                             rotary_base=500000.0),
    "llama3.2-1b": ModelConfig(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                               num_query_groups=8, kv_channels=64, vocab_size=128256, max_position_embeddings=131072,
                               norm_epsilon=1e-5, rotary_base=500000.0, rope_scaling_factor=32.0, tie_embeddings=True),
    "mistral-7b": ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                              num_query_groups=8, vocab_size=32000, max_position_embeddings=32768, norm_epsilon=1e-5,
                              rotary_base=10000.0, sliding_window=4096),
    "qwen3-0.6b": ModelConfig(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                              num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                              norm_epsilon=1e-6, rotary_base=1000000.0, tie_embeddings=True, qk_layernorm=True),
    "qwen3-8b": ModelConfig(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                            num_query_groups=8, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                            norm_epsilon=1e-6, rotary_base=1000000.0, qk_layernorm=True),
    "qwen3-30b-a3b": ModelConfig(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
                                 num_query_groups=4, kv_channels=128, vocab_size=151936, max_position_embeddings=40960,
                                 norm_epsilon=1e-6, rotary_base=1000000.0, qk_layernorm=True, num_moe_experts=128,
                                 moe_ffn_hidden_size=768, moe_router_topk=8, moe_aux_loss_coeff=0.001),
    "mixtral-8x7b": ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                                num_query_groups=8, vocab_size=32000, max_position_embeddings=32768, norm_epsilon=1e-5,
                                rotary_base=1000000.0, num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=0.02),
    "qwen2.5-0.5b": ModelConfig(num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14,
                                num_query_groups=2, kv_channels=64, vocab_size=151936, max_position_embeddings=32768,
                                norm_epsilon=1e-6, rotary_base=1000000.0, tie_embeddings=True, qkv_bias=True),
}
