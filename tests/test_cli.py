"""The README's main job through its real entry point: torchrun + `python -m megatron_dil.train` + the example
config, and the CLI's error paths."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "tiny" / "dil_lsif.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from megatron_dil.data.tiny_task import prepare_tiny_dataset

    return prepare_tiny_dataset(str(tmp_path_factory.mktemp("cli") / "tiny"))


def _command(args: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "megatron_dil.train", "--config", str(CONFIG), *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _train(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args, nproc), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_quickstart_config_trains_under_torchrun(tiny_data, tmp_path):
    from megatron_dil.config import load_config
    from megatron_dil.training.config import RunConfig

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", f"data.train=[{tiny_data['train']}]", f"data.valid={tiny_data['valid']}",
                 "train.train_iters=2", "logging.eval_pairs=64", "checkpoint.save_interval=null"]
    result = _train(overrides, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout TP=2 PP=1 DP=1" in result.stdout
    assert "micro-batch 8 pairs (16 sequences) × 4 accumulation × DP 1 = global batch 32 pairs" in result.stdout
    assert "step 2/2 | loss" in result.stdout and "eval @ step 2" in result.stdout
    assert "Transformer Engine and Apex are not installed" not in result.stderr  # expected CPU noise is hidden
    saved = load_config(RunConfig, out / "config.yaml")
    assert saved == load_config(RunConfig, CONFIG, overrides)
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000002"
    assert (out / "final" / "megatron_dil_checkpoint.json").exists()


def test_config_errors_are_one_line_and_exit_2():
    result = _train(["train.lrr=1e-6"])
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr  # torchrun reports the child's code
    lines = [line for line in result.stderr.splitlines() if "megatron-dil-train" in line]
    assert lines == [lines[0]] and "config error: train.lrr: unknown key" in lines[0]


def test_bad_input_is_one_line_per_rank_and_exit_1(tiny_data, tmp_path):
    result = _train([f"output_dir={tmp_path / 'bad'}", f"data.train=[{tiny_data['train']}]", "data.valid=null",
                     "parallel.tensor=3"], nproc=3)
    assert result.returncode != 0 and "exitcode  : 1" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("megatron-dil-train: error on rank")]
    assert len(errors) == 3
    assert all("LayoutError: num_attention_heads (4) is not divisible by tensor parallel size 3" in e for e in errors)


def test_sigterm_to_torchrun_saves_the_current_step_and_resume_continues(tiny_data, tmp_path):
    """Slurm's SIGTERM to torchrun mid-run (torchrun forwards it to the workers): the ranks agree at the next step
    boundary, save that step and exit 0; the next launch resumes from exactly that step."""
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", f"data.train=[{tiny_data['train']}]", "data.valid=null",
                 "checkpoint.save_interval=null", "logging.log_interval=1"]
    proc = subprocess.Popen(_command([*overrides, "train.train_iters=500"], nproc=2), cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/500"):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    output = "".join(lines) + rest
    left = re.search(r"SIGTERM received: leaving at step (\d+) after saving; run again to resume", output)
    assert left, output[-3000:]
    step = int(left.group(1))
    assert step >= 3 and f"step {step}/500" in output and f"step {step + 1}/500" not in output
    assert (out / "checkpoints" / "latest").read_text() == f"iter_{step:07d}"
    assert not (out / "final").exists()

    resumed = _train([*overrides, f"train.train_iters={step + 2}"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/iter_{step:07d} at step {step}" in resumed.stdout
    assert f"step {step + 1}/{step + 2}" in resumed.stdout and f"step {step}/" not in resumed.stdout
    assert (out / "checkpoints" / "latest").read_text() == f"iter_{step + 2:07d}"
