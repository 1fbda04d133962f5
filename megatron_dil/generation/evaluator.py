"""Evaluation by generation during training: greedy completions of a fixed set of held-out prompts, scored by a
task verifier when there is one. The trainer runs it as one of its periodic components (``generate_eval:`` in the
run config, :class:`~megatron_dil.generation.config.GenerationEvalConfig`).

The prompts are split over data-parallel ranks; each model-parallel group decodes its share with the policy's
current weights (KV cache, vocabulary-parallel greedy choice), and the last pipeline stage's results are gathered
over the data-parallel group, so every last-stage rank returns the same :class:`GenerationEvalResult`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dil.data.tokenizer import PreferenceTokenizer
from megatron_dil.generation.config import GenerationEvalConfig
from megatron_dil.generation.decode import DecodeLimits, DecodeRequest
from megatron_dil.generation.engine import generate
from megatron_dil.generation.prompts import load_prompts
from megatron_dil.generation.sampler import SamplingConfig
from megatron_dil.generation.verifier import get_verifier


@dataclass
class GenerationEvalResult:
    step: int
    num_prompts: int
    correct: float | None  # Σ verifier scores over the prompts it applies to (None without a verifier)
    scored: int  # prompts the verifier applies to
    samples: list[dict[str, Any]] = field(default_factory=list)  # the first few: prompt, completion, score

    @property
    def score(self) -> float | None:
        return None if self.correct is None or not self.scored else self.correct / self.scored

    def summary(self) -> str:
        head = f"generate @ step {self.step}: {self.num_prompts} prompts"
        if self.score is not None:
            head += f" | verifier {self.correct:g}/{self.scored} correct ({100 * self.score:.1f}%)"
        return "\n".join([head] + [f"  {s['prompt']!r} -> {s['completion']!r}"
                                   + ("" if s["score"] is None else f" [{s['score']:g}]") for s in self.samples])


class GenerationEvaluator:
    def __init__(self, config: GenerationEvalConfig, tokenizer: PreferenceTokenizer, window: int, vocab_size: int):
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.verifier = get_verifier(config.verifier) if config.verifier else None
        self.prompts = load_prompts(config.prompts, tokenizer, template=config.template, window=window,
                                    limit=config.max_prompts).prompts
        self.limits = DecodeLimits(config.max_new_tokens, window, (tokenizer.eos_id,))

    @torch.no_grad()
    def run(self, step: int, chunks: list[torch.nn.Module]) -> GenerationEvalResult | None:
        """Collective over the world. ``chunks``: this rank's model chunks (Megatron DDP-wrapped or bare; one per
        rank — interleaved pipelines are not supported). Returns the result on last-stage ranks, None elsewhere;
        the model is left in eval mode (the training step sets train mode itself)."""
        if len(chunks) != 1:
            raise ValueError("generation evaluation needs one model chunk per rank (no virtual pipeline)")
        model = getattr(chunks[0], "module", chunks[0])
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = [DecodeRequest(p.ids, p.index, 0) for p in self.prompts[dp_rank::dp]]
        completions = generate(model, mine, SamplingConfig(temperature=0.0), self.limits, self.vocab_size,
                               self.config.batch_size)
        if completions is None:
            return None
        rows = []
        for request, completion in zip(mine, completions):
            ids = completion.token_ids[:-1] if completion.finish_reason == "eos" else completion.token_ids
            prompt = self.prompts[request.prompt_index].source
            text = self.tokenizer.decode(ids)
            rows.append((request.prompt_index, prompt, text,
                         None if self.verifier is None else self.verifier(prompt, text)))
        gathered: list[Any] = [None] * dp
        if dp > 1:
            dist.all_gather_object(gathered, rows, group=parallel_state.get_data_parallel_group())
        else:
            gathered = [rows]
        rows = sorted((r for part in gathered for r in part), key=lambda r: r[0])
        scores = [r[3] for r in rows if r[3] is not None]
        return GenerationEvalResult(
            step=step, num_prompts=len(rows), correct=float(sum(scores)) if self.verifier else None,
            scored=len(scores),
            samples=[{"prompt": r[1], "completion": r[2], "score": r[3]} for r in rows[:self.config.samples_shown]])
