"""LoRA on real gloo ranks: the TP/PP-sharded adapter forward and its gradients against a float64 merged reference,
the PEFT and merged exports against transformers/peft, and LoRA DIL runs (layouts, reference modes, resume)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_ranks
from tests.test_trainer import run_dict, train_ranks

RANK, ALPHA = 4, 8.0
TOKENS = torch.randint(3, 47, (2, 12), generator=torch.Generator().manual_seed(0))
TARGETS = {"linear_qkv": "column", "linear_proj": "row", "linear_fc1": "column", "linear_fc2": "row"}


def _linears(layer) -> dict:
    return {"linear_qkv": layer.self_attention.linear_qkv, "linear_proj": layer.self_attention.linear_proj,
            "linear_fc1": layer.mlp.linear_fc1, "linear_fc2": layer.mlp.linear_fc2}


def global_factors(layer: int, target: str, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzero (A [r, in], B [out, r]) of one adapter in the TP=1 layout (fused rows as the TP=1 checkpoint)."""
    g = torch.Generator().manual_seed(1000 * layer + list(TARGETS).index(target))
    return 0.2 * torch.randn(RANK, in_features, generator=g), 0.2 * torch.randn(out_features, RANK, generator=g)


def shard_rows(full: torch.Tensor, target: str, tp: int, k: int) -> torch.Tensor:
    """TP rank k's rows of a column-parallel output: contiguous for QKV (whole query groups), [gate_k; up_k] for fc1."""
    if target == "linear_fc1":
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[k], up.chunk(tp)[k]])
    return full.chunk(tp)[k]


def gather_rows(shards: list[torch.Tensor], target: str) -> torch.Tensor:
    if target == "linear_fc1":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards)


def _full_logits(logits, tp: int, vocab: int):
    from megatron.core import parallel_state

    shards = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(shards, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :vocab]


def _adapted(rank: int, world_size: int, checkpoints: dict, out_dir: str) -> dict:
    """Per layout (TP, PP) in a 2-rank world: adapters set to the global factors, full logits; at PP=1 the
    full-layout gradients of a fixed projection of the logits; the float64 merged reference at TP=1; exports at TP=2."""
    from megatron.core import parallel_state

    from megatron_dil.convert import MegatronCheckpoint, load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_dil.lora import LoRAConfig, apply_lora, merged
    from megatron_dil.lora.export import save_adapters
    from megatron_dil.models.builder import build_model
    from megatron_dil.models.forward import forward_logits
    from megatron_dil.runtime import ParallelConfig, initialize

    lora = LoRAConfig(rank=RANK, alpha=ALPHA)
    position_ids = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    results = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        model_cfg = MegatronCheckpoint(checkpoints[tp]).model
        initialize(ParallelConfig(tensor=tp, pipeline=pp), model_cfg, seed=7)
        k = parallel_state.get_tensor_model_parallel_rank()
        chunks = build_model(model_cfg, max_sequence_length=TOKENS.shape[1])
        load_megatron_checkpoint(chunks, checkpoints[tp])
        if (tp, pp) == (1, 1):  # reference: plain model with W + (α/r)·B·A merged in float64
            with torch.no_grad():
                for layer in chunks[0].decoder.layers:
                    for target, linear in _linears(layer).items():
                        w = linear.weight
                        a, b = global_factors(layer.layer_number - 1, target, *w.shape)
                        w.copy_(w.double() + ALPHA / RANK * (b.double() @ a.double()))
            results["reference"] = forward_logits(chunks, TOKENS, position_ids)[..., :model_cfg.vocab_size]
            chunks = build_model(model_cfg, max_sequence_length=TOKENS.shape[1])
            load_megatron_checkpoint(chunks, checkpoints[tp])
        apply_lora(chunks, lora, seed=3)
        if (tp, pp) == (1, 1):
            results["trainable"] = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
        with torch.no_grad():
            for chunk in chunks:
                for layer in chunk.decoder.layers:
                    for target, linear in _linears(layer).items():
                        out_f, in_f = linear.weight.shape
                        full_shape = (out_f * tp, in_f) if TARGETS[target] == "column" else (out_f, in_f * tp)
                        a, b = global_factors(layer.layer_number - 1, target, *full_shape)
                        if TARGETS[target] == "column":
                            linear.lora.A.copy_(a)
                            linear.lora.B.copy_(shard_rows(b, target, tp, k))
                        else:
                            linear.lora.A.copy_(a.chunk(tp, dim=1)[k])
                            linear.lora.B.copy_(b)
        logits = forward_logits(chunks, TOKENS, position_ids)
        if logits is not None:
            results[(tp, pp)] = _full_logits(logits, tp, model_cfg.vocab_size)
        if pp == 1:  # gradients of Σ logits·R (each TP rank its vocab shard: their sum is the whole)
            chunk = chunks[0]
            chunk.train()
            local = chunk(TOKENS, position_ids, None)
            vp = local.shape[-1]
            weights = torch.randn(*local.shape[:2], model_cfg.vocab_size, generator=torch.Generator().manual_seed(5))
            weights = torch.nn.functional.pad(weights, (0, vp * tp - model_cfg.vocab_size))  # padded vocab: 0
            (local * weights[..., k * vp:(k + 1) * vp]).sum().backward()
            results[("with_grad", tp)] = sorted(n for n, p in chunk.named_parameters() if p.grad is not None)
            grads = {}
            for layer in chunk.decoder.layers:
                for target, linear in _linears(layer).items():
                    ga, gb = linear.lora.A.grad, linear.lora.B.grad
                    group = parallel_state.get_tensor_model_parallel_group()
                    sharded = gb if TARGETS[target] == "column" else ga
                    parts = [torch.empty_like(sharded) for _ in range(tp)]
                    torch.distributed.all_gather(parts, sharded.contiguous(), group=group)
                    if TARGETS[target] == "column":
                        grads[(layer.layer_number, target)] = (ga, gather_rows(parts, target))
                    else:
                        grads[(layer.layer_number, target)] = (torch.cat(parts, dim=1), gb)
            results[("grads", tp)] = grads
        if (tp, pp) == (2, 1):
            save_adapters(chunks, f"{out_dir}/adapters", model_cfg, lora, checkpoints[tp])
            with merged(chunks):
                save_megatron_checkpoint(chunks, f"{out_dir}/merged", model_cfg)
            after = forward_logits(chunks, TOKENS, position_ids)  # merging restored the exact weights
            results["after_merge"] = _full_logits(after, tp, model_cfg.vocab_size)
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def adapted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    ranks = run_ranks(_adapted, 2, tiny["checkpoints"], str(out))
    return {"ranks": ranks, "dir": out, "checkpoints": tiny["checkpoints"]}


def test_adapter_forward_and_gradients_match_the_merged_float64_reference(adapted):
    from megatron_dil.convert import MegatronCheckpoint
    from megatron_dil.lora import LoRAConfig

    """Adapted logits at (TP, PP) = (1,1), (2,1), (1,2) equal a plain model with W + (α/r)·B·A merged in float64;
    only adapters get gradients, and the TP=2 shards' gradients assemble into the TP=1 ones."""
    rank0, rank1 = adapted["ranks"]
    reference = rank0["reference"]
    for layout, logits in ((1, 1), rank0[(1, 1)]), ((2, 1), rank0[(2, 1)]), ((1, 2), rank1[(1, 2)]):
        torch.testing.assert_close(logits, reference, rtol=0, atol=2e-5, msg=str(layout))
    assert (rank0[(1, 1)] - rank0["reference"]).abs().max() < 2e-5
    torch.testing.assert_close(rank0["after_merge"], rank0[(2, 1)], rtol=0, atol=0)
    for tp in (1, 2):
        names = rank0[("with_grad", tp)]
        assert names and all(".lora." in n for n in names), names
        assert len(names) == 2 * 4 * 4  # A and B of 4 linears on 4 layers
    model = MegatronCheckpoint(adapted["checkpoints"][1]).model
    assert rank0["trainable"] == LoRAConfig(rank=RANK, alpha=ALPHA).num_parameters(model)  # summed over TP=1 ranks
    for key, (ga, gb) in rank0[("grads", 1)].items():
        ga2, gb2 = rank0[("grads", 2)][key]
        for got, want in ((ga2, ga), (gb2, gb)):  # fp32 sums in another order: relative to the largest entry
            assert want.abs().max() > 0 and (got - want).abs().max() <= 1e-5 * want.abs().max(), key


def test_peft_and_merged_exports_load_in_transformers(adapted, tiny, tmp_path, capsys):
    """The TP=2 adapters as a PEFT directory: PeftModel on the HF base gives Megatron's logits; so does the merged
    checkpoint exported to HF. The CLI refuses --adapter-only on a merged checkpoint in one line."""
    import transformers
    from peft import PeftModel

    from megatron_dil.convert import megatron_to_hf
    from megatron_dil.convert.megatron_to_hf import main

    megatron = adapted["ranks"][0][(2, 1)]
    assert main(["--source", str(adapted["dir"] / "adapters"), "--output", str(tmp_path / "peft"),
                 "--adapter-only", "--base-model", str(tiny["root"] / "hf")]) == 0
    base = transformers.LlamaForCausalLM.from_pretrained(tiny["root"] / "hf", torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(TOKENS).logits, megatron, rtol=0, atol=1e-4)
    megatron_to_hf(adapted["dir"] / "merged", tmp_path / "hf_merged", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, megatron, rtol=0, atol=1e-4)
    capsys.readouterr()
    assert main(["--source", str(adapted["dir"] / "merged"), "--output", str(tmp_path / "x"), "--adapter-only"]) == 1
    err = capsys.readouterr().err.strip()
    assert "not an adapters directory" in err and "\n" not in err and not (tmp_path / "x").exists()


def lora_run(tiny, name: str, tp: int = 1, pp: int = 1, **sections) -> dict:
    defaults = dict(model=None, init={"checkpoint": tiny["checkpoints"][tp]}, parallel={"tensor": tp, "pipeline": pp},
                    lora={"rank": RANK, "alpha": ALPHA}, train={"lr": 2e-2}, reference={"mode": "base"},
                    logging={"eval_pairs": 16})
    return run_dict(tiny, tiny["root"] / name, **{**defaults, **sections})


def test_lora_dil_layouts_reference_modes_and_resume(tiny):
    """LoRA DIL-LSIF with the base as reference: step 0 is the initial policy (LSIF = -1/2, f = 0); the trajectory
    is the same at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2) and with a co-resident or precomputed
    reference;
    checkpoints hold the adapters only and a resumed run continues the same trajectory; final/ is merged (a normal
    checkpoint: adapted weights moved, the rest untouched) or the adapters."""
    from safetensors.torch import load_file

    from megatron_dil.convert import MegatronCheckpoint

    trajectories = {}
    for tp, pp, dp in ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)):
        out = train_ranks(lora_run(tiny, f"lora_{tp}{pp}{dp}", tp, pp), tp * pp * dp)
        assert out["history"][0]["loss"] == pytest.approx(-0.5, abs=1e-6)
        assert out["history"][0]["dil/f_chosen"] == pytest.approx(0.0, abs=1e-6)
        trajectories[(tp, pp, dp)] = [h["loss"] for h in out["history"]]
    reference = trajectories[(1, 1, 1)]
    assert max(reference) - min(reference) > 1e-3, reference
    for layout, losses in trajectories.items():
        np.testing.assert_allclose(losses, reference, rtol=0, atol=2e-5, err_msg=str(layout))
    for mode in ("model", "precompute"):  # a co-resident base copy; log-probs cached before training
        other = train_ranks(lora_run(tiny, f"lora_{mode}_ref", reference={"mode": mode, "recompute": True}), 1)
        np.testing.assert_allclose([h["loss"] for h in other["history"]], reference, rtol=0, atol=1e-6, err_msg=mode)

    final, init = MegatronCheckpoint(tiny["root"] / "lora_111" / "final"), MegatronCheckpoint(tiny["checkpoints"][1])
    assert set(final._file_of) == set(init._file_of)  # a plain checkpoint: the base's keys, no adapters
    qkv, embedding = "decoder.layers.0.self_attention.linear_qkv.weight", "embedding.word_embeddings.weight"
    assert not torch.equal(final.read(qkv, 0), init.read(qkv, 0))
    assert torch.equal(final.read(embedding, 0), init.read(embedding, 0))

    split = tiny["root"] / "lora_resume"
    first = train_ranks(lora_run(tiny, "lora_resume", train={"lr": 2e-2, "exit_interval": 2}), 1)
    saved = torch.load(split / "checkpoints" / "iter_0000002" / "model_tp00_pp000.pt", weights_only=False)
    assert saved["model"][0] and all(".lora." in key for key in saved["model"][0])
    second = train_ranks(lora_run(tiny, "lora_resume", lora={"rank": RANK, "alpha": ALPHA, "final": "adapters"}), 1)
    resumed = [h["loss"] for h in first["history"]] + [h["loss"] for h in second["history"]]
    np.testing.assert_allclose(resumed, reference, rtol=0, atol=1e-6)
    adapters = load_file(str(split / "final" / "adapter_tp00_pp000.safetensors"))
    assert len(adapters) == 2 * 4 * 4 and all(".lora." in key for key in adapters)


def test_bad_lora_settings_fail_with_a_clear_message(tiny):
    from pathlib import Path

    from megatron_dil.config import ConfigError, from_dict, load_config
    from megatron_dil.lora import load_trainable_state_dict
    from megatron_dil.training.config import RunConfig

    recipe = load_config(RunConfig, Path(__file__).parent.parent / "examples" / "llama3-8b" / "dil_lsif_lora.yaml")
    assert recipe.lora.rank == 16 and recipe.lora.scaling == 2.0 and recipe.reference.mode == "base"

    cases = [({"reference": {"mode": "base"}}, "reference.mode=base needs a `lora:` section"),
             ({"lora": {"targets": ["q_proj"]}}, "lora.targets must be a non-empty subset"),
             ({"lora": {"rank": 0}}, "lora.rank"),
             ({"lora": {"final": "adapters"}, "checkpoint": {"export_hf": "hf"}}, "set lora.final=merged")]
    for sections, message in cases:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
            from_dict(RunConfig, run_dict(tiny, tiny["root"] / "bad", **sections))
    model = torch.nn.Linear(2, 2)
    model.weight.requires_grad_(False)  # a frozen base with one trainable tensor
    with pytest.raises(ValueError, match=r"lora settings changed\?\): missing \['bias'\], unexpected \['other'\]"):
        load_trainable_state_dict(model, {"other": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"other shape \['bias'\]"):  # another rank
        load_trainable_state_dict(model, {"bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"missing \['weight'\]"):  # a LoRA checkpoint into full training
        load_trainable_state_dict(model.requires_grad_(True), {"bias": torch.zeros(2)})
    load_trainable_state_dict(model.requires_grad_(True), {"weight": torch.ones(2, 2), "bias": torch.ones(2)})
    assert torch.equal(model.weight, torch.ones(2, 2))
