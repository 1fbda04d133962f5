"""Preprocess preference pairs into Megatron indexed datasets (``megatron-dil-preprocess``).

Output for ``--output-prefix P``: ``P_train.{bin,idx,json}`` and, with ``--valid-fraction > 0``,
``P_valid.{bin,idx,json}``. In the ``.bin/.idx`` (megatron.core.datasets.indexed_dataset) each pair is one document of
three sequences ``[prompt, chosen response, rejected response]``; the prompt length is the loss-mask boundary. The JSON
is the metadata (source, tokenizer identity, template, truncation, counts, dropped-row reasons, length histograms)
and is written last: a prefix without it is incomplete and the reader refuses it. Everything is written under
temporary names and renamed at the end, so an interrupted run leaves any previous dataset untouched.

Split: a pair goes to valid iff ``u < valid_fraction`` with ``u = blake2b(seed, rendered prompt) / 2^64``: deterministic,
independent of worker count and order, and pairs sharing a prompt stay on the same side (no prompt leakage).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from typing import Any, Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_dil.data.config import PreprocessConfig
from megatron_dil.data.rows import DROP_REASONS, Columns, RowError, parse_row
from megatron_dil.data.templates import resolve_template
from megatron_dil.data.tokenize import TokenizedPair, TruncationConfig, tokenize_pair
from megatron_dil.data.tokenizer import load_tokenizer

FORMAT_VERSION = "megatron_dil.preference/v1"
SPLITS = ("train", "valid")
HISTOGRAM_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


class PreprocessError(RuntimeError):
    """A hard failure (``--strict`` bad row, unreadable input): names the file and row."""


@dataclass
class PreprocessResult:
    prefixes: dict[str, str]  # split -> dataset prefix
    counts: dict[str, Any]
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.counts["rows_read"] / max(self.seconds, 1e-9)


# ---------------------------------------------------------------- reading


def iter_raw_rows(path: str, input_format: str = "auto", split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, raw)`` with 1-based row numbers (JSONL: line numbers). ``raw`` is a JSONL line (str; parsed
    in the workers so a malformed line is a per-row error) or an already-parsed row."""
    fmt = input_format if input_format != "auto" else _guess_format(path)
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
    elif fmt == "json":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:  # many .json files are JSON Lines
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield number, line
            return
        if not isinstance(rows, list):
            raise PreprocessError(f"{path}: a .json input must hold a list of rows, found {type(rows).__name__}")
        yield from enumerate(rows, 1)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    else:
        import datasets

        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise PreprocessError(f"{path}: no split {split!r} (has {sorted(data)}); set --input-split")
            data = data[split]
        yield from enumerate(data, 1)


def _guess_format(path: str) -> str:
    if os.path.isdir(path):
        return "datasets"
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if path.endswith(suffix):
            return fmt
    raise PreprocessError(f"{path}: cannot tell the format from the name; set --input-format")


# ---------------------------------------------------------------- tokenizing (in workers)

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, template_name: str, truncation: TruncationConfig, columns: Columns) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    _WORKER.update(tokenizer=tokenizer, template=resolve_template(template_name, tokenizer)[1],
                   truncation=truncation, columns=columns)


def _process_chunk(chunk: list[tuple[int, Any]]) -> list[tuple[int, TokenizedPair | RowError]]:
    out = []
    for number, raw in chunk:
        try:
            if isinstance(raw, str):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise RowError("malformed_json", f"{e.msg} at column {e.colno}") from None
            row = parse_row(raw, _WORKER["columns"])
            out.append((number, tokenize_pair(row, _WORKER["tokenizer"], _WORKER["template"], _WORKER["truncation"])))
        except RowError as e:
            out.append((number, e))
    return out


def _chunks(rows: Iterator[tuple[int, Any]], size: int) -> Iterator[list[tuple[int, Any]]]:
    chunk: list[tuple[int, Any]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- writing


@dataclass
class _SplitWriter:
    """One split's ``.bin/.idx`` under temporary names plus its length statistics."""

    final_prefix: str
    dtype: type
    tmp_prefix: str = ""
    builder: IndexedDatasetBuilder | None = None
    num_pairs: int = 0
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})

    def __post_init__(self) -> None:
        self.tmp_prefix = f"{self.final_prefix}.tmp-{os.getpid()}"
        self.builder = IndexedDatasetBuilder(self.tmp_prefix + ".bin", dtype=self.dtype)

    def add(self, pair: TokenizedPair) -> None:
        ids = np.asarray(pair.prompt + pair.chosen + pair.rejected, dtype=np.int64)
        self.builder.add_document(ids, [len(pair.prompt), len(pair.chosen), len(pair.rejected)])
        self.num_pairs += 1
        for key in self.lengths:
            self.lengths[key].append(len(getattr(pair, key)))

    def temp_paths(self) -> list[str]:
        return [self.tmp_prefix + ext for ext in (".bin", ".idx", ".json")]


def _histogram(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    top = max(values)
    edges = [e for e in HISTOGRAM_EDGES if e < top] + [max(top + 1, 1)]
    counts, _ = np.histogram(values, bins=edges)
    return {"count": len(values), "mean": float(np.mean(values)), "max": int(top), "min": int(min(values)),
            "bins": [[int(lo), int(hi), int(c)] for lo, hi, c in zip(edges[:-1], edges[1:], counts)]}


def _valid_side(prompt_text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\x00{prompt_text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def preprocess_pairs(config: PreprocessConfig) -> PreprocessResult:
    """Run the whole preprocessing; return the written prefixes and the counts (also in each metadata JSON)."""
    start = time.time()
    tokenizer = load_tokenizer(config.tokenizer)
    template_name, template_source = resolve_template(config.template, tokenizer)
    truncation = TruncationConfig(config.max_length, config.max_prompt_length, config.truncation_mode,
                                  config.overlong_prompt)
    columns = Columns(config.prompt_column, config.chosen_column, config.rejected_column)
    for path in config.inputs:
        if not os.path.exists(path):
            raise PreprocessError(f"input {path!r} does not exist")
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    splits = SPLITS if config.valid_fraction > 0 else SPLITS[:1]
    writers = {s: _SplitWriter(f"{config.output_prefix}_{s}", dtype) for s in splits}
    counts: dict[str, Any] = {"rows_read": 0, "pairs_written": 0, "truncated": 0, "boundary_shifted": 0,
                              "dropped": {r: 0 for r in DROP_REASONS}, "dropped_rows": {r: [] for r in DROP_REASONS}}
    try:
        worker_args = (config.tokenizer, config.template, truncation, columns)
        for path in config.inputs:
            rows = iter_raw_rows(path, config.input_format, config.input_split)
            for number, result in _tokenized(rows, config, worker_args, path):
                counts["rows_read"] += 1
                if isinstance(result, RowError):
                    if config.strict:
                        raise PreprocessError(f"{path}: row {number}: {result} (--strict)")
                    counts["dropped"][result.reason] += 1
                    shown = counts["dropped_rows"][result.reason]
                    if len(shown) < config.max_rows_shown:
                        shown.append(f"{path}:{number}")
                    continue
                counts["truncated"] += result.truncated
                counts["boundary_shifted"] += result.boundary_shifted
                counts["pairs_written"] += 1
                side = "valid" if "valid" in writers and _valid_side(
                    result.prompt_text, config.split_seed, config.valid_fraction) else "train"
                writers[side].add(result)
        if counts["pairs_written"] == 0:
            raise PreprocessError(f"no usable pair in {config.inputs}; dropped: {_nonzero(counts['dropped'])}")
        counts.update({f"{s}_pairs": w.num_pairs for s, w in writers.items()})
        metadata = {
            "format": FORMAT_VERSION,
            "layout": "one document per pair: sequences [prompt, chosen response, rejected response]",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": {"inputs": [os.path.abspath(p) for p in config.inputs], "input_format": config.input_format,
                       "columns": asdict(columns)},
            "tokenizer": tokenizer.identity(),
            "template": {"name": template_name, "source": template_source},
            "truncation": asdict(truncation),
            "split_rule": {"valid_fraction": config.valid_fraction, "seed": config.split_seed,
                      "rule": "valid iff blake2b(seed, rendered prompt)/2^64 < valid_fraction"},
            "counts": counts,
        }
        for split, writer in writers.items():
            writer.builder.finalize(writer.tmp_prefix + ".idx")
            split_meta = dict(metadata, split=split, num_pairs=writer.num_pairs,
                              lengths={k: _histogram(v) for k, v in writer.lengths.items()},
                              files={"bin_bytes": os.path.getsize(writer.tmp_prefix + ".bin"),
                                     "idx_bytes": os.path.getsize(writer.tmp_prefix + ".idx")})
            with open(writer.tmp_prefix + ".json", "w") as f:
                json.dump(split_meta, f, indent=1)
        _publish(writers.values(), config.output_prefix)
    finally:
        for writer in writers.values():
            for path in writer.temp_paths():
                if os.path.exists(path):
                    os.remove(path)
    return PreprocessResult({s: w.final_prefix for s, w in writers.items()}, counts, time.time() - start)


def _tokenized(rows: Iterator[tuple[int, Any]], config: PreprocessConfig, worker_args: tuple,
               path: str) -> Iterator[tuple[int, TokenizedPair | RowError]]:
    """Tokenize rows in order, inline (1 worker) or in a process pool; with a progress bar."""
    progress = _progress(config.progress, path)
    try:
        if config.workers == 1:
            _init_worker(*worker_args)
            for chunk in _chunks(rows, config.chunk_size):
                results = _process_chunk(chunk)
                progress.update(len(results))
                yield from results
        else:
            # fork (Linux) starts workers in milliseconds; spawn would re-import torch/megatron in each (seconds)
            context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
            with context.Pool(config.workers, initializer=_init_worker, initargs=worker_args) as pool:
                for results in pool.imap(_process_chunk, _chunks(rows, config.chunk_size)):
                    progress.update(len(results))
                    yield from results
    finally:
        progress.close()


def _progress(enabled: bool, path: str):
    try:
        from tqdm import tqdm
    except ImportError:  # simple fallback: a line every 10k rows
        class _Simple:
            n = 0

            def update(self, k: int) -> None:
                if enabled and (self.n + k) // 10000 > self.n // 10000:
                    print(f"{path}: {self.n + k} rows", file=sys.stderr)
                self.n += k

            def close(self) -> None:
                pass
        return _Simple()
    return tqdm(desc=os.path.basename(path), unit=" rows", disable=not enabled, file=sys.stderr)


def _publish(writers, output_prefix: str) -> None:
    """Rename temporaries to final names. The metadata JSON (the completeness marker) of every split is removed
    first and written last, so a crash in between leaves no prefix that looks complete."""
    writers = list(writers)
    for split in SPLITS:  # stale splits of an earlier run (e.g. a valid split no longer requested) go too
        for ext in (".json", ".bin", ".idx"):
            stale = f"{output_prefix}_{split}{ext}"
            if os.path.exists(stale):
                os.remove(stale)
    for writer in writers:
        os.replace(writer.tmp_prefix + ".bin", writer.final_prefix + ".bin")
        os.replace(writer.tmp_prefix + ".idx", writer.final_prefix + ".idx")
    for writer in writers:
        os.replace(writer.tmp_prefix + ".json", writer.final_prefix + ".json")


def _nonzero(counter: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counter.items() if v}


def format_summary(result: PreprocessResult) -> str:
    c = result.counts
    lines = [f"rows read {c['rows_read']}, pairs written {c['pairs_written']} "
             + ", ".join(f"{s} {c[f'{s}_pairs']}" for s in SPLITS if f"{s}_pairs" in c)
             + f" in {result.seconds:.1f}s ({result.pairs_per_second:.0f} rows/s)",
             f"truncated pairs {c['truncated']}, prompt/response boundaries shifted by a merged token "
             f"{c['boundary_shifted']}"]
    dropped = _nonzero(c["dropped"])
    lines.append(f"dropped {sum(dropped.values())}" + ("" if dropped else " (none)"))
    for reason, n in dropped.items():
        lines.append(f"  {reason}: {n} (first: {', '.join(c['dropped_rows'][reason])})")
    lines += [f"wrote {p}.{{bin,idx,json}}" for p in result.prefixes.values()]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = PreprocessConfig(inputs=[], output_prefix="", tokenizer="")
    p = argparse.ArgumentParser(
        prog="megatron-dil-preprocess",
        description="Tokenize preference pairs (prompt, chosen, rejected) into Megatron indexed datasets "
                    "PREFIX_train/PREFIX_valid (.bin/.idx + metadata .json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", dest="inputs", nargs="+", required=True,
                   help="input files/dirs: .jsonl, .json (list of rows or JSON lines), .parquet, or a directory saved "
                        "by datasets.save_to_disk; rows as strings or TRL conversational message lists")
    p.add_argument("--input-format", default=d.input_format, choices=["auto", "jsonl", "json", "parquet", "datasets"],
                   help="input format; auto guesses from the file extension (a directory is a datasets dir)")
    p.add_argument("--input-split", default=d.input_split, help="split to read from a datasets DatasetDict directory")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_train.* (and _valid.*)")
    p.add_argument("--tokenizer", required=True,
                   help="Hugging Face tokenizer directory (local) or sentencepiece .model file; the trainer must use "
                        "the same one (its fingerprint is stored in the metadata)")
    p.add_argument("--prompt-column", default=d.prompt_column, help="column holding the prompt (string or messages)")
    p.add_argument("--chosen-column", default=d.chosen_column, help="column holding the preferred response")
    p.add_argument("--rejected-column", default=d.rejected_column, help="column holding the dispreferred response")
    p.add_argument("--template", default=d.template,
                   help="chat template for conversational rows: auto (the tokenizer's own, else chatml), tokenizer, "
                        "chatml, zephyr, llama2 or plain; string rows are tokenized as BOS+prompt+response+EOS")
    p.add_argument("--max-length", type=int, default=d.max_length, help="max tokens of prompt+response")
    p.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length,
                   help="prompt length kept when prompt+response exceed --max-length")
    p.add_argument("--truncation-mode", default=d.truncation_mode, choices=["keep_end", "keep_start"],
                   help="which part of a too-long prompt is kept (keep_end keeps the leading BOS too)")
    p.add_argument("--overlong-prompt", default=d.overlong_prompt, choices=["drop", "truncate"],
                   help="what to do with a pair whose prompt alone exceeds --max-length")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="fraction of prompts sent to the valid split (deterministic hash of the prompt)")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/valid split hash")
    p.add_argument("--workers", type=int, default=d.workers, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="rows per work item sent to a worker")
    p.add_argument("--strict", action="store_true", help="fail on the first bad row instead of skipping and counting")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--max-rows-shown", type=int, default=d.max_rows_shown,
                   help="row numbers listed per drop reason in the summary and metadata")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``megatron-dil-preprocess``."""
    args = build_parser().parse_args(argv)
    try:
        result = preprocess_pairs(PreprocessConfig(**vars(args)))
    except (PreprocessError, ValueError, FileNotFoundError) as e:
        print(f"megatron-dil-preprocess: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0
