"""Forward passes through Megatron's pipeline schedule (works at any TP/PP/VPP layout)."""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron.core.models.gpt import GPTModel


@torch.no_grad()
def forward_logits(chunks: list[GPTModel], tokens: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Logits [b, s, Vp/TP] (sharded on the vocabulary) for one batch, on the last pipeline stage; None elsewhere.

    Every rank passes the same inputs (only the first stage reads tokens; the schedule moves activations).
    """
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch[0], batch[1], batch[2]), None

    for chunk in chunks:
        chunk.eval()
    batch = (tokens, position_ids, attention_mask)
    vpp = len(chunks)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter([batch]) for _ in range(vpp)] if vpp > 1 else iter([batch]),
        model=chunks if vpp > 1 else chunks[0],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]
