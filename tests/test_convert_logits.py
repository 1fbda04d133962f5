"""HF → megatron_dil conversion reproduces transformers' fp32 logits at TP=1, TP=2 and PP=2 on
real gloo ranks; ``save_megatron_checkpoint`` writes back exactly the converted shards."""
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
        logits = forward_logits(chunks, TOKENS, position_ids)
        if logits is not None:
            shards = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(shards, logits.contiguous(),
                                         group=parallel_state.get_tensor_model_parallel_group())
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                results[(name, checkpoint, (tp, pp, vpp))] = torch.cat(shards, dim=-1)[..., : model_cfg.vocab_size]
        if resave:
            save_megatron_checkpoint(chunks, resave, model_cfg)
        parallel_state.destroy_model_parallel()
    return results


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
    assert len(results) == len(cases)
    for (name, checkpoint, layout), logits in results.items():
        reference = hf_models[name][1]
        err = (logits - reference).abs().max().item()
        assert err <= 1e-4, f"{name} {checkpoint} at (tp, pp, vpp)={layout}: max |Δlogit| = {err:.3g}"
    for name, checkpoint, layout, resave in cases:
        if resave:  # what the trainer saves equals what the converter wrote, tensor for tensor
            for shard in sorted(Path(checkpoint, "shards").iterdir()):
                written, saved = load_file(shard), load_file(Path(resave, "shards", shard.name))
                assert written.keys() == saved.keys(), shard
                for key in written:
                    assert torch.equal(written[key], saved[key]), f"{shard.name}:{key}"
