"""The reward head: a bias-free linear map H → 1 in place of ``GPTModel.output_layer`` on the last pipeline stage.

``GPTModel`` applies the decoder's final norm and then calls ``output_layer(hidden, weight=..., runtime_gather_output=
...)``; ``RewardHead`` has that signature and returns per-position scalars [s, b, 1], so the model's output is
[b, s, 1] and everything around it (the pipeline schedule, DDP, the optimizer) is unchanged. The final hidden state
is replicated over tensor-parallel ranks (no sequence parallelism), so the head is replicated too: every TP rank
computes the same scalar and holds the full gradient of the hidden state (no all-reduce, unlike the vocabulary-
parallel output layer). Its weight w [1, H] is drawn from N(0, std²) by a generator seeded with the run seed alone,
so every TP/PP/DP layout starts from the same head. In checkpoints it is the canonical ``output_layer.weight`` of
shape [1, H] (Hugging Face ``score.weight``), and ``model_config.yaml`` says ``head: reward``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class RewardHead(nn.Module):
    """r_t = w · h_t for every position t (pooling to the last real token happens in ``reward.loss``)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, std: float, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(1, hidden_size, generator=generator, dtype=torch.float64) * std
        self.weight = nn.Parameter(weight.to(dtype))
        self.sequence_parallel = False  # read by GPTModel's inference path

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.linear(hidden, self.weight), None


def default_head_std(hidden_size: int) -> float:
    """1/√(H+1): the IRL paper's initialisation of the reward head."""
    return 1.0 / math.sqrt(hidden_size + 1)


HEAD_ATTRIBUTE = "megatron_dil_head"


def built_head(chunks: list) -> str:
    """"reward" for chunks built as a reward model (every pipeline stage's chunks are marked), else "lm"."""
    return getattr(chunks[0], HEAD_ATTRIBUTE, "lm")


def attach_reward_heads(chunks: list, hidden_size: int, dtype: torch.dtype, std: float | None, seed: int) -> None:
    """Replace the output layer of the chunk that holds the last pipeline stage (if any on this rank) by a head, and
    mark every chunk as a reward model's."""
    for chunk in chunks:
        setattr(chunk, HEAD_ATTRIBUTE, "reward")
        if chunk.post_process:
            head = RewardHead(hidden_size, dtype, std or default_head_std(hidden_size), seed)
            if torch.cuda.is_available():
                head.cuda(torch.cuda.current_device())
            chunk.output_layer = head
