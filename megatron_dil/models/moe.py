"""Router statistics of the policy's mixture-of-experts layers, per optimizer step.

Two quantities per MoE layer ℓ, logged beside the preference metrics (never added to them):
- load-balancing loss L_aux,ℓ = E · Σ_e f_e · P̄_e (Megatron's, before its coefficient), averaged over the step's
  micro-batches and the data-parallel ranks; its gradient enters the model through Megatron's aux-loss autoscaler,
  not through the preference loss, so the reported loss and the log-probs are the preference loss's alone;
- load imbalance = max_e n_e / mean_e n_e, with n_e the tokens routed to expert e over the whole step and every rank
  (1 = perfectly balanced; E / top-k = every token on the same k experts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker,
                                                     reduce_aux_losses_tracker_across_ranks)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_dil.models.config import ModelConfig


class MoEMonitor:
    """Counts routed tokens per (layer, expert) with forward hooks on the routers of ``chunks`` (training passes only)
    and reads Megatron's aux-loss tracker; ``collect`` is collective (every rank calls it after each step)."""

    def __init__(self, chunks: list[torch.nn.Module], model: ModelConfig):
        self.num_layers = model.num_layers
        self.counts = torch.zeros(model.num_layers, model.num_moe_experts, dtype=torch.float64)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router: TopKRouter, inputs, outputs) -> None:
        if router.training and torch.is_grad_enabled():
            routing_map = outputs[1]  # [tokens, E] bool: token t goes to expert e
            self.counts[router.layer_number - 1] += routing_map.sum(dim=0).detach().to("cpu", torch.float64)

    def collect(self, micro_batches: int) -> dict[str, float]:
        """This step's ``moe/*`` scalars (the same on every rank), then reset for the next step."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        counts = self.counts.to(device)
        dist.all_reduce(counts)  # layers live on their pipeline stage; tokens are split over DP/EP (and SP) ranks
        imbalance = (counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-12)).cpu()
        out = {f"moe/load_imbalance_layer_{i}": float(v) for i, v in enumerate(imbalance)}
        out["moe/load_imbalance"] = float(imbalance.max())
        tracker = get_moe_layer_wise_logging_tracker()
        names = sorted(tracker)
        if names:
            reduce_aux_losses_tracker_across_ranks(names)  # sum over PP (and TP/CP), mean over DP
            for name in names:
                per_layer = tracker[name]["values"].float().cpu() / micro_batches
                out[f"moe/{name}"] = float(per_layer.sum()) / self.num_layers
                out.update({f"moe/{name}_layer_{i}": float(v) for i, v in enumerate(per_layer)})
            clear_aux_losses_tracker()
        self.counts.zero_()
        return out
