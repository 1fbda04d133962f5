"""Forward-only rewards of micro-batches through Megatron's pipeline schedule (any TP/PP/VPP layout)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dil.data.collator import PreferenceBatch
from megatron_dil.reward.loss import sequence_rewards
from megatron_dil.training.step import run_schedule


def score_batches(chunks: list, batches: list[PreferenceBatch]) -> list[torch.Tensor]:
    """Per micro-batch, the fp32 rewards [2n] of its sequences (chosen 0..n−1, rejected n..2n−1) on the last
    pipeline stage; [] on other stages. Collective over the model-parallel group."""
    rewards: list[torch.Tensor] = []

    def loss_for(index: int, batch: PreferenceBatch, outputs: torch.Tensor):
        rewards.append(sequence_rewards(outputs, batch.sequence_index, 2 * batch.num_pairs).detach())
        return torch.zeros((), device=outputs.device), torch.tensor(batch.num_pairs, dtype=torch.int), {}

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        run_schedule(chunks, batches, loss_for, forward_only=True)
    return rewards


def reports_scores() -> bool:
    """The one rank per data-parallel replica whose scores count: last pipeline stage, tensor-parallel rank 0."""
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
        parallel_state.get_tensor_model_parallel_rank() == 0


def world_sum(values: list[float], device: torch.device) -> list[float]:
    """Collective: Σ over all ranks of float64 ``values`` (ranks that do not report pass zeros)."""
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return packed.tolist()
