"""The DIL trainer on real gloo ranks: layout parity, step-0 identities, resume, learning, reference modes, TensorBoard,
non-finite losses."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import run_ranks


def run_dict(tiny, output_dir: Path, **sections) -> dict:
    """A run config (plain dict, picklable for spawned ranks) on the tiny task; ``sections`` update it."""
    run = {
        "output_dir": str(output_dir),
        "model": {"preset": "tiny"},
        "data": {"train": [tiny["data"]["train"]], "valid": tiny["data"]["valid"],
                 "tokenizer": tiny["data"]["tokenizer"], "max_length": 32},
        "loss": {"name": "dil_lsif"},
        "train": {"micro_batch_size": 4, "global_batch_size": 16, "train_iters": 3, "lr": 1e-3,
                  "warmup_fraction": 0.0, "lr_schedule": "constant"},
        "reference": {"mode": "precompute", "recompute": True},
        "checkpoint": {"keep_last": 2},
        "logging": {"eval_pairs": 64, "tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(run.get(section), dict):
            run[section] = {**run[section], **values}
        else:
            run[section] = values
    return run


def _train(rank: int, world_size: int, run: dict) -> dict:
    from megatron_dil.config import from_dict
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import train

    result = train(from_dict(RunConfig, run))
    return {"history": result.history, "evaluations": result.evaluations, "iteration": result.state.iteration,
            "skipped": result.state.skipped_steps, "generations": result.generations}


def train_ranks(run: dict, world_size: int) -> dict:
    """Train on ``world_size`` spawned gloo ranks; the last rank (last pipeline stage) holds the metrics."""
    return run_ranks(_train, world_size, run)[-1]


def _step0_and_train(rank: int, world_size: int, run: dict) -> dict:
    """At step 0 (reference = initial weights) evaluate every DIL variant and DPO, then train."""
    from megatron_dil.config import from_dict
    from megatron_dil.losses import LossConfig, build_loss
    from megatron_dil.runtime.distributed import shutdown
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import Trainer

    try:
        trainer = Trainer(from_dict(RunConfig, run))
        trainer.prepare_reference()
        step0 = {}
        for name in ("dil_lsif", "dil_bce", "dil_ukl", "dpo"):
            trainer.loss = build_loss(LossConfig(name=name))
            step0[name] = trainer.evaluate()
        trainer.loss = build_loss(LossConfig(name="dil_lsif"))
        trainer.run.reference.recompute = False  # computed just above
        result = trainer.fit()
        return {"step0": step0, "history": result.history}
    finally:
        shutdown()


LAYOUTS = [(1, 1, None, 1), (2, 1, None, 1), (1, 2, None, 1), (1, 2, 2, 1), (1, 1, None, 2)]  # (TP, PP, VPP, DP)


def test_layouts_give_the_same_trajectory_and_step0_identities(tiny):
    """Same weights and global batch: (TP, PP, VPP, DP) = (1,1,-,1), (2,1,-,1), (1,2,-,1) (1F1B), (1,2,2,1)
    (interleaved 1F1B) and (1,1,-,2) give the same DIL-LSIF loss trajectory; at step 0 every pair has f = 0, so
    LSIF = -1/2, BCE = 2 ln 2, UKL = 1, DPO = ln 2, rewards 0."""
    expected_step0 = {"dil_lsif": -0.5, "dil_bce": 2 * math.log(2), "dil_ukl": 1.0, "dpo": math.log(2)}
    trajectories = {}
    for tp, pp, vpp, dp in LAYOUTS:
        run = run_dict(tiny, tiny["root"] / f"run_{tp}{pp}{vpp}{dp}", model=None,
                       init={"checkpoint": tiny["checkpoints"][tp]},
                       parallel={"tensor": tp, "pipeline": pp, "virtual_pipeline": vpp})
        out = run_ranks(_step0_and_train, tp * pp * dp, run)[-1]
        for name, value in expected_step0.items():
            metrics = out["step0"][name]
            assert metrics["loss"] == pytest.approx(value, abs=1e-5), (tp, pp, vpp, dp, name)
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
                assert abs(metrics[key]) < 1e-5, (tp, pp, vpp, dp, name, key, metrics[key])
        assert out["history"][0]["dil/f_chosen"] == pytest.approx(0.0, abs=1e-5)
        trajectories[(tp, pp, vpp, dp)] = [h["loss"] for h in out["history"]]
    reference = trajectories[LAYOUTS[0]]
    assert reference[0] == pytest.approx(-0.5, abs=1e-5) and max(reference) - min(reference) > 1e-3
    for layout, losses in trajectories.items():
        np.testing.assert_allclose(losses, reference, rtol=0, atol=2e-5, err_msg=str(layout))


def test_resume_continues_the_uninterrupted_trajectory(tiny):
    """DP=2 with the distributed optimizer: stop after step 3 (checkpoint), resume, and steps 4-6 equal an
    uninterrupted run; a half-written checkpoint left by a crash is ignored and cleaned up."""
    common = dict(train={"train_iters": 6}, logging={"eval_pairs": 16})
    full = train_ranks(run_dict(tiny, tiny["root"] / "resume_full", **common), 2)
    resumed_dir = tiny["root"] / "resume_split"
    first = train_ranks(run_dict(tiny, resumed_dir, **{**common, "train": {"train_iters": 6, "exit_interval": 3}}), 2)
    assert first["iteration"] == 3
    crashed = resumed_dir / "checkpoints" / "iter_0000005.partial"  # a save that died half-way
    crashed.mkdir()
    (crashed / "rank_00000.pt").write_bytes(b"truncated")
    second = train_ranks(run_dict(tiny, resumed_dir, **common), 2)
    assert second["iteration"] == 6 and len(second["history"]) == 3
    split = [h["loss"] for h in first["history"]] + [h["loss"] for h in second["history"]]
    np.testing.assert_allclose(split, [h["loss"] for h in full["history"]], rtol=0, atol=1e-6)
    np.testing.assert_allclose([h["grad_norm"] for h in second["history"]],
                               [h["grad_norm"] for h in full["history"][3:]], rtol=1e-6)
    assert not crashed.exists()
    kept = sorted(p.name for p in (resumed_dir / "checkpoints").iterdir())
    assert kept == ["iter_0000003", "iter_0000006", "latest"]


@pytest.mark.parametrize("loss", [{"name": "dil_lsif"}, {"name": "dpo", "beta": 0.1}])
def test_training_moves_heldout_reward_accuracy(tiny, loss):
    """On the bundled task held-out reward accuracy goes from ~0.2 (ties at step 0 count as wrong) to well above
    chance; TensorBoard gets the documented scalars."""
    out_dir = tiny["root"] / f"learn_{loss['name']}"
    full = tiny["full"]
    run = run_dict(tiny, out_dir, loss=loss, reference={"recompute": loss["name"] == "dil_lsif"},
                   data={"train": [full["train"]], "valid": full["valid"]},
                   train={"micro_batch_size": 8, "global_batch_size": 32, "train_iters": 40, "lr": 1e-3,
                          "warmup_fraction": 0.1, "lr_schedule": "cosine"},
                   logging={"eval_interval": 20, "eval_pairs": None, "tensorboard": True})
    if loss["name"] == "dpo":
        run["checkpoint"]["export_hf"] = str(out_dir / "hf")
    out = train_ranks(run, 2)
    final = out["evaluations"][-1]
    assert final["step"] == 40
    assert final["rewards/accuracies"] > 0.8, out["evaluations"]
    assert final["rewards/margins"] > 0
    if loss["name"] == "dil_lsif":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out_dir / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        documented = {f"train/{k}" for k in (
            "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "dil/f_chosen", "dil/f_rejected", "dil/exp_f_chosen", "dil/exp_f_rejected", "lr",
            "grad_norm", "loss_scale", "tokens_per_second", "pairs_per_second", "mfu", "memory_gib",
            "skipped_steps")} | {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"}
        assert documented <= tags, documented - tags
        assert len(events.Scalars("train/loss")) == 40
    else:  # the HF export at the end loads in transformers, tokenizer included
        import torch
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir / "hf", torch_dtype=torch.float32)
        assert hf.config.vocab_size == 47 and hf.config.num_hidden_layers == 2
        tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir / "hf")
        assert len(tokenizer) == 47


def test_precomputed_and_coresident_reference_give_the_same_losses(tiny):
    runs = {mode: train_ranks(run_dict(tiny, tiny["root"] / f"ref_{mode}", reference={"mode": mode},
                                       parallel={"tensor": 2}), 2)
            for mode in ("precompute", "model")}
    for key in ("loss", "dil/f_chosen", "dil/f_rejected", "rewards/accuracies"):
        np.testing.assert_allclose([h[key] for h in runs["model"]["history"]],
                                   [h[key] for h in runs["precompute"]["history"]], rtol=0, atol=1e-6)


def test_packed_rows_train_like_padded_rows(tiny):
    """data.packing=mask (several sequences per row, block-diagonal causal mask) gives the padded-row trajectory."""
    runs = {packing: train_ranks(run_dict(tiny, tiny["root"] / f"pack_{packing}", parallel={"tensor": 2},
                                          data={"packing": packing}), 2)
            for packing in ("none", "mask")}
    for key in ("loss", "dil/f_chosen", "rewards/margins"):
        np.testing.assert_allclose([h[key] for h in runs["mask"]["history"]],
                                   [h[key] for h in runs["none"]["history"]], rtol=0, atol=2e-6)


def test_generation_evaluation_scores_the_current_weights(tiny):
    """generate_eval at step 0, every 2 steps and the end (TP=2): each evaluation's greedy completions equal
    transformers greedy generate() on those weights (step 0: the initial HF model; the end: final/ exported to HF),
    and the verifier score is the tiny-task check of those completions."""
    import torch
    import transformers

    from megatron_dil.convert import megatron_to_hf
    from megatron_dil.data.tokenizer import load_tokenizer
    from megatron_dil.generation.prompts import load_prompts
    from megatron_dil.generation.verifier import tiny_sort

    out = tiny["root"] / "generate_eval"
    shown = 6
    result = train_ranks(run_dict(
        tiny, out, model=None, init={"checkpoint": tiny["checkpoints"][2]}, parallel={"tensor": 2},
        loss={"name": "sft"}, train={"train_iters": 4, "lr": 3e-3},
        generate_eval={"prompts": tiny["data"]["valid"], "interval": 2, "max_prompts": shown, "max_new_tokens": 10,
                       "verifier": "tiny_sort", "samples_shown": shown}), 2)
    generations = result["generations"]
    assert [g.step for g in generations] == [0, 2, 4]
    tokenizer = load_tokenizer(tiny["data"]["tokenizer"])
    prompts = load_prompts(tiny["data"]["valid"], tokenizer, window=32, limit=shown).prompts
    megatron_to_hf(out / "final", out / "final_hf", progress=False)
    for generation, hf_dir in ((generations[0], tiny["root"] / "hf"), (generations[-1], out / "final_hf")):
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        expected = []
        for prompt in prompts:
            ids = torch.tensor([prompt.ids])
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)[0, len(prompt.ids):]
            new = new.tolist()
            expected.append(tokenizer.decode(new[:-1] if new and new[-1] == tokenizer.eos_id else new))
        assert [s["completion"] for s in generation.samples] == expected
        scores = [tiny_sort(p.source, text) for p, text in zip(prompts, expected)]
        assert generation.correct == sum(scores) and generation.scored == len(scores)
    assert generations[0].samples != generations[-1].samples  # the evaluations follow the training


def test_blended_datasets_look_up_their_own_reference_logprobs(tiny):
    """A 50/50 blend of two datasets: reference tables are concatenated in sample-id order, so at step 0 every pair
    of both datasets has f = 0 exactly as in a single dataset."""
    data = tiny["data"]
    blend = [f"0.5:{data['train']}", f"0.5:{tiny['full']['train']}"]
    out = train_ranks(run_dict(tiny, tiny["root"] / "blend", data={"train": blend, "num_workers": 1},
                               train={"train_iters": 2}), 2)
    first = out["history"][0]
    assert first["loss"] == pytest.approx(-0.5, abs=1e-6)
    assert abs(first["dil/f_chosen"]) < 1e-6 and abs(first["dil/f_rejected"]) < 1e-6


@pytest.mark.parametrize("policy", ["skip", "stop", "limit"])
def test_nonfinite_losses_are_skipped_or_stop_with_the_step(tiny, policy):
    """A NaN in the reference cache makes the loss non-finite: `skip` counts and skips every step, `stop` raises
    naming step 1, and `skip` stops once train.max_consecutive_skips steps in a row were skipped."""
    from megatron_dil.training.reference import ReferenceTable, write_cache

    data = tiny["root"] / f"nan_{policy}"
    shutil.copytree(Path(tiny["data"]["train"]).parent, data, ignore=shutil.ignore_patterns("*.npz"))
    prefix = str(data / Path(tiny["data"]["train"]).name)
    base = dict(data={"train": [prefix], "valid": None})
    train_ranks(run_dict(tiny, tiny["root"] / f"nan_prep_{policy}", **base, train={"train_iters": 1}), 1)
    base["reference"] = {"recompute": False}
    [path] = Path(prefix).parent.glob(Path(prefix).name + ".reference_logps.*.npz")
    with np.load(path) as cache:
        sums, counts, identity = cache["sums"].copy(), cache["counts"], json.loads(str(cache["identity"]))
    sums[:, 0] = np.nan
    write_cache(str(path), ReferenceTable(sums, counts), identity)  # a consistent cache holding NaNs
    mode = "skip" if policy == "limit" else policy
    run = run_dict(tiny, tiny["root"] / f"nan_run_{policy}", **base,
                   train={"train_iters": 3 if policy == "limit" else 2, "nonfinite_loss": mode,
                          "max_consecutive_skips": 2 if policy == "limit" else 5})
    if policy == "stop":
        with pytest.raises(RuntimeError, match="step 1: non-finite loss"):
            train_ranks(run, 1)
    elif policy == "limit":
        with pytest.raises(RuntimeError, match=r"step 2: 2 consecutive steps skipped for non-finite values "
                                               r"\(train.max_consecutive_skips=2\), last: non-finite loss"):
            train_ranks(run, 1)
        assert not (tiny["root"] / f"nan_run_{policy}" / "final").exists()
    else:
        out = train_ranks(run, 1)
        assert out["skipped"] == 2 and out["iteration"] == 2
        assert all(math.isnan(h["grad_norm"]) for h in out["history"])


def test_bad_runs_fail_with_a_clear_message(tiny):
    from megatron_dil.config import ConfigError, from_dict
    from megatron_dil.models.config import ModelConfig
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.preflight import check_compatible as _check_compatible

    with pytest.raises(ConfigError, match="set `model`"):
        from_dict(RunConfig, {"output_dir": "x"})
    with pytest.raises(ConfigError, match="train.micro_batch_size: expected int"):
        from_dict(RunConfig, run_dict(tiny, Path("x"), train={"micro_batch_size": "four"}))
    run = from_dict(RunConfig, run_dict(tiny, Path("x")))
    with pytest.raises(ValueError, match="wrong tokenizer"):
        _check_compatible(run, ModelConfig.from_preset("tiny", vocab_size=40), 47)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _check_compatible(run, ModelConfig.from_preset("tiny", max_position_embeddings=16), 47)


def test_pipeline_padding_keeps_every_sequence_unchanged(tiny):
    """Micro-batches padded to one [rows, S] for the pipeline keep tokens, masks and sequence ids of the real
    sequences; padded positions belong to no sequence and see only themselves."""
    import torch

    from megatron_dil.data import PreferenceCollator, PreferenceDataset
    from megatron_dil.training.step import uniform_shapes

    dataset = PreferenceDataset(tiny["data"]["train"])
    for packing in ("none", "mask"):
        collate = PreferenceCollator(0, 8, packing, 64)
        small, large = collate([dataset[i] for i in range(2)]), collate([dataset[i] for i in range(2, 8)])
        padded = uniform_shapes([small, large])
        assert padded[1] is large and padded[0].tokens.shape == large.tokens.shape
        rows, length = small.tokens.shape
        grown = padded[0]
        for name in ("tokens", "labels", "loss_mask", "position_ids", "sequence_index"):
            assert torch.equal(getattr(grown, name)[:rows, :length], getattr(small, name)), (packing, name)
        assert (grown.sequence_index[rows:] == -1).all() and (grown.sequence_index[:, length:] == -1).all()
        assert grown.loss_mask[rows:].sum() == 0 and grown.loss_mask[:, length:].sum() == 0
        if packing == "mask":
            mask = grown.attention_mask
            assert torch.equal(mask[:rows, :, :length, :length], small.attention_mask)
            assert mask[:rows, :, :length, length:].all()  # real queries never see padding
            side = mask.shape[-1]
            assert not mask[..., torch.arange(side), torch.arange(side)].any()  # no fully masked row
