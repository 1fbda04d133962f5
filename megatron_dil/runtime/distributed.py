"""torch.distributed + Megatron ``parallel_state`` from torchrun's environment, validated up front.

World layout (Megatron order tp-cp-dp-pp): world = TP × CP × PP × DP, so DP = world / (TP·CP·PP). Mixture-of-experts
layers use a second grid over the same ranks (tp-cp-ep-dp-pp with the expert TP size): expert parallelism EP splits
the experts across the data-parallel ranks, so EP must divide DP·CP·TP/ETP and the number of experts.
Backend: NCCL with CUDA, gloo without (then the CPU bridge in ``cpu_compat`` is installed).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_dil.models.config import ModelConfig
from megatron_dil.runtime import cpu_compat


class LayoutError(ValueError):
    """The requested parallel layout cannot work for this world size or model; the message says why."""


@dataclass
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is whatever of the world is left."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (interleaved 1F1B); None = not interleaved
    context: int = 1
    sequence_parallel: bool = False  # GPU option: shard activations along the sequence inside TP regions
    expert: int = 1  # expert parallelism (MoE): each rank of an EP group holds num_moe_experts / EP experts
    expert_tensor: int = 1  # tensor parallelism inside each expert; experts are stored whole, so 1 for now
    expert_dispatcher: str = "alltoall"  # MoE token dispatcher: alltoall | allgather
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context", "expert", "expert_tensor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline is not None and (self.virtual_pipeline < 1 or self.pipeline == 1):
            raise ValueError("virtual_pipeline needs pipeline > 1 and a value >= 1")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("sequence_parallel needs tensor > 1")
        if self.expert_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(f"expert_dispatcher must be alltoall or allgather, not {self.expert_dispatcher!r}")


def validate_layout(parallel: ParallelConfig, world_size: int, model: ModelConfig | None = None) -> int:
    """Check the layout against the world size and model; return the data-parallel size or raise ``LayoutError``."""
    model_parallel = parallel.tensor * parallel.pipeline * parallel.context
    if world_size % model_parallel:
        raise LayoutError(f"world size {world_size} is not divisible by tensor({parallel.tensor}) × "
                          f"context({parallel.context}) × pipeline({parallel.pipeline}) = {model_parallel}")
    if model is not None:
        tp = parallel.tensor
        if model.num_attention_heads % tp:
            raise LayoutError(f"num_attention_heads ({model.num_attention_heads}) is not divisible by "
                              f"tensor parallel size {tp}")
        if model.query_groups % tp:
            raise LayoutError(f"num_query_groups ({model.query_groups}) is not divisible by tensor parallel size {tp}")
        if model.ffn_hidden_size % tp:
            raise LayoutError(f"ffn_hidden_size ({model.ffn_hidden_size}) is not divisible by tensor parallel "
                              f"size {tp}")
        stages = parallel.pipeline * (parallel.virtual_pipeline or 1)
        if model.num_layers % stages:
            raise LayoutError(f"num_layers ({model.num_layers}) is not divisible by pipeline({parallel.pipeline}) × "
                              f"virtual_pipeline({parallel.virtual_pipeline or 1}) = {stages}")
    _validate_experts(parallel, world_size, model)
    return world_size // model_parallel


def _validate_experts(parallel: ParallelConfig, world_size: int, model: ModelConfig | None) -> None:
    """Expert-parallel sizes against the world and the model (MoE × TP needs sequence parallelism, a GPU option)."""
    ep, etp = parallel.expert, parallel.expert_tensor
    if etp != 1:
        raise LayoutError(f"parallel.expert_tensor={etp} is not supported: experts are stored and run whole "
                          f"(expert_tensor=1); use parallel.expert to spread them")
    if model is not None and not model.is_moe:
        if ep > 1:
            raise LayoutError(f"parallel.expert={ep} needs a mixture-of-experts model (num_moe_experts is not set)")
        return
    expert_grid = ep * etp * parallel.pipeline
    if world_size % expert_grid:
        raise LayoutError(f"world size {world_size} is not divisible by expert({ep}) × expert_tensor({etp}) × "
                          f"pipeline({parallel.pipeline}) = {expert_grid}")
    if model is None:
        return
    if model.num_moe_experts % ep:
        raise LayoutError(f"num_moe_experts ({model.num_moe_experts}) is not divisible by expert parallel size {ep}")
    if parallel.tensor > 1 and not parallel.sequence_parallel:
        raise LayoutError(f"a mixture-of-experts model with tensor={parallel.tensor} needs "
                          f"parallel.sequence_parallel=true (Megatron's MoE layer requires it; it is a GPU option, "
                          f"so on CPU use tensor=1 with expert/pipeline/data parallelism)")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank, then Megatron's tracked model-parallel streams
    (which offset the seed by the tensor-parallel rank, so TP shards initialise differently)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(parallel: ParallelConfig, model: ModelConfig | None = None, seed: int = 1234) -> int:
    """Initialise torch.distributed (from torchrun's env vars) and Megatron's parallel state; return the DP size.

    Works without torchrun too (a single process: world size 1). Validates the layout before creating any group.
    """
    from megatron.core import parallel_state

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel = validate_layout(parallel, world_size, model)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_compat.install()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            timeout=timedelta(minutes=parallel.timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    seed_everything(seed)
    return data_parallel


def shutdown() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
