"""Collate a micro-batch of pairs into one forward pass holding chosen and rejected sequences.

Sequences: for n pairs, sequence j < n is ``prompt_j + chosen_j`` and sequence n + j is ``prompt_j + rejected_j``.
For a sequence x of length L at row positions p..p+L-1:

    labels[p + t]    = x[t + 1]                       (t < L − 1; pad id elsewhere)
    loss_mask[p + t] = 1  iff  t + 1 ≥ len(prompt)    (label is a response token; 0 for t = L − 1 and padding)
    position_ids     = 0, 1, ..., L − 1               (restart per sequence)

so Σ_t loss_mask·log p(labels | tokens) is the response log-likelihood log π(y|x) of each sequence.

Layouts (``packing``):
- ``none``: one sequence per row, rows 0..n−1 chosen, n..2n−1 rejected, right-padded to S (a multiple of
  ``pad_to_multiple_of``); plain causal attention, ``attention_mask`` None.
- ``mask``: sequences placed first-fit in order into rows of at most ``pack_length`` tokens; ``attention_mask``
  [rows, 1, S, S] (True = masked out, Megatron's convention) lets a query see keys of its own sequence at or before it;
  a padding query sees only itself (a fully masked row would make softmax NaN).
- ``thd``: all sequences in ONE row, each padded to a multiple of ``pad_to_multiple_of``, with
  ``PackedSeqParams(qkv_format="thd", cu_seqlens_q/kv = cumulative real lengths, cu_seqlens_*_padded = cumulative
  padded lengths)`` for Transformer Engine on GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_dil.data.config import PACKING_MODES
from megatron_dil.data.dataset import PreferencePair


@dataclass
class PreferenceBatch:
    """One micro-batch of ``num_pairs`` pairs (shapes [rows, S]; see the module docstring)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    packed_seq_params: PackedSeqParams | None
    sequence_index: torch.Tensor  # chosen of pair i -> i, rejected of pair i -> n + i, padding -1
    sample_ids: torch.Tensor  # [n] dataset index of each pair
    num_pairs: int
    num_tokens: int  # non-padding tokens

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        """Tensors moved to ``device`` (PackedSeqParams' cu_seqlens too)."""
        move = (lambda t: t.to(device, non_blocking=True) if t is not None else None)
        params = self.packed_seq_params
        if params is not None:
            params = PackedSeqParams(
                qkv_format=params.qkv_format, cu_seqlens_q=move(params.cu_seqlens_q),
                cu_seqlens_kv=move(params.cu_seqlens_kv), cu_seqlens_q_padded=move(params.cu_seqlens_q_padded),
                cu_seqlens_kv_padded=move(params.cu_seqlens_kv_padded), max_seqlen_q=params.max_seqlen_q,
                max_seqlen_kv=params.max_seqlen_kv)
        return PreferenceBatch(move(self.tokens), move(self.labels), move(self.loss_mask), move(self.position_ids),
                               move(self.attention_mask), params, move(self.sequence_index), move(self.sample_ids),
                               self.num_pairs, self.num_tokens)


class PreferenceCollator:
    """``collator(pairs) -> PreferenceBatch``; ``pack_length`` bounds packed rows (``mask``), default 2048."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8, packing: str = "none", pack_length: int = 2048):
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, not {packing!r}")
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of
        self.packing = packing
        self.pack_length = pack_length

    def _round_up(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    def __call__(self, pairs: list[PreferencePair]) -> PreferenceBatch:
        n = len(pairs)
        sequences = [np.concatenate([p.prompt, p.chosen]) for p in pairs] + \
                    [np.concatenate([p.prompt, p.rejected]) for p in pairs]
        prompt_lengths = [len(p.prompt) for p in pairs] * 2
        if self.packing == "none":
            placement = [(j, 0) for j in range(2 * n)]  # (row, start)
            rows, width = 2 * n, self._round_up(max(map(len, sequences)))
        elif self.packing == "mask":
            placement, rows, width = self._first_fit(sequences, pairs)
        else:
            starts = np.concatenate([[0], np.cumsum([self._round_up(len(s)) for s in sequences])])
            placement = [(0, int(s)) for s in starts[:-1]]
            rows, width = 1, int(starts[-1])
        batch = self._fill(sequences, prompt_lengths, placement, rows, width)
        attention_mask = packed_seq_params = None
        if self.packing == "mask":
            attention_mask = _block_causal_mask(batch["sequence_index"])
        elif self.packing == "thd":
            real = torch.tensor([0] + [len(s) for s in sequences]).cumsum(0).to(torch.int32)
            padded = torch.tensor([0] + [self._round_up(len(s)) for s in sequences]).cumsum(0).to(torch.int32)
            longest = int((padded[1:] - padded[:-1]).max())
            packed_seq_params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
                                                cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                                                max_seqlen_q=longest, max_seqlen_kv=longest)
        return PreferenceBatch(
            tokens=batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"],
            position_ids=batch["position_ids"], attention_mask=attention_mask, packed_seq_params=packed_seq_params,
            sequence_index=batch["sequence_index"],
            sample_ids=torch.tensor([p.sample_id for p in pairs], dtype=torch.long),
            num_pairs=n, num_tokens=int(sum(map(len, sequences))))

    def _first_fit(self, sequences: list[np.ndarray], pairs: list[PreferencePair]):
        fill: list[int] = []
        placement = []
        for j, seq in enumerate(sequences):
            if len(seq) > self.pack_length:
                raise ValueError(f"sample {pairs[j % len(pairs)].sample_id}: sequence of {len(seq)} tokens exceeds "
                                 f"pack_length {self.pack_length}")
            row = next((r for r, used in enumerate(fill) if used + len(seq) <= self.pack_length), len(fill))
            if row == len(fill):
                fill.append(0)
            placement.append((row, fill[row]))
            fill[row] += len(seq)
        return placement, len(fill), self._round_up(max(fill))

    def _fill(self, sequences, prompt_lengths, placement, rows: int, width: int) -> dict[str, torch.Tensor]:
        tokens = np.full((rows, width), self.pad_id, dtype=np.int64)
        labels = np.full((rows, width), self.pad_id, dtype=np.int64)
        loss_mask = np.zeros((rows, width), dtype=np.float32)
        position_ids = np.zeros((rows, width), dtype=np.int64)
        sequence_index = np.full((rows, width), -1, dtype=np.int64)
        for j, (seq, prompt_length, (row, start)) in enumerate(zip(sequences, prompt_lengths, placement)):
            length = len(seq)
            span = slice(start, start + length)
            tokens[row, span] = seq
            labels[row, start:start + length - 1] = seq[1:]
            loss_mask[row, start + max(prompt_length, 1) - 1:start + length - 1] = 1.0  # the first token has no label
            position_ids[row, span] = np.arange(length)
            sequence_index[row, span] = j
        return {k: torch.from_numpy(v) for k, v in dict(
            tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
            sequence_index=sequence_index).items()}


def _block_causal_mask(sequence_index: torch.Tensor) -> torch.Tensor:
    """[rows, 1, S, S], True = masked out: query q may see key k iff same sequence and k ≤ q (padding: only q)."""
    width = sequence_index.shape[1]
    same = sequence_index[:, :, None] == sequence_index[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    padding = (sequence_index == -1)[:, :, None] & torch.eye(width, dtype=torch.bool)
    allowed = (same & (sequence_index[:, :, None] >= 0) & causal) | padding
    return ~allowed[:, None]
