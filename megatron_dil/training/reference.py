"""Reference log-probs: precomputed once and stored beside each dataset, or from a co-resident frozen model.

The cache of dataset PREFIX is ``PREFIX.reference_logps.npz``: per pair the reference's summed response log-prob and
token count for chosen and rejected, plus an identity (model weights, tokenizer, dataset, log-prob settings). A cache
whose identity differs from the current run is stale: it is refused (or rewritten with ``reference.recompute=true``),
never silently used.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dil.data.collator import PreferenceBatch, PreferenceCollator
from megatron_dil.data.dataset import BlendedPreferenceDataset, PreferenceDataset
from megatron_dil.losses import PairLogProbs
from megatron_dil.ops.logprobs import SequenceLogProbs
from megatron_dil.training.monitor import format_seconds
from megatron_dil.training.step import LogProbSetup, compute_logprobs


class StaleReferenceCache(RuntimeError):
    """A reference cache exists but was computed for another model, tokenizer, dataset or log-prob setting."""


@dataclass
class ReferenceTable:
    """Reference sums and token counts per sample id: columns (chosen, rejected)."""

    sums: np.ndarray  # [N, 2] float64
    counts: np.ndarray  # [N, 2] int64

    def lookup(self, sample_ids: torch.Tensor, device: torch.device) -> PairLogProbs:
        ids = sample_ids.cpu().numpy()
        sums = torch.from_numpy(self.sums[ids]).to(device=device, dtype=torch.float32)
        counts = torch.from_numpy(self.counts[ids]).to(device=device, dtype=torch.float32)
        return PairLogProbs(chosen=SequenceLogProbs(sums[:, 0], counts[:, 0]),
                            rejected=SequenceLogProbs(sums[:, 1], counts[:, 1]))


def cache_path(prefix: str) -> str:
    return prefix + ".reference_logps.npz"


def model_identity(init_checkpoint: str | None, model_config: dict[str, Any], seed: int) -> dict[str, Any]:
    """What determines the reference weights: the checkpoint's manifest and file sizes, or the random-init seed and
    the layout (each TP/PP rank initialises its shard from its own RNG stream)."""
    if init_checkpoint is None:
        layout = [parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_virtual_pipeline_model_parallel_world_size()]
        return {"random_init_seed": seed, "layout": layout, "model": model_config}
    root = Path(init_checkpoint)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}:{int(path.stat().st_mtime)}".encode())
    manifest = root / "megatron_dil_checkpoint.json"
    return {"checkpoint": str(root.resolve()), "files": digest.hexdigest(),
            "manifest": json.loads(manifest.read_text()) if manifest.exists() else None, "model": model_config}


def cache_identity(model_id: dict[str, Any], dataset: PreferenceDataset, setup: LogProbSetup,
                   precision: str) -> dict[str, str]:
    """Digest per component (model weights, dataset + tokenizer, log-prob setting, precision) of what the cached
    values depend on."""
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"model": digest(model_id), "dataset and tokenizer": digest(dataset.metadata),
            "vocab size": str(setup.vocab_size), "precision": precision}


def _read_cache(path: str, identity: dict[str, str]) -> ReferenceTable | None:
    if not os.path.exists(path):
        return None
    with np.load(path) as data:
        try:
            cached = json.loads(str(data["identity"]))
        except ValueError:  # written by an older version: treat every component as different
            cached = {}
        if cached != identity:
            differs = ", ".join(k for k in identity if cached.get(k) != identity[k])
            raise StaleReferenceCache(
                f"{path} was computed for another {differs}; delete it or set reference.recompute=true to rebuild it")
        return ReferenceTable(sums=data["sums"].copy(), counts=data["counts"].copy())


def _dp_shard(num_samples: int, micro_batch_size: int) -> list[list[int]]:
    """This DP rank's micro-batches of a full ordered pass (every sample exactly once over all DP ranks)."""
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    mine = list(range(rank, num_samples, size))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def _precompute(chunks: list, dataset: PreferenceDataset, collator: PreferenceCollator, setup: LogProbSetup,
                micro_batch_size: int, device: torch.device, progress: Callable[[int, int], None]) -> ReferenceTable:
    """Forward the frozen reference over the whole dataset (DP-sharded), gathered on every rank."""
    groups = _dp_shard(len(dataset), micro_batch_size)
    real = len(groups)
    if parallel_state.get_expert_model_parallel_world_size() > 1 and groups:
        # MoE layers exchange tokens between expert-parallel ranks in every forward pass: ranks with fewer
        # micro-batches repeat their last one (results dropped) so all run the same number of passes
        longest = math.ceil(math.ceil(len(dataset) / parallel_state.get_data_parallel_world_size()) / micro_batch_size)
        groups += [groups[-1]] * (longest - real)
    ids, sums, counts = [], [], []
    window = 8  # micro-batches per schedule call
    for start in range(0, len(groups), window):
        batches = [collator([dataset[i] for i in g]).to(device) for g in groups[start:start + window]]
        results = compute_logprobs(chunks, batches, setup)
        for batch, pairs in list(zip(batches, results))[:max(0, real - start)]:
            ids.append(batch.sample_ids.cpu().numpy())
            sums.append(torch.stack([pairs.chosen.sum, pairs.rejected.sum], 1).double().cpu().numpy())
            counts.append(torch.stack([pairs.chosen.count, pairs.rejected.count], 1).long().cpu().numpy())
        progress(min(start + window, len(groups)), len(groups))
    local = (np.concatenate(ids) if ids else np.zeros(0, np.int64),
             np.concatenate(sums) if sums else np.zeros((0, 2)),
             np.concatenate(counts) if counts else np.zeros((0, 2), np.int64))
    # Only the last pipeline stage computed values; it sends them to every rank of the world.
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local if parallel_state.is_pipeline_last_stage() else None)
    table = ReferenceTable(sums=np.full((len(dataset), 2), np.nan), counts=np.zeros((len(dataset), 2), np.int64))
    for part in gathered:
        if part is not None:
            table.sums[part[0]], table.counts[part[0]] = part[1], part[2]
    if np.isnan(table.sums).any():
        raise RuntimeError("reference precompute left pairs without log-probs (a rank produced no results)")
    return table


def reference_table(chunks: list, dataset: PreferenceDataset | BlendedPreferenceDataset, collator: PreferenceCollator,
                    setup: LogProbSetup, model_id: dict[str, Any], precision: str, micro_batch_size: int,
                    recompute: bool, device: torch.device, log: Callable[[str], None]) -> ReferenceTable:
    """The reference table for ``dataset`` (a blend: its datasets' tables concatenated in sample-id order), read from
    each dataset's cache or computed with ``chunks`` and written there."""
    parts = dataset.datasets if isinstance(dataset, BlendedPreferenceDataset) else [dataset]
    tables = []
    for part in parts:
        path, identity = cache_path(part.prefix), cache_identity(model_id, part, setup, precision)
        table = None if recompute else _read_cache(path, identity)
        if table is not None:
            log(f"reference log-probs: reusing {path}")
        else:
            log(f"reference log-probs: computing {len(part)} pairs of {part.prefix}")
            started = time.perf_counter()

            def progress(done: int, total: int) -> None:
                if done == total or done % 50 == 0:
                    eta = (time.perf_counter() - started) / done * (total - done)
                    log(f"  reference pass {done}/{total} micro-batches, ETA {format_seconds(eta)}")

            table = _precompute(chunks, part, collator, setup, micro_batch_size, device, progress)
            if dist.get_rank() == 0:
                tmp = path + ".tmp.npz"
                np.savez(tmp, sums=table.sums, counts=table.counts, identity=np.array(json.dumps(identity)))
                os.replace(tmp, path)
            dist.barrier()
        tables.append(table)
    return ReferenceTable(sums=np.concatenate([t.sums for t in tables]),
                          counts=np.concatenate([t.counts for t in tables]))


def table_reference(table: ReferenceTable) -> Callable[[int, PreferenceBatch], PairLogProbs]:
    return lambda index, batch: table.lookup(batch.sample_ids, batch.labels.device)
