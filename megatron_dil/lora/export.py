"""Adapters alone: the run's ``final/`` with ``lora.final: adapters``, and its PEFT export.

``final/`` (adapters) holds ``adapter_tpXX_ppYYY.safetensors`` (this (tp, pp) rank's A and B under canonical keys
``decoder.layers.{i}.{self_attention|mlp}.{linear}.lora.{A,B}``, global layer indices) and ``adapter_manifest.json``
(the LoRA settings, layout, model config, base checkpoint and the size and BLAKE2b digest of every shard).

PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) has one adapter per HF projection, with
``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] and scaling lora_alpha / r. A fused column-parallel linear's
B is split by output rows exactly like its weight (``convert.sharding.hf_tensor``: q/k/v per query group, fc1 as
[gate; up]); its A is shared by the parts, so each part gets a copy: B_q·A, B_k·A, B_v·A are exactly the q/k/v rows
of B·A. A row-parallel linear's A is the concatenation of the TP shards' columns, its B the replicated one.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_dil.config import from_dict, to_dict
from megatron_dil.convert.checkpoint import _global_layers
from megatron_dil.convert.hf_config import ConversionError
from megatron_dil.convert.sharding import TensorParallelLayout, canonical_key, hf_tensor
from megatron_dil.io import IntegrityError, publish, record_files, verify_files
from megatron_dil.lora.config import LoRAConfig
from megatron_dil.models.config import ModelConfig

MANIFEST = "adapter_manifest.json"
# Megatron linear -> (its weight's canonical suffix, HF projections it covers, which factor hf_tensor reassembles)
MODULES = {"linear_qkv": ("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                          "B"),
           "linear_proj": ("self_attention.linear_proj", ("self_attn.o_proj",), "A"),
           "linear_fc1": ("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), "B"),
           "linear_fc2": ("mlp.linear_fc2", ("mlp.down_proj",), "A")}


def _shard_name(tp_rank: int, pp_rank: int) -> str:
    return f"adapter_tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors"


def adapter_tensors(chunks: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors under canonical keys (global layer indices)."""
    out = {}
    for chunk in chunks:
        layers = _global_layers(chunk)
        for name, param in chunk.named_parameters():
            if ".lora." in name:
                out[canonical_key(name, layers)] = param.detach().cpu().contiguous()
    return out


def save_adapters(chunks: list[torch.nn.Module], path: str | Path, model: ModelConfig, lora: LoRAConfig,
                  base_checkpoint: str | None) -> None:
    """Collective: write the adapters of every (tp, pp) rank (first DP replica) to ``path``, atomically."""
    from megatron.core import parallel_state

    final = Path(path)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    tp, pp = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size())
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        save_file(adapter_tensors(chunks), str(partial / _shard_name(parallel_state.get_tensor_model_parallel_rank(),
                                                                   parallel_state.get_pipeline_model_parallel_rank())))
    dist.barrier()
    if dist.get_rank() == 0:
        shards = [_shard_name(t, p) for t in range(tp) for p in range(pp)]
        manifest = {"lora": asdict(lora), "tensor_parallel": tp, "pipeline_parallel": pp, "model": to_dict(model),
                    "base_checkpoint": str(Path(base_checkpoint).resolve()) if base_checkpoint else None,
                    "files": record_files(partial, shards)}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish(partial, final)
    dist.barrier()


def read_adapters(path: str | Path) -> tuple[dict, LoRAConfig, ModelConfig, dict[int, dict[str, torch.Tensor]]]:
    """Manifest, LoRA settings, model and the adapter tensors per TP rank of an adapters directory (verified)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} holds no {MANIFEST}: not an adapters directory (write one with "
                              f"lora.final=adapters; a merged final/ exports with megatron-dil-megatron-to-hf "
                              f"without --adapter-only)") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path / MANIFEST} is not valid JSON ({err})") from None
    verify_files(path, manifest["files"], "adapters", "write the adapters again (rerun the export of the run)")
    per_rank: dict[int, dict[str, torch.Tensor]] = {}
    for t in range(manifest["tensor_parallel"]):
        for p in range(manifest["pipeline_parallel"]):
            per_rank.setdefault(t, {}).update(load_file(str(path / _shard_name(t, p))))
    return manifest, from_dict(LoRAConfig, manifest["lora"]), from_dict(ModelConfig, manifest["model"]), per_rank


def peft_tensors(lora: LoRAConfig, model: ModelConfig, per_rank: dict[int, dict[str, torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
    """PEFT's ``adapter_model.safetensors`` content from the adapters of every TP rank."""
    layout = TensorParallelLayout(model, len(per_rank))
    out = {}
    for layer in range(model.num_layers):
        prefix = f"decoder.layers.{layer}."
        for target in lora.targets:
            suffix, projections, split = MODULES[target]
            factor = {"A": f"{prefix}{suffix}.lora.A", "B": f"{prefix}{suffix}.lora.B"}
            shared = "A" if split == "B" else "B"

            def read(key: str, rank: int, factor_key: str = factor[split]) -> torch.Tensor:
                return per_rank[rank][factor_key]  # hf_tensor asks for the weight; the factor is sliced like it

            for projection in projections:
                name = f"base_model.model.model.layers.{layer}.{projection}"
                out[f"{name}.lora_{split}.weight"] = hf_tensor(f"model.layers.{layer}.{projection}.weight", read,
                                                                layout).contiguous()
                out[f"{name}.lora_{shared}.weight"] = per_rank[0][factor[shared]].clone()
    return out


def export_peft(source: str | Path, output: str | Path, base_model: str | None = None) -> Path:
    """Write the PEFT directory ``output`` (must not exist) from the adapters directory ``source``."""
    output = Path(output)
    if output.exists():
        raise ConversionError(f"output directory {output} already exists; remove it or choose another")
    try:
        manifest, lora, model, per_rank = read_adapters(source)
    except IntegrityError as err:
        raise ConversionError(str(err)) from None
    projections = sorted({p.split(".")[-1] for t in lora.targets for p in MODULES[t][1]})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": projections, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": base_model or manifest.get("base_checkpoint")}
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        save_file(peft_tensors(lora, model, per_rank), str(partial / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (partial / "adapter_config.json").write_text(json.dumps(config, indent=2))
        publish(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output
