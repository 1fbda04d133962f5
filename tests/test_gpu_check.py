"""The GPU check's CPU dry run (``bash bench/gpu_check.sh --dry-run``) runs every row's CPU part and writes its
report; rows that need CUDA say NOT RUN with the reason; the budget machinery never loses the report."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    cases = {(row["row"], case["name"]): case for row in report["rows"] for case in row["cases"]}
    return proc.stdout, report, rows, cases, out


def test_dry_run_reports_every_row_and_the_table(dry_run):
    stdout, report, rows, _, out = dry_run
    assert report["mode"] == "dry-run"
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for row in rows.values():
        assert row["status"] in (gpu_check.PASS, gpu_check.FAIL, gpu_check.NOT_RUN)
        assert row["status"] != gpu_check.FAIL, row
        for case in row["cases"]:
            if case["status"] != gpu_check.PASS:
                assert case["summary"], case  # every NOT RUN says why
    assert report["table"] in stdout
    assert "nothing to install" in report["install_log"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "install.log"] + [f"row{r}.log"
                                                                                         for r in range(1, 6)]


def test_dry_run_environment_row(dry_run):
    import torch

    _, _, rows, cases, _ = dry_run
    assert rows[1]["status"] == gpu_check.PASS
    assert cases[1, "versions"]["metrics"]["torch"] == torch.__version__
    assert cases[1, "gpu"]["status"] == gpu_check.NOT_RUN and "dry run" in cases[1, "gpu"]["summary"]
    assert cases[1, "layer spec"]["metrics"]["spec"] == "local"
    assert cases[1, "matmul peak"]["metrics"]["peak_flops"] > 1e6


def test_dry_run_parity_row_matches_transformers_and_round_trips(dry_run):
    _, _, rows, cases, _ = dry_run
    assert rows[2]["status"] == gpu_check.PASS
    mistral = next(n for r, n in cases if r == 2 and n.startswith("mistral"))  # window < sequence: local spec too
    for name in ("llama", "qwen2", "qwen3", mistral):
        metrics = cases[2, name]["metrics"]
        assert cases[2, name]["status"] == gpu_check.PASS
        assert metrics["spec"] == "local" and metrics["round_trip"] is True
        assert 0.0 <= metrics["fp32_max_abs_diff"] <= 1e-4 < 1e-3 * metrics["scale_max_abs_logit"]
        assert "bf16_max_abs_diff" not in metrics  # bf16 parity is a GPU case


def test_dry_run_training_row_runs_the_trainer(dry_run):
    _, _, rows, cases, _ = dry_run
    assert rows[3]["status"] == gpu_check.PASS
    for name in ("reference precompute", "reference model"):
        metrics = cases[3, name]["metrics"]
        assert cases[3, name]["status"] == gpu_check.PASS
        assert metrics["tokens_per_second"] > 0 and metrics["memory_gib"] > 0 and 0 < metrics["mfu"] < 1
        # DIL-LSIF starts at −0.5 (policy = reference, f = 0) and moves little in 3 steps at lr 1e-5
        assert math.isfinite(metrics["loss"]) and abs(metrics["loss"] + 0.5) < 0.05
        assert metrics["mfu_vs_row1_peak"] == pytest.approx(
            metrics["mfu"] * metrics["peak_flops"] / cases[1, "matmul peak"]["metrics"]["peak_flops"])
    assert cases[3, "reference model"]["metrics"]["reference_cost_ratio"] > 0
    for name in ("recompute_activations", "sequence_parallel TP=2"):
        assert cases[3, name]["status"] == gpu_check.NOT_RUN and "refused on CPU" in cases[3, name]["summary"]


def test_dry_run_logprob_row_measures_the_kernel(dry_run):
    _, _, rows, cases, _ = dry_run
    assert rows[4]["status"] == gpu_check.PASS
    naive = cases[4, "naive log_softmax"]["metrics"]
    chunked = next(c for (r, n), c in cases.items() if r == 4 and "chunk " in n)["metrics"]
    assert naive["seconds"] > 0 and naive["peak_extra_mib"] > 0
    assert chunked["memory_vs_naive"] == pytest.approx(chunked["peak_extra_mib"] / naive["peak_extra_mib"])
    assert chunked["memory_vs_naive"] < 1


def test_dry_run_generation_row_times_greedy_decode(dry_run):
    _, report, rows, cases, _ = dry_run
    assert rows[5]["status"] == gpu_check.PASS
    plan = report["plan"]
    assert plan["gen_preset"] == "tiny" and plan["gen_dtype"] == "float32"
    for batch in plan["gen_batches"]:
        case = cases[5, f"greedy decode batch {batch}"]
        metrics = case["metrics"]
        assert case["status"] == gpu_check.PASS and metrics["batch"] == batch
        assert metrics["ttft_s"] > 0 and metrics["total_s"] > 0
        assert metrics["tokens_per_s"] == pytest.approx(batch * plan["gen_new_tokens"] / metrics["total_s"])
        assert case["summary"].startswith(f"{metrics['tokens_per_s']:.1f} tok/s, TTFT ")


def test_exhausted_budget_still_writes_every_row(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--budget", "1",
                           "--rows", "1,5", "--output", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for row in (1, 5):
        assert rows[row]["status"] == gpu_check.NOT_RUN and "global budget of 1 s exhausted" in rows[row]["reason"]
    for row in (2, 3, 4):
        assert rows[row]["reason"] == "not selected (--rows)"


def test_gpu_mode_without_cuda_fails_row_1_and_skips_the_gpu_rows(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--rows", "1,2", "--jobs", "2",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a FAIL row: no GPU where one was expected
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert rows[1]["status"] == gpu_check.FAIL and "no CUDA device" in rows[1]["reason"]
    assert rows[2]["status"] == gpu_check.NOT_RUN and "no CUDA device visible" in rows[2]["reason"]


def test_overrunning_row_is_killed_with_its_children_and_keeps_finished_cases(tmp_path, monkeypatch):
    """A row past its budget is killed with the processes it started; the cases it reported survive."""
    monkeypatch.setattr(gpu_check, "GRACE", 0.5)
    partial, pid_file = tmp_path / "row.json", tmp_path / "child.pid"
    script = (f"import json, subprocess, time; from pathlib import Path; "
              f"Path({str(partial)!r}).write_text(json.dumps([{{'name': 'first', 'status': 'PASS', "
              f"'summary': '1 tok/s', 'metrics': {{}}}}])); "
              f"child = subprocess.Popen(['sleep', '60']); Path({str(pid_file)!r}).write_text(str(child.pid)); "
              f"time.sleep(60)")
    process = gpu_check.RowProcess(3, [sys.executable, "-c", script], partial, 1.0, tmp_path / "row3.log")
    while not process.done():
        time.sleep(0.1)
    result = process.result()
    assert result["seconds"] < 10
    assert [c["name"] for c in result["cases"]] == ["first", "row time budget"]
    assert result["status"] == gpu_check.PASS and "row time budget: killed after" in result["reason"]
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild gets SIGKILL with the group; give the kernel a moment to reap it
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child process {child} of the killed row is still running")


def test_row_status_aggregation():
    def case(status: str, name: str = "c") -> dict:
        return dataclasses.asdict(gpu_check.Case(name, status, f"{name} says {status}"))

    assert gpu_check.row_status([case("PASS"), case("FAIL", "b"), case("NOT RUN")]) == \
        ("FAIL", "b: b says FAIL")
    assert gpu_check.row_status([case("PASS"), case("NOT RUN", "x")]) == \
        ("PASS", "1 of 2 not run: x: x says NOT RUN")
    assert gpu_check.row_status([case("NOT RUN", "x")]) == ("NOT RUN", "x: x says NOT RUN")
    assert gpu_check.row_status([]) == ("NOT RUN", "nothing ran")
