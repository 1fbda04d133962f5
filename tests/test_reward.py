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
    from megatron_dil.convert import megatron_to_hf

    root = tiny["root"] / "reward"
    result = run_ranks(_train, WORLD, reward_run(tiny, root / "rm"))[-1]
    final = root / "rm" / "final"
    megatron_to_hf(final, root / "hf", progress=False)
    return {"root": root, "final": final, "hf": root / "hf", "result": result}


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
    from megatron_dil.convert import hf_to_megatron

    checkpoint = trained["final"]
    if tp == 2:
        checkpoint = trained["root"] / "final_tp2"
        if not checkpoint.exists():
            hf_to_megatron(trained["final"], checkpoint, tensor_parallel=2, pipeline_parallel=1, progress=False)
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
