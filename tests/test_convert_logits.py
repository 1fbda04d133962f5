"""HF → megatron_dil conversion reproduces transformers' fp32 logits at TP=1, TP=2 and PP=2 on
real gloo ranks (256-token sequences: Mistral's sliding window and a non-integer rope_theta matter);
``save_megatron_checkpoint`` writes back exactly the converted shards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import run_ranks
from tests.test_convert_models import TOKENS, build_hf_models

LAYOUTS = [  # (checkpoint converted at (TP, PP), loaded at (TP, PP, VPP))
    ((1, 1), (1, 1, None)),
    ((2, 1), (2, 1, None)),
    ((1, 2), (1, 2, None)),
    ((1, 1), (1, 2, None)),  # global layer indices: a PP=1 checkpoint loads into a PP=2 model
]


def _megatron_logits(rank: int, world_size: int, cases: list[tuple[str, str, tuple, str]]) -> dict:
    """For each (name, checkpoint, (tp, pp, vpp), resave_dir): load, forward, gather the vocab shards; return the
    full logits from the last stage's TP rank 0 (None on other ranks)."""
    from megatron.core import parallel_state

    from megatron_dil.convert import MegatronCheckpoint, load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_dil.models.builder import build_model
    from megatron_dil.models.forward import forward_logits
    from megatron_dil.runtime import ParallelConfig, initialize

    results = {}
    for name, checkpoint, (tp, pp, vpp), resave in cases:
        model_cfg = MegatronCheckpoint(checkpoint).model
        initialize(ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp), model_cfg, seed=7)
        chunks = build_model(model_cfg, max_sequence_length=TOKENS.shape[1])
        load_megatron_checkpoint(chunks, checkpoint)
        position_ids = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
        runs = [("rows", forward_logits(chunks, TOKENS, position_ids))]
        if model_cfg.sliding_window is not None:  # both rows packed into one: window AND block-diagonal mask
            s = TOKENS.shape[1]
            causal = torch.ones(2 * s, 2 * s).tril().bool()
            blocks = torch.block_diag(*[torch.ones(s, s, dtype=torch.bool)] * 2) & causal
            packed = forward_logits(chunks, TOKENS.reshape(1, -1), position_ids.reshape(1, -1), ~blocks[None, None])
            runs.append(("packed", None if packed is None else packed.reshape(2, s, -1)))
        for form, logits in runs:
            if logits is not None:
                shards = [torch.empty_like(logits) for _ in range(tp)]
                torch.distributed.all_gather(shards, logits.contiguous(),
                                             group=parallel_state.get_tensor_model_parallel_group())
                if parallel_state.get_tensor_model_parallel_rank() == 0:
                    full = torch.cat(shards, dim=-1)[..., : model_cfg.vocab_size]
                    results[(name, checkpoint, (tp, pp, vpp), form)] = full
        if resave:
            save_megatron_checkpoint(chunks, resave, model_cfg)
        parallel_state.destroy_model_parallel()
    return results


def _vpp_and_mismatch(rank: int, world_size: int, checkpoint_tp1: str) -> tuple[dict, str]:
    """Load a TP=1/PP=1 checkpoint at PP=2 × VPP=2 (this rank's two chunks hold global layers {r, r+2}): return the
    loaded weights by global name; then try it in a TP=2 model and return the refusal."""
    from megatron.core import parallel_state

    from megatron_dil.convert import CheckpointMismatchError, MegatronCheckpoint, load_megatron_checkpoint
    from megatron_dil.models.builder import build_model
    from megatron_dil.runtime import ParallelConfig, initialize

    model_cfg = MegatronCheckpoint(checkpoint_tp1).model
    initialize(ParallelConfig(tensor=1, pipeline=2, virtual_pipeline=2), model_cfg, seed=3)
    chunks = build_model(model_cfg, max_sequence_length=TOKENS.shape[1])
    load_megatron_checkpoint(chunks, checkpoint_tp1)
    loaded = {}
    for chunk in chunks:
        for name, tensor in chunk.state_dict().items():
            if isinstance(tensor, torch.Tensor):
                parts = name.split(".")
                if parts[:2] == ["decoder", "layers"]:
                    parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
                loaded[".".join(parts)] = tensor.clone()
    parallel_state.destroy_model_parallel()
    initialize(ParallelConfig(tensor=2), model_cfg, seed=3)
    try:
        load_megatron_checkpoint(build_model(model_cfg, max_sequence_length=TOKENS.shape[1]), checkpoint_tp1)
        refusal = ""
    except CheckpointMismatchError as err:
        refusal = str(err)
    parallel_state.destroy_model_parallel()
    return loaded, refusal


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return build_hf_models(tmp_path_factory.mktemp("hf"))


def test_logits_match_transformers_at_every_layout(hf_models, tmp_path):
    from megatron_dil.convert import hf_to_megatron

    cases, converted = [], {}
    for name, (hf_dir, _) in hf_models.items():
        for (tp, pp), load_layout in LAYOUTS:
            out = tmp_path / f"{name}_tp{tp}_pp{pp}"
            if out not in converted.values():
                hf_to_megatron(hf_dir, out, tensor_parallel=tp, pipeline_parallel=pp, progress=False)
                converted[(name, tp, pp)] = out
            resave = str(tmp_path / f"{name}_resaved_tp{tp}_pp{pp}") if load_layout == (tp, pp, None) else ""
            cases.append((name, str(out), load_layout, resave))
    results = {}
    for rank_results in run_ranks(_megatron_logits, 2, cases):
        results.update(rank_results)
    assert len(results) == len(cases) + sum(name == "mistral" for name, *_ in cases)
    for (name, checkpoint, layout, form), logits in results.items():
        reference = hf_models[name][1]
        err = (logits - reference).abs().max().item()
        assert err <= 1e-4, f"{name} {checkpoint} at (tp, pp, vpp)={layout}, {form}: max |Δlogit| = {err:.3g}"
    for name, checkpoint, layout, resave in cases:
        if resave:  # what the trainer saves equals what the converter wrote, tensor for tensor
            for shard in sorted(Path(checkpoint, "shards").iterdir()):
                written, saved = load_file(shard), load_file(Path(resave, "shards", shard.name))
                assert written.keys() == saved.keys(), shard
                for key in written:
                    assert torch.equal(written[key], saved[key]), f"{shard.name}:{key}"


def test_virtual_pipeline_load_and_tensor_parallel_refusal(hf_models, tmp_path):
    from megatron_dil.convert import hf_to_megatron

    checkpoint = tmp_path / "llama_tp1"
    hf_to_megatron(hf_models["llama"][0], checkpoint, tensor_parallel=1, pipeline_parallel=1, progress=False)
    stored = load_file(checkpoint / "shards" / "tp00_pp000.safetensors")
    (loaded0, refusal0), (loaded1, refusal1) = run_ranks(_vpp_and_mismatch, 2, str(checkpoint))
    layers = {0: {int(k.split(".")[2]) for k in loaded0 if k.startswith("decoder.layers.")},
              1: {int(k.split(".")[2]) for k in loaded1 if k.startswith("decoder.layers.")}}
    assert layers == {0: {0, 2}, 1: {1, 3}}
    assert set(loaded0) | set(loaded1) == set(stored) | {"output_layer.weight"}
    for key, value in {**loaded0, **loaded1}.items():
        assert torch.equal(value, stored[key]), key
    for refusal in (refusal0, refusal1):
        assert "written for tensor_parallel=1 but the model is built with tensor_parallel=2" in refusal
        assert "--tensor-parallel 2" in refusal
