"""Sampler on real gloo DP ranks (disjoint, covering, resumable), DataLoader sharding, and dataset blending."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch.distributed as dist

from megatron_dil.data import DataConfig, PreferenceSampler, build_dataloader, build_datasets, load_tokenizer
from megatron_dil.data.tiny_task import prepare_tiny_dataset
from tests.distributed import init_gloo, run_ranks

N, MBS, DP = 50, 3, 2
STRIDE = MBS * DP
USABLE = N - N % STRIDE  # 48 per epoch, 8 steps


def _take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def _ranks(rank, world_size, tiny):
    init_gloo()
    full = _take(PreferenceSampler(N, MBS, rank, world_size, seed=7), 20)  # 2.5 epochs
    resumed = {c: _take(PreferenceSampler(N, MBS, rank, world_size, consumed_samples=c, seed=7), 20 - c // STRIDE)
               for c in (STRIDE * 3, STRIDE * 8, STRIDE * 11)}  # mid-epoch, exactly at, and after an epoch boundary
    gathered = [None] * world_size
    dist.all_gather_object(gathered, full)
    # the trainer's path: a DataLoader per rank over the tiny dataset
    config = DataConfig(train=[tiny["train"]], tokenizer=tiny["tokenizer"], max_length=32)
    tokenizer = load_tokenizer(config.tokenizer)
    train, _ = build_datasets(config, tokenizer)
    loader = iter(build_dataloader(train, config, tokenizer, micro_batch_size=4, dp_rank=rank, dp_size=world_size))
    loader_ids = [next(loader).sample_ids.tolist() for _ in range(5)]
    return {"full": full, "resumed": resumed, "gathered": gathered, "loader_ids": loader_ids}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare_tiny_dataset(str(tmp_path_factory.mktemp("tiny") / "tiny"))


def test_dp2_disjoint_covering_and_resume(tiny):
    r0, r1 = run_ranks(_ranks, DP, tiny)
    assert r0["gathered"] == [r0["full"], r1["full"]] == r1["gathered"]  # every rank sees the same global plan
    steps_per_epoch = USABLE // STRIDE
    for epoch in range(2):
        steps = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        a = [i for mb in r0["full"][steps] for i in mb]
        b = [i for mb in r1["full"][steps] for i in mb]
        assert all(len(mb) == MBS for mb in r0["full"] + r1["full"])
        assert not set(a) & set(b)  # disjoint across ranks
        assert len(set(a + b)) == USABLE == len(a + b)  # no repeat within an epoch, all but the ragged tail
        assert set(a + b) <= set(range(N))
    epoch0 = [i for s in range(steps_per_epoch) for i in r0["full"][s] + r1["full"][s]]
    epoch1 = [i for s in range(steps_per_epoch, 2 * steps_per_epoch) for i in r0["full"][s] + r1["full"][s]]
    assert epoch0 != epoch1  # reshuffled every epoch
    for result in (r0, r1):
        for consumed, continued in result["resumed"].items():
            assert continued == result["full"][consumed // STRIDE:]
    ids0 = {i for mb in r0["loader_ids"] for i in mb}
    ids1 = {i for mb in r1["loader_ids"] for i in mb}
    assert len(ids0) == len(ids1) == 20 and not ids0 & ids1


def test_unshuffled_single_pass_and_bad_arguments():
    sampler = PreferenceSampler(10, 2, 1, 2, shuffle=False, max_epochs=1)
    assert list(sampler) == [[2, 3], [6, 7]] and len(sampler) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        PreferenceSampler(10, 2, 0, 2, consumed_samples=3)
    with pytest.raises(ValueError, match="cannot fill one step"):
        PreferenceSampler(3, 2, 0, 2)


def test_blending_weights_ids_and_determinism(tmp_path, tiny):
    from megatron_dil.data import PreprocessConfig, preprocess_pairs
    from megatron_dil.data.tiny_task import tiny_example_dir
    source = os.path.join(tiny_example_dir(), "pairs.jsonl")
    lines = open(source).readlines()
    prefixes = []
    for name, chunk in (("a", lines[:8]), ("b", lines[8:28])):
        (tmp_path / f"{name}.jsonl").write_text("".join(chunk))
        prefixes.append(preprocess_pairs(PreprocessConfig(
            inputs=[str(tmp_path / f"{name}.jsonl")], output_prefix=str(tmp_path / name), tokenizer=tiny["tokenizer"],
            max_length=32, max_prompt_length=16, progress=False)).prefixes["train"])
    config = DataConfig(train=[f"0.75:{prefixes[0]}", f"0.25:{prefixes[1]}"], tokenizer=tiny["tokenizer"],
                        max_length=32, blend_size=40)
    blend, _ = build_datasets(config)
    again, _ = build_datasets(config)
    a, b = blend.datasets
    draws = Counter(blend.source(k)[0] for k in range(40))
    assert draws == {0: 30, 1: 10}
    for k in range(1, 41):  # Megatron's rule keeps every prefix within one sample of its share
        prefix = Counter(blend.source(j)[0] for j in range(k))
        assert abs(prefix[0] - 0.75 * k) <= 1 and abs(prefix[1] - 0.25 * k) <= 1
    per_pair = Counter(blend.source(k) for k in range(40) if blend.source(k)[0] == 0)
    assert set(per_pair.values()) <= {3, 4} and len(per_pair) == 8  # full cycles before repeats
    for k in range(40):
        d, inner = blend.source(k)
        pair, reference = blend[k], (a, b)[d][inner]
        assert pair.sample_id == (0, 8)[d] + inner
        assert np.array_equal(pair.chosen, reference.chosen) and np.array_equal(pair.prompt, reference.prompt)
        assert again.source(k) == (d, inner)
    unweighted, _ = build_datasets(DataConfig(train=prefixes, tokenizer=tiny["tokenizer"], max_length=32))
    assert Counter(unweighted.source(k)[0] for k in range(len(unweighted))) == {0: 8, 1: 20}
