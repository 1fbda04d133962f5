"""The trainer under users' faults: bad configs refused at load or before any model is built, damaged checkpoints,
a full disk during a save, a changed schedule on resume, a NaN gradient behind a finite loss."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import run_ranks
from tests.test_trainer import run_dict

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "dil_lsif.yaml"


@pytest.mark.parametrize("override, message", [
    ("train.train_iters=0", "train.train_iters must be >= 1, got 0"),
    ("train.train_iters=-5", "train.train_iters must be >= 1, got -5"),
    ("train.epochs=0", "train.epochs must be > 0, got 0.0"),
    ("checkpoint.save_interval=-1", "checkpoint.save_interval must be >= 1, got -1"),
    ("logging.log_interval=0", "logging.log_interval must be >= 1, got 0"),
    ("logging.eval_interval=0", "logging.eval_interval must be >= 1, got 0"),
    ("train.min_lr=0.01", "train.min_lr must be in [0, lr=0.001], got 0.01"),
    ("train.lr=0", "train.lr must be > 0, got 0.0"),
    ("train.adam_beta2=1.0", "train.adam_beta2 must be in [0, 1), got 1.0"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be >= 1, got 0"),
    ("train.exit_interval=0", "train.exit_interval must be >= 1, got 0"),
    ("data.tokenizer=", "data.tokenizer is required with random init"),
])
def test_config_domains_are_checked_at_load_naming_the_key(override, message):
    from megatron_dil.config import ConfigError, load_config
    from megatron_dil.training.config import RunConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(RunConfig, CONFIG, [override])


def test_preflight_refuses_bad_runs_before_any_model(tiny, tmp_path):
    """Batch plan vs datasets, epochs, output_dir and the tokenizer default are settled without a process group."""
    import torch.distributed as dist

    from megatron_dil.config import from_dict
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.preflight import preflight
    from megatron_dil.training.trainer import Trainer

    def config(**sections) -> RunConfig:
        return from_dict(RunConfig, run_dict(tiny, sections.pop("out", tmp_path / "out"), **sections))

    # a validation split smaller than one micro-batch per DP rank: refused up front, not at the final evaluation
    with pytest.raises(ValueError, match=re.escape(
            "data.valid holds 55 pairs, fewer than one evaluation micro-batch per data-parallel rank "
            "(train.micro_batch_size 32 × DP 2 = 64 pairs)")):
        preflight(config(train={"micro_batch_size": 32, "global_batch_size": 64}), world_size=2)
    with pytest.raises(ValueError, match="data.valid holds 55 pairs"):
        Trainer(config(train={"micro_batch_size": 64, "global_batch_size": 64}))
    assert not dist.is_initialized()  # refused before any process group (let alone a model) existed
    with pytest.raises(ValueError, match=re.escape("train.global_batch_size 20 pairs is not divisible by "
                                                   "train.micro_batch_size 4 × data-parallel size 2")):
        preflight(config(train={"global_batch_size": 20}), world_size=2)
    # epochs: less than one step is refused, a fraction of a step is rounded down and said so
    with pytest.raises(ValueError, match=re.escape("train.epochs 0.02 × 425 pairs is less than one global batch")):
        preflight(config(train={"train_iters": None, "epochs": 0.02}), world_size=1)
    checked = preflight(config(train={"train_iters": None, "epochs": 1.1}), world_size=1)
    assert checked.plan.train_iters == int(1.1 * 425 / 16) == 29
    assert checked.notes == ["train.epochs 1.1 × 425 pairs / global batch 16 = 29.22 steps → 29 (rounded down)"]
    assert checked.plan.eval_micro_batches == 55 // 4  # the whole split: logging.eval_pairs 64 is more
    # output_dir: a file, or below a file
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output_dir .*/file is a file, not a directory"):
        preflight(config(out=tmp_path / "file"), world_size=1)
    with pytest.raises(ValueError, match="output_dir .*/file/run is not writable"):
        preflight(config(out=tmp_path / "file" / "run"), world_size=1)
    # init.checkpoint without data.tokenizer: the checkpoint's tokenizer/, said so; none there names the key
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny["checkpoints"][1], ckpt)
    no_tokenizer = dict(model=None, init={"checkpoint": str(ckpt)},
                        data={**run_dict(tiny, tmp_path)["data"], "tokenizer": ""})
    with pytest.raises(ValueError, match=re.escape(f"data.tokenizer is not set and init.checkpoint {ckpt} carries "
                                                   f"no tokenizer/ directory: set data.tokenizer")):
        preflight(config(**no_tokenizer), world_size=1)
    shutil.copytree(tiny["data"]["tokenizer"], ckpt / "tokenizer", dirs_exist_ok=True)  # beside its generation_config.json
    run = config(**no_tokenizer)
    checked = preflight(run, world_size=1)
    assert run.data.tokenizer == str(ckpt / "tokenizer")
    assert checked.notes == [f"data.tokenizer not set: using the tokenizer of init.checkpoint ({ckpt / 'tokenizer'})"]
    assert checked.plan.train_iters == 3 and checked.plan.accumulation == 4


def test_periodic_components_act_on_cadence_and_last_step_once():
    from megatron_dil.training.cadence import Periodic

    done = []
    component = Periodic(interval=4, last_step=10, action=done.append)
    for step in range(1, 11):
        component.maybe_run(step)
        if step == 8:
            component.run(8)  # an exit save at a step already saved on cadence: no second save
    component.run(10)  # the after-loop call of a run that ended normally
    assert done == [4, 8, 10]
    only_last = Periodic(interval=None, last_step=3, action=done.append)
    assert [only_last.should_run(s) for s in (1, 2, 3)] == [False, False, True]


def test_exit_signal_records_sigterm_instead_of_dying_and_restores_the_handler():
    import os
    import signal

    from megatron_dil.training.signals import ExitSignal

    before = signal.getsignal(signal.SIGTERM)
    with ExitSignal() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def _train_with_faults(rank: int, world_size: int, run: dict, fail_save_at: str | None) -> dict:
    """Train, recording this rank's console lines, every checkpoint file it writes and the error it ends with;
    ``fail_save_at``: the last rank's writes into that checkpoint fail as on a full disk."""
    import contextlib
    import errno
    import io

    import torch

    from megatron_dil.config import from_dict
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import TrainResult, train

    saves, real_save = [], torch.save

    def save(obj, path, *args, **kwargs):
        if isinstance(path, (str, Path)) and Path(path).parent.name.startswith("iter_"):
            path = Path(path)
            saves.append(f"{path.parent.name.removesuffix('.partial')}/{path.name}")
            if fail_save_at and path.parent.name.startswith(fail_save_at) and rank == world_size - 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    torch.save = save
    console, error, result = io.StringIO(), None, TrainResult()
    with contextlib.redirect_stdout(console):
        try:
            result = train(from_dict(RunConfig, run))
        except (ValueError, RuntimeError) as err:
            error = f"{type(err).__name__}: {err}"
        finally:
            torch.save = real_save
    return {"logs": console.getvalue(), "saves": saves, "error": error, "history": result.history,
            "iteration": result.state.iteration, "exit_reason": result.exit_reason}


def test_checkpoints_survive_damage_full_disks_and_schedule_changes(tiny):
    """One run directory through a run's life (DP=2, distributed optimizer):
    - save_interval and exit_interval on the same step write that checkpoint once;
    - the newest checkpoint damaged (state.json gone): resume takes the older verified one and says why;
    - resumed with another train.train_iters and train.lr: both honoured (the cosine schedule of the new values
      from the resumed step, checked against the formula) and named;
    - a full disk on one rank during a save: every rank stops with one message, the previous checkpoint intact;
    - every checkpoint damaged (truncated shard, state.json not JSON, a flipped byte): refused naming each file,
      never a silent restart from step 0."""
    out = tiny["root"] / "faults"
    root = out / "checkpoints"
    sections = dict(checkpoint={"save_interval": 2, "keep_last": 3}, logging={"eval_pairs": 16})

    def run(train: dict, fail_save_at: str | None = None) -> list[dict]:
        config = run_dict(tiny, out, train={"lr_schedule": "cosine", **train}, **sections)
        return run_ranks(_train_with_faults, 2, config, fail_save_at)

    first = run({"train_iters": 6, "exit_interval": 4})
    assert [r["error"] for r in first] == [None, None] and first[1]["exit_reason"] == "train.exit_interval"
    assert first[1]["iteration"] == 4
    assert first[1]["saves"] == ["iter_0000002/rank_00001.pt", "iter_0000004/rank_00001.pt"]
    assert first[0]["saves"] == [f"iter_{s:07d}/{f}" for s in (2, 4) for f in ("model_tp00_pp000.pt",
                                                                              "rank_00000.pt")]

    (root / "iter_0000004" / "state.json").unlink()
    second = run({"train_iters": 8, "lr": 5e-3})[1]
    assert second["error"] is None, second["error"]
    logs = second["logs"]
    assert f"resume: skipped rank 0: checkpoint {root}/iter_0000004: state.json is missing" in logs
    assert (f"resumed from {root}/iter_0000002 at step 2 (32 pairs seen); honouring the changed train.train_iters "
            f"6 → 8, train.lr 0.001 → 0.005: the LR schedule follows this config from step 2") in logs
    assert second["iteration"] == 8 and len(second["history"]) == 6
    cosine = [5e-3 * 0.5 * (1 + math.cos(math.pi * n / 8)) for n in range(2, 8)]  # lr of step n+1, decay over 8
    np.testing.assert_allclose([h["lr"] for h in second["history"]], cosine, rtol=1e-12)

    full = run({"train_iters": 12}, fail_save_at="iter_0000010")
    for rank in full:
        assert rank["error"].startswith("CheckpointSaveError: saving the checkpoint of step 10 failed on rank 1: "
                                        "OSError: [Errno 28] No space left on device (the disk is full: "), rank
        assert f"the previous checkpoint ({root}/iter_0000008) is intact" in rank["error"]
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000006", "iter_0000008", "latest"]

    shard = root / "iter_0000008" / "rank_00001.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    (root / "iter_0000006" / "state.json").write_text("{not json")
    model = root / "iter_0000004" / "model_tp00_pp000.pt"
    blob = bytearray(model.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    model.write_bytes(bytes(blob))
    damaged = run({"train_iters": 12})
    for rank in damaged:
        error = rank["error"]
        assert error.startswith(f"IntegrityError: checkpoint.resume: none of the 3 checkpoints in {root} can be "
                                f"resumed: "), error
        assert f"{shard} has {size // 2} bytes but {size} were written (truncated or replaced)" in error
        assert f"checkpoint {root}/iter_0000006: state.json is not valid JSON" in error
        assert f"{model} does not match the checksum recorded when it was written" in error
        assert error.endswith("Delete them (or set checkpoint.resume=false) to start from step 0")
        assert rank["history"] == []


def _nan_gradient_at_step_1(rank: int, world_size: int, run: dict) -> dict:
    """A finite loss whose gradient is NaN at step 1 (a hook poisons one weight's gradient), then normal steps; then
    the weights poisoned and a checkpoint and an export attempted."""
    import torch

    from megatron_dil.config import from_dict
    from megatron_dil.runtime.distributed import shutdown
    from megatron_dil.training.checkpoint import save_checkpoint
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import Trainer

    try:
        trainer = Trainer(from_dict(RunConfig, run))
        weight = trainer.policy[0].module.decoder.layers[0].mlp.linear_fc2.weight
        weight.register_hook(lambda grad: grad * math.nan if trainer.result.state.iteration == 0 else grad)
        result = trainer.fit()
        finite = all(bool(torch.isfinite(p).all()) for c in trainer.policy for p in c.module.parameters())
        with torch.no_grad():
            weight[0, 0] = math.nan
        refusals = []
        for attempt in (lambda: save_checkpoint(trainer.checkpointer.root, trainer.policy, trainer.optimizer,
                                                trainer.scheduler, result.state, 2), trainer.export):
            try:
                attempt()
            except FloatingPointError as err:
                refusals.append(str(err))
        return {"history": result.history, "skipped": result.state.skipped_steps, "finite": finite,
                "refusals": refusals}
    finally:
        shutdown()


def test_nan_gradient_behind_a_finite_loss_is_skipped_and_never_saved(tiny):
    out = tiny["root"] / "nan_grad"
    run = run_dict(tiny, out, data={"valid": None}, train={"train_iters": 3, "nonfinite_loss": "skip"})
    result = run_ranks(_nan_gradient_at_step_1, 1, run)[0]
    first, *rest = result["history"]
    assert math.isfinite(first["loss"]) and math.isnan(first["grad_norm"]) and result["skipped"] == 1
    assert all(math.isfinite(h["grad_norm"]) for h in rest) and rest[-1]["skipped_steps"] == 1
    assert result["finite"]  # the skipped step left no NaN in the weights, so later steps and final/ are clean
    assert [r.split(":")[0] for r in result["refusals"]] == [
        f"refusing to write checkpoint {out}/checkpoints/iter_0000003",
        f"refusing to write the final weights {out}/final"]
    assert all("decoder.layers.0.mlp.linear_fc2.weight" in r and "hold NaN/inf" in r for r in result["refusals"])
