"""Everything checkable before a rank builds a model: architecture, tokenizer, datasets, layout, batch plan and the
output directory. Runs on every rank without a process group (the world size comes from torchrun's environment), so
a bad run ends before any weights are allocated, and the checks are testable without ranks."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron_dil.convert.hf_files import has_tokenizer
from megatron_dil.data.loader import build_datasets
from megatron_dil.data.tokenizer import PreferenceTokenizer, load_tokenizer
from megatron_dil.models.config import ModelConfig
from megatron_dil.runtime.distributed import validate_layout
from megatron_dil.training.batch_plan import BatchPlan
from megatron_dil.training.config import RunConfig


@dataclass
class Preflight:
    model: ModelConfig
    tokenizer: PreferenceTokenizer
    train_set: object
    valid_set: object | None
    plan: BatchPlan
    notes: list[str] = field(default_factory=list)  # decisions worth a log line (defaults taken, rounding)


def resolve_model_config(run: RunConfig) -> ModelConfig:
    """``model:`` for random init, else the architecture stored with ``init.checkpoint``; with a ``reward:`` section
    the same trunk under a reward head. A reward checkpoint is refused where a policy is trained."""
    if run.model is not None:
        model = run.model
    else:
        from megatron_dil.convert import MegatronCheckpoint

        model = MegatronCheckpoint(run.init.checkpoint).model
        if model.head == "reward" and run.reward is None:
            raise ValueError(f"init.checkpoint {run.init.checkpoint} is a reward model (head: reward); a policy "
                             f"checkpoint is expected (or add a reward: section to train the reward model further)")
    return dataclasses.replace(model, head="reward") if run.reward is not None else model


def resolve_tokenizer(run: RunConfig) -> str | None:
    """``data.tokenizer`` defaults to the ``tokenizer/`` that ``init.checkpoint`` carries (set in ``run``); returns a
    note saying so, or None when it was given."""
    if run.data.tokenizer:
        return None
    bundled = Path(run.init.checkpoint) / "tokenizer"
    if not has_tokenizer(bundled):
        raise ValueError(f"data.tokenizer is not set and init.checkpoint {run.init.checkpoint} carries no tokenizer/ "
                         f"directory: set data.tokenizer to the tokenizer the datasets were written with")
    run.data.tokenizer = str(bundled)
    return f"data.tokenizer not set: using the tokenizer of init.checkpoint ({bundled})"


def check_compatible(run: RunConfig, model: ModelConfig, tokenizer_vocab: int) -> None:
    if tokenizer_vocab > model.vocab_size:
        raise ValueError(f"tokenizer {run.data.tokenizer} has {tokenizer_vocab} tokens but the model's vocabulary "
                         f"is {model.vocab_size}: wrong tokenizer for this model")
    if run.data.max_length > model.max_position_embeddings:
        raise ValueError(f"data.max_length {run.data.max_length} exceeds the model's max_position_embeddings "
                         f"{model.max_position_embeddings}")
    if run.parallel.context > 1:
        raise ValueError("parallel.context > 1 is not supported by the trainer yet (sequences are not split)")


def check_output_dir(path: str) -> None:
    """``output_dir`` exists (created if needed) as a writable directory, else one line saying what is wrong."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a directory: choose another output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output_dir {out} is not writable ({err.strerror or err}): choose another output_dir "
                         f"or fix its permissions") from None


def check_demonstrations(run: RunConfig, *datasets) -> None:
    """Only ``loss.name: sft`` trains on a demonstrations dataset (its rejected responses are empty)."""
    if run.loss.name == "sft":
        return
    for dataset in datasets:
        for part in getattr(dataset, "datasets", [dataset]):  # a blend's parts
            if part is not None and part.kind == "demonstrations":
                raise ValueError(f"dataset {part.prefix!r} holds demonstrations (no rejected responses): loss "
                                 f"{run.loss.name!r} needs pairs; use loss.name sft, or megatron-dil-iterate to make "
                                 f"pairs from it")


def preflight(run: RunConfig, world_size: int) -> Preflight:
    """All checks that need no process group and no model, in the order a user would fix them."""
    model = resolve_model_config(run)
    notes = [note] if (note := resolve_tokenizer(run)) else []
    tokenizer = load_tokenizer(run.data.tokenizer)
    check_compatible(run, model, tokenizer.vocab_size)
    data_parallel = validate_layout(run.parallel, world_size, model)
    train_set, valid_set = build_datasets(run.data, tokenizer)
    check_demonstrations(run, train_set, valid_set)
    plan = BatchPlan.from_config(run, data_parallel, len(train_set), None if valid_set is None else len(valid_set))
    if plan.epochs_note:
        notes.append(plan.epochs_note)
    check_output_dir(run.output_dir)
    return Preflight(model, tokenizer, train_set, valid_set, plan, notes)
