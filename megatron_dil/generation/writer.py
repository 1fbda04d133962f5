"""Sample rows to ``OUTPUT`` (JSONL), appearing only when complete; an interrupted run resumes without duplicates.

While running, each data-parallel writer appends finished samples to ``OUTPUT.partial/rank_DDDDD.jsonl`` (a line per
sample, flushed per batch) next to ``settings.json`` (what determines the samples: checkpoint, prompts, sampling).
A rerun with the same settings skips every (prompt, sample) already there — samples depend only on (seed, prompt
index, sample index), so the DP size may change between runs; different settings start over. At the end rank 0
merges the part files in (prompt, sample) order into ``OUTPUT.tmp-PID`` and renames it to ``OUTPUT``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def prepare(output: Path, settings: dict[str, Any]) -> None:
    """Rank 0, before any writer starts: keep a matching ``.partial`` directory, replace a stale one."""
    directory = partial_dir(output)
    marker = directory / "settings.json"
    if directory.exists() and (not marker.is_file() or json.loads(marker.read_text()) != settings):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        tmp = directory / "settings.json.tmp"
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
        tmp.replace(marker)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a part file (a line cut by a crash is ignored)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                rows.append(json.loads(line))
    return rows


def finished_keys(output: Path) -> set[tuple[int, int]]:
    """(prompt index, sample index) of every sample already written by any earlier or current writer."""
    return {(r["prompt_index"], r["sample_index"]) for part in sorted(partial_dir(output).glob("rank_*.jsonl"))
            for r in _read_rows(part)}


class PartWriter:
    """One data-parallel rank's part file, opened for appending (a cut last line is dropped first)."""

    def __init__(self, output: Path, dp_rank: int):
        self.path = partial_dir(output) / f"rank_{dp_rank:05d}.jsonl"
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def finalize(output: Path, expected: int) -> int:
    """Rank 0, after every writer closed: merge, check the count, publish ``output``; return the rows written."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for part in sorted(partial_dir(output).glob("rank_*.jsonl")):
        for row in _read_rows(part):
            rows.setdefault((row["prompt_index"], row["sample_index"]), row)
    if len(rows) != expected:
        raise RuntimeError(f"{partial_dir(output)} holds {len(rows)} samples, expected {expected}; rerun to finish")
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for key in sorted(rows):
                f.write(json.dumps(rows[key], ensure_ascii=False) + "\n")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (e.g. a full disk) leaves no half file behind
    shutil.rmtree(partial_dir(output))
    return len(rows)
