"""Collator layouts against a loop-built reference, and packed rows giving the same log-probs as unpacked ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_dil.data import PreferenceCollator, PreferencePair

PAD = 0


def make_pairs(seed=0, n=3, vocab=20):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        prompt, chosen, rejected = (rng.integers(1, vocab, size=rng.integers(2, 7)) for _ in range(3))
        pairs.append(PreferencePair(100 + i, prompt, chosen, rejected))
    return pairs


def test_unpacked_rows_labels_masks_against_loops():
    pairs = make_pairs()
    batch = PreferenceCollator(PAD, pad_to_multiple_of=8)(pairs)
    n = len(pairs)
    sequences = [list(p.prompt) + list(p.chosen) for p in pairs] + [list(p.prompt) + list(p.rejected) for p in pairs]
    width = batch.tokens.shape[1]
    assert batch.tokens.shape == (2 * n, width) and width % 8 == 0 and width - 8 < max(map(len, sequences)) <= width
    for j, seq in enumerate(sequences):
        prompt_length = len(pairs[j % n].prompt)
        for t in range(width):
            inside = t < len(seq)
            assert batch.tokens[j, t] == (seq[t] if inside else PAD)
            assert batch.labels[j, t] == (seq[t + 1] if t + 1 < len(seq) else PAD)
            assert batch.loss_mask[j, t] == (1.0 if prompt_length <= t + 1 < len(seq) else 0.0)
            assert batch.position_ids[j, t] == (t if inside else 0)
            assert batch.sequence_index[j, t] == (j if inside else -1)
        # the masked labels are exactly the response
        response = list(pairs[j % n].chosen if j < n else pairs[j % n].rejected)
        assert batch.labels[j][batch.loss_mask[j].bool()].tolist() == response
    assert batch.attention_mask is None and batch.packed_seq_params is None
    assert batch.sample_ids.tolist() == [100, 101, 102] and batch.num_pairs == n
    assert batch.num_tokens == sum(map(len, sequences))


class TinyCausalLM(torch.nn.Module):
    """One attention layer with learned positions: enough to expose any leak across packed sequences."""

    def __init__(self, vocab=20, hidden=16, max_positions=64):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden, dtype=torch.float64)
        self.position = torch.nn.Embedding(max_positions, hidden, dtype=torch.float64)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, dtype=torch.float64)
        self.out = torch.nn.Linear(hidden, vocab, dtype=torch.float64)

    def forward(self, tokens, position_ids, attention_mask):
        h = self.embed(tokens) + self.position(position_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        if attention_mask is None:
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)
        else:  # Megatron convention: True = masked out
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=~attention_mask)
        return self.out(h + a[:, 0])


def sequence_logps(model, batch, n_sequences):
    """Σ_t loss_mask·log p(label_t) per sequence, grouped by sequence_index."""
    logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
    token_logp = torch.log_softmax(logits, -1).gather(-1, batch.labels[..., None])[..., 0] * batch.loss_mask
    return torch.stack([token_logp[batch.sequence_index == j].sum() for j in range(n_sequences)])


@pytest.mark.parametrize("pack_length", [16, 40])
def test_mask_packing_matches_unpacked_logprobs(pack_length):
    pairs = make_pairs(seed=1, n=4)
    model = TinyCausalLM()
    unpacked = PreferenceCollator(PAD, 8)(pairs)
    packed = PreferenceCollator(PAD, 8, packing="mask", pack_length=pack_length)(pairs)
    assert packed.tokens.shape[0] < unpacked.tokens.shape[0]  # several sequences share rows
    assert packed.attention_mask.shape == (packed.tokens.shape[0], 1, packed.tokens.shape[1], packed.tokens.shape[1])
    assert packed.loss_mask.sum() == unpacked.loss_mask.sum() and packed.num_tokens == unpacked.num_tokens
    expected = sequence_logps(model, unpacked, 8)
    got = sequence_logps(model, packed, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.isfinite(model(packed.tokens, packed.position_ids, packed.attention_mask)).all()


def test_mask_packing_rejects_sequence_longer_than_row():
    with pytest.raises(ValueError, match="sample 100: sequence of .* exceeds pack_length 4"):
        PreferenceCollator(PAD, 8, packing="mask", pack_length=4)(make_pairs())


def test_thd_layout_cu_seqlens():
    pairs = make_pairs(seed=2, n=3)
    unpacked = PreferenceCollator(PAD, 4)(pairs)
    thd = PreferenceCollator(PAD, 4, packing="thd")(pairs)
    params = thd.packed_seq_params
    lengths = [len(p.prompt) + len(p.chosen) for p in pairs] + [len(p.prompt) + len(p.rejected) for p in pairs]
    padded = [-(-length // 4) * 4 for length in lengths]
    assert params.qkv_format == "thd" and thd.tokens.shape == (1, sum(padded)) and thd.attention_mask is None
    assert params.cu_seqlens_q.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert params.cu_seqlens_q_padded.tolist() == np.concatenate([[0], np.cumsum(padded)]).tolist()
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == max(padded)
    for j, start in enumerate(params.cu_seqlens_q_padded[:-1].tolist()):
        span = slice(start, start + lengths[j])
        for field in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(thd, field)[0, span], getattr(unpacked, field)[j, :lengths[j]])
        assert (thd.sequence_index[0, span] == j).all()
