"""vocab_parallel_logprobs and sequence_logprobs against a float64 single-rank log_softmax + gather reference."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_dil.ops import sequence_logprobs, vocab_parallel_logprobs
from tests.distributed import init_gloo, run_ranks

PADDED_VOCAB = 64
SEQ, BATCH = 7, 2  # Megatron layout [s, b, V]
NUM_SEQUENCES = 3  # row 0 packs sequences 0 and 1, row 1 holds sequence 2 then padding
PAD_ID = -100


def make_inputs(seed: int, vocab_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(SEQ, BATCH, PADDED_VOCAB, generator=gen) * 3
    logits[..., vocab_size:] = 1e4  # garbage in padded rows: would dominate if they entered the normaliser
    targets = torch.randint(0, vocab_size, (SEQ, BATCH), generator=gen)
    targets[0, 0] = targets[6, 1] = PAD_ID
    targets[1, 1] = vocab_size - 1  # the last real id (owned by the last rank with real ids)
    loss_mask = torch.rand(SEQ, BATCH, generator=gen) > 0.25
    loss_mask &= targets != PAD_ID
    sequence_index = torch.tensor([[0] * 3 + [1] * 4, [2] * 5 + [-1] * 2]).T.contiguous()  # [s, b]
    return dict(logits=logits, targets=targets, loss_mask=loss_mask, sequence_index=sequence_index,
                grad_tokens=torch.randn(SEQ, BATCH, generator=gen), grad_sum=torch.randn(NUM_SEQUENCES, generator=gen))


def reference(inputs: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """float64, one rank: log_softmax over the real vocabulary, gather, loop-summed per sequence."""
    logits = inputs["logits"].double().requires_grad_()
    targets, mask, index = inputs["targets"], inputs["loss_mask"], inputs["sequence_index"]
    logps = logits[..., :vocab_size].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq_sum = torch.stack([sum(logps[t, b] for t in range(SEQ) for b in range(BATCH)
                               if index[t, b] == i and mask[t, b]) for i in range(NUM_SEQUENCES)])
    seq_count = torch.tensor([float(((index == i) & mask).sum()) for i in range(NUM_SEQUENCES)], dtype=torch.float64)
    objective = (logps * inputs["grad_tokens"].double() * mask).sum() + (seq_sum * inputs["grad_sum"].double()).sum()
    (grad,) = torch.autograd.grad(objective, logits)
    return dict(logps=logps.detach(), seq_sum=seq_sum.detach(), seq_count=seq_count, grad=grad)


def ours(inputs: dict[str, torch.Tensor], vocab_size: int, chunk_size: int | None, group=None, shard=slice(None),
         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    logits = inputs["logits"][..., shard].to(dtype).clone().requires_grad_()
    before = logits.detach().clone()
    logps = vocab_parallel_logprobs(logits, inputs["targets"], group, vocab_size=vocab_size, chunk_size=chunk_size)
    seq = sequence_logprobs(logps, inputs["loss_mask"], inputs["sequence_index"], NUM_SEQUENCES)
    objective = (logps * inputs["grad_tokens"] * inputs["loss_mask"]).sum() + (seq.sum * inputs["grad_sum"]).sum()
    objective.backward()
    assert torch.equal(logits.detach(), before), "logits were modified in place"
    return dict(logps=logps.detach(), seq_sum=seq.sum.detach(), seq_count=seq.count, grad=logits.grad,
                mean=seq.mean.detach())


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], mask: torch.Tensor, vocab_size: int,
                   rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got["logps"][mask].double(), want["logps"][mask], rtol=rtol, atol=atol)
    torch.testing.assert_close(got["seq_sum"].double(), want["seq_sum"], rtol=rtol, atol=atol)
    torch.testing.assert_close(got["seq_count"].double(), want["seq_count"], rtol=0, atol=0)
    torch.testing.assert_close(got["grad"][..., :vocab_size].double(), want["grad"][..., :vocab_size],
                               rtol=rtol, atol=atol)
    assert not got["grad"][..., vocab_size:].any(), "padded vocabulary ids got a gradient"


# (vocab_size, chunk_size): no padding; padding inside the last shard; at TP=4 a shard made only of padding.
CASES = [(64, None), (64, 5), (50, None), (50, 3), (40, 4)]


def _tp_worker(rank: int, world_size: int, cases: list) -> dict:
    init_gloo()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2]}
    results = {}
    for tp, group in groups.items():
        tp_rank = dist.get_rank(group)
        local = PADDED_VOCAB // tp
        for seed, (vocab_size, chunk_size) in enumerate(cases):
            inputs = make_inputs(seed, vocab_size)
            results[tp, vocab_size, chunk_size] = ours(inputs, vocab_size, chunk_size, group,
                                                      slice(tp_rank * local, (tp_rank + 1) * local))
    return results


def test_tensor_parallel_2_and_4_match_float64_reference():
    per_rank = run_ranks(_tp_worker, 4, CASES)
    for tp in (2, 4):
        for seed, (vocab_size, chunk_size) in enumerate(CASES):
            inputs = make_inputs(seed, vocab_size)
            want = reference(inputs, vocab_size)
            ranks = per_rank[:tp]
            got = {key: ranks[0][tp, vocab_size, chunk_size][key] for key in ("logps", "seq_sum", "seq_count")}
            got["grad"] = torch.cat([r[tp, vocab_size, chunk_size]["grad"] for r in ranks], dim=-1)
            for r in ranks[1:]:  # every TP rank returns the same full log-probs
                torch.testing.assert_close(r[tp, vocab_size, chunk_size]["logps"], got["logps"], rtol=0, atol=0)
            assert_matches(got, want, inputs["loss_mask"], vocab_size)


@pytest.mark.parametrize("vocab_size,chunk_size", CASES + [(64, 1), (64, 100)])
def test_single_rank_matches_float64_reference(vocab_size, chunk_size):
    inputs = make_inputs(7, vocab_size)
    got = ours(inputs, vocab_size, chunk_size)
    assert_matches(got, reference(inputs, vocab_size), inputs["loss_mask"], vocab_size)
    assert got["logps"].dtype == torch.float32
    torch.testing.assert_close(got["mean"], got["seq_sum"] / got["seq_count"].clamp(min=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_use_fp32_math(dtype):
    inputs = make_inputs(3, 50)
    inputs["logits"] = inputs["logits"].to(dtype).float()  # reference sees exactly the half-precision values
    got = ours(inputs, 50, 4, dtype=dtype)
    want = reference(inputs, 50)
    assert got["grad"].dtype == dtype
    torch.testing.assert_close(got["logps"][inputs["loss_mask"]].double(), want["logps"][inputs["loss_mask"]],
                               rtol=1e-5, atol=1e-5)  # fp32 math: no half-precision error in the values
    torch.testing.assert_close(got["grad"][..., :50].double(), want["grad"][..., :50], rtol=1e-2, atol=1e-2)


def test_sequence_logprobs_of_an_empty_sequence_and_bad_input():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    seq = sequence_logprobs(logps, torch.tensor([[True, False, True]]), torch.tensor([[0, 0, 2]]), 3)
    torch.testing.assert_close(seq.sum, torch.tensor([-1.0, 0.0, -3.0]))
    torch.testing.assert_close(seq.count, torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(seq.mean, torch.tensor([-1.0, 0.0, -3.0]))
    seq.sum.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[1.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="num_sequences is 2"):
        sequence_logprobs(logps, torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0, 1, 2]]), 2)
    with pytest.raises(ValueError, match="must equal logits shape"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size 9"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), vocab_size=9)
