"""Which weights to generate with: a converted checkpoint, a run's ``final/``, or a training ``checkpoints/iter_*``.

- megatron_dil checkpoint (``megatron_dil_checkpoint.json``; converted HF model or a run's ``final/``): any PP, the TP
  it was written at; tokenizer from its ``tokenizer/``.
- a run directory (``OUTPUT_DIR`` with ``config.yaml``): its ``final/`` when present, else its newest complete
  ``checkpoints/iter_*`` whose ``state.json`` parses and whose files have their recorded sizes.
- ``checkpoints/iter_N``: the model state of a resumable training checkpoint; architecture and tokenizer from the
  run's ``config.yaml``; it loads at the TP/PP layout it was written with (its stage-local files, each checked
  against the digest ``state.json`` records before it is read).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_dil.convert import MegatronCheckpoint, is_megatron_checkpoint, load_megatron_checkpoint
from megatron_dil.convert.hf_files import has_tokenizer
from megatron_dil.data.tokenizer import PreferenceTokenizer, load_tokenizer
from megatron_dil.io import IntegrityError, verify_file, verify_files
from megatron_dil.models.config import ModelConfig
from megatron_dil.training.checkpoint import REMEDY, STATE, read_state


class GenerationInputError(ValueError):
    """Bad input to generation (checkpoint, tokenizer, prompts, flags); the message names it and what to do."""


@dataclass
class ModelSource:
    """A resolved checkpoint: architecture, tokenizer directory, and the layout it must load at (None = free)."""

    path: Path
    kind: str  # "megatron" | "training"
    model: ModelConfig
    tokenizer: str | None
    tensor_parallel: int
    pipeline_parallel: int | None  # fixed for training checkpoints
    reward_normalization: dict | None = None  # reward models' final/: mean/std on demonstrations (reward.normalize)


HEAD_USE = {"lm": "a policy", "reward": "a reward model"}


def resolve_checkpoint(path: str | Path, head: str = "lm") -> ModelSource:
    """Identify ``path`` (see the module docstring) or raise ``GenerationInputError`` naming it; its model must have
    ``head`` ("lm": a policy, for generation and iteration; "reward": for scoring)."""
    source = _resolve(Path(path))
    if source.model.head != head:
        raise GenerationInputError(f"checkpoint {path} is {HEAD_USE[source.model.head]} (head: {source.model.head}) "
                                   f"but {HEAD_USE[head]} is expected here")
    return source


def _resolve(path: Path) -> ModelSource:
    path = Path(path)
    if not path.exists():
        raise GenerationInputError(f"--checkpoint {path}: no such file or directory")
    if is_megatron_checkpoint(path):
        ckpt = MegatronCheckpoint(path)
        tokenizer = path / "tokenizer"
        return ModelSource(path, "megatron", ckpt.model, str(tokenizer) if has_tokenizer(tokenizer) else None,
                           ckpt.manifest.tensor_parallel, None, ckpt.manifest.reward_normalization)
    if (path / STATE).is_file() and path.parent.name == "checkpoints":
        return _training_checkpoint(path)
    if (path / "config.yaml").is_file():
        if is_megatron_checkpoint(path / "final"):
            return _resolve(path / "final")
        for candidate in sorted((path / "checkpoints").glob("iter_*"), reverse=True):
            try:
                verify_files(candidate, read_state(candidate)["files"], f"checkpoint {candidate}", REMEDY,
                             check_digest=False)
            except IntegrityError:
                continue  # incomplete or damaged: the newest usable one is taken, as the trainer's resume does
            return _training_checkpoint(candidate)
    raise GenerationInputError(f"--checkpoint {path}: not a megatron_dil checkpoint (no megatron_dil_checkpoint.json), "
                               f"a run directory with final/ or checkpoints/, nor a checkpoints/iter_* directory")


def _training_checkpoint(path: Path) -> ModelSource:
    from megatron_dil.config import load_config
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.preflight import resolve_model_config

    run_dir = path.parent.parent
    run = load_config(RunConfig, run_dir / "config.yaml")
    try:
        layout = read_state(path)["layout"]
    except IntegrityError as err:
        raise GenerationInputError(f"--checkpoint {path}: {err}") from None
    if layout.get("virtual_pipeline", 1) != 1:
        raise GenerationInputError(f"--checkpoint {path}: written with virtual pipeline {layout['virtual_pipeline']}, "
                                   f"which generation does not load; use the run's final/ instead")
    return ModelSource(path, "training", resolve_model_config(run), run.data.tokenizer, layout["tensor"],
                       layout["pipeline"])


def resolve_tokenizer(source: ModelSource, override: str | None) -> PreferenceTokenizer:
    """The checkpoint's tokenizer, or ``override`` after checking it has the same vocabulary."""
    if override is None and source.tokenizer is None:
        raise GenerationInputError(f"--checkpoint {source.path} carries no tokenizer; pass --tokenizer")
    tokenizer = load_tokenizer(override or source.tokenizer)
    if override is not None and source.tokenizer is not None and Path(source.tokenizer).exists():
        own = load_tokenizer(source.tokenizer)
        if own.fingerprint != tokenizer.fingerprint:
            raise GenerationInputError(
                f"--tokenizer {override} (vocab {tokenizer.vocab_size}) is not the tokenizer of --checkpoint "
                f"{source.path} ({source.tokenizer}, vocab {own.vocab_size}); drop --tokenizer to use the checkpoint's")
    if tokenizer.vocab_size > source.model.vocab_size:
        raise GenerationInputError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model of "
                                   f"{source.path} has a vocabulary of {source.model.vocab_size}: wrong tokenizer")
    return tokenizer


def load_weights(chunks: list[GPTModel], source: ModelSource) -> None:
    """Copy the checkpoint's weights into this rank's (single) model chunk."""
    if source.kind == "megatron":
        load_megatron_checkpoint(chunks, source.path)
        return
    tp, pp = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    name = f"model_tp{tp:02d}_pp{pp:03d}.pt"
    verify_file(source.path / name, read_state(source.path)["files"][name], f"checkpoint {source.path}", REMEDY)
    blob = torch.load(source.path / name, map_location="cpu", weights_only=False)
    chunks[0].load_state_dict(blob["model"][0])
