"""How each weight maps between Hugging Face names and Megatron-Core tensor-parallel shards.

Megatron names here are the *canonical* ones stored in checkpoints: local-spec keys with GLOBAL layer indices.
With TP size t, rank r, nh heads, ng query groups, head dim d, hidden H, FFN F, vocab V padded to Vp:

| Megatron key (layer i)                   | HF key (model.layers.i.)          | rank r's shard                              |
|------------------------------------------|-----------------------------------|---------------------------------------------|
| input_layernorm.weight                   | input_layernorm.weight            | replicated                                  |
| self_attention.linear_qkv.{weight,bias}  | self_attn.{q,k,v}_proj.{..}       | groups g ∈ [r·ng/t, (r+1)·ng/t), each as    |
|                                          |                                   | [q heads of g (nh/ng·d rows); k_g (d); v_g (d)] |
| self_attention.{q,k}_layernorm.weight    | self_attn.{q,k}_norm.weight       | replicated (Qwen3 QK-norm, [d])             |
| self_attention.linear_proj.weight        | self_attn.o_proj.weight           | columns [r·nh·d/t, (r+1)·nh·d/t)            |
| pre_mlp_layernorm.weight                 | post_attention_layernorm.weight   | replicated                                  |
| mlp.linear_fc1.weight                    | mlp.{gate,up}_proj.weight         | [gate rows r·F/t..; up rows r·F/t..]        |
| mlp.linear_fc2.weight                    | mlp.down_proj.weight              | columns [r·F/t, (r+1)·F/t)                  |
| embedding.word_embeddings.weight         | model.embed_tokens.weight         | rows [r·Vp/t, (r+1)·Vp/t), rows ≥ V zero    |
| decoder.final_layernorm.weight           | model.norm.weight                 | replicated                                  |
| output_layer.weight (untied only)        | lm_head.weight                    | as the embedding                            |

Every mapping is slicing and concatenation only, so a round trip is bit-exact.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_dil.convert.hf_config import ConversionError
from megatron_dil.models.config import ModelConfig

EMBEDDING, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
_GLOBAL = {EMBEDDING: ("model.embed_tokens.weight", "vocab"), FINAL_NORM: ("model.norm.weight", "replicated"),
           OUTPUT: ("lm_head.weight", "vocab")}
_LAYER = {  # Megatron suffix -> (HF suffix, kind); fused tensors list their HF parts
    "input_layernorm.weight": ("input_layernorm.weight", "replicated"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", "replicated"),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", "replicated"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", "column"),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", "replicated"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", "column"),
}
_QKV = {"self_attention.linear_qkv.weight": "weight", "self_attention.linear_qkv.bias": "bias"}
_FC1 = "mlp.linear_fc1.weight"
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

HFRead = Callable[[str, int, int | None, int | None], torch.Tensor]  # (key, dim, start, stop) -> slice
ShardRead = Callable[[str, int], torch.Tensor]  # (canonical Megatron key, tp rank) -> shard


@dataclass(frozen=True)
class TensorParallelLayout:
    model: ModelConfig
    tensor_parallel: int

    def __post_init__(self) -> None:
        m, t = self.model, self.tensor_parallel
        for name, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.query_groups),
                            ("ffn_hidden_size", m.ffn_hidden_size)):
            if t < 1 or value % t:
                raise ConversionError(f"tensor_parallel={t} does not divide {name}={value}")

    @property
    def padded_vocab(self) -> int:
        return self.model.padded_vocab_size(self.tensor_parallel)


def validate_pipeline(model: ModelConfig, pipeline_parallel: int) -> None:
    if pipeline_parallel < 1 or model.num_layers % pipeline_parallel:
        raise ConversionError(f"pipeline_parallel={pipeline_parallel} does not divide num_layers={model.num_layers}")


def canonical_key(local_key: str, global_layer_of: dict[int, int]) -> str:
    """A model chunk's state-dict key (local or TE spec, stage-local layer index) as its canonical checkpoint key."""
    match = _LAYER_KEY.match(local_key)
    if not match:
        return local_key
    suffix = _TE_NAMES.get(match.group(2), match.group(2))
    return f"decoder.layers.{global_layer_of[int(match.group(1))]}.{suffix}"


def megatron_keys(model: ModelConfig, layers: range, first_stage: bool, last_stage: bool) -> list[str]:
    """Canonical keys held by a pipeline stage owning ``layers`` (the tied output layer is the embedding)."""
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    per_layer += ["self_attention.linear_qkv.bias"] if model.qkv_bias else []
    if model.qk_layernorm:
        per_layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    per_layer += ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", _FC1, "mlp.linear_fc2.weight"]
    keys = [EMBEDDING] if first_stage else []
    keys += [f"decoder.layers.{i}.{s}" for i in layers for s in per_layer]
    if last_stage:
        keys += [FINAL_NORM] + ([] if model.tie_embeddings else [OUTPUT])
    return keys


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model with its shape (``lm_head`` only when untied)."""
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    nh, ng = model.num_attention_heads, model.query_groups
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h)}
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (nh * d, h),
                       p + "self_attn.k_proj.weight": (ng * d, h), p + "self_attn.v_proj.weight": (ng * d, h)})
        if model.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (nh * d,), p + "self_attn.k_proj.bias": (ng * d,),
                           p + "self_attn.v_proj.bias": (ng * d,)})
        if model.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        shapes.update({p + "self_attn.o_proj.weight": (h, nh * d), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    return shapes


def megatron_shard_shape(key: str, layout: TensorParallelLayout) -> tuple[int, ...]:
    """Shape of rank r's shard of canonical ``key`` (the same on every rank)."""
    m, t = layout.model, layout.tensor_parallel
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    qkv_rows = (m.num_attention_heads + 2 * m.query_groups) * d // t
    if key in (EMBEDDING, OUTPUT):
        return (layout.padded_vocab // t, h)
    match = _LAYER_KEY.match(key)
    suffix = match.group(2) if match else key
    return {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,), FINAL_NORM: (h,),
            "self_attention.q_layernorm.weight": (d,), "self_attention.k_layernorm.weight": (d,),
            "self_attention.linear_qkv.weight": (qkv_rows, h), "self_attention.linear_qkv.bias": (qkv_rows,),
            "self_attention.linear_proj.weight": (h, m.num_attention_heads * d // t),
            _FC1: (2 * f // t, h), "mlp.linear_fc2.weight": (h, f // t)}[suffix]


def _split(key: str) -> tuple[str, str]:
    """(HF prefix, Megatron suffix) of a canonical key."""
    match = _LAYER_KEY.match(key)
    if not match:
        raise KeyError(key)
    return f"model.layers.{match.group(1)}.", match.group(2)


def _vocab_rows(layout: TensorParallelLayout, rank: int) -> tuple[int, int, int]:
    """(start, stop of real rows, shard rows) of rank's vocabulary slice."""
    rows = layout.padded_vocab // layout.tensor_parallel
    start = rank * rows
    return start, min(start + rows, layout.model.vocab_size), rows


def megatron_shard(key: str, read: HFRead, layout: TensorParallelLayout, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of canonical ``key``, reading only the needed slices of the HF tensors."""
    m, t = layout.model, layout.tensor_parallel
    if key in _GLOBAL:
        hf_key, kind = _GLOBAL[key]
        if kind == "replicated":
            return read(hf_key, 0, None, None)
        start, stop, rows = _vocab_rows(layout, rank)
        real = read(hf_key, 0, start, stop) if start < stop else None
        shard = torch.zeros(rows, m.hidden_size, dtype=real.dtype if real is not None else torch.float32)
        if real is not None:
            shard[: stop - start] = real
        return shard
    prefix, suffix = _split(key)
    if suffix in _QKV:
        param = _QKV[suffix]
        d, groups = m.head_dim, m.query_groups // t
        q_rows = m.num_attention_heads // m.query_groups * d
        q = read(f"{prefix}self_attn.q_proj.{param}", 0, rank * groups * q_rows, (rank + 1) * groups * q_rows)
        k = read(f"{prefix}self_attn.k_proj.{param}", 0, rank * groups * d, (rank + 1) * groups * d)
        v = read(f"{prefix}self_attn.v_proj.{param}", 0, rank * groups * d, (rank + 1) * groups * d)
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(groups, q_rows, *rest), k.reshape(groups, d, *rest),
                           v.reshape(groups, d, *rest)], dim=1)
        return fused.reshape(-1, *rest)
    if suffix == _FC1:
        rows = m.ffn_hidden_size // t
        span = (rank * rows, (rank + 1) * rows)
        return torch.cat([read(f"{prefix}mlp.gate_proj.weight", 0, *span), read(f"{prefix}mlp.up_proj.weight", 0, *span)])
    hf_suffix, kind = _LAYER[suffix]
    if kind == "replicated":
        return read(prefix + hf_suffix, 0, None, None)
    cols = megatron_shard_shape(key, layout)[1]
    return read(prefix + hf_suffix, 1, rank * cols, (rank + 1) * cols)


def hf_keys(model: ModelConfig) -> list[str]:
    return list(hf_shapes(model))


def hf_tensor(hf_key: str, read_shard: ShardRead, layout: TensorParallelLayout) -> torch.Tensor:
    """The full HF tensor ``hf_key`` rebuilt from the Megatron shards of every TP rank (inverse of
    ``megatron_shard``: padding rows dropped)."""
    m, t = layout.model, layout.tensor_parallel
    ranks = range(t)
    for mg_key, (name, kind) in _GLOBAL.items():
        if hf_key == name:
            if kind == "replicated":
                return read_shard(mg_key, 0)
            return torch.cat([read_shard(mg_key, r) for r in ranks])[: m.vocab_size]
    match = _HF_LAYER_KEY.match(hf_key)
    if not match:
        raise ConversionError(f"unexpected Hugging Face tensor {hf_key}")
    prefix, suffix = f"decoder.layers.{match.group(1)}.", match.group(2)
    attn = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", suffix)
    if attn:
        part, param = attn.groups()
        d, groups = m.head_dim, m.query_groups // t
        q_rows = m.num_attention_heads // m.query_groups * d
        span = {"q": (0, q_rows), "k": (q_rows, q_rows + d), "v": (q_rows + d, q_rows + 2 * d)}[part]
        pieces = []
        for r in ranks:
            fused = read_shard(f"{prefix}self_attention.linear_qkv.{param}", r)
            rest = fused.shape[1:]
            pieces.append(fused.reshape(groups, q_rows + 2 * d, *rest)[:, span[0]:span[1]].reshape(-1, *rest))
        return torch.cat(pieces)
    if suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        rows = m.ffn_hidden_size // t
        half = slice(0, rows) if suffix.startswith("mlp.gate") else slice(rows, 2 * rows)
        return torch.cat([read_shard(prefix + _FC1, r)[half] for r in ranks])
    found = [(s, k) for s, (h, k) in _LAYER.items() if h == suffix]
    if not found:
        raise ConversionError(f"unexpected Hugging Face tensor {hf_key}")
    mg_suffix, kind = found[0]
    if kind == "replicated":
        return read_shard(prefix + mg_suffix, 0)
    return torch.cat([read_shard(prefix + mg_suffix, r) for r in ranks], dim=1)
