"""Preprocess preference pairs (or demonstrations) into Megatron indexed datasets (``megatron-dil-preprocess``).

Output for ``--output-prefix P``: ``P_train.{bin,idx,json}`` and, with ``--valid-fraction > 0``,
``P_valid.{bin,idx,json}`` in the format of :mod:`megatron_dil.data.writer` (one document of three sequences
``[prompt, chosen response, rejected response]`` per pair; the JSON metadata, written last, holds the source,
tokenizer identity, template, truncation, counts, dropped-row reasons, length histograms, token-id range and the
checksums of ``.bin/.idx``). ``--kind demonstrations`` reads SFT rows (prompt and one response, see
:mod:`megatron_dil.data.rows`) into the same format with an empty rejected sequence and ``"kind": "demonstrations"``
in the metadata: ``loss.name: sft`` trains on it, ``megatron-dil-iterate`` builds preference pairs from it. Everything is written under staging names and renamed at the end, so an interrupted run
leaves any previous dataset untouched; staging files are removed on every exit path, and those of a killed run by the
next run.

Tokenizing runs inline (``--workers 1``) or in a process pool that never hangs: a bad row comes back as a
:class:`RowError` value, any other exception in a worker is re-raised in the parent naming the file and row, and a
worker that dies (a signal, the OOM killer) fails the run with a one-line error.

Split: a pair goes to valid iff ``u < valid_fraction`` with ``u = blake2b(seed, rendered prompt) / 2^64``: deterministic,
independent of worker count and order, and pairs sharing a prompt stay on the same side (no prompt leakage).
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from typing import Any, Iterator

from megatron.core.datasets.indexed_dataset import DType

from megatron_dil.data.config import PreprocessConfig
from megatron_dil.data.rows import DROP_REASONS, Columns, RowError, parse_demonstration, parse_row
from megatron_dil.data.templates import resolve_template
from megatron_dil.data.tokenize import TokenizedPair, TruncationConfig, tokenize_pair
from megatron_dil.data.tokenizer import load_tokenizer
from megatron_dil.data.writer import SPLITS, SplitWriter, publish_splits, remove_dead_staging


class PreprocessError(RuntimeError):
    """A hard failure (``--strict`` bad row, unreadable input, a failed worker): names the file and row."""


class WorkerError(PreprocessError):
    """An unexpected exception while tokenizing row ``row`` (of a file the parent knows), carried as text so that it
    crosses the process boundary whatever the original exception was."""

    def __init__(self, row: int, detail: str):
        super().__init__(f"row {row}: {detail}")
        self.row, self.detail = row, detail

    def __reduce__(self):
        return WorkerError, (self.row, self.detail)


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
    in the workers so a malformed line is a per-row error) or an already-parsed row. Text must be UTF-8 (a leading
    byte-order mark is skipped); a file that cannot be read in its format is a one-line :class:`PreprocessError`."""
    fmt = input_format if input_format != "auto" else _guess_format(path)
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                text = _decode(path, number, line[len(codecs.BOM_UTF8):] if number == 1 and
                               line.startswith(codecs.BOM_UTF8) else line)
                if text.strip():
                    yield number, text
    elif fmt == "json":
        with open(path, "rb") as f:
            data = f.read()
        text = _decode(path, 1, data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data)
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
        import pyarrow
        import pyarrow.parquet as pq

        number = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except (pyarrow.ArrowException, OSError) as e:
            where = f" (failed after row {number})" if number else ""
            raise PreprocessError(f"{path}: not a readable Parquet file{where}: {e}; if it holds JSON lines set "
                                  f"--input-format jsonl, else rewrite it") from None
    else:
        import datasets

        try:
            data = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise PreprocessError(f"{path}: not a directory written by datasets.save_to_disk ({e}); pass a "
                                  f".jsonl/.json/.parquet file or set --input-format") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise PreprocessError(f"{path}: no split {split!r} (has {sorted(data)}); set --input-split")
            data = data[split]
        yield from enumerate(data, 1)


def _decode(path: str, first_row: int, data: bytes) -> str:
    """``data`` as UTF-8, or a :class:`PreprocessError` naming the row and byte that are not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = first_row + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PreprocessError(f"{path}: row {row}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8; "
                              f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _guess_format(path: str) -> str:
    if os.path.isdir(path):
        return "datasets"
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if path.endswith(suffix):
            return fmt
    raise PreprocessError(f"{path}: cannot tell the format from the name; set --input-format")


# ---------------------------------------------------------------- tokenizing (in workers)

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, template_name: str, truncation: TruncationConfig, columns: Columns,
                 kind: str) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    _WORKER.update(tokenizer=tokenizer, template=resolve_template(template_name, tokenizer)[1],
                   truncation=truncation, columns=columns,
                   parse=parse_demonstration if kind == "demonstrations" else parse_row)


def _init_pool_worker(*worker_args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it shuts the pool down
    _init_worker(*worker_args)


def _process_chunk(chunk: list[tuple[int, Any]]) -> list[tuple[int, TokenizedPair | RowError]]:
    """Tokenize a chunk: a bad row becomes its :class:`RowError`; anything else raises :class:`WorkerError`."""
    out = []
    for number, raw in chunk:
        try:
            row = _WORKER["parse"](raw, _WORKER["columns"])
            out.append((number, tokenize_pair(row, _WORKER["tokenizer"], _WORKER["template"], _WORKER["truncation"])))
        except RowError as e:
            out.append((number, e))
        except Exception as e:
            raise WorkerError(number, f"{type(e).__name__}: {e}") from e
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


# ---------------------------------------------------------------- driver


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
    columns = Columns(config.prompt_column, config.chosen_column, config.rejected_column, config.response_column,
                      config.messages_column)
    for path in config.inputs:
        if not os.path.exists(path):
            raise PreprocessError(f"input {path!r} does not exist")
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise PreprocessError(f"--output-prefix {config.output_prefix}: cannot create the directory {out_dir} "
                              f"({e.strerror}); choose a prefix in a writable directory") from None
    remove_dead_staging(config.output_prefix)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    splits = SPLITS if config.valid_fraction > 0 else SPLITS[:1]
    writers: dict[str, SplitWriter] = {}
    counts: dict[str, Any] = {"rows_read": 0, "pairs_written": 0, "truncated": 0, "boundary_shifted": 0,
                              "dropped": {r: 0 for r in DROP_REASONS}, "dropped_rows": {r: [] for r in DROP_REASONS}}
    try:
        for split in splits:
            writers[split] = SplitWriter(f"{config.output_prefix}_{split}", dtype)
        worker_args = (config.tokenizer, config.template, truncation, columns, config.kind)
        for path in config.inputs:
            rows = iter_raw_rows(path, config.input_format, config.input_split)
            with closing(_tokenized(rows, config, worker_args, path)) as tokenized:  # shuts the pool down on errors
                for number, result in tokenized:
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
                    writers[side].add(result.prompt, result.chosen, result.rejected)
        if counts["pairs_written"] == 0:
            raise PreprocessError(f"no usable pair in {config.inputs}; dropped: {_nonzero(counts['dropped'])}")
        counts.update({f"{s}_pairs": w.num_pairs for s, w in writers.items()})
        metadata = {
            "layout": "one document per pair: sequences [prompt, chosen response, rejected response]"
                      + (" (demonstrations: rejected empty)" if config.kind == "demonstrations" else ""),
            "kind": config.kind,
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
            writer.finalize(dict(metadata, split=split))
        publish_splits(list(writers.values()), config.output_prefix)
    finally:
        for writer in writers.values():
            writer.discard()
    return PreprocessResult({s: w.final_prefix for s, w in writers.items()}, counts, time.time() - start)


def _tokenized(rows: Iterator[tuple[int, Any]], config: PreprocessConfig, worker_args: tuple,
               path: str) -> Iterator[tuple[int, TokenizedPair | RowError]]:
    """Tokenize rows in order, inline (1 worker) or in a process pool; with a progress bar."""
    progress = _progress(config.progress, path)
    try:
        if config.workers == 1:
            _init_worker(*worker_args)
            results = map(_process_chunk, _chunks(rows, config.chunk_size))
        else:
            results = _pooled(_chunks(rows, config.chunk_size), config.workers, worker_args, path)
        for chunk_results in results:
            progress.update(len(chunk_results))
            yield from chunk_results
    except WorkerError as e:
        raise PreprocessError(f"{path}: row {e.row}: tokenizing failed: {e.detail}") from e
    finally:
        progress.close()


def _pooled(chunks: Iterator[list[tuple[int, Any]]], workers: int, worker_args: tuple,
            path: str) -> Iterator[list[tuple[int, TokenizedPair | RowError]]]:
    """``map(_process_chunk, chunks)`` in order on ``workers`` processes with at most 2 chunks per worker in flight.

    concurrent.futures (unlike multiprocessing.Pool, which waits forever for the task of a dead worker or a result
    it cannot unpickle) fails every pending future with ``BrokenProcessPool`` in both cases.
    """
    # fork (Linux) starts workers in milliseconds; spawn would re-import torch/megatron in each (seconds)
    context = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_pool_worker, initargs=worker_args)
    pending: deque[tuple[list, Future]] = deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(_process_chunk, chunk)))
            if len(pending) >= 2 * workers:
                yield _result(*pending.popleft(), path)
        while pending:
            yield _result(*pending.popleft(), path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(chunk: list[tuple[int, Any]], future: Future, path: str) -> list:
    try:
        return future.result()
    except BrokenProcessPool as e:
        why = str(e.__cause__).strip().splitlines()[-1] if e.__cause__ else "killed by a signal, e.g. out of memory"
        raise PreprocessError(f"{path}: a tokenizer worker failed while rows {chunk[0][0]}-{chunk[-1][0]} were in "
                              f"flight ({why}); rerun, with fewer --workers if memory is short") from None


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
        description="Tokenize preference pairs (prompt, chosen, rejected), or demonstrations (--kind demonstrations), "
                    "into Megatron indexed datasets "
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
    p.add_argument("--kind", default=d.kind, choices=["pairs", "demonstrations"],
                   help="pairs: prompt/chosen/rejected rows; demonstrations: SFT rows (prompt + --response-column, or "
                        "a --messages-column conversation whose last assistant turn is the response), stored with an "
                        "empty rejected side for loss.name sft and megatron-dil-iterate")
    p.add_argument("--response-column", default=d.response_column, help="demonstrations: the response column")
    p.add_argument("--messages-column", default=d.messages_column,
                   help="demonstrations: column of whole conversations (used when a row has no response column)")
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
    except (PreprocessError, ValueError, OSError) as e:  # bad input or environment: one line, no traceback
        print(f"megatron-dil-preprocess: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
