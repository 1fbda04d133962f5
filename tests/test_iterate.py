"""Demonstration datasets and megatron-dil-iterate (self-play pairs, iterated DIL) on the tiny sorting task.

The module fixture runs the whole pipeline once on 2 gloo ranks (DP=2): demonstrations (the chosen responses of the
tiny task, no rejected ones) → SFT from random init, stopped early → 2 iterations of DIL-LSIF (+ NLL term) with T = 0.7 self-play
samples. The tests read its outputs; the resume test reruns the second iteration's training from a mid-run checkpoint.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.distributed import run_ranks

WORLD = 2


def _train(rank, world_size, run_dict):
    from megatron_dil.config import from_dict
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import train

    return [h["loss"] for h in train(from_dict(RunConfig, run_dict)).history if "loss" in h]


def _iterate(rank, world_size, cfg_dict):
    from megatron_dil.config import from_dict
    from megatron_dil.iterate.config import IterateConfig
    from megatron_dil.iterate.loop import iterate

    return iterate(from_dict(IterateConfig, cfg_dict))


def _final_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted((path / "shards").glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def selfplay(tiny):
    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import preprocess_pairs
    from megatron_dil.data.tiny_task import TINY_MAX_LENGTH, TINY_MAX_PROMPT_LENGTH, tiny_example_dir

    root = tiny["root"] / "selfplay"
    root.mkdir()
    rows = root / "rows.jsonl"
    rows.write_text("\n".join(Path(tiny_example_dir(), "pairs.jsonl").read_text().splitlines()[:1200]) + "\n")
    demos = preprocess_pairs(PreprocessConfig(
        inputs=[str(rows)], output_prefix=str(root / "demo"), tokenizer=tiny["full"]["tokenizer"], kind="demonstrations",
        response_column="chosen", max_length=TINY_MAX_LENGTH, max_prompt_length=TINY_MAX_PROMPT_LENGTH,
        valid_fraction=0.15, progress=False)).prefixes
    train = {"micro_batch_size": 16, "global_batch_size": 32, "lr": 1.0e-3, "warmup_fraction": 0.1,
             "precision": "fp32"}
    sft = {"output_dir": str(root / "sft"), "model": {"preset": "tiny"},
           "data": {"train": [demos["train"]], "valid": demos["valid"], "tokenizer": tiny["full"]["tokenizer"],
                    "max_length": TINY_MAX_LENGTH},
           "loss": {"name": "sft"}, "train": dict(train, train_iters=100, lr=3.0e-3),
           "logging": {"log_interval": 50, "tensorboard": False}}
    sft_losses = run_ranks(_train, WORLD, sft)[-1]
    cfg = {"output_dir": str(root / "iterate"), "init": str(root / "sft" / "final"),
           "demonstrations": demos["train"], "valid_demonstrations": demos["valid"], "iterations": 2,
           "history": "previous", "sampling": {"temperature": 0.7, "seed": 0}, "max_new_tokens": 12,
           "train": {"data": {"max_length": TINY_MAX_LENGTH}, "loss": {"name": "dil_lsif", "sft_weight": 1.0},
                     "train": dict(train, train_iters=30), "checkpoint": {"save_interval": 15, "keep_last": 0},
                     "logging": {"log_interval": 10, "tensorboard": False, "eval_pairs": 128},
                     "generate_eval": {"prompts": demos["valid"], "max_prompts": 158, "max_new_tokens": 12,
                                       "verifier": "tiny_sort"}}}
    table = run_ranks(_iterate, WORLD, cfg)[0]
    return {"root": root, "demos": demos, "sft_losses": sft_losses, "cfg": cfg, "table": table,
            "tokenizer": tiny["full"]["tokenizer"]}


def _eval(selfplay, k):
    return json.loads((Path(selfplay["cfg"]["output_dir"]) / f"iter_{k}" / "eval.json").read_text())


def test_demonstration_rows_tokenize_like_the_chat_template(tiny, tmp_path):
    """prompt/completion strings, prompt/completion messages, single- and multi-turn `messages`: the stored ids are the
    HF tokenizer's own tokenization of the chat template's rendering; bad rows are skipped, counted with row numbers;
    `--strict` turns the first into a one-line error."""
    import transformers

    from megatron_dil.data import PreferenceDataset, load_tokenizer
    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import PreprocessError, preprocess_pairs

    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    good = [
        {"prompt": [user("sort ascending : 3 1 2")], "completion": [bot("1 2 3")]},
        {"prompt": "sort descending : 1 5", "completion": " 5 1"},  # strings: plain text, BOS + prompt + response + EOS
        {"messages": [user("sort ascending : 4 2 1"), bot("1 2 4")]},
        {"messages": [user("sort ascending : 4 2"), bot("2 4"), user("sort descending : 1 5 3"), bot("5 3 1")]},
    ]
    bad = [{"prompt": [user("sort ascending : 1 2")]},  # no response
           {"prompt": [user("  ")], "completion": [bot("1")]},  # empty prompt
           {"messages": [user("sort ascending : 1 2")]},  # no assistant turn last
           {"messages": [bot("1 2")]}]  # no prompt turn
    source = tmp_path / "demos.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    config = dict(inputs=[str(source)], output_prefix=str(tmp_path / "d"), tokenizer=tiny["full"]["tokenizer"],
                  kind="demonstrations", max_length=64, max_prompt_length=32, progress=False)
    result = preprocess_pairs(PreprocessConfig(**config))
    assert result.counts["pairs_written"] == 4
    assert result.counts["dropped"]["missing_field"] == 2 and result.counts["dropped"]["empty_field"] == 2
    assert result.counts["dropped_rows"]["missing_field"] == [f"{source}:5", f"{source}:7"]
    dataset = PreferenceDataset(result.prefixes["train"], load_tokenizer(tiny["full"]["tokenizer"]))
    assert dataset.kind == "demonstrations" and dataset.metadata["kind"] == "demonstrations"
    hf = transformers.AutoTokenizer.from_pretrained(tiny["full"]["tokenizer"])
    text = dataset[1]
    assert text.prompt.tolist() == hf("sort descending : 1 5")["input_ids"]
    assert text.prompt.tolist() + text.chosen.tolist() == hf("sort descending : 1 5 5 1")["input_ids"] + [hf.eos_token_id]
    conversations = {0: [user("sort ascending : 3 1 2"), bot("1 2 3")], 2: good[2]["messages"], 3: good[3]["messages"]}
    for i, conversation in conversations.items():
        pair = dataset[i]
        prompt = hf.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        full = hf.apply_chat_template(conversation, tokenize=False)
        expected_prompt = hf(prompt, add_special_tokens=False)["input_ids"]
        assert pair.prompt.tolist() == expected_prompt
        assert pair.prompt.tolist() + pair.chosen.tolist() == hf(full, add_special_tokens=False)["input_ids"]
    assert all(dataset[i].rejected.size == 0 for i in range(4))
    with pytest.raises(PreprocessError, match=r"demos.jsonl: row 5: missing_field: no 'completion'"):
        preprocess_pairs(PreprocessConfig(**config, strict=True))


def test_only_sft_trains_on_demonstrations(selfplay):
    """A preference loss on a demonstrations dataset is refused before any model is built; SFT (DP=2, the fixture's
    first stage) trained on it."""
    from megatron_dil.config import from_dict
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.preflight import preflight

    losses = selfplay["sft_losses"]
    assert len(losses) == 100 and np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    run = from_dict(RunConfig, {"output_dir": str(selfplay["root"] / "refused"), "model": {"preset": "tiny"},
                                "data": {"train": [selfplay["demos"]["train"]], "tokenizer": selfplay["tokenizer"],
                                         "max_length": 32}, "loss": {"name": "dil_lsif"}})
    with pytest.raises(ValueError, match="holds demonstrations .* loss 'dil_lsif' needs pairs"):
        preflight(run, 1)


def test_selfplay_pairs_are_token_exact(selfplay):
    """chosen = the demonstration's ids, rejected = the sampled ids as generated (EOS included); equal ones dropped;
    metadata records generator, iteration and sampling."""
    from megatron_dil.data import PreferenceDataset, load_tokenizer
    from megatron_dil.iterate.pairs import demonstration_prompts

    tokenizer = load_tokenizer(selfplay["tokenizer"])
    demos = PreferenceDataset(selfplay["demos"]["train"], tokenizer)
    prompt_index = demonstration_prompts(demos)
    out = Path(selfplay["cfg"]["output_dir"]) / "iter_1"
    samples = {r["prompt_index"]: r["completion_token_ids"]
               for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    pairs = PreferenceDataset(str(out / "pairs_train"), tokenizer)
    expected = [(d.prompt.tolist(), d.chosen.tolist(), samples[prompt_index[tuple(d.prompt.tolist())]])
                for d in (demos[i] for i in range(len(demos)))]
    kept = [e for e in expected if e[1] != e[2]]
    assert len(pairs) == len(kept) and len(expected) - len(kept) == pairs.metadata["counts"]["dropped_equal"] > 0
    for i, (prompt, chosen, rejected) in enumerate(kept):
        pair = pairs[i]
        assert (pair.prompt.tolist(), pair.chosen.tolist(), pair.rejected.tolist()) == (prompt, chosen, rejected)
    source = pairs.metadata["source"]
    assert source["iteration"] == 1 and source["sampling"]["temperature"] == 0.7
    assert source["generator"] == str((out.parent / "iter_0" / "train" / "final").resolve())


def test_iterated_dil_raises_heldout_accuracy_and_demonstration_likelihood(selfplay):
    first, last = _eval(selfplay, 0), _eval(selfplay, 1)
    assert last["score_after"] >= first["score_before"] + 0.03, selfplay["table"]
    assert last["demo_loglik_after"] > first["demo_loglik_before"] + 0.05, selfplay["table"]
    assert first["demo_loglik_after"] == pytest.approx(last["demo_loglik_before"], abs=1e-6)  # π_1 measured twice
    assert (Path(selfplay["cfg"]["output_dir"]) / "summary.tsv").read_text().startswith("iteration\tpairs")


def test_rerun_resumes_training_and_gives_the_same_final_weights(selfplay):
    """Iteration 1's training killed after its step-15 checkpoint (its later outputs removed): the rerun skips
    generation and pairs, resumes training at step 15 and ends with bit-identical final weights (fp32)."""
    out = Path(selfplay["cfg"]["output_dir"]) / "iter_1"
    final = out / "train" / "final"
    before = _final_weights(final)
    samples_mtime = (out / "samples.jsonl").stat().st_mtime_ns
    uninterrupted = _eval(selfplay, 1)
    shutil.rmtree(final)
    shutil.rmtree(out / "train" / "checkpoints" / "iter_0000030")
    (out / "eval.json").unlink()
    run_ranks(_iterate, WORLD, selfplay["cfg"])
    after = _final_weights(final)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert (out / "samples.jsonl").stat().st_mtime_ns == samples_mtime
    resumed = _eval(selfplay, 1)
    for key in ("score_before", "score_after", "demo_loglik_before", "demo_loglik_after", "pairs"):
        assert resumed[key] == uninterrupted[key], key


def test_kill_during_generation_then_rerun_gives_the_same_final_weights(selfplay):
    """Iteration 1 killed half-way through its generation (half its samples in samples.jsonl.partial/, nothing
    after): the rerun generates only the missing samples, rebuilds the same pairs and trains to the same weights."""
    from megatron_dil.config import from_dict
    from megatron_dil.generation.cli import generation_settings
    from megatron_dil.generation.writer import partial_dir
    from megatron_dil.iterate.config import IterateConfig
    from megatron_dil.iterate.loop import generate_config, training_run

    cfg = from_dict(IterateConfig, selfplay["cfg"])
    out = Path(cfg.output_dir) / "iter_1"
    before = _final_weights(out / "train" / "final")
    pairs_digest = json.loads((out / "pairs_train.json").read_text())["files"]
    samples = out / "samples.jsonl"
    rows = samples.read_text().splitlines()
    partial = partial_dir(samples)
    partial.mkdir()
    (partial / "settings.json").write_text(json.dumps(
        generation_settings(generate_config(cfg, 1, training_run(cfg, 1))), indent=1, sort_keys=True))
    (partial / "rank_00000.jsonl").write_text("\n".join(rows[:len(rows) // 2]) + "\n")
    samples.unlink()
    for name in ("pairs_train.bin", "pairs_train.idx", "pairs_train.json", "eval.json"):
        (out / name).unlink()
    shutil.rmtree(out / "train")
    run_ranks(_iterate, WORLD, selfplay["cfg"])
    ids = lambda lines: [(r["prompt_index"], r["completion_token_ids"]) for r in map(json.loads, lines)]  # noqa: E731
    assert ids(samples.read_text().splitlines()) == ids(rows)  # (log-probs differ in the last bits: other batches)
    assert json.loads((out / "pairs_train.json").read_text())["files"] == pairs_digest
    after = _final_weights(out / "train" / "final")
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_bad_iterate_input_is_one_line(selfplay, tiny, tmp_path, capfd):
    from megatron_dil.iterate.cli import main

    cfg = dict(selfplay["cfg"], iterations=1)
    path = tmp_path / "iter.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path)]) == 1
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and "iterations: 1, but" in err and "2 finished iterations" in err
    path.write_text(yaml.safe_dump(dict(selfplay["cfg"], history="all")))
    assert main(["--config", str(path)]) == 1
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and "(history differ from" in err
    # demonstrations tokenized with another tokenizer than the checkpoint's
    other = tmp_path / "other_tok"
    shutil.copytree(selfplay["tokenizer"], other)
    config = json.loads((other / "tokenizer.json").read_text())
    config["model"]["vocab"]["zz"] = len(config["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(config))
    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import preprocess_pairs

    rows = selfplay["root"] / "rows.jsonl"
    prefix = preprocess_pairs(PreprocessConfig(inputs=[str(rows)], output_prefix=str(tmp_path / "o"),
                                               tokenizer=str(other), kind="demonstrations", response_column="chosen",
                                               max_length=32, max_prompt_length=16, progress=False)).prefixes["train"]
    path.write_text(yaml.safe_dump(dict(selfplay["cfg"], output_dir=str(tmp_path / "run"), demonstrations=prefix)))
    assert main(["--config", str(path)]) == 1
    err = capfd.readouterr().err.strip()
    assert "\n" not in err and "was tokenized with" in err
    # a pair dataset where demonstrations are expected
    path.write_text(yaml.safe_dump(dict(selfplay["cfg"], output_dir=str(tmp_path / "run"),
                                        demonstrations=tiny["data"]["train"])))
    assert main(["--config", str(path)]) == 1
    assert "megatron-dil-iterate reads demonstrations" in capfd.readouterr().err
