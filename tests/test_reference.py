"""Reference log-prob caches: content-addressed keys (caches of several models coexist, a swapped checkpoint never
reuses another model's values), configurable location, and damaged caches refused in one line naming the file."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import run_ranks

TINY_HF = dict(vocab_size=47, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """160 tiny-task pairs (train only) and two tiny Llamas of identical shapes (different random weights)."""
    import torch
    import transformers

    from megatron_dil.convert import hf_to_megatron
    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import preprocess_pairs
    from megatron_dil.data.tiny_task import TINY_MAX_LENGTH, TINY_MAX_PROMPT_LENGTH, tiny_example_dir

    root = tmp_path_factory.mktemp("reference")
    rows = root / "pairs.jsonl"
    rows.write_text("\n".join(Path(tiny_example_dir(), "pairs.jsonl").read_text().splitlines()[:160]) + "\n")
    tokenizer = str(Path(tiny_example_dir(), "tokenizer"))
    prefix = preprocess_pairs(PreprocessConfig(
        inputs=[str(rows)], output_prefix=str(root / "data" / "tiny"), tokenizer=tokenizer,
        max_length=TINY_MAX_LENGTH, max_prompt_length=TINY_MAX_PROMPT_LENGTH, valid_fraction=0.0,
        progress=False)).prefixes["train"]
    checkpoints = {}
    for seed, name in enumerate(("model_a", "model_b")):
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).save_pretrained(root / f"hf_{name}")
        checkpoints[name] = str(root / name)
        hf_to_megatron(root / f"hf_{name}", checkpoints[name], tensor_parallel=1, pipeline_parallel=1, progress=False)
    return {"root": root, "prefix": prefix, "tokenizer": tokenizer, "checkpoints": checkpoints}


def _run(tiny, init: dict, **reference) -> dict:
    return {"output_dir": str(tiny["root"] / "run"), **init,
            "data": {"train": [tiny["prefix"]], "valid": None, "tokenizer": tiny["tokenizer"], "max_length": 32},
            "loss": {"name": "dil_lsif"}, "train": {"micro_batch_size": 8, "global_batch_size": 16, "train_iters": 1},
            "reference": {"mode": "precompute", **reference}, "logging": {"tensorboard": False}}


def _prepare(rank: int, world_size: int, steps: list) -> list[dict]:
    """Each step is a run config (build the trainer, prepare the reference: return its log lines and the train
    table's first rows, or the error) or ``(function, *args)`` called on rank 0 between runs (e.g. to damage a
    file); one result per run."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dil.config import from_dict
    from megatron_dil.runtime.distributed import shutdown
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import Trainer

    out = []
    try:
        for step in steps:
            if isinstance(step, tuple):
                if rank == 0:
                    step[0](*step[1:])
                dist.barrier()
                continue
            logs: list[str] = []
            try:
                trainer = Trainer(from_dict(RunConfig, step))
                trainer.monitor.log = logs.append
                trainer.prepare_reference()
                out.append({"logs": logs, "sums": trainer.tables["train"].sums[:4].copy()})
            except RuntimeError as err:
                out.append({"logs": logs, "error": f"{type(err).__name__}: {err}"})
            parallel_state.destroy_model_parallel()
    finally:
        shutdown()
    return out


def _swap_in(checkpoint: str, other: str) -> None:
    """Replace ``checkpoint``'s files by ``other``'s, keeping each file's size (asserted) and times."""
    root = Path(checkpoint)
    times = {p.relative_to(root): (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    shutil.rmtree(root)
    shutil.copytree(other, root)
    for name, (atime, mtime) in times.items():
        assert (root / name).stat().st_size == (Path(other) / name).stat().st_size
        os.utime(root / name, ns=(atime, mtime))


def _zero_sums(prefix: str) -> None:
    """Every reference sum of the dataset's cache set to 0; identity and recorded checksum kept."""
    [path] = _caches(prefix)
    with np.load(path) as cache:
        stored = {k: cache[k].copy() for k in cache.files}
    np.savez(path, **{**stored, "sums": np.zeros_like(stored["sums"])})


def _caches(prefix: str) -> set[str]:
    return {str(p) for p in Path(prefix).parent.glob(Path(prefix).name + ".reference_logps.*.npz")}


def test_caches_are_keyed_by_content_and_coexist(tiny):
    """Model A, then model B on the same data, then A again: two caches, the third run reuses A's. Then a checkpoint
    directory whose files are replaced by B's (same sizes, mtimes restored) reuses B's values, not A's."""
    root, prefix = tiny["root"], tiny["prefix"]
    swapped = root / "swapped"
    shutil.copytree(tiny["checkpoints"]["model_a"], swapped)
    swapped_run = _run(tiny, {"init": {"checkpoint": str(swapped)}})
    a, b, a_again, b_swapped = run_ranks(_prepare, 1, [
        swapped_run, _run(tiny, {"init": {"checkpoint": tiny["checkpoints"]["model_b"]}}), swapped_run,
        (_swap_in, str(swapped), tiny["checkpoints"]["model_b"]), swapped_run])[0]
    assert all("error" not in r for r in (a, b, a_again, b_swapped))
    cache_a, cache_b = (next(line for line in r["logs"] if "computing" in line).rsplit(" -> ", 1)[1] for r in (a, b))
    assert _caches(prefix) == {cache_a, cache_b}
    assert a_again["logs"] == [f"reference log-probs: reusing {cache_a}"]
    np.testing.assert_array_equal(a_again["sums"], a["sums"])
    assert not np.allclose(b["sums"], a["sums"])
    assert b_swapped["logs"] == [f"reference log-probs: reusing {cache_b}"]
    np.testing.assert_array_equal(b_swapped["sums"], b["sums"])


def test_damaged_caches_are_refused_naming_the_file(tiny, tmp_path):
    """Zeroed sums (file identity kept), truncated, text and short caches: one line naming the file and the
    remedy; reference.recompute=true rebuilds. A cache directory that cannot be written fails before the pass, on
    every rank (no hang); reference.cache_dir moves caches out of the dataset's directory."""
    from megatron_dil.training.reference import ReferenceCacheError, ReferenceTable, read_cache, write_cache

    data = tmp_path / "data"
    shutil.copytree(Path(tiny["prefix"]).parent, data, ignore=shutil.ignore_patterns("*.npz"))
    prefix = str(data / Path(tiny["prefix"]).name)
    tiny = {**tiny, "prefix": prefix}
    random_init = {"model": {"preset": "tiny"}}
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    elsewhere = tmp_path / "caches"
    results = run_ranks(_prepare, 2, [
        _run(tiny, random_init), (_zero_sums, prefix), _run(tiny, random_init),
        _run(tiny, random_init, recompute=True), _run(tiny, random_init, cache_dir=str(elsewhere)),
        _run(tiny, random_init, cache_dir=str(blocked / "caches"))])
    made, refused, rebuilt, moved, _ = results[0]
    [path] = _caches(prefix)
    for result in (refused, results[1][1]):  # on every rank
        assert result["error"] == (f"ReferenceCacheError: {path}: its values do not match the checksum recorded "
                                   f"when it was written (edited or damaged); set reference.recompute=true to rebuild it")
    assert rebuilt["sums"].tolist() == made["sums"].tolist() and (made["sums"] < 0).all()
    assert [p.name for p in elsewhere.iterdir()] == [Path(path).name]
    assert moved["sums"].tolist() == made["sums"].tolist()
    for result in (results[0][-1], results[1][-1]):  # every rank: the same line, before any reference pass
        assert result["error"].startswith(f"ReferenceCacheError: cannot write the reference log-prob cache "
                                          f"{blocked / 'caches'}/tiny_train.reference_logps.")
        assert "reference.cache_dir is not writable (NotADirectoryError" in result["error"]
        assert not any("computing" in line for line in result["logs"])

    with np.load(path) as cache:
        stored = {k: cache[k].copy() for k in cache.files}
    identity, rows = json.loads(str(stored["identity"])), len(stored["sums"])
    assert read_cache(path, identity, rows).sums[:4].tolist() == made["sums"].tolist()
    good = Path(path).read_bytes()
    for damage, message in ((good[:-64], "is not a readable reference cache"),
                            (b"sums,counts\n1,2\n", "is not a readable reference cache")):
        Path(path).write_bytes(damage)
        with pytest.raises(ReferenceCacheError, match=rf"^{path} {message} .*; set reference.recompute=true") as err:
            read_cache(path, identity, rows)
        assert "\n" not in str(err.value)
    write_cache(path, ReferenceTable(stored["sums"][:10], stored["counts"][:10]), identity)
    with pytest.raises(ReferenceCacheError, match=rf"^{path} holds 10 pairs but the dataset has {rows}; set "):
        read_cache(path, identity, rows)
    write_cache(path, ReferenceTable(stored["sums"], stored["counts"]), {**identity, "precision": "other"})
    with pytest.raises(ReferenceCacheError, match=rf"^{path} was computed for another precision"):
        read_cache(path, identity, rows)
