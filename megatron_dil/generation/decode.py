"""Batched autoregressive decoding with Megatron-Core's KV cache (``StaticInferenceContext``), at any TP × PP.

Prompts of different lengths need no padding: all rows of a batch advance through the same positions (so position
ids are plain ``arange`` and attention is plainly causal). The first forward (prefill) runs the first
``min(prompt lengths)`` tokens of every row; after it, each step feeds one token per row: a row still inside its
prompt is fed its next prompt token (the choice made for it is discarded), the others the token just chosen.
A row's completion is therefore exactly what a one-prompt run would produce (the KV cache holds only real tokens).

Pipeline parallel: every step, each stage runs its layers on the step's tokens (first stage) or the activations
received from the stage before, and sends its output on; the last stage picks the tokens (``sampler``) and
broadcasts them, with the rows' done flags, to all stages of its pipeline. Point-to-point calls are plain blocking
send/recv along the pipeline (one ordering on both sides, which gloo needs).

Per-token log-probs of the chosen tokens are log softmax(z)_y of the untempered logits over the real vocabulary,
computed by ``ops.logprobs.vocab_parallel_logprobs`` exactly as in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel

from megatron_dil.generation.sampler import SamplingConfig, choose_tokens, row_keys
from megatron_dil.ops.logprobs import vocab_parallel_logprobs

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class DecodeRequest:
    """One row: a prompt and the (prompt index, sample index) that key its random noise."""

    prompt: list[int]
    prompt_index: int
    sample_index: int


@dataclass
class Completion:
    """Generated ids (the terminating EOS/stop token included), their log-probs, and why generation ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass(frozen=True)
class DecodeLimits:
    """``max_new_tokens`` per row; ``window`` caps prompt + completion (the model's max positions); ``eos_ids`` end
    a row with reason ``eos``, ``stop_ids`` with ``stop``."""

    max_new_tokens: int
    window: int
    eos_ids: tuple[int, ...]
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _stage_forward(model: GPTModel, tokens: torch.Tensor, start: int, context: StaticInferenceContext,
                   hidden_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Positions [start, start + s) of every row through this rank's stage; the last stage returns the logits of the
    last position [b, V_local], other stages send their activations on and return None."""
    b, s = tokens.shape
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if not first:
        received = torch.empty(s, b, hidden_size, dtype=dtype, device=tokens.device)
        dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    context.sequence_len_offset = start
    if start > 0:
        context.enable_decode_mode()
    positions = torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, s)
    if not last:
        output = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
        dist.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    # GPTModel gathers the whole vocabulary whenever it gets an inference context (it asserts
    # runtime_gather_output); take its decoder output instead and apply the output layer without the gather.
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    model.post_process = False
    try:
        hidden = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
    finally:
        model.post_process = True
    logits, _ = model.output_layer(hidden[-1:], weight=weight, runtime_gather_output=False)
    return logits[0]


@torch.no_grad()
def decode(model: GPTModel, requests: list[DecodeRequest], sampling: SamplingConfig, limits: DecodeLimits,
           vocab_size: int, context: StaticInferenceContext | None = None) -> list[Completion] | None:
    """Generate for ``requests`` on this model-parallel group (every rank of it passes the same requests).

    Returns the completions on the last pipeline stage (every TP rank of it holds identical ones), None elsewhere.
    ``context``: a KV cache to (re)use, sized for ``len(requests)`` rows × the longest prompt + ``max_new_tokens``
    (default: a new one of exactly that size); its ``key_value_memory_dict`` holds the cache afterwards.
    """
    model.eval()
    device = _device()
    lengths = torch.tensor([len(r.prompt) for r in requests], device=device)
    if int(lengths.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    b = len(requests)
    total = min(limits.window, int((lengths + limits.max_new_tokens).max()))
    if int(lengths.max()) >= total:
        raise ValueError(f"a prompt of {int(lengths.max())} tokens leaves no room to generate within the model's "
                         f"window of {limits.window} positions")
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for row, request in enumerate(requests):
        tokens[row, :len(request.prompt)] = torch.tensor(request.prompt, dtype=torch.long)
    token_logps = torch.zeros(b, total, dtype=torch.float32, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    reason = torch.full((b,), FINISH_REASONS.index("length"), dtype=torch.long, device=device)
    end = torch.full((b,), total, dtype=torch.long, device=device)  # one past a row's last token
    prompt_index = torch.tensor([r.prompt_index for r in requests], device=device)
    sample_index = torch.tensor([r.sample_index for r in requests], device=device)
    eos = torch.tensor(limits.eos_ids or (-1,), device=device)
    stop = torch.tensor(limits.stop_ids or (-1,), device=device)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    config = model.config
    if context is None:
        context = StaticInferenceContext(b, total)
    elif context.max_batch_size != b or context.max_sequence_length < total:
        raise ValueError(f"the KV cache holds {context.max_batch_size} rows × {context.max_sequence_length} positions; "
                         f"this batch needs {b} × {total}")
    context.reset()

    start, position = 0, int(lengths.min())
    while position < total:
        logits = _stage_forward(model, tokens[:, start:position], start, context, config.hidden_size,
                                config.pipeline_dtype or config.params_dtype)
        # message from the last stage: the chosen tokens and the rows' done flags after this step
        message = torch.zeros(2, b, dtype=torch.long, device=device)
        if last_stage:
            generated = position - lengths  # index of the token being chosen within its row's completion
            keys = row_keys(sampling.seed, prompt_index, sample_index, generated.clamp(min=0))
            chosen = choose_tokens(logits, vocab_size, sampling, keys, tp_group)
            in_prompt = generated < 0
            chosen = torch.where(in_prompt | done, tokens[:, position], chosen)
            token_logps[:, position] = vocab_parallel_logprobs(logits.unsqueeze(1), chosen.unsqueeze(1), tp_group,
                                                               vocab_size=vocab_size).squeeze(1)
            active = ~in_prompt & ~done
            hit_eos = active & torch.isin(chosen, eos)
            hit_stop = active & ~hit_eos & torch.isin(chosen, stop)
            full = active & (generated + 1 >= limits.max_new_tokens)
            reason = torch.where(hit_eos, FINISH_REASONS.index("eos"),
                                 torch.where(hit_stop, FINISH_REASONS.index("stop"), reason))
            finished = hit_eos | hit_stop | full
            end = torch.where(finished, position + 1, end)
            done = done | finished
            message[0], message[1] = chosen, done.long()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(message, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        tokens[:, position] = message[0]
        done = message[1].bool()
        start, position = position, position + 1
        if bool(done.all()):
            break
    if not last_stage:
        return None
    return [Completion(token_ids=tokens[row, len(r.prompt):int(end[row])].tolist(),
                       logprobs=token_logps[row, len(r.prompt):int(end[row])].tolist(),
                       finish_reason=FINISH_REASONS[int(reason[row])])
            for row, r in enumerate(requests)]
