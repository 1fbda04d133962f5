"""Next-token choice on vocabulary-parallel logits, identical on every tensor-parallel rank, never gathering V.

Rank r holds logits z of token ids [r·V_local, (r+1)·V_local) (Megatron's padded vocabulary); ids ≥ V (padding) are
cut off before anything else, so they are never chosen.

Sampling is Gumbel-max: with g_v i.i.d. standard Gumbel,

    argmax_v (z_v / T + g_v)  ~  softmax(z / T)

restricted to a candidate set C (all real ids; or the top-k; or the top-p nucleus) the same argmax samples
softmax(z / T) renormalised on C. The noise g_v = −log(−log u_v) comes from a counter-based hash of
(seed, prompt index, sample index, generated-token index, token id) — no generator state — so every TP rank draws
the same noise for the ids it owns, and a sample does not depend on the batch it ran in, the DP size or the TP size.

Collectives (TP group, at most k values per row per shard):
- greedy / plain sampling: each shard's best (value, id); all-gather; the max wins (ties: the lowest id, as
  ``torch.argmax``);
- top-k: each shard's local top-k; all-gather; the global top-k is exact (any global top-k id is in its shard's top-k);
- top-p: the nucleus is the shortest prefix of ids sorted by probability whose mass reaches p (id i kept iff the mass
  before it is < p, as in transformers' ``TopPLogitsWarper``). Each shard sends its top-k0 (k0 = 64, grown ×4 until
  the nucleus closes inside the gathered set, which is then exact); probabilities use the global normaliser
  Σ_v exp(z_v/T) from one SUM all-reduce. With top-k too, top-p applies to the top-k renormalised (transformers' order).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

_MASK32 = 0xFFFFFFFF
_FIRST_NUCLEUS_CANDIDATES = 64


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0 = greedy. ``top_k`` 0 and ``top_p`` 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _mul32(x: Tensor, constant: int) -> Tensor:
    """x · c mod 2^32 for x in [0, 2^32) without leaving int64's range (c split in 16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (lowbias32): a bijection of [0, 2^32) with good avalanche."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, prompt_index: Tensor, sample_index: Tensor, step: Tensor) -> Tensor:
    """One 32-bit key per row from (seed, prompt index, sample index, generated-token index): int64 [b]."""
    key = _mix32(torch.full_like(prompt_index, seed & _MASK32) ^ 0x5BD1E995)
    for part in (prompt_index, sample_index, step):
        key = _mix32(key ^ _mix32(part.long() + 0x9E3779B9))
    return key


def gumbel_noise(keys: Tensor, token_ids: Tensor) -> Tensor:
    """Standard Gumbel noise [b, n] (float64) for rows with ``keys`` [b] at vocabulary ids ``token_ids`` [b, n] or
    [n]: a pure function of (key, id), with u of 53 random bits."""
    ids = token_ids.long() if token_ids.dim() == 2 else token_ids.long().unsqueeze(0)
    high = _mix32(keys.unsqueeze(1) ^ _mix32(ids))
    low = _mix32(high ^ 0x27D4EB2F ^ keys.unsqueeze(1))
    u = ((high << 21) + (low >> 11)).double().add_(0.5).mul_(2.0 ** -53)
    return -torch.log(-torch.log(u))


def _tp(group: ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather_rows(values: Tensor, group: ProcessGroup | None) -> Tensor:
    """[b, k] per rank → [b, TP·k] (rank-major), the same on every rank."""
    world, _ = _tp(group)
    if world == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(parts, values.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _global_top(scores: Tensor, vocab_start: int, k: int, group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """The global top-k (values desc, ids) [b, k'] of scores sharded on the vocabulary; k' = min(k, real V)."""
    local_k = min(k, scores.shape[1])
    values, local_ids = scores.topk(local_k, dim=1) if local_k else (scores[:, :0], scores[:, :0].long())
    ids = local_ids + vocab_start
    # shards with fewer real ids pad with -inf so every rank sends the same shape
    pad = k - local_k
    if pad:
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=1)
    values, ids = _all_gather_rows(values, group), _all_gather_rows(ids, group)
    real = int((ids[0] >= 0).sum())
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :min(k, real)]
    return values.gather(1, order), ids.gather(1, order)


def _nucleus_keep(logits_sorted: Tensor, log_normaliser: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Which sorted candidates are in the top-p nucleus, and whether the nucleus closed inside them."""
    probs = (logits_sorted - log_normaliser.unsqueeze(1)).exp()
    before = probs.cumsum(dim=1) - probs
    keep = before < top_p
    keep[:, 0] = True
    closed = (probs.sum(dim=1) >= top_p) | (logits_sorted.shape[1] == 0)
    return keep, closed


def _lse(scores: Tensor, group: ProcessGroup | None) -> Tensor:
    """log Σ_v exp(scores_v) over the sharded vocabulary: MAX then SUM all-reduce (as ``ops.logprobs``)."""
    world, _ = _tp(group)
    m = scores.max(dim=1).values if scores.shape[1] else scores.new_full((scores.shape[0],), float("-inf"))
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = (scores - m.unsqueeze(1)).exp().sum(dim=1)
    if world > 1:
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return m + s.log()


def choose_tokens(logits: Tensor, vocab_size: int, config: SamplingConfig, keys: Tensor | None,
                  group: ProcessGroup | None = None) -> Tensor:
    """Next token ids [b] (int64, < ``vocab_size``, identical on every rank of ``group``) from this rank's logits
    [b, V_local] of the padded, vocabulary-sharded output. ``keys`` [b] (from :func:`row_keys`) seed the noise; unused
    when greedy."""
    world, rank = _tp(group)
    local = logits.shape[1]
    vocab_start = rank * local
    real = max(0, min(local, vocab_size - vocab_start))
    scores = logits[:, :real].float()
    if not config.greedy:
        scores = scores / config.temperature
    b = scores.shape[0]

    if config.greedy or (config.top_k == 0 and config.top_p >= 1.0):
        if config.greedy:
            perturbed = scores
        else:
            ids = torch.arange(vocab_start, vocab_start + real, device=scores.device)
            perturbed = scores.double() + gumbel_noise(keys, ids)
        if real:
            value, index = perturbed.max(dim=1)  # first maximum: the lowest id on ties
            best = torch.stack([value.double(), (index + vocab_start).double()], dim=1)
        else:
            best = torch.tensor([[float("-inf"), -1.0]], dtype=torch.float64, device=scores.device).expand(b, 2)
            best = best.contiguous()
        gathered = _all_gather_rows(best, group).view(b, world, 2)  # rank-major: lower ranks own lower ids
        winner = gathered[:, :, 0].argmax(dim=1)
        return gathered[torch.arange(b, device=scores.device), winner, 1].long()

    if config.top_k:
        values, ids = _global_top(scores, vocab_start, config.top_k, group)
        keep = torch.ones_like(values, dtype=torch.bool)
        if config.top_p < 1.0:
            keep, _ = _nucleus_keep(values, torch.logsumexp(values, dim=1), config.top_p)
    else:
        log_normaliser = _lse(scores, group)
        k = _FIRST_NUCLEUS_CANDIDATES
        while True:
            values, ids = _global_top(scores, vocab_start, k, group)
            keep, closed = _nucleus_keep(values, log_normaliser, config.top_p)
            if bool(closed.all()) or k >= local:
                break
            k *= 4
    perturbed = values.double() + gumbel_noise(keys, ids.clamp(min=0))
    perturbed = perturbed.masked_fill(~keep, float("-inf"))
    return ids.gather(1, perturbed.argmax(dim=1, keepdim=True)).squeeze(1)
