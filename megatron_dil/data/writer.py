"""Writing one preference dataset split: the on-disk format and its integrity fields.

A split with prefix ``P`` is three files. ``P.bin/P.idx`` (megatron.core.datasets.indexed_dataset) hold one document
per pair of three sequences ``[prompt, chosen response, rejected response]``. ``P.json`` is the metadata, written
last; besides the provenance the preprocessor adds, it records what the reader verifies:

- ``format``: :data:`FORMAT_VERSION`;
- ``num_pairs``: documents in ``P.bin/P.idx``;
- ``files``: ``{"bin": {"size", "blake2b"}, "idx": {"size", "blake2b"}}``, byte size and streamed BLAKE2b-256 of each
  (megatron_dil.io.files), so a same-size change (an edited length, another dataset's ``.idx``, a flipped byte) is
  detected, not read as shifted pairs;
- ``token_ids``: ``{"min", "max"}`` over every stored token (null for an empty split), checked against the run's
  tokenizer before training.

Everything is staged as ``P.tmp-HOST-PID.*`` and renamed into place by :func:`publish_splits`; a later run removes
the staging files of runs on this host whose process is gone (killed with SIGKILL, say).
"""
from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_dil.io.files import file_record

FORMAT_VERSION = "megatron_dil.preference/v2"
SPLITS = ("train", "valid")
EXTENSIONS = (".bin", ".idx", ".json")
HISTOGRAM_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
_STAGING = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)\.(?:bin|idx|json)$")


@dataclass
class SplitWriter:
    """One split under staging names: ``add`` pairs, then ``finalize`` (metadata) or ``discard``."""

    final_prefix: str
    dtype: type
    tmp_prefix: str = ""
    builder: IndexedDatasetBuilder | None = None
    num_pairs: int = 0
    min_id: int | None = None
    max_id: int | None = None
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})

    def __post_init__(self) -> None:
        self.tmp_prefix = f"{self.final_prefix}.tmp-{socket.gethostname()}-{os.getpid()}"
        self.builder = IndexedDatasetBuilder(self.tmp_prefix + ".bin", dtype=self.dtype)

    def add(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        ids = np.asarray(prompt + chosen + rejected, dtype=np.int64)
        self.builder.add_document(ids, [len(prompt), len(chosen), len(rejected)])
        self.num_pairs += 1
        low, high = int(ids.min()), int(ids.max())
        self.min_id = low if self.min_id is None else min(self.min_id, low)
        self.max_id = high if self.max_id is None else max(self.max_id, high)
        for key, seq in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            self.lengths[key].append(len(seq))

    def finalize(self, metadata: dict[str, Any]) -> None:
        """Close ``.bin/.idx`` and stage ``.json``: ``metadata`` plus this split's counts, histograms and integrity
        fields (``files`` digests are computed here, after the last byte is written)."""
        self.builder.finalize(self.tmp_prefix + ".idx")
        split_meta = dict(
            metadata, format=FORMAT_VERSION, num_pairs=self.num_pairs,
            lengths={k: _histogram(v) for k, v in self.lengths.items()},
            token_ids=None if self.min_id is None else {"min": self.min_id, "max": self.max_id},
            files={"bin": file_record(self.tmp_prefix + ".bin"), "idx": file_record(self.tmp_prefix + ".idx")})
        with open(self.tmp_prefix + ".json", "w") as f:
            json.dump(split_meta, f, indent=1)

    def discard(self) -> None:
        """Remove the staging files (every exit path; no-op after publication)."""
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for ext in EXTENSIONS:
            if os.path.exists(self.tmp_prefix + ext):
                os.remove(self.tmp_prefix + ext)


def publish_splits(writers: list[SplitWriter], output_prefix: str) -> None:
    """Rename staged files to their final names. The metadata JSON (the completeness marker) of every split is removed
    first and written last, so a crash in between leaves no prefix that looks complete. Splits of an earlier run that
    this one does not write (e.g. a valid split no longer requested) are removed too."""
    for split in SPLITS:
        for ext in (".json", ".bin", ".idx"):
            stale = f"{output_prefix}_{split}{ext}"
            if os.path.exists(stale):
                os.remove(stale)
    for writer in writers:
        os.replace(writer.tmp_prefix + ".bin", writer.final_prefix + ".bin")
        os.replace(writer.tmp_prefix + ".idx", writer.final_prefix + ".idx")
    for writer in writers:
        os.replace(writer.tmp_prefix + ".json", writer.final_prefix + ".json")


def remove_dead_staging(output_prefix: str) -> list[str]:
    """Remove ``OUTPUT_PREFIX_{split}.tmp-HOST-PID.*`` left by a run on this host whose process no longer exists;
    return the removed paths. Staging files of live processes (a concurrent run) and of other hosts stay."""
    directory = os.path.dirname(os.path.abspath(output_prefix)) or "."
    if not os.path.isdir(directory):
        return []
    stems = {os.path.basename(f"{output_prefix}_{split}") + ".tmp-" for split in SPLITS}
    host, removed = socket.gethostname(), []
    for name in os.listdir(directory):
        match = _STAGING.search(name)
        if not match or not any(name.startswith(stem) for stem in stems) or match["host"] != host \
                or _alive(int(match["pid"])):
            continue
        os.remove(os.path.join(directory, name))
        removed.append(os.path.join(directory, name))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _histogram(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    top = max(values)
    edges = [e for e in HISTOGRAM_EDGES if e < top] + [max(top + 1, 1)]
    counts, _ = np.histogram(values, bins=edges)
    return {"count": len(values), "mean": float(np.mean(values)), "max": int(top), "min": int(min(values)),
            "bins": [[int(lo), int(hi), int(c)] for lo, hi, c in zip(edges[:-1], edges[1:], counts)]}
