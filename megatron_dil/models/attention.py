"""Mistral's sliding-window attention, with the same semantics on the Transformer Engine and the local spec.

Hugging Face: with ``sliding_window = W`` query i attends to keys j with i − W < j ≤ i, i.e. exactly W keys including
itself. Megatron-Core / TE ``window_size = (left, right)`` lets query i see keys [i − left, i + right], so W maps to
``(W − 1, 0)`` (``attention_window``).

On the local spec, Megatron-Core 0.16.1's ``FusedScaleMaskSoftmax`` replaces any given attention mask (e.g. the
block-diagonal mask of packed rows) by the window mask, and its fused kernel ignores the window altogether.
``SlidingWindowDotProductAttention`` instead masks (given mask OR window mask) on the unfused softmax path.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.utils import get_sliding_window_causal_mask


def attention_window(sliding_window: int | None) -> tuple[int, int] | None:
    """Megatron/TE ``window_size`` for a Hugging Face ``sliding_window`` (None: full causal attention)."""
    if sliding_window is None:
        return None
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
    return (sliding_window - 1, 0)


class SlidingWindowDotProductAttention(DotProductAttention):
    """Local-spec core attention whose window is applied on top of the given mask (True = masked out)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        softmax = self.scale_mask_softmax
        self.window = softmax.window_size  # None on layers that window_attn_skip_freq leaves global
        softmax.window_size = None  # the mask below carries the window; mcore's would drop the given mask
        softmax.scaled_masked_softmax_fusion = False  # the fused kernel would drop both

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        if self.window is not None:  # query/key: [s, b, heads, dim]
            window = get_sliding_window_causal_mask(query.size(0), key.size(0), self.window).to(query.device)
            attention_mask = window if attention_mask is None else attention_mask | window
        return super().forward(query, key, value, attention_mask, *args, **kwargs)
