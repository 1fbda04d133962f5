"""Resumable training checkpoints, written atomically.

Layout: ``OUTPUT_DIR/checkpoints/iter_NNNNNNN/`` with
  ``model_tpXX_ppYYY.pt``   model chunks + LR scheduler, from DP rank 0 of each (tp, pp)
  ``rank_RRRRR.pt``         every rank's optimizer shard (Adam moments and step, fp32 main params, loss scaler) and
                            RNG states: with the distributed optimizer each DP rank owns a different shard
  ``state.json``            iteration, consumed pairs, skipped steps and the layout (written last)
and ``OUTPUT_DIR/checkpoints/latest`` naming the newest complete one.

Atomicity: everything goes into ``iter_N.partial`` first; after a barrier rank 0 renames it to ``iter_N`` and only
then rewrites ``latest`` (via a temp file + rename) and prunes old checkpoints beyond ``keep_last``. A crash at any
point leaves the previous checkpoint and ``latest`` intact; stale ``.partial`` directories are removed on the next save.
Resume needs the same TP/PP/DP layout (a different one is refused with the layout named).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_dil.convert.checkpoint import publish


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0  # pairs, over all DP ranks
    skipped_steps: int = 0


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
    for megatron_optimizer, state in zip(_megatron_optimizers(optimizer), saved, strict=True):
        megatron_optimizer.optimizer.load_state_dict(state["inner"])
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


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def save_checkpoint(root: str | Path, chunks: list, optimizer, scheduler, state: TrainState, keep_last: int) -> Path:
    """Collective: save a resumable checkpoint of step ``state.iteration``; return its directory."""
    root = Path(root)
    name = f"iter_{state.iteration:07d}"
    final, partial = root / name, root / f"{name}.partial"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            shutil.rmtree(stale)
        partial.mkdir()
    dist.barrier()
    if _writes_model_file():
        torch.save({"model": [c.module.state_dict() for c in chunks], "scheduler": scheduler.state_dict()},
                   partial / _model_file())
    torch.save({"optimizer": _optimizer_state(optimizer), "rng": _rng_state()}, partial / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (partial / "state.json").write_text(json.dumps({**asdict(state), "layout": _layout()}, indent=1))
        publish(partial, final)  # re-saving a step keeps the old copy until the new one is in place
        tmp = root / "latest.tmp"
        tmp.write_text(name)
        tmp.replace(root / "latest")
        complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / "state.json").exists()
                          and p.suffix == "")
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


@torch.no_grad()
def load_checkpoint(path: str | Path, chunks: list, optimizer, scheduler) -> TrainState:
    """Collective: restore model, optimizer, scheduler and RNG from ``path``; return the train state."""
    path = Path(path)
    saved = json.loads((path / "state.json").read_text())
    layout = saved.pop("layout")
    if layout != _layout():
        raise ValueError(f"checkpoint {path} was written with layout {layout}, this run is {_layout()}; resume with "
                         f"the same parallel sizes (or export to HF and re-convert at the new layout)")
    blob = torch.load(path / _model_file(), map_location="cpu", weights_only=False)
    for chunk, state_dict in zip(chunks, blob["model"], strict=True):
        chunk.module.load_state_dict(state_dict)
    scheduler.load_state_dict(blob["scheduler"])
    own = torch.load(path / f"rank_{dist.get_rank():05d}.pt", map_location="cpu", weights_only=False)
    _load_optimizer_state(optimizer, own["optimizer"])
    _set_rng_state(own["rng"])
    return TrainState(**saved)
