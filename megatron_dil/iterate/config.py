"""``megatron-dil-iterate --config ITER.yaml``: the self-play loop's config (:class:`IterateConfig`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_dil.config import at_least
from megatron_dil.generation.sampler import SamplingConfig

HISTORY = ("previous", "all", "none")


@dataclass
class IterateConfig:
    """Iteration k = 0..iterations−1 generates one sample per demonstration prompt from π_k, writes the pairs
    (demonstration ≻ sample), trains π_{k+1} from π_k (its reference) on them blended with earlier iterations'
    pairs (``history``: ``previous`` = iterations k−1 and k as SPIN, ``all`` = 0..k as the IRL code, ``none`` = k),
    and evaluates.

    ``init``: π_0, a megatron_dil checkpoint (``megatron-dil-hf-to-megatron`` output or a run's ``final/``) stored at
    ``train.parallel.tensor``. ``demonstrations``: a ``--kind demonstrations`` dataset prefix (``PREFIX_train``);
    ``valid_demonstrations``: held-out demonstrations for the log-likelihood (``PREFIX_valid``). ``train``: the run
    config of each training stage (any RunConfig section; ``output_dir``, ``init`` and ``data.train/valid`` are set
    per iteration); its ``loss`` defaults to ``dil_lsif``; ``dpo`` with ``logps: sum`` and ``beta: 0.1`` is SPIN.
    """

    output_dir: str
    init: str
    demonstrations: str
    valid_demonstrations: str | None = None
    iterations: int = 2
    history: str = "previous"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    max_new_tokens: int = 64
    generate_batch_size: int = 64
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        at_least(self, 1, "iterations", "max_new_tokens", "generate_batch_size")
        if self.history not in HISTORY:
            raise ValueError(f"history must be one of {HISTORY}, not {self.history!r}")
        for key in ("output_dir", "init"):
            if key in self.train:
                raise ValueError(f"train.{key} is set per iteration by megatron-dil-iterate: remove it (use the "
                                 f"top-level {'init' if key == 'init' else 'output_dir'})")
