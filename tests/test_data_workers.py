"""The tokenizer worker pool never hangs: a bad row, an exception the parent cannot unpickle and a worker killed by a
signal all end the run (or the row) with one line; staging files go on every exit path, and a run killed with SIGKILL
has its staging files removed by the next run."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest

import megatron_dil.data.preprocess as preprocess_module
from megatron_dil.data import PreferenceDataset, PreprocessConfig, preprocess_pairs
from megatron_dil.data.preprocess import PreprocessError, WorkerError, main
from megatron_dil.data.rows import RowError
from megatron_dil.data.tiny_task import tiny_example_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(tiny_example_dir(), "tokenizer")
ROWS = [{"prompt": f"sort ascending : {i} 2 1", "chosen": f" 1 2 {i}", "rejected": f" {i} 2 1"} for i in range(3, 10)]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts the main thread's wait on the pool."""
    def fire(*_):
        raise TimeoutError(f"no result within {seconds}s: the worker pool hangs")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def run(tmp_path, path, **kw):
    return preprocess_pairs(PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "out"),
                                             tokenizer=TINY_TOKENIZER, progress=False, chunk_size=2, **kw))


# Module-level so that the pool pickles them by reference; the forked workers see the monkeypatched module.
class Unpicklable(Exception):
    def __init__(self, a, b):  # pickled as Unpicklable(message): unpickling fails in the parent
        super().__init__(f"{a} {b}")


def tokenize_raising_unpicklable(row, *args):
    if "boom" in row.prompt:
        raise Unpicklable("cannot", "unpickle")
    return REAL_TOKENIZE(row, *args)


def chunk_raising_unpicklable(chunk):
    raise Unpicklable("cannot", "unpickle")


def chunk_killing_worker(chunk):
    if any(number == 5 for number, _ in chunk):
        os.kill(os.getpid(), signal.SIGKILL)
    return REAL_CHUNK(chunk)


REAL_TOKENIZE = preprocess_module.tokenize_pair
REAL_CHUNK = preprocess_module._process_chunk


def test_exceptions_survive_pickling():
    for error in (RowError("bad_role", "'chosen' has role 'user'"), WorkerError(7, "KeyError: 'x'")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__


def test_malformed_row_with_two_workers_is_counted_like_one_worker(tmp_path, capsys):
    path = write_rows(tmp_path / "rows.jsonl", ROWS[:2] + ['{"prompt": "sort", "chosen'] + ROWS[2:])
    written = {}
    for workers in (1, 2):
        with deadline(120):
            assert main(["--input", path, "--output-prefix", str(tmp_path / f"w{workers}"), "--tokenizer",
                         TINY_TOKENIZER, "--workers", str(workers), "--chunk-size", "2", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"malformed_json: 1 (first: {path}:3)" in out and "pairs written 7" in out
        written[workers] = [open(tmp_path / f"w{workers}_train{ext}", "rb").read() for ext in (".bin", ".idx")]
    assert written[1] == written[2]
    with deadline(120):  # --strict stops at the bad row while chunks are in flight: the pool is shut down
        assert main(["--input", path, "--output-prefix", str(tmp_path / "strict"), "--tokenizer", TINY_TOKENIZER,
                     "--workers", "2", "--chunk-size", "1", "--strict", "--no-progress"]) == 1
    assert f"{path}: row 3: malformed_json" in capsys.readouterr().err
    assert not glob.glob(str(tmp_path / "*.tmp-*")) and not glob.glob(str(tmp_path / "strict_*"))


@pytest.mark.parametrize("case", ["row", "chunk", "killed"])
def test_any_worker_failure_reaches_the_parent_as_one_line(tmp_path, monkeypatch, case):
    path = write_rows(tmp_path / "rows.jsonl", ROWS[:3] + [dict(ROWS[3], prompt="boom 1")] + ROWS[4:])
    run(tmp_path, path)  # a previous dataset, which a failed run must leave intact
    before = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "out_*"))}
    if case == "row":  # an arbitrary exception type while tokenizing one row
        monkeypatch.setattr(preprocess_module, "tokenize_pair", tokenize_raising_unpicklable)
        expected = f"{path}: row 4: tokenizing failed: Unpicklable: cannot unpickle"
    elif case == "chunk":  # an exception that cannot cross the process boundary at all
        monkeypatch.setattr(preprocess_module, "_process_chunk", chunk_raising_unpicklable)
        expected = f"{path}: a tokenizer worker failed while rows"
    else:  # a worker killed by a signal (SIGKILL: the OOM killer's)
        monkeypatch.setattr(preprocess_module, "_process_chunk", chunk_killing_worker)
        expected = f"{path}: a tokenizer worker failed while rows"
    with deadline(120), pytest.raises(PreprocessError) as failure:
        run(tmp_path, path, workers=2)
    message = str(failure.value)
    assert message.startswith(expected) and "\n" not in message, message
    if case == "killed":
        assert "killed by a signal" in message
    after = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "out_*"))}
    assert after == before and not glob.glob(str(tmp_path / "*.tmp-*"))


def test_rerun_after_kill9_removes_the_killed_runs_staging_files(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", ROWS * 3000)
    prefix = str(tmp_path / "out")
    victim = subprocess.Popen([sys.executable, "-m", "megatron_dil.data.preprocess", "--input", path,
                               "--output-prefix", prefix, "--tokenizer", TINY_TOKENIZER, "--no-progress",
                               "--workers", "2"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = f"{prefix}_train.tmp-{socket.gethostname()}-{victim.pid}.bin"
    start = time.time()
    while not os.path.exists(staged) and victim.poll() is None and time.time() - start < 120:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert os.path.exists(staged), "the run ended before it staged anything"
    # staging files of a live process (a concurrent run) and of another host are not ours to remove
    sleeper = subprocess.Popen(["sleep", "60"])
    foreign = [f"{prefix}_train.tmp-{socket.gethostname()}-{sleeper.pid}.bin", f"{prefix}_train.tmp-elsewhere-1.idx"]
    for name in foreign:
        open(name, "w").close()
    try:
        result = run(tmp_path, write_rows(tmp_path / "small.jsonl", ROWS))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(glob.glob(f"{prefix}_*.tmp-*")) == sorted(foreign)
    assert len(PreferenceDataset(result.prefixes["train"])) == len(ROWS)
