"""The README's main job through its real entry point: torchrun + `python -m megatron_dil.train` + the example
config, and the CLI's error paths."""
from __future__ import annotations

import os
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


def _train(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_dil.train", "--config", str(CONFIG), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
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
