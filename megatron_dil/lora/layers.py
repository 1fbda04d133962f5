"""A LoRA adapter on one Megatron-Core tensor-parallel linear, sharded like it.

The linear computes y = W x with W [out, in]; the adapter adds (α/r)·B·A·dropout(x), A [r, in], B [out, r].
With TP size t and rank k (W's own shard is the slice the adapter must reproduce when merged):

  column-parallel (W split on rows: linear_qkv, linear_fc1)  A full, replicated;  B rows of rank k  [out/t, r]
      z = A·x on every rank (identical); its gradient is summed over TP (Megatron's copy-to-TP region), so A's
      gradient and x's are the full ones on each rank; B_k·A equals the rows of ΔW that W_k holds, in W_k's fused
      order (QKV grouped per query group, fc1 as [gate_k; up_k]), because B's rows follow W's.
  row-parallel (W split on columns: linear_proj, linear_fc2)  A columns of rank k [r, in/t];  B full, replicated
      z = Σ_k A_k·x_k by an all-reduce over TP (Megatron's reduce-from-TP region), then B·z on every rank.

Dropout (``lora.dropout``) draws from the default generator, which Megatron keeps identical over TP ranks (as for
its hidden dropout): a column-parallel adapter's replicated input gets the same mask on every rank.

A is initialised layout-independently (the full matrix from a generator seeded by the run seed and the global
module name, then sliced), B to zero: at step 0 the adapted model equals the base exactly, at any TP/PP.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes


class LoRAAdapter(torch.nn.Module):
    """The adapter of one linear; ``enabled`` False makes it contribute nothing (the base model)."""

    def __init__(self, in_features: int, out_features: int, parallel: str, rank: int, scaling: float, dropout: float,
                 name: str, seed: int, dtype: torch.dtype, device: torch.device | None = None):
        super().__init__()
        assert parallel in ("column", "row"), parallel
        tp, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                       parallel_state.get_tensor_model_parallel_rank())
        self.parallel, self.scaling, self.enabled = parallel, scaling, True
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        full_in = in_features * (tp if parallel == "row" else 1)
        generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        a = torch.empty(rank, full_in)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's (and nn.Linear's) init
        if parallel == "row":
            a = a[:, tp_rank * in_features:(tp_rank + 1) * in_features]
        self.A = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.B = torch.nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        sharded = self.A if parallel == "row" else self.B
        set_tensor_model_parallel_attributes(sharded, True, 1 if parallel == "row" else 0, 1)

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A: this rank's slice of ΔW, shaped like the linear's weight shard."""
        return (self.B @ self.A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x), self.A)
        z = copy_to_tensor_model_parallel_region(z) if self.parallel == "column" \
            else reduce_from_tensor_model_parallel_region(z)
        return F.linear(z, self.B) * self.scaling


def _adapt(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
    """Forward hook of an adapted linear: Megatron linears return (output, bias)."""
    adapter = module.lora
    if not adapter.enabled:
        return output
    out, bias = output
    return out + adapter(args[0] if args else kwargs["input_"]), bias


def attach_adapter(linear: torch.nn.Module, adapter: LoRAAdapter) -> None:
    linear.lora = adapter
    linear.register_forward_hook(_adapt, with_kwargs=True)
