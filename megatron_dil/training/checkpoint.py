"""Resumable training checkpoints: written atomically, verified on load.

Layout: ``OUTPUT_DIR/checkpoints/iter_NNNNNNN/`` with
  ``model_tpXX_ppYYY.pt``   model chunks (only the trainable tensors when some are frozen: LoRA adapters) + LR
                            scheduler, from DP rank 0 of each (tp, pp)
  ``rank_RRRRR.pt``         every rank's optimizer shard (Adam moments and step, fp32 main params, loss scaler) and
                            RNG states: with the distributed optimizer each DP rank owns a different shard
  ``state.json``            iteration, consumed pairs, skipped steps, the layout, the run's schedule keys and the size
                            and BLAKE2b digest of every other file (written last)
and ``OUTPUT_DIR/checkpoints/latest`` naming the newest one (informational: resume scans the directories).

Atomicity: everything goes into ``iter_N.partial`` first; after every rank reported success rank 0 writes
``state.json``, renames the directory to ``iter_N`` and only then rewrites ``latest`` and prunes complete checkpoints
beyond ``keep_last``. A failure on any rank (a full disk, say) is agreed on by all ranks, removes the partial directory
and leaves the previous checkpoint intact; weights holding NaN/inf are never written.

Resume (``find_resumable``) takes the newest ``iter_N`` whose ``state.json`` parses and whose files all have their
recorded sizes (each rank also checks the digests of the files it reads) and reports why it skipped newer ones. It
needs the same TP/PP/DP layout (a different one is refused with the layout named).
"""
from __future__ import annotations

import errno
import json
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_dil.lora.apply import load_trainable_state_dict, trainable_state_dict
from megatron_dil.io import IntegrityError, atomic_write_text, file_record, publish, verify_file, verify_files
from megatron_dil.training.collectives import first_error

STATE = "state.json"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0  # pairs, over all DP ranks
    skipped_steps: int = 0
    consecutive_skips: int = 0  # non-finite steps in a row up to this one (train.max_consecutive_skips)


def _layout() -> dict[str, int]:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "data": parallel_state.get_data_parallel_world_size(),
        "expert": parallel_state.get_expert_model_parallel_world_size(),
    }


def _model_file() -> str:
    tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    if parallel_state.get_expert_model_parallel_world_size() > 1:  # MoE: each EP rank holds other experts
        return f"model_tp{tp:02d}_pp{pp:03d}_ep{parallel_state.get_expert_model_parallel_rank():03d}.pt"
    return f"model_tp{tp:02d}_pp{pp:03d}.pt"


def _writes_model_file() -> bool:
    """Collective. DP rank 0 of each (tp, pp); with expert parallelism the lowest rank of each (tp, pp, ep), since
    dense replicas span DP but expert replicas only the expert-data-parallel group."""
    if parallel_state.get_expert_model_parallel_world_size() == 1:
        return parallel_state.get_data_parallel_rank() == 0
    mine = _model_file()
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, mine)
    return names.index(mine) == dist.get_rank()


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_params(megatron_optimizer) -> list[torch.Tensor]:
    """The parameters the inner torch optimizer updates (fp32 main params; this rank's shard when distributed)."""
    return [p for group in megatron_optimizer.optimizer.param_groups for p in group["params"]]


def _optimizer_state(optimizer) -> list[dict]:
    return [{"inner": o.optimizer.state_dict(), "main_params": [p.detach().clone() for p in _main_params(o)],
             "grad_scaler": o.grad_scaler.state_dict() if getattr(o, "grad_scaler", None) else None}
            for o in _megatron_optimizers(optimizer)]


def _load_optimizer_state(optimizer, saved: list[dict]) -> None:
    """Adam state, main params and loss scaler from the checkpoint; the param groups' hyperparameters (``max_lr``,
    ``min_lr``, weight decay, betas, ...) stay those of this run's config."""
    for megatron_optimizer, state in zip(_megatron_optimizers(optimizer), saved, strict=True):
        configured = [{k: v for k, v in g.items() if k != "params"} for g in megatron_optimizer.optimizer.param_groups]
        megatron_optimizer.optimizer.load_state_dict(state["inner"])
        for group, values in zip(megatron_optimizer.optimizer.param_groups, configured, strict=True):
            group.update(values)
        for param, value in zip(_main_params(megatron_optimizer), state["main_params"], strict=True):
            param.copy_(value)
        if state["grad_scaler"] is not None:
            megatron_optimizer.grad_scaler.load_state_dict(state["grad_scaler"])


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed on some rank; the previous checkpoint is untouched."""


def _nonfinite_parameters(chunks: list) -> str | None:
    bad = [name for chunk in chunks for name, p in chunk.module.named_parameters() if not torch.isfinite(p).all()]
    return f"parameters {bad[:3]}{' ...' if len(bad) > 3 else ''} hold NaN/inf" if bad else None


def check_finite_weights(chunks: list, what: str) -> None:
    """Collective: refuse to write ``what`` when any rank's weights hold a non-finite value."""
    error = first_error(_nonfinite_parameters(chunks))
    if error is not None:
        raise FloatingPointError(f"refusing to write {what}: {error} (the run diverged); resume from the last "
                                 f"checkpoint with a lower train.lr")


def _save_error(root: Path, err: BaseException) -> str:
    """One line for a failed write; torch.save reports a full disk as ``file write failed`` without an errno, so
    (almost) no free space counts as a full disk too."""
    free = shutil.disk_usage(root).free / 2**20 if root.exists() else float("nan")
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or free < 64
    return (f"{type(err).__name__}: {' '.join(str(err).split())} ({'the disk is full: ' if full else ''}"
            f"{free:.0f} MiB free on {root})")


def _agree(root: Path, partial: Path, error: str | None, step: int) -> None:
    """Collective: if any rank failed, remove the partial checkpoint and raise on every rank."""
    failed = first_error(error)
    if failed is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    previous = latest_name(root)
    raise CheckpointSaveError(f"saving the checkpoint of step {step} failed on {failed}; the previous checkpoint "
                              f"({root / previous if previous else 'none'}) is intact: fix the cause and run again to "
                              f"resume from it")


def latest_name(root: Path) -> str | None:
    pointer = root / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def save_checkpoint(root: str | Path, chunks: list, optimizer, scheduler, state: TrainState, keep_last: int,
                    schedule: dict | None = None) -> Path:
    """Collective: save a resumable checkpoint of step ``state.iteration``; return its directory. ``schedule``
    (the run's LR-schedule keys) is recorded so a resumed run can name what changed."""
    root = Path(root)
    name = f"iter_{state.iteration:07d}"
    final, partial = root / name, root / f"{name}.partial"
    check_finite_weights(chunks, f"checkpoint {final}")
    rank, error = dist.get_rank(), None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("*.partial"):
                shutil.rmtree(stale)
            partial.mkdir()
        except OSError as err:
            error = _save_error(root, err)
    _agree(root, partial, error, state.iteration)
    records = {}
    try:
        if _writes_model_file():
            torch.save({"model": [trainable_state_dict(c.module) for c in chunks], "scheduler": scheduler.state_dict()},
                       partial / _model_file())
            records[_model_file()] = file_record(partial / _model_file())
        own = f"rank_{rank:05d}.pt"
        torch.save({"optimizer": _optimizer_state(optimizer), "rng": _rng_state()}, partial / own)
        records[own] = file_record(partial / own)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        error = _save_error(root, err)
    _agree(root, partial, error, state.iteration)
    gathered: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if rank == 0:
        try:
            files = {k: v for part in gathered for k, v in part.items()}
            atomic_write_text(partial / STATE, json.dumps(
                {**asdict(state), "layout": _layout(), "schedule": schedule or {}, "files": files}, indent=1))
            publish(partial, final)  # re-saving a step keeps the old copy until the new one is in place
            atomic_write_text(root / "latest", name)
            complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / STATE).exists()
                              and p.suffix == "")
            for old in complete[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old)
        except OSError as err:
            error = _save_error(root, err)
    _agree(root, partial, error, state.iteration)
    return final


REMEDY = ("this checkpoint is damaged or incomplete; delete it to resume from an older one, or set "
          "checkpoint.resume=false to start over")


def read_state(path: Path) -> dict:
    """``state.json`` of checkpoint ``path``, or ``IntegrityError`` saying what is wrong with it."""
    try:
        saved = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise IntegrityError(f"checkpoint {path}: {STATE} is missing (the save did not complete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"checkpoint {path}: {STATE} is not valid JSON ({err})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("files"), dict):
        raise IntegrityError(f"checkpoint {path}: {STATE} records no file checksums (not written by this trainer)")
    return saved


def _own_files() -> list[str]:
    return [_model_file(), f"rank_{dist.get_rank():05d}.pt"]


def _check_candidate(path: Path) -> str | None:
    """This rank's verdict on checkpoint ``path``: None if usable, else why not."""
    try:
        saved = read_state(path)
        what = f"checkpoint {path}"
        for name in _own_files():
            if name not in saved["files"]:
                raise IntegrityError(f"{what}: {STATE} does not list {name} (written at another layout?)")
        verify_files(path, saved["files"], what, REMEDY, check_digest=False)  # sizes of all: cheap
        for name in _own_files():  # digests of what this rank will read
            verify_file(path / name, saved["files"][name], what, REMEDY)
    except IntegrityError as err:
        return str(err)
    return None


def find_resumable(root: str | Path) -> tuple[Path | None, list[str], int]:
    """Collective: the newest verified checkpoint under ``root`` (or None), the reasons newer ones were skipped, and
    how many checkpoint directories exist at all."""
    candidates = sorted((p for p in Path(root).glob("iter_*") if p.is_dir() and p.suffix == ""), reverse=True)
    skipped = []
    for path in candidates:
        problem = first_error(_check_candidate(path))
        if problem is None:
            return path, skipped, len(candidates)
        skipped.append(problem)
    return None, skipped, len(candidates)


def _load(path: Path, name: str) -> dict:
    try:
        return torch.load(path / name, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as whatever the unpickler trips on
        raise IntegrityError(f"checkpoint {path}: {name} cannot be read ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]}); {REMEDY}") from None


@torch.no_grad()
def load_checkpoint(path: str | Path, chunks: list, optimizer, scheduler) -> tuple[TrainState, dict]:
    """Restore model, optimizer and RNG from verified checkpoint ``path`` and advance the LR scheduler to its step
    count (the schedule itself comes from this run's config); return the train state and the recorded schedule."""
    path = Path(path)
    saved = read_state(path)
    layout = saved["layout"]
    if layout != _layout():
        raise ValueError(f"checkpoint {path} was written with layout {layout}, this run is {_layout()}; resume with "
                         f"the same parallel sizes (or export to HF and re-convert at the new layout)")
    blob = _load(path, _model_file())
    for chunk, state_dict in zip(chunks, blob["model"], strict=True):
        load_trainable_state_dict(chunk.module, state_dict)
    own = _load(path, f"rank_{dist.get_rank():05d}.pt")
    _load_optimizer_state(optimizer, own["optimizer"])
    scheduler.step(increment=blob["scheduler"]["num_steps"])  # sets each group's lr for the resumed step
    _set_rng_state(own["rng"])
    names = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in saved.items() if k in names}), saved.get("schedule", {})
