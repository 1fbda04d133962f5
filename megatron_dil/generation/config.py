"""``generate_eval:``: evaluation by greedy generation during training (see ``evaluator``)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_dil.config import at_least


@dataclass
class GenerationEvalConfig:
    """Greedy completions of the first ``max_prompts`` distinct prompts of ``prompts`` (any source
    ``megatron-dil-generate`` reads, e.g. the valid split's dataset prefix), scored by ``verifier`` when set.

    Off while ``prompts`` is unset. Runs before the first step of a fresh run (the starting point), every ``interval``
    steps (None: only at the end) and at the last step.
    """

    prompts: str | None = None
    interval: int | None = None
    max_prompts: int = 64
    max_new_tokens: int = 32
    batch_size: int = 64
    verifier: str | None = None  # e.g. tiny_sort
    samples_shown: int = 3
    template: str = "auto"

    def __post_init__(self) -> None:
        at_least(self, 1, "interval", "max_prompts", "max_new_tokens", "batch_size")
        at_least(self, 0, "samples_shown")
