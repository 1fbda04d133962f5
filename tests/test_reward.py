"""Reward models (megatron_dil.reward): last-token scores against a float64 Hugging Face reference at TP=1, TP=2 and
PP=2 (padded and packed rows), the Bradley–Terry training path with normalisation, megatron-dil-score, the
*ForSequenceClassification export and import, and refusals of a reward checkpoint where a policy is expected (and
the other way round).

The module fixture trains a reward model for a few steps from the tiny random Llama of ``conftest`` (2 gloo ranks,
DP=2) so that the head is not its initial draw; its final/ is exported to Hugging Face once.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_ranks

WORLD = 2


def _train(rank, world_size, run_dict):
    from megatron_dil.config import from_dict
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import train

    result = train(from_dict(RunConfig, run_dict))
    return {"history": result.history, "evaluations": result.evaluations}


def reward_run(tiny, output_dir, **train):
    from megatron_dil.data.tiny_task import TINY_MAX_LENGTH

    data = tiny["data"]
    return {"output_dir": str(output_dir), "init": {"checkpoint": tiny["checkpoints"][1]},
            "data": {"train": [data["train"]], "valid": data["valid"], "tokenizer": data["tokenizer"],
                     "max_length": TINY_MAX_LENGTH},
            "reward": {"center_rewards_coefficient": 0.01},
            "train": {"micro_batch_size": 8, "global_batch_size": 16, "train_iters": 4, "lr": 1e-3,
                      "precision": "fp32", **train},
            "logging": {"log_interval": 1, "tensorboard": False}}


@pytest.fixture(scope="module")
def trained(tiny):
    from megatron_dil.convert import hf_to_megatron, megatron_to_hf

    root = tiny["root"] / "reward"
    result = run_ranks(_train, WORLD, reward_run(tiny, root / "rm"))[-1]
    final = root / "rm" / "final"
    megatron_to_hf(final, root / "hf", progress=False)
    hf_to_megatron(final, root / "final_tp2", tensor_parallel=2, pipeline_parallel=1, progress=False)  # a reshard
    return {"root": root, "final": final, "final_tp2": root / "final_tp2", "hf": root / "hf", "result": result}


def _pairs(tiny, count=6):
    from megatron_dil.data.dataset import PreferenceDataset

    dataset = PreferenceDataset(tiny["data"]["valid"])
    return [dataset[i] for i in range(count)]


def _hf_scores(hf_dir, sequences, dtype):
    """Each sequence alone through transformers' *ForSequenceClassification (no padding involved)."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        return [float(model(torch.tensor([s])).logits[0, 0]) for s in sequences]


def _score_layout(rank, world_size, checkpoint, tp, pp, pairs):
    from megatron.core import parallel_state

    from megatron_dil.convert import MegatronCheckpoint, load_megatron_checkpoint
    from megatron_dil.data.collator import PreferenceCollator
    from megatron_dil.models.builder import build_model
    from megatron_dil.reward.scoring import reports_scores, score_batches
    from megatron_dil.runtime.distributed import ParallelConfig, initialize, shutdown

    model = MegatronCheckpoint(checkpoint).model
    initialize(ParallelConfig(tensor=tp, pipeline=pp), model, seed=0)
    try:
        chunks = build_model(model)
        load_megatron_checkpoint(chunks, checkpoint)
        out = {}
        for packing in ("none", "mask"):  # right-padded rows; first-fit packed rows (several sequences per row)
            collator = PreferenceCollator(0, 8, packing, pack_length=48)
            batches = [collator(pairs[:4]), collator(pairs[4:])]
            if packing == "mask":
                assert batches[0].tokens.shape[0] < 8  # really packed
            rewards = score_batches(chunks, batches)
            out[packing] = [r.tolist() for r in rewards] if reports_scores() else None
        out["dp_rank"] = parallel_state.get_data_parallel_rank()
        return out
    finally:
        shutdown()


def _sequences(pairs):
    """Sequences in the collator's order per micro-batch (chosen 0..n−1, then rejected)."""
    out = []
    for part in (pairs[:4], pairs[4:]):
        out.append([list(p.prompt) + list(p.chosen) for p in part] + [list(p.prompt) + list(p.rejected) for p in part])
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_scores_match_float64_reference(tiny, trained, tp, pp):
    """Rewards at the last real token of each sequence, in padded and in packed micro-batches, equal transformers'
    float64 LlamaForSequenceClassification of the same weights (each sequence scored alone) at TP=1, TP=2, PP=2."""
    checkpoint = trained["final_tp2"] if tp == 2 else trained["final"]
    pairs = _pairs(tiny)
    sequences = _sequences(pairs)
    reference = [_hf_scores(trained["hf"], part, torch.float64) for part in sequences]
    assert np.std(np.concatenate(reference)) > 1e-3  # the scores differ between sequences: pooling matters
    outputs = run_ranks(_score_layout, WORLD, str(checkpoint), tp, pp, pairs)
    reporting = [o for o in outputs if o["none"] is not None]
    assert len(reporting) == WORLD // (tp * pp)
    for out in reporting:
        for packing in ("none", "mask"):
            for got, want in zip(out[packing], reference, strict=True):
                np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_training_metrics_and_normalisation(tiny, trained):
    """The Bradley–Terry run logs the usual reward metrics; its final/ is a reward model with normalisation
    statistics equal to μ/σ of the exported model's scores of the train set's chosen responses."""
    from megatron_dil.convert import MegatronCheckpoint
    from megatron_dil.data.dataset import PreferenceDataset
    from megatron_dil.reward.loss import BradleyTerryLoss, PairRewards
    from megatron_dil.reward.config import RewardConfig

    history = trained["result"]["history"]
    assert len(history) == 4
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(np.isfinite(h[key]) for h in history)
    evaluation = trained["result"]["evaluations"][-1]
    assert 0.0 <= evaluation["rewards/accuracies"] <= 1.0
    ckpt = MegatronCheckpoint(trained["final"])
    assert ckpt.model.head == "reward"
    stats = ckpt.manifest.reward_normalization
    dataset = PreferenceDataset(tiny["data"]["train"])
    usable = len(dataset) // 16 * 16  # micro_batch 8 × DP 2: the ragged tail is left out
    assert stats["count"] == usable
    chosen = [list(dataset[i].prompt) + list(dataset[i].chosen) for i in range(len(dataset))]
    scores = np.array(_hf_scores(trained["hf"], chosen, torch.float64))
    # DP rank r reads micro-batches r, r+2, ... of the ordered pass: together the first `usable` pairs
    np.testing.assert_allclose([stats["mean"], stats["std"]], [scores[:usable].mean(), scores[:usable].std()],
                               atol=1e-5)
    # the loss: −log σ(r_w − r_l − m) + c (r_w + r_l)², against hand math
    loss = BradleyTerryLoss(RewardConfig(margin=0.5, center_rewards_coefficient=0.1))
    out = loss(PairRewards(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0])))
    expected = [-np.log(1 / (1 + np.exp(-(1.0 - 0.5)))) + 0.1 * 1.0, -np.log(1 / (1 + np.exp(-(-3.0 - 0.5)))) + 0.1]
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-6)
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_export_pools_like_training_and_import_is_identity(tiny, trained):
    """The exported LlamaForSequenceClassification (fp32) scores a right-padded batch like Megatron (≤ 1e-5: HF pools
    the last non-pad token); importing it back gives the same tensors bit for bit and the same statistics."""
    import transformers
    from safetensors.torch import load_file

    from megatron_dil.convert import MegatronCheckpoint, hf_to_megatron

    config = json.loads((trained["hf"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == 0 and config["eos_token_id"] == 2
    pairs = _pairs(tiny)
    sequences = [s for part in _sequences(pairs) for s in part]
    megatron = [r for out in run_ranks(_score_layout, 1, str(trained["final"]), 1, 1, pairs)[0]["none"] for r in out]
    width = max(map(len, sequences))
    batch = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(trained["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(batch, attention_mask=(batch != 0).long()).logits[:, 0].tolist()
    np.testing.assert_allclose(hf, megatron, atol=1e-5, rtol=0)

    back = trained["root"] / "imported"
    hf_to_megatron(trained["hf"], back, tensor_parallel=1, pipeline_parallel=1, progress=False)
    ckpt = MegatronCheckpoint(back)
    assert ckpt.model.head == "reward"
    assert ckpt.manifest.reward_normalization == MegatronCheckpoint(trained["final"]).manifest.reward_normalization
    original, imported = load_file(trained["final"] / "shards" / "tp00_pp000.safetensors"), \
        load_file(back / "shards" / "tp00_pp000.safetensors")
    assert original.keys() == imported.keys() and "output_layer.weight" in original
    for key in original:
        assert torch.equal(original[key], imported[key]), key


def _score_cli(rank, world_size, argv):
    from megatron_dil.reward.cli import main

    return main(argv)


def test_score_cli(tiny, trained, tmp_path):
    """megatron-dil-score at TP=2 × DP=1 (rows of text prompts and responses, and generation-output rows with token
    ids) writes every row with its raw and normalised reward, equal to the HF reference."""
    from megatron_dil.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny["data"]["tokenizer"])
    prompts = [[{"role": "user", "content": "sort ascending : 3 1 2"}], [{"role": "user", "content": "sort descending : 5 9 1 1"}]]
    rows = [{"prompt": prompts[0], "response": "1 2 3"}, {"prompt": prompts[1], "response": "9 5 1 1"},
            {"prompt": prompts[0], "response": "3 2 1"},
            {"prompt": prompts[1], "completion": "1 1 5", "completion_token_ids": tokenizer.encode("1 1 5") + [2]}]
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    output = tmp_path / "scored.jsonl"
    codes = run_ranks(_score_cli, WORLD, ["--checkpoint", str(trained["final_tp2"]), "--input",
                                          str(rows_path), "--output", str(output), "--tensor-parallel", "2",
                                          "--no-progress"])
    assert codes == [0, 0]
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["response"] if "response" in r else r["completion"] for r in scored] == ["1 2 3", "9 5 1 1", "3 2 1", "1 1 5"]
    template, ids = tokenizer.chat_template, []
    for r in rows:  # prompt + response = the joint tokenization of the rendered conversation (as preprocessing)
        if "completion_token_ids" in r:
            ids.append(tokenizer.encode(tokenizer.render_chat(r["prompt"], template, add_generation_prompt=True))
                       + r["completion_token_ids"])
        else:
            conversation = r["prompt"] + [{"role": "assistant", "content": r["response"]}]
            ids.append(tokenizer.encode(tokenizer.render_chat(conversation, template, add_generation_prompt=False)))
    reference = _hf_scores(trained["hf"], ids, torch.float64)
    np.testing.assert_allclose([r["reward"] for r in scored], reference, atol=2e-5)
    stats = json.loads((trained["hf"] / "config.json").read_text())["reward_normalization"]
    np.testing.assert_allclose([r["reward_normalized"] for r in scored],
                               [(x - stats["mean"]) / stats["std"] for x in reference], atol=1e-4)


def _one_error_line(capfd, prog: str, needle: str) -> None:
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1 and needle in lines[0], lines


def test_refusals(tiny, trained, tmp_path, capfd, monkeypatch):
    """A reward checkpoint where a policy is expected (training a policy from it, generation, iteration) and a policy
    checkpoint where a reward model is expected (scoring) are refused with one line; so are a loss: section beside
    reward:, model.head reward without reward:, and an export whose pad id is EOS (HF would pool elsewhere)."""
    import yaml

    from megatron_dil.config import ConfigError, from_dict
    from megatron_dil.convert import ConversionError, megatron_to_hf
    from megatron_dil.generation.cli import main as generate_main
    from megatron_dil.generation.model import GenerationInputError
    from megatron_dil.iterate.config import IterateConfig
    from megatron_dil.iterate.loop import check_inputs
    from megatron_dil.reward.cli import main as score_main
    from megatron_dil.train import main as train_main
    from megatron_dil.training.config import RunConfig

    monkeypatch.delenv("MEGATRON_DIL_TRACEBACK", raising=False)
    policy_run = reward_run(tiny, tmp_path / "policy")
    policy_run.pop("reward")
    policy_run["init"]["checkpoint"] = str(trained["final"])
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump(policy_run))
    assert train_main(["--config", str(config)]) == 1
    _one_error_line(capfd, "megatron-dil-train", "is a reward model (head: reward); a policy checkpoint is expected")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort ascending : 3 1 2"}) + "\n")
    assert generate_main(["--checkpoint", str(trained["final"]), "--prompts", str(prompts), "--output",
                          str(tmp_path / "samples.jsonl")]) == 1
    _one_error_line(capfd, "megatron-dil-generate", "is a reward model (head: reward) but a policy is expected")
    with pytest.raises(GenerationInputError, match="is a reward model"):
        check_inputs(from_dict(IterateConfig, {"output_dir": str(tmp_path / "it"), "init": str(trained["final"]),
                                               "demonstrations": tiny["data"]["train"]}))

    assert score_main(["--checkpoint", tiny["checkpoints"][1], "--input", str(prompts), "--output",
                       str(tmp_path / "scored.jsonl")]) == 1
    _one_error_line(capfd, "megatron-dil-score", "is a policy (head: lm) but a reward model is expected")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "sort ascending : 3 1 2", "response": "1 2 3"}) + "\n{not json\n")
    assert score_main(["--checkpoint", str(trained["final"]), "--input", str(rows), "--output",
                       str(tmp_path / "scored.jsonl")]) == 1
    _one_error_line(capfd, "megatron-dil-score", f"{rows}:2: malformed_json")
    assert not (tmp_path / "scored.jsonl").exists()

    with pytest.raises(ConfigError, match="remove the loss: section"):
        from_dict(RunConfig, {**reward_run(tiny, tmp_path / "x"), "loss": {"name": "dpo"}})
    with pytest.raises(ConfigError, match="no reward: section"):
        from_dict(RunConfig, {"output_dir": str(tmp_path / "y"), "model": {"preset": "tiny", "head": "reward"},
                              "data": {"train": ["x"], "tokenizer": tiny["data"]["tokenizer"]}})
    with pytest.raises(ConversionError, match="--pad-token-id"):
        megatron_to_hf(trained["final"], tmp_path / "hf_eos_pad", pad_token_id=2, progress=False)
    assert not (tmp_path / "hf_eos_pad").exists()
