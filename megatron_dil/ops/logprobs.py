"""Per-token log-probabilities from vocabulary-parallel logits, and their per-sequence reduction.

Rank r of the tensor-parallel group holds the logits of vocabulary ids [r·V_local, (r+1)·V_local). For a token with
target id y and logits z over the real (unpadded) vocabulary V:

    log p(y) = z_y − lse(z),   lse(z) = m + log Σ_{v<V} exp(z_v − m),   m = max_{v<V} z_v

computed with three all-reduces (MAX of the local maxima, SUM of the local Σexp, SUM of the target logit, which is
non-zero only on the rank that owns y) and never gathering the vocabulary. Backward is local:

    ∂ log p(y) / ∂z_v = 1[v = y] − softmax(z)_v          (0 for padded ids v ≥ V)

Padding ids sit at the end of the padded vocabulary, so each rank's real ids are a prefix of its shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def _group_size_and_rank(group: ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _chunks(num_tokens: int, chunk_size: int | None) -> list[slice]:
    step = num_tokens if chunk_size is None else chunk_size
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, max(step, 1))]


class _VocabParallelLogProbs(torch.autograd.Function):
    """Autograd function on flattened logits [N, V_local]; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group: ProcessGroup | None, vocab_start: int,
                num_real_local: int, chunk_size: int | None) -> Tensor:
        world_size = _group_size_and_rank(group)[0]
        real = logits[:, :num_real_local]  # view: the shard's real (unpadded) vocabulary ids
        num_tokens = logits.shape[0]

        # m: max is exact in any dtype, so no fp32 copy is needed here.
        if num_real_local > 0:
            max_logit = real.max(dim=-1).values.float()
        else:
            max_logit = torch.full((num_tokens,), float("-inf"), device=logits.device)
        if world_size > 1:
            dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)

        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < num_real_local)
        safe_target = torch.where(owned, local_target, torch.zeros_like(local_target))

        sums = torch.zeros(2, num_tokens, dtype=torch.float32, device=logits.device)  # [Σexp(z−m), z_y]
        if num_real_local > 0:
            target_logit = real.gather(1, safe_target.unsqueeze(1)).squeeze(1).float()
            sums[1] = torch.where(owned, target_logit, torch.zeros_like(target_logit))
            for chunk in _chunks(num_tokens, chunk_size):
                shifted = real[chunk].to(torch.float32, copy=True)  # the one fp32 buffer, chunk × V_local
                sums[0, chunk] = shifted.sub_(max_logit[chunk].unsqueeze(1)).exp_().sum(dim=-1)
                del shifted  # free before the next chunk allocates
        if world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

        logsumexp = max_logit + sums[0].log()
        ctx.save_for_backward(logits, safe_target, owned, logsumexp)
        ctx.num_real_local = num_real_local
        ctx.chunk_size = chunk_size
        return sums[1] - logsumexp

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        logits, safe_target, owned, logsumexp = ctx.saved_tensors
        num_real_local = ctx.num_real_local
        grad_logits = torch.zeros_like(logits)  # padded ids keep a zero gradient
        grad_logp = grad_logp.float()
        chunks = _chunks(logits.shape[0], ctx.chunk_size) if num_real_local > 0 else []
        for chunk in chunks:
            # (one_hot − softmax) · g, softmax recomputed from the saved logits and lse: one fp32 chunk buffer.
            grad = logits[chunk, :num_real_local].to(torch.float32, copy=True)
            grad.sub_(logsumexp[chunk].unsqueeze(1)).exp_().mul_(-grad_logp[chunk].unsqueeze(1))
            rows = torch.arange(chunk.stop - chunk.start, device=logits.device)
            grad[rows, safe_target[chunk]] += torch.where(owned[chunk], grad_logp[chunk], 0.0)
            grad_logits[chunk, :num_real_local] = grad
            del grad  # free before the next chunk allocates
        return grad_logits, None, None, None, None, None


def vocab_parallel_logprobs(logits: Tensor, targets: Tensor, tp_group: ProcessGroup | None = None, *,
                            vocab_size: int | None = None, chunk_size: int | None = None) -> Tensor:
    """fp32 log p(target) [...] from logits [..., V_local] sharded over ``tp_group`` on the vocabulary dimension.

    ``vocab_size`` is the real vocabulary size V; ids ≥ V (Megatron's padding) are left out of the normaliser and get
    a zero gradient. ``targets`` [...] may hold any id (e.g. a pad id): such positions get a finite value that the
    caller masks out. ``chunk_size`` bounds the extra fp32 memory to chunk_size × V_local in forward and backward.
    ``logits`` is never modified; the gradient comes back in its dtype.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the vocabulary "
                         f"dimension {tuple(logits.shape[:-1])}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    world_size, rank = _group_size_and_rank(tp_group)
    local_vocab = logits.shape[-1]
    padded_vocab = local_vocab * world_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {padded_vocab}] (V_local {local_vocab} × TP "
                         f"{world_size})")
    vocab_start = rank * local_vocab
    num_real_local = max(0, min(local_vocab, vocab_size - vocab_start))
    flat_logits = logits.reshape(-1, local_vocab)
    logps = _VocabParallelLogProbs.apply(flat_logits, targets.reshape(-1).long(), tp_group, vocab_start,
                                         num_real_local, chunk_size)
    return logps.view(targets.shape)


@dataclass
class SequenceLogProbs:
    """Per-sequence log-probabilities: ``sum`` [n] = Σ_t mask_t · log p_t (fp32), ``count`` [n] = Σ_t mask_t
    (fp32, exact below 2^24 tokens)."""

    sum: Tensor
    count: Tensor

    @property
    def mean(self) -> Tensor:
        """Token-averaged log-probability Σ_t mask_t · log p_t / max(1, Σ_t mask_t)."""
        return self.sum / self.count.clamp(min=1)


def sequence_logprobs(token_logps: Tensor, loss_mask: Tensor, sequence_index: Tensor,
                      num_sequences: int) -> SequenceLogProbs:
    """Reduce per-token log-probs [rows, S] to per-sequence sums and counts.

    ``sequence_index`` [rows, S] maps each position to its sequence in 0..num_sequences−1 (−1 = padding), so one row
    can hold one padded sequence or several packed ones. Differentiable in ``token_logps`` (index_add).
    """
    if not token_logps.shape == loss_mask.shape == sequence_index.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)}, loss_mask {tuple(loss_mask.shape)} and "
                         f"sequence_index {tuple(sequence_index.shape)} must have the same shape")
    index = sequence_index.reshape(-1).long()
    if index.numel() and int(index.max()) >= num_sequences:
        raise ValueError(f"sequence_index holds {int(index.max())} but num_sequences is {num_sequences}")
    valid = (index >= 0) & loss_mask.reshape(-1).bool()
    safe_index = index.clamp(min=0)
    logps = token_logps.reshape(-1).float()
    zeros = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    total = zeros.index_add(0, safe_index, torch.where(valid, logps, torch.zeros_like(logps)))
    count = zeros.index_add(0, safe_index, valid.float())
    return SequenceLogProbs(sum=total, count=count)
