"""Hugging Face ``config.json`` ↔ ``ModelConfig`` for LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM and the mixture-of-experts Qwen3MoeForCausalLM and MixtralForCausalLM.

Reads both the transformers-5 form (``rope_parameters``) and the older one (``rope_theta`` + ``rope_scaling``).
Anything Megatron-Core cannot reproduce exactly is refused with a ``ConversionError`` naming the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_dil.models.config import ModelConfig

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                           "mixtral": "MixtralForCausalLM"}
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")
REQUIRED_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
# Megatron-Core's Llama-3 RoPE scaling hard-codes these three values (only ``factor`` is configurable).
LLAMA3_FIXED_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


CAUSAL_LM, SEQUENCE_CLASSIFICATION = "ForCausalLM", "ForSequenceClassification"


class ConversionError(ValueError):
    """The checkpoint or request cannot be converted; the message names the file, tensor, field or flag."""


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def architecture_of(hf: dict[str, Any]) -> str:
    """The model type (a key of ``SUPPORTED_ARCHITECTURES``), refusing anything else."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    supported = sorted(SUPPORTED_ARCHITECTURES.values())
    if architectures:
        causal = architectures[0].replace(SEQUENCE_CLASSIFICATION, CAUSAL_LM) if len(architectures) == 1 else None
        if causal not in SUPPORTED_ARCHITECTURES.values():
            raise ConversionError(f"config.json architectures={architectures} is not supported; supported: {supported} "
                                  f"(and their *{SEQUENCE_CLASSIFICATION} reward models)")
        return next(t for t, a in SUPPORTED_ARCHITECTURES.items() if a == causal)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"config.json model_type={model_type!r} is not supported; supported: {supported}")
    return model_type


def head_of(hf: dict[str, Any]) -> str:
    """"reward" for a *ForSequenceClassification config with one label (a reward model), "lm" for *ForCausalLM."""
    architectures = hf.get("architectures") or []
    if not (architectures and architectures[0].endswith(SEQUENCE_CLASSIFICATION)):
        return "lm"
    labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
    if labels != 1:
        raise ConversionError(f"config.json {architectures[0]} has {labels} labels; a reward model has num_labels 1")
    return "reward"


def sequence_classification_config(config: dict[str, Any], pad_token_id: int | None) -> dict[str, Any]:
    """The HF config of a reward model: *ForSequenceClassification with one label and ``pad_token_id`` set. HF pools
    the score at the last token that is not ``pad_token_id``; training pools at the last real token (an EOS for
    tokenized rows), so the pad id must differ from the EOS id."""
    if pad_token_id is None or pad_token_id == config.get("eos_token_id"):
        what = "no pad token" if pad_token_id is None else f"pad_token_id {pad_token_id} = eos_token_id"
        raise ConversionError(f"the reward model's tokenizer has {what}: Hugging Face would pool the score at another "
                              f"token than training; pass --pad-token-id ID (an id that never ends a sequence)")
    arch = config["architectures"][0].replace(CAUSAL_LM, SEQUENCE_CLASSIFICATION)
    return {**config, "architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id}


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling dict or None) from either config form."""
    params = hf.get("rope_parameters")
    if params is not None:
        scaling = None if params.get("rope_type", "default") == "default" else params
        return float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), scaling
    return float(hf.get("rope_theta", 10000.0)), hf.get("rope_scaling")


def _integer(hf: dict[str, Any], field: str, required: bool) -> int | None:
    """A positive integer size field, never rounded: a missing required one, a float such as 32.5, a string or a
    non-positive value is refused naming the field."""
    value = hf.get(field)
    if value is None:
        if required:
            raise ConversionError(f"config.json has no {field}; a {sorted(SUPPORTED_ARCHITECTURES.values())} "
                                  f"config needs {list(REQUIRED_SIZES)}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json {field}={value!r} is not a positive integer")
    return value


def _require(hf: dict[str, Any], field: str, expected: Any, why: str) -> None:
    if hf.get(field, expected) != expected:
        raise ConversionError(f"config.json {field}={hf[field]!r} is not supported ({why}); expected {expected!r}")


def model_config_from_hf(hf: dict[str, Any], make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The ``ModelConfig`` of a supported HF decoder config (refusing features Megatron-Core would compute differently)."""
    arch = architecture_of(hf)
    _require(hf, "hidden_act", "silu", "the Megatron model uses SwiGLU")
    if arch != "qwen2":
        _require(hf, "attention_bias", False, "a Llama o_proj bias has no Megatron counterpart")
    _require(hf, "mlp_bias", False, "the Megatron model has no MLP biases")
    _require(hf, "pretraining_tp", 1, "only the exact (non-sliced) Llama computation is supported")
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        _require(hf, "use_sliding_window", False, "Qwen's per-layer sliding window is not implemented")
    moe = _moe_fields(hf, arch) if arch in MOE_ARCHITECTURES else {}
    theta, scaling = _rope(hf)
    rope_factor = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConversionError(f"config.json rope scaling type {kind!r} is not supported (only 'llama3')")
        for field, value in LLAMA3_FIXED_ROPE_SCALING.items():
            if float(scaling.get(field, value)) != value:
                raise ConversionError(f"config.json llama3 rope scaling {field}={scaling[field]} is not supported: "
                                      f"Megatron-Core implements only {LLAMA3_FIXED_ROPE_SCALING}")
        if not isinstance(scaling.get("factor"), (int, float)):
            raise ConversionError(f"config.json llama3 rope scaling needs a numeric factor, not "
                                  f"{scaling.get('factor')!r}")
        rope_factor = float(scaling["factor"])
    sizes = {name: _integer(hf, name, required=True) for name in REQUIRED_SIZES}
    optional = {name: _integer(hf, name, required=False) for name in OPTIONAL_SIZES}
    heads = sizes["num_attention_heads"]
    try:
        model = ModelConfig(
            num_layers=sizes["num_hidden_layers"],
            hidden_size=sizes["hidden_size"],
            ffn_hidden_size=sizes["intermediate_size"],
            num_attention_heads=heads,
            vocab_size=sizes["vocab_size"],
            num_query_groups=optional["num_key_value_heads"] or heads,
            kv_channels=optional["head_dim"] or sizes["hidden_size"] // heads,
            max_position_embeddings=optional["max_position_embeddings"] or 4096,
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            rotary_base=theta,
            rope_scaling_factor=rope_factor,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            qk_layernorm=arch in ("qwen3", "qwen3_moe"),
            sliding_window=optional["sliding_window"] if arch in ("mistral", "mixtral") else None,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            init_method_std=float(hf.get("initializer_range", 0.02)),
            head=head_of(hf),
            **moe,
        )
    except ValueError as err:  # ModelConfig's own checks (e.g. heads not a multiple of key/value heads)
        raise ConversionError(f"config.json: {err}") from None
    return model


def _moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """MoE ``ModelConfig`` fields: every layer sparse, no shared expert, routing Megatron reproduces exactly."""
    if arch == "qwen3_moe":
        _require(hf, "decoder_sparse_step", 1, "every layer must be a mixture-of-experts layer")
        _require(hf, "mlp_only_layers", [], "every layer must be a mixture-of-experts layer")
    else:
        _require(hf, "router_jitter_noise", 0.0, "Megatron-Core has no multiplicative router jitter")
    return dict(
        num_moe_experts=_integer(hf, "num_experts", False) or _integer(hf, "num_local_experts", False)
        or (128 if arch == "qwen3_moe" else 8),
        moe_ffn_hidden_size=_integer(hf, "moe_intermediate_size" if arch == "qwen3_moe" else "intermediate_size", True),
        moe_router_topk=_integer(hf, "num_experts_per_tok", False) or 2,
        moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if arch == "qwen3_moe" else True,
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def hf_config_from_model(model: ModelConfig, dtype: str) -> dict[str, Any]:
    """A transformers-5 ``config.json`` for a ``ModelConfig`` (Qwen3 when it has QK-norm, Qwen2 when it has QKV bias,
    Mistral with a sliding window, Llama otherwise)."""
    if model.qk_layernorm and model.qkv_bias:
        raise ConversionError("no Hugging Face architecture has both QK-norm and QKV bias (qk_layernorm, qkv_bias)")
    if model.is_moe:
        arch = "qwen3_moe" if model.qk_layernorm else "mixtral"
        if model.qkv_bias or (arch == "mixtral" and not model.moe_norm_topk_prob):
            raise ConversionError(f"no Hugging Face MoE architecture matches this model (qkv_bias={model.qkv_bias}, "
                                  f"moe_norm_topk_prob={model.moe_norm_topk_prob}, qk_layernorm=False)")
    else:
        arch = ("qwen3" if model.qk_layernorm else "qwen2" if model.qkv_bias else
                "mistral" if model.sliding_window is not None else "llama")
    rope: dict[str, Any] = {"rope_theta": model.rotary_base, "rope_type": "default"}
    if model.rope_scaling_factor is not None:
        rope = {**rope, "rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_FIXED_ROPE_SCALING}
    config: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_parameters": rope,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_method_std,
        "attention_dropout": 0.0,
        "dtype": dtype,
    }
    if arch in ("llama", "qwen3", "qwen3_moe"):
        config.update(attention_bias=False)
    if arch == "llama":
        config.update(mlp_bias=False)
    if arch in ("mistral", "mixtral"):
        config["sliding_window"] = model.sliding_window
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        config.update(use_sliding_window=False, sliding_window=None)
    if arch == "qwen3_moe":
        config.update(num_experts=model.num_moe_experts, moe_intermediate_size=model.expert_ffn_hidden_size,
                      norm_topk_prob=model.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "mixtral":
        config.update(num_local_experts=model.num_moe_experts, intermediate_size=model.expert_ffn_hidden_size,
                      router_jitter_noise=0.0)
    if model.is_moe:
        config.update(num_experts_per_tok=model.moe_router_topk, router_aux_loss_coef=model.moe_aux_loss_coeff)
    return config


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal in every field that changes the computed function (padding divisor and init/dropout excluded)."""
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size", "query_groups",
              "head_dim", "norm_epsilon", "rotary_base", "rope_scaling_factor", "tie_embeddings", "qkv_bias",
              "qk_layernorm", "sliding_window", "max_position_embeddings", "num_moe_experts", "expert_ffn_hidden_size",
              "moe_router_topk", "moe_norm_topk_prob")
    return all(getattr(a, f) == getattr(b, f) for f in fields)
