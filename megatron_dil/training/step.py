"""One micro-batch through Megatron's pipeline schedule: logits → vocab-parallel log-probs → preference loss.

For n pairs a micro-batch holds 2n sequences (chosen i and rejected i, see ``data.collator``). On the last pipeline
stage the sharded logits [rows, S, Vp/TP] give per-token log p(label) by a TP all-reduce (never gathering the
vocabulary), summed per sequence over response tokens into ``PairLogProbs``. The loss function returns
(Σ per-pair loss, n, ...): with ``calculate_per_token_loss`` the gradients are divided by the global pair count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_dil.data.collator import PreferenceBatch
from megatron_dil.losses import MetricAccumulator, PairLogProbs, PreferenceLoss, find_nonfinite
from megatron_dil.ops.logprobs import SequenceLogProbs, sequence_logprobs, vocab_parallel_logprobs


@dataclass
class LogProbSetup:
    """How logits become log-probs: the real vocabulary (padding excluded) and the chunking of the log-softmax."""

    vocab_size: int
    chunk_size: int | None = None


def pair_logprobs(logits: torch.Tensor, batch: PreferenceBatch, setup: LogProbSetup) -> PairLogProbs:
    """Per-pair response log-likelihoods log π(y|x) = Σ_t mask_t · log p(y_t | x, y_<t) for chosen and rejected."""
    token_logps = vocab_parallel_logprobs(
        logits, batch.labels, parallel_state.get_tensor_model_parallel_group(),
        vocab_size=setup.vocab_size, chunk_size=setup.chunk_size)
    n = batch.num_pairs
    seq = sequence_logprobs(token_logps, batch.loss_mask, batch.sequence_index, 2 * n)
    return PairLogProbs(chosen=SequenceLogProbs(seq.sum[:n], seq.count[:n]),
                        rejected=SequenceLogProbs(seq.sum[n:], seq.count[n:]))


def detach_pairs(pairs: PairLogProbs) -> PairLogProbs:
    return PairLogProbs(chosen=SequenceLogProbs(pairs.chosen.sum.detach(), pairs.chosen.count.detach()),
                        rejected=SequenceLogProbs(pairs.rejected.sum.detach(), pairs.rejected.count.detach()))


@dataclass
class MicroBatchResults:
    """What the last pipeline stage collected over the micro-batches of one schedule call."""

    metrics: MetricAccumulator = field(default_factory=MetricAccumulator)
    nonfinite: list[str] = field(default_factory=list)
    logprobs: list[PairLogProbs] = field(default_factory=list)


def _model_forward(model, batch: PreferenceBatch) -> torch.Tensor:
    return model(batch.tokens, batch.position_ids, batch.attention_mask,
                 packed_seq_params=batch.packed_seq_params)


def _pad_to(batch: PreferenceBatch, rows: int, length: int) -> PreferenceBatch:
    """``batch`` grown to [rows, length] with padding (loss mask 0, sequence index −1, appended positions masked)."""
    extra_rows, extra_cols = rows - batch.tokens.shape[0], length - batch.tokens.shape[1]
    if not extra_rows and not extra_cols:
        return batch

    def grow(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, extra_cols, 0, extra_rows), value=value)

    mask = batch.attention_mask
    if mask is not None:  # [rows, 1, S, S], True = masked out; new queries see only themselves (no empty rows)
        mask = torch.nn.functional.pad(mask, (0, extra_cols, 0, extra_cols, 0, 0, 0, extra_rows), value=True)
        mask = mask & ~torch.eye(length, dtype=torch.bool, device=mask.device)
    return PreferenceBatch(grow(batch.tokens, 0), grow(batch.labels, 0), grow(batch.loss_mask, 0.0),
                           grow(batch.position_ids, 0), mask, batch.packed_seq_params, grow(batch.sequence_index, -1),
                           batch.sample_ids, batch.num_pairs, batch.num_tokens)


def uniform_shapes(batches: list[PreferenceBatch]) -> list[PreferenceBatch]:
    """Pipeline stages exchange activations of one static shape per schedule call: pad every micro-batch to the
    largest [rows, S]. Padding sits after the real tokens (causal attention) and in extra rows, so results are
    unchanged."""
    rows = max(b.tokens.shape[0] for b in batches)
    length = max(b.tokens.shape[1] for b in batches)
    return [_pad_to(b, rows, length) for b in batches]


def run_schedule(chunks: list, batches: list[PreferenceBatch],
                 loss_for: Callable[[int, PreferenceBatch, torch.Tensor], tuple], forward_only: bool) -> None:
    """Run Megatron's forward-backward function (no pipelining, 1F1B or interleaved by the parallel state) over
    ``batches``; ``loss_for(index, batch, logits)`` is Megatron's loss function for micro-batch ``index``.

    The interleaved schedule needs a multiple of PP micro-batches: forward-only passes are padded with copies of the
    last batch whose outputs are ignored (training steps are validated up front instead).
    """
    real = len(batches)
    pipeline = parallel_state.get_pipeline_model_parallel_world_size()
    if len(chunks) > 1 and real % pipeline:
        if not forward_only:
            raise ValueError(f"the interleaved schedule needs a multiple of PP={pipeline} micro-batches, got {real}")
        batches = batches + [batches[-1]] * (pipeline - real % pipeline)
    if pipeline > 1:
        batches = uniform_shapes(batches)

    def ignored(batch: PreferenceBatch, logits: torch.Tensor):
        return logits.sum() * 0.0, torch.tensor(0, dtype=torch.int), {}

    def forward_step(data_iterator, model):
        index, batch = next(data_iterator)
        loss = partial(loss_for, index, batch) if index < real else partial(ignored, batch)
        return _model_forward(model, batch), loss

    items = list(enumerate(batches))
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(items) for _ in chunks] if len(chunks) > 1 else iter(items),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=max(b.tokens.shape[0] for b in batches),
        forward_only=forward_only,
    )


def compute_logprobs(chunks: list, batches: list[PreferenceBatch], setup: LogProbSetup) -> list[PairLogProbs]:
    """Forward-only log-probs of every micro-batch (used for the reference); valid on the last stage, [] elsewhere."""
    results = MicroBatchResults()

    def loss_for(index: int, batch: PreferenceBatch, logits: torch.Tensor):
        results.logprobs.append(detach_pairs(pair_logprobs(logits, batch, setup)))
        return torch.zeros((), device=logits.device), torch.tensor(batch.num_pairs, dtype=torch.int), {}

    with torch.no_grad():
        run_schedule(chunks, batches, loss_for, forward_only=True)
    return results.logprobs


def preference_losses(chunks: list, batches: list[PreferenceBatch], loss: PreferenceLoss, setup: LogProbSetup,
                      reference: Callable[[int, PreferenceBatch], PairLogProbs | None], forward_only: bool,
                      results: MicroBatchResults | None = None, inputs: Callable = pair_logprobs
                      ) -> MicroBatchResults:
    """Forward (and backward unless ``forward_only``) of the preference loss over ``batches``.

    ``reference(index, batch)`` gives the reference log-probs of micro-batch ``index`` (None for reference-free
    losses). ``inputs(outputs, batch, setup)`` turns the model's output into the loss's input: log-probs of the
    responses (a policy), or ``reward.pair_rewards`` (a reward model's scalars). Non-finite per-pair losses are
    reported in ``nonfinite`` (the caller skips or stops the step). Metrics accumulate into ``results`` (a fresh one
    by default), so an evaluation can span several calls.
    """
    results = results if results is not None else MicroBatchResults()

    def loss_for(index: int, batch: PreferenceBatch, logits: torch.Tensor):
        policy = inputs(logits, batch, setup)
        out = loss(policy, reference(index, batch))
        problem = find_nonfinite(out.losses.detach(), f"{loss.name} loss")
        if problem is not None:
            bad = torch.nonzero(~torch.isfinite(out.losses.detach())).flatten()
            results.nonfinite.append(f"{problem} (sample ids {batch.sample_ids[bad].tolist()[:8]})")
        results.metrics.add(out.metrics, out.token_counts)
        return out.losses.sum(), torch.tensor(batch.num_pairs, dtype=torch.int), {}

    if forward_only:
        with torch.no_grad():
            run_schedule(chunks, batches, loss_for, forward_only=True)
    else:
        run_schedule(chunks, batches, loss_for, forward_only=False)
    return results
