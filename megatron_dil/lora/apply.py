"""Put adapters on a model's Megatron linears, freeze the rest, and switch between adapted, base and merged views."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from megatron_dil.lora.config import LoRAConfig
from megatron_dil.lora.layers import LoRAAdapter, attach_adapter

PARALLEL = {"linear_qkv": "column", "linear_fc1": "column", "linear_proj": "row", "linear_fc2": "row"}


def _targets(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {"linear_qkv": layer.self_attention.linear_qkv, "linear_proj": layer.self_attention.linear_proj,
            "linear_fc1": layer.mlp.linear_fc1, "linear_fc2": layer.mlp.linear_fc2}


def apply_lora(chunks: list[torch.nn.Module], config: LoRAConfig, seed: int) -> None:
    """Attach an adapter to every targeted linear of ``chunks`` (GPTModel, before the DDP wrap) and freeze every other
    parameter, so only adapters reach Megatron's DDP buckets and the optimizer."""
    for chunk in chunks:
        chunk.requires_grad_(False)
        for layer in chunk.decoder.layers:
            for target, linear in _targets(layer).items():
                if target not in config.targets:
                    continue
                if "LayerNorm" in type(linear).__name__:
                    raise ValueError(f"LoRA on {type(linear).__name__} (a norm fused into the linear) would adapt the "
                                     f"pre-norm input: build the model with the local layer spec")
                weight = linear.weight
                out_features, in_features = weight.shape
                name = f"decoder.layers.{layer.layer_number - 1}.{target}"
                attach_adapter(linear, LoRAAdapter(in_features, out_features, PARALLEL[target], config.rank,
                                                   config.scaling, config.dropout, name, seed, weight.dtype,
                                                   weight.device))


def adapters(chunks: list[torch.nn.Module]) -> list[LoRAAdapter]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoRAAdapter)]


@contextmanager
def base_model(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """The frozen base in eval mode: adapters switched off (the LoRA reference π_ref = π_θ0), modes restored after."""
    found, modes = adapters(chunks), [c.training for c in chunks]
    for adapter in found:
        adapter.enabled = False
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for adapter in found:
            adapter.enabled = True
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


@contextmanager
@torch.no_grad()
def merged(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """Weights W + (α/r)·B·A with the adapters detached: the state dict is a plain model's (same keys, same shard
    shapes), for writing a normal checkpoint. The exact original weights are put back after (kept on CPU meanwhile)."""
    linears = [m for chunk in chunks for m in chunk.modules() if isinstance(getattr(m, "lora", None), LoRAAdapter)]
    saved = []
    for linear in linears:
        adapter = linear._modules.pop("lora")
        saved.append((adapter, linear.weight.detach().cpu().clone()))
        linear.weight.add_(adapter.delta_weight().to(linear.weight.dtype))
    try:
        yield
    finally:
        for linear, (adapter, weight) in zip(linears, saved):
            linear.weight.copy_(weight)
            linear.lora = adapter


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, or only the trainable parameters when some are frozen (LoRA: the adapters; the frozen
    base is rebuilt from ``init.checkpoint`` on resume)."""
    params = dict(module.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return module.state_dict()
    return {name: p.detach() for name, p in params.items() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``trainable_state_dict``: a partial state must hold exactly the trainable parameters, shaped alike
    (a checkpoint of another ``lora:`` setting, or of full-parameter training, is refused naming the difference)."""
    params = dict(module.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    full = len(trainable) == len(params)  # a full state dict also holds buffers and extra state
    expected = set(params) if full else trainable
    present = set(state) & set(params) if full else set(state)
    reshaped = [n for n in present & expected if tuple(state[n].shape) != tuple(params[n].shape)]
    if expected != present or reshaped:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise ValueError(f"the checkpoint's trainable tensors do not match this model's (lora settings changed?): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}, other shape {reshaped[:3]}")
    if full:
        module.load_state_dict(state)
        return
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
