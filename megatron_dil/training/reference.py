"""Reference log-probs: precomputed once and cached per dataset, or from a co-resident frozen model.

A cache holds, per pair of one dataset PREFIX, the reference's summed response log-prob and token count for chosen
and rejected. Its name carries a key of everything the values depend on, so caches for different models coexist:

    CACHE_DIR/NAME.reference_logps.KEY.npz      CACHE_DIR = reference.cache_dir, default: the dataset's directory
                                                NAME = the prefix's file name, KEY = 16 hex digits

KEY = BLAKE2b of the identity: the model (a converted checkpoint's shard digests from its manifest and its
model_config.yaml; for random init the seed, layout and architecture), the dataset (its metadata with the tokenizer
fingerprint and the BLAKE2b digests of its ``.idx`` and ``.bin`` recorded at write time, which the dataset reader has
verified against the files), the vocabulary size and the precision. Sums and
counts are loss-independent: every reference-based loss reuses them. The file also records its identity, row count
and a BLAKE2b checksum of the values, checked on every read: a damaged, truncated, short or edited cache is refused
with one line naming it and the remedy (``reference.recompute=true``), never used. Caches are written by rank 0
through a temporary file and a rename; a cache directory that is not writable is reported before the reference
pass, not after it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
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
from megatron_dil.io import publish
from megatron_dil.losses import PairLogProbs
from megatron_dil.ops.logprobs import SequenceLogProbs
from megatron_dil.training.config import ReferenceConfig
from megatron_dil.training.monitor import format_seconds
from megatron_dil.training.step import LogProbSetup, compute_logprobs

REMEDY = "set reference.recompute=true to rebuild it"


class ReferenceCacheError(RuntimeError):
    """A reference cache cannot be used (damaged, edited, for other data) or written; the message says what to do."""


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

    def checksum(self) -> str:
        """BLAKE2b of the values (float64 sums, int64 counts)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(self.sums, np.float64).tobytes())
        digest.update(np.ascontiguousarray(self.counts, np.int64).tobytes())
        return digest.hexdigest()


def model_identity(init_checkpoint: str | None, model_config: dict[str, Any], seed: int) -> dict[str, Any]:
    """What determines the reference weights: the checkpoint's content (shard digests and architecture), or the
    random-init seed, architecture and layout (each TP/PP rank initialises its shard from its own RNG stream)."""
    if init_checkpoint is None:
        layout = [parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_virtual_pipeline_model_parallel_world_size()]
        return {"random_init_seed": seed, "layout": layout, "model": model_config}
    from megatron_dil.convert import MegatronCheckpoint

    return {"checkpoint_content": MegatronCheckpoint(init_checkpoint).content_digest(), "model": model_config}


def cache_identity(model_id: dict[str, Any], dataset: PreferenceDataset, setup: LogProbSetup,
                   precision: str) -> dict[str, Any]:
    """Everything the cached values depend on (content digests, not file names or times)."""
    return {"model": model_id, "dataset": dataset.metadata, "vocab_size": setup.vocab_size, "precision": precision}


def cache_path(prefix: str, identity: dict[str, Any], cache_dir: str | None = None) -> str:
    """``CACHE_DIR/NAME.reference_logps.KEY.npz`` for dataset ``prefix`` (see the module docstring)."""
    key = hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    directory = cache_dir if cache_dir is not None else os.path.dirname(os.path.abspath(prefix))
    return os.path.join(directory, f"{os.path.basename(prefix)}.reference_logps.{key}.npz")


def write_cache(path: str, table: ReferenceTable, identity: dict[str, Any]) -> None:
    """Write ``table`` with its identity and checksum to ``path`` (a temporary sibling renamed into place)."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, sums=table.sums, counts=table.counts, identity=np.array(json.dumps(identity, default=str)),
                 checksum=np.array(table.checksum()))
        publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_cache(path: str, identity: dict[str, Any], num_pairs: int) -> ReferenceTable | None:
    """The cached table at ``path`` (None if absent), after checking identity, row count and checksum."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["identity"]))
            table = ReferenceTable(sums=data["sums"].astype(np.float64), counts=data["counts"].astype(np.int64))
            checksum = str(data["checksum"])
    except Exception as err:  # noqa: BLE001 - any decoding failure (BadZipFile, EOFError, KeyError, ...) of a file
        raise ReferenceCacheError(f"{path} is not a readable reference cache ({type(err).__name__}: {err}); "
                                  f"{REMEDY}") from None
    expected = json.loads(json.dumps(identity, default=str))
    if stored != expected:
        differs = ", ".join(k for k in expected if stored.get(k) != expected[k])
        raise ReferenceCacheError(f"{path} was computed for another {differs or 'identity'} (copied or renamed?); "
                                  f"{REMEDY}")
    if table.sums.shape != (num_pairs, 2) or table.counts.shape != (num_pairs, 2):
        raise ReferenceCacheError(f"{path} holds {table.sums.shape[0]} pairs but the dataset has {num_pairs}; "
                                  f"{REMEDY}")
    if table.checksum() != checksum:
        raise ReferenceCacheError(f"{path}: its values do not match the checksum recorded when it was written "
                                  f"(edited or damaged); {REMEDY}")
    return table


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on global rank 0, its result (or its error, raised as ``ReferenceCacheError``) on every rank."""
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others would wait forever
            payload = [("error", str(err) if isinstance(err, ReferenceCacheError) else f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise ReferenceCacheError(value)
    return value


def _writable(directory: str) -> str | None:
    """None if a file can be created in ``directory``, else why not."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".reference_probe-"):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"


def _plan(parts: list[PreferenceDataset], model_id: dict[str, Any], setup: LogProbSetup, precision: str,
          reference: ReferenceConfig) -> list[tuple[str, dict[str, Any]]]:
    """(cache path, identity) per dataset; refuses an unwritable directory for any cache that must be computed."""
    plan = []
    for part in parts:
        identity = cache_identity(model_id, part, setup, precision)
        path = cache_path(part.prefix, identity, reference.cache_dir)
        if reference.recompute or not os.path.exists(path):
            problem = _writable(os.path.dirname(path))
            if problem:
                where = "reference.cache_dir" if reference.cache_dir is not None else f"the directory of {part.prefix}"
                raise ReferenceCacheError(
                    f"cannot write the reference log-prob cache {path}: {where} is not writable ({problem}); "
                    f"set reference.cache_dir to a writable directory")
        plan.append((path, identity))
    return plan


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
                    reference: ReferenceConfig, device: torch.device, log: Callable[[str], None]) -> ReferenceTable:
    """The reference table for ``dataset`` (a blend: its datasets' tables concatenated in sample-id order), read from
    each dataset's cache or computed with ``chunks`` and written there."""
    parts = dataset.datasets if isinstance(dataset, BlendedPreferenceDataset) else [dataset]
    plan = _on_rank0(lambda: _plan(parts, model_id, setup, precision, reference))
    tables = []
    for part, (path, identity) in zip(parts, plan):
        table = None if reference.recompute else read_cache(path, identity, len(part))
        if table is not None:
            log(f"reference log-probs: reusing {path}")
        else:
            log(f"reference log-probs: computing {len(part)} pairs of {part.prefix} -> {path}")
            started = time.perf_counter()

            def progress(done: int, total: int) -> None:
                if done == total or done % 50 == 0:
                    eta = (time.perf_counter() - started) / done * (total - done)
                    log(f"  reference pass {done}/{total} micro-batches, ETA {format_seconds(eta)}")

            table = _precompute(chunks, part, collator, setup, micro_batch_size, device, progress)
            _on_rank0(lambda: write_cache(path, table, identity))
        tables.append(table)
    return ReferenceTable(sums=np.concatenate([t.sums for t in tables]),
                          counts=np.concatenate([t.counts for t in tables]))


def table_reference(table: ReferenceTable) -> Callable[[int, PreferenceBatch], PairLogProbs]:
    return lambda index, batch: table.lookup(batch.sample_ids, batch.labels.device)
