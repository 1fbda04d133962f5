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
| output_layer.weight [1, H] (reward head) | score.weight (*ForSequenceClass.)  | replicated (``head: reward``, never tied)   |

Mixture-of-experts layers (E experts of width Fe) replace the two MLP rows with a router and E experts, stored WHOLE
(not split over TP) under their GLOBAL expert index e, in tensor-parallel rank 0's expert files
(``shards/tp00_experts_l{layer}_e{first expert}.safetensors``), so a checkpoint loads at any expert-parallel size:

| Megatron key (layer i)                          | HF Qwen3-MoE key (Mixtral: block_sparse_moe., w1/w3/w2) | shard   |
|-------------------------------------------------|---------------------------------------------------------|---------|
| mlp.router.weight [E, H]                        | mlp.gate.weight                                         | replicated |
| mlp.experts.local_experts.e.linear_fc1.weight   | mlp.experts.e.{gate,up}_proj.weight ([gate; up], 2Fe×H) | whole   |
| mlp.experts.local_experts.e.linear_fc2.weight   | mlp.experts.e.down_proj.weight (H×Fe)                   | whole   |

transformers 5 writes the per-expert form above; its in-memory fused form (``mlp.experts.gate_up_proj`` [E, 2Fe, H]
with gate first, ``mlp.experts.down_proj`` [E, H, Fe], ``mlp.gate.weight``) is read too.

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
REWARD_HEAD = "score.weight"  # Hugging Face *ForSequenceClassification head (num_labels 1, no bias)
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
_ROUTER = "mlp.router.weight"
_EXPERT_KEY = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_TE_EXPERT_KEY = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")  # grouped GEMM (TE spec)
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

HFRead = Callable[[str, int, int | None, int | None], torch.Tensor]  # (key, dim, start, stop) -> slice
ShardRead = Callable[[str, int], torch.Tensor]  # (canonical Megatron key, tp rank) -> shard


@dataclass(frozen=True)
class MoENames:
    """Hugging Face names of one MoE layer's router and experts (relative to ``model.layers.{i}.``)."""

    router: str
    expert: str  # per-expert prefix, formatted with the expert index
    gate: str
    up: str
    down: str
    fused_gate_up: str = "mlp.experts.gate_up_proj"  # transformers-5 in-memory form: [E, 2Fe, H], gate rows first
    fused_down: str = "mlp.experts.down_proj"  # [E, H, Fe]
    fused_router: str = "mlp.gate.weight"


QWEN3_MOE_NAMES = MoENames("mlp.gate.weight", "mlp.experts.{}.", "gate_proj.weight", "up_proj.weight",
                           "down_proj.weight")
MIXTRAL_NAMES = MoENames("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{}.", "w1.weight", "w3.weight",
                         "w2.weight")


def moe_names(model: ModelConfig) -> MoENames:
    """Qwen3-MoE (the MoE family with QK-norm) or Mixtral naming."""
    return QWEN3_MOE_NAMES if model.qk_layernorm else MIXTRAL_NAMES


def is_expert_key(key: str) -> bool:
    """A canonical per-expert key (stored whole, in tensor-parallel rank 0's expert files)."""
    match = _LAYER_KEY.match(key)
    return bool(match and _EXPERT_KEY.match(match.group(2)))


def expert_keys(model: ModelConfig, layer: int, experts: range) -> list[str]:
    return [f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{fc}.weight" for e in experts
            for fc in ("linear_fc1", "linear_fc2")]


def expert_file(layer: int, first_expert: int) -> str:
    return f"shards/tp00_experts_l{layer:04d}_e{first_expert:04d}.safetensors"


@dataclass(frozen=True)
class TensorParallelLayout:
    model: ModelConfig
    tensor_parallel: int
    hf_fused_experts: bool = False  # the HF source stores experts fused (transformers-5 in-memory form)

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


def canonical_key(local_key: str, global_layer_of: dict[int, int], first_expert: int = 0) -> str:
    """A model chunk's state-dict key (local or TE spec, stage-local layer index, rank-local expert index) as its
    canonical checkpoint key; ``first_expert`` is the global index of this rank's first expert (EP rank × E/EP)."""
    match = _LAYER_KEY.match(local_key)
    if not match:
        return local_key
    suffix = _TE_NAMES.get(match.group(2), match.group(2))
    expert = _EXPERT_KEY.match(suffix)
    grouped = _TE_EXPERT_KEY.match(suffix)
    if expert:
        suffix = f"mlp.experts.local_experts.{int(expert.group(1)) + first_expert}.{expert.group(2)}.weight"
    elif grouped:
        suffix = f"mlp.experts.local_experts.{int(grouped.group(2)) + first_expert}.{grouped.group(1)}.weight"
    return f"decoder.layers.{global_layer_of[int(match.group(1))]}.{suffix}"


def megatron_keys(model: ModelConfig, layers: range, first_stage: bool, last_stage: bool) -> list[str]:
    """Canonical keys held by a pipeline stage owning ``layers`` in its TP-sharded files (the tied output layer is the
    embedding; MoE experts are listed by ``expert_keys``)."""
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    per_layer += ["self_attention.linear_qkv.bias"] if model.qkv_bias else []
    if model.qk_layernorm:
        per_layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    per_layer += ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight"]
    per_layer += [_ROUTER] if model.is_moe else [_FC1, "mlp.linear_fc2.weight"]
    keys = [EMBEDDING] if first_stage else []
    keys += [f"decoder.layers.{i}.{s}" for i in layers for s in per_layer]
    if last_stage:
        keys += [FINAL_NORM] + ([] if model.tie_embeddings and model.head == "lm" else [OUTPUT])
    return keys


def hf_shapes(model: ModelConfig, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model with its shape (``lm_head`` only when untied; MoE experts per expert, or fused)."""
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
        shapes.update({p + "self_attn.o_proj.weight": (h, nh * d), p + "post_attention_layernorm.weight": (h,)})
        if model.is_moe:
            shapes.update(_hf_expert_shapes(model, p, fused_experts))
        else:
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if model.head == "reward":
        shapes[REWARD_HEAD] = (1, h)
    elif not model.tie_embeddings:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    return shapes


def _hf_expert_shapes(model: ModelConfig, prefix: str, fused: bool) -> dict[str, tuple[int, ...]]:
    h, fe, e, names = model.hidden_size, model.expert_ffn_hidden_size, model.num_moe_experts, moe_names(model)
    if fused:
        return {prefix + names.fused_router: (e, h), prefix + names.fused_gate_up: (e, 2 * fe, h),
                prefix + names.fused_down: (e, h, fe)}
    shapes = {prefix + names.router: (e, h)}
    for j in range(e):
        expert = prefix + names.expert.format(j)
        shapes.update({expert + names.gate: (fe, h), expert + names.up: (fe, h), expert + names.down: (h, fe)})
    return shapes


def megatron_shard_shape(key: str, layout: TensorParallelLayout) -> tuple[int, ...]:
    """Shape of rank r's shard of canonical ``key`` (the same on every rank; experts are whole)."""
    m, t = layout.model, layout.tensor_parallel
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    qkv_rows = (m.num_attention_heads + 2 * m.query_groups) * d // t
    if key == OUTPUT and m.head == "reward":
        return (1, h)
    if key in (EMBEDDING, OUTPUT):
        return (layout.padded_vocab // t, h)
    match = _LAYER_KEY.match(key)
    suffix = match.group(2) if match else key
    expert = _EXPERT_KEY.match(suffix)
    if expert:
        fe = m.expert_ffn_hidden_size
        return (2 * fe, h) if expert.group(2) == "linear_fc1" else (h, fe)
    if suffix == _ROUTER:
        return (m.num_moe_experts, h)
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
    if key == OUTPUT and m.head == "reward":
        return read(REWARD_HEAD, 0, None, None)
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
    if suffix == _ROUTER or _EXPERT_KEY.match(suffix):
        return _hf_expert_read(prefix, suffix, read, layout)
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


def _hf_expert_read(prefix: str, suffix: str, read: HFRead, layout: TensorParallelLayout) -> torch.Tensor:
    """Router or one whole expert (fc1 = [gate; up], fc2 = down) from either HF expert layout."""
    names, fused = moe_names(layout.model), layout.hf_fused_experts
    if suffix == _ROUTER:
        return read(prefix + (names.fused_router if fused else names.router), 0, None, None)
    index, fc = _EXPERT_KEY.match(suffix).groups()
    e = int(index)
    if fused:
        return read(prefix + (names.fused_gate_up if fc == "linear_fc1" else names.fused_down), 0, e, e + 1)[0]
    expert = prefix + names.expert.format(e)
    if fc == "linear_fc1":
        return torch.cat([read(expert + names.gate, 0, None, None), read(expert + names.up, 0, None, None)])
    return read(expert + names.down, 0, None, None)


def hf_keys(model: ModelConfig) -> list[str]:
    return list(hf_shapes(model))


def hf_tensor(hf_key: str, read_shard: ShardRead, layout: TensorParallelLayout) -> torch.Tensor:
    """The full HF tensor ``hf_key`` rebuilt from the Megatron shards of every TP rank (inverse of
    ``megatron_shard``: padding rows dropped)."""
    m, t = layout.model, layout.tensor_parallel
    ranks = range(t)
    if hf_key == REWARD_HEAD and m.head == "reward":
        return read_shard(OUTPUT, 0)
    for mg_key, (name, kind) in _GLOBAL.items():
        if hf_key == name:
            if kind == "replicated":
                return read_shard(mg_key, 0)
            return torch.cat([read_shard(mg_key, r) for r in ranks])[: m.vocab_size]
    match = _HF_LAYER_KEY.match(hf_key)
    if not match:
        raise ConversionError(f"unexpected Hugging Face tensor {hf_key}")
    prefix, suffix = f"decoder.layers.{match.group(1)}.", match.group(2)
    if m.is_moe:
        names = moe_names(m)
        if suffix == names.router:
            return read_shard(prefix + _ROUTER, 0)
        expert = re.match("^" + re.escape(names.expert).replace(r"\{\}", r"(\d+)") + r"(.+)$", suffix)
        if expert and expert.group(2) in (names.gate, names.up, names.down):
            part, fe = expert.group(2), m.expert_ffn_hidden_size
            fc = "linear_fc2" if part == names.down else "linear_fc1"
            whole = read_shard(f"{prefix}mlp.experts.local_experts.{expert.group(1)}.{fc}.weight", 0)
            return {names.gate: whole[:fe], names.up: whole[fe:], names.down: whole}[part]
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
