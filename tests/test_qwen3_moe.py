"""Qwen3 (QK-norm) and mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers, on real gloo ranks.

One module fixture builds the tiny random HF models and converts them once; one 2-rank launch runs every layout:
logits at TP=1/TP=2 (Qwen3) and EP=1/EP=2 with both token dispatchers (MoE), and one optimizer step per layout whose
trained weights are exported and compared tensor by tensor with the Adam step of transformers' float64 gradient
(catching the QK-norm weights' TP-partial gradients, which Megatron sums only when told the model has QK-norm, and
expert gradients counted twice)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_HF
from tests.distributed import run_ranks
from tests.test_convert_models import COMMON, TOKENS, random_model, save_tokenizer
from tests.test_trainer import _step0_and_train, run_dict

LR, ADAM_EPS = 1e-2, 1e-4


def hf_configs() -> dict:
    from transformers import MixtralConfig, Qwen3Config, Qwen3MoeConfig

    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.0)  # the step tests compare with a plain HF gradient
    return {
        "qwen3": Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=24, tie_word_embeddings=False),
        "qwen3_moe": Qwen3MoeConfig(**COMMON, num_hidden_layers=2, head_dim=16, num_experts=4, moe_intermediate_size=32,
                                    norm_topk_prob=True, **moe),
        "mixtral": MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=4, **moe),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """name -> {"hf": dir, "logits": fp32 reference, "ckpt": {tp: converted checkpoint}}; plus a fused-expert copy
    of the Qwen3-MoE model (transformers 5's in-memory layout) as "qwen3_moe_fused"."""
    from megatron_dil.convert import hf_to_megatron

    root = tmp_path_factory.mktemp("qwen3_moe")
    out = {}
    for seed, (name, config) in enumerate(hf_configs().items()):
        model = random_model(config, seed + 10)
        directory = root / name
        model.save_pretrained(directory)
        save_tokenizer(directory, config.vocab_size)
        with torch.no_grad():
            out[name] = {"hf": directory, "logits": model(TOKENS).logits.float()}
        if name == "qwen3_moe":
            fused = root / "qwen3_moe_fused"
            fused.mkdir()
            config.save_pretrained(fused)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
            out["qwen3_moe_fused"] = {"hf": fused, "logits": out[name]["logits"]}
    for name, entry in out.items():
        tps = (1, 2) if name == "qwen3" else (1,)
        entry["ckpt"] = {tp: str(root / f"{name}_tp{tp}") for tp in tps}
        for tp in tps:
            hf_to_megatron(entry["hf"], entry["ckpt"][tp], tensor_parallel=tp, pipeline_parallel=1, progress=False)
    return out


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.roll(TOKENS, -1, dims=1)
    mask = torch.ones(TOKENS.shape, dtype=torch.float32)
    mask[0, :3] = 0
    mask[:, -1] = 0
    return TOKENS, labels, mask


def _run_cases(rank: int, world_size: int, cases: list[tuple]) -> dict:
    """Each case (kind, key, checkpoint, parallel kwargs, output dir): "logits" returns the full-vocabulary logits
    (on the rank that has them); "step" runs one AdamW step of a token cross-entropy on ``_batch()`` (rows split over
    DP) with Megatron DDP + the distributed optimizer and saves the trained weights to the output dir."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_dil.convert import MegatronCheckpoint, load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_dil.models.builder import build_model
    from megatron_dil.models.forward import forward_logits
    from megatron_dil.runtime import ParallelConfig, initialize
    from megatron_dil.training.builders import build_policy
    from megatron_dil.training.config import InitConfig, RunConfig, TrainConfig

    results = {"backward_factory": _factory_call_in_custom_backward()}
    seq = TOKENS.shape[1]
    positions = torch.arange(seq).expand_as(TOKENS)
    for kind, key, checkpoint, parallel_kwargs, output in cases:
        model_cfg = MegatronCheckpoint(checkpoint).model
        parallel = ParallelConfig(**parallel_kwargs)
        dp = initialize(parallel, model_cfg, seed=5)
        if kind == "logits":
            chunks = build_model(model_cfg, max_sequence_length=seq, moe_dispatcher=parallel.expert_dispatcher)
            load_megatron_checkpoint(chunks, checkpoint)
            logits = forward_logits(chunks, TOKENS, positions)
            if logits is not None:
                shards = [torch.empty_like(logits) for _ in range(parallel.tensor)]
                torch.distributed.all_gather(shards, logits.contiguous(),
                                             group=parallel_state.get_tensor_model_parallel_group())
                results[key] = torch.cat(shards, dim=-1)[..., : model_cfg.vocab_size]
        else:
            run = RunConfig(init=InitConfig(checkpoint=checkpoint), parallel=parallel, train=TrainConfig(
                precision="fp32", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=1e6, warmup_fraction=0.0,
                distributed_optimizer=True, overlap_grad_reduce=False, micro_batch_size=2 // dp,
                global_batch_size=2, seed=5))
            wrapped, optimizer = build_policy(model_cfg, run, max_sequence_length=seq)
            tokens, labels, mask = _batch()
            dp_rank = parallel_state.get_data_parallel_rank()
            rows = slice(dp_rank * 2 // dp, (dp_rank + 1) * 2 // dp)

            def forward_step(data_iterator, model):
                def loss_func(logits):
                    ce = torch.nn.functional.cross_entropy(
                        _gather_vocab(logits)[..., : model_cfg.vocab_size].flatten(0, 1).float(),
                        labels[rows].flatten(), reduction="none")
                    return (ce * mask[rows].flatten()).sum(), mask[rows].sum().to(torch.int), {}
                return model(tokens[rows], positions[rows], None), loss_func

            optimizer.zero_grad()
            for chunk in wrapped:
                chunk.train()
                chunk.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=wrapped[0],
                                        num_microbatches=1, seq_length=seq, micro_batch_size=2 // dp,
                                        forward_only=False)
            ok, grad_norm, _ = optimizer.step()
            assert ok
            save_megatron_checkpoint([w.module for w in wrapped], output, model_cfg,
                                     hf_config=MegatronCheckpoint(checkpoint).hf_config)
            results[("grad_norm", *key)] = float(grad_norm)
        parallel_state.destroy_model_parallel()
    return results


def _factory_call_in_custom_backward() -> torch.Tensor:
    """A custom autograd backward that allocates with ``device=<int>`` as Megatron's do: the autograd engine runs it
    with an empty TorchFunctionMode stack, so only the CPU bridge's backward hook maps the device to CPU."""
    from megatron_dil.runtime import cpu_compat

    cpu_compat.install()

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full(grad.shape, 2.0, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    Scale.apply(x).sum().backward()
    return x.grad


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from the TP shards, differentiable (Megatron's gather along the last dimension)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def _hf_adam_step(hf_dir: Path, output: Path) -> tuple[dict[str, torch.Tensor], float]:
    """Independent reference for one step: the float64 transformers gradient g of the full batch's mean token
    cross-entropy, and AdamW's first step w − lr · g / (|g| + eps) (m̂ = g, √v̂ = |g|), saved by transformers
    itself (so fused in-memory experts come back in the per-expert file layout); also returns ‖g‖."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                 experts_implementation="eager").double()
    tokens, labels, mask = _batch()
    logits = model(tokens).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    (ce * mask.flatten().double()).sum().div(mask.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    with torch.no_grad():
        for param, grad in zip(model.parameters(), grads):
            param -= LR * grad / (grad.abs() + ADAM_EPS)
    model.save_pretrained(output)
    return _hf_tensors(output), torch.cat([g.flatten() for g in grads]).norm().item()


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_qwen3_and_moe_match_transformers_and_train_alike_across_layouts(models, tmp_path):
    from megatron_dil.convert import megatron_to_hf

    logit_cases = [("qwen3", 1, {}), ("qwen3", 2, {"tensor": 2})]
    for name in ("qwen3_moe", "mixtral", "qwen3_moe_fused"):
        logit_cases += [(name, 1, {}), (name, 1, {"expert": 2})]
    logit_cases += [("mixtral", 1, {"expert": 2, "expert_dispatcher": "allgather"})]
    step_cases = [("qwen3", 1, {}), ("qwen3", 2, {"tensor": 2}), ("qwen3_moe", 1, {}),
                  ("qwen3_moe", 1, {"expert": 2}), ("mixtral", 1, {}), ("mixtral", 1, {"expert": 2})]
    cases = [("logits", (name, json.dumps(p, sort_keys=True)), models[name]["ckpt"][tp], p, "")
             for name, tp, p in logit_cases]
    cases += [("step", (name, json.dumps(p, sort_keys=True)), models[name]["ckpt"][tp], p,
               str(tmp_path / f"step_{name}_{'_'.join(f'{k}{v}' for k, v in p.items()) or 'base'}"))
              for name, tp, p in step_cases]
    results = {}
    for per_rank in run_ranks(_run_cases, 2, cases):
        results.update(per_rank)
    assert torch.equal(results["backward_factory"], torch.full((3,), 2.0))
    for name, _, p in logit_cases:
        err = (results[(name, json.dumps(p, sort_keys=True))] - models[name]["logits"]).abs().max().item()
        assert err <= 1e-4, f"{name} at {p}: max |Δlogit| vs transformers = {err:.3g}"

    trained = {}
    for kind, key, _, _, output in cases:
        if kind == "step":
            megatron_to_hf(output, tmp_path / (Path(output).name + "_hf"), progress=False)
            trained[key] = _hf_tensors(tmp_path / (Path(output).name + "_hf"))
    for name, other_layout in (("qwen3", {"tensor": 2}), ("qwen3_moe", {"expert": 2}), ("mixtral", {"expert": 2})):
        initial = _hf_tensors(models[name]["hf"])
        expected, grad_norm = _hf_adam_step(models[name]["hf"], tmp_path / f"{name}_adam_reference")
        for layout in ({}, other_layout):
            reported = results[("grad_norm", name, json.dumps(layout, sort_keys=True))]
            assert reported == pytest.approx(grad_norm, rel=1e-5), (name, layout)
            got = trained[(name, json.dumps(layout, sort_keys=True))]
            assert got.keys() == expected.keys() == initial.keys(), name
            for key, value in expected.items():
                assert (value - initial[key]).abs().max() > 0.5 * LR, f"{name}: {key} did not train"
                err = (got[key].double() - value).abs().max().item()
                assert err <= 1e-5, f"{name} at {layout}: {key} after one step differs from the transformers " \
                                    f"Adam step by {err:.3g}"
    assert any(k.endswith("self_attn.q_norm.weight") for k in trained[("qwen3", "{}")])


# --------------------------------------------------------------------------------------------------------------------
# The DIL trainer on a Qwen3-MoE model at EP=1 and EP=2

def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights, after checking the manifest's records (gathered from the writing ranks) against every file."""
    from megatron_dil.io import verify_files
    files = json.loads((run_dir / "final" / "megatron_dil_checkpoint.json").read_text())["files"]
    assert {f"shards/{f.name}" for f in (run_dir / "final" / "shards").iterdir()} <= files.keys()
    verify_files(run_dir / "final", files, "final checkpoint", "a record is wrong")
    tensors = {}
    for file in sorted((run_dir / "final" / "shards").glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_dil_on_moe_has_step0_identities_and_the_same_trajectory_and_weights_at_ep1_and_ep2(tiny):
    """Same weights, same global batch: EP=1 × DP=2 and EP=2 × DP=2 give the same DIL-LSIF losses and the same final
    weights (experts under their global index); at step 0 f = 0 exactly although the router aux loss is non-zero
    (it trains the router through Megatron's autoscaler, never through the preference loss or the log-probs)."""
    from transformers import Qwen3MoeConfig

    from megatron_dil.convert import hf_to_megatron

    config = Qwen3MoeConfig(**{**TINY_HF, "num_hidden_layers": 2}, head_dim=16, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=48, norm_topk_prob=True, router_aux_loss_coef=0.01,
                            bos_token_id=1, eos_token_id=2)
    hf_dir, ckpt = tiny["root"] / "qwen3_moe_hf", tiny["root"] / "qwen3_moe_ckpt"
    random_model(config, 3).save_pretrained(hf_dir)
    hf_to_megatron(hf_dir, ckpt, tensor_parallel=1, pipeline_parallel=1, progress=False)
    outs, finals = {}, {}
    for ep in (1, 2):
        run_dir = tiny["root"] / f"moe_ep{ep}"
        run = run_dict(tiny, run_dir, model=None, init={"checkpoint": str(ckpt)}, parallel={"expert": ep},
                       train={"train_iters": 2})
        outs[ep] = run_ranks(_step0_and_train, 2, run)[-1]
        finals[ep] = _final_tensors(run_dir)
    for ep, out in outs.items():
        assert out["step0"]["dil_lsif"]["loss"] == pytest.approx(-0.5, abs=1e-6), ep
        assert out["step0"]["dpo"]["loss"] == pytest.approx(0.6931472, abs=1e-6), ep
        first = out["history"][0]
        assert first["loss"] == pytest.approx(-0.5, abs=1e-6) and first["dil/f_chosen"] == pytest.approx(0, abs=1e-6)
        assert first["moe/load_balancing_loss"] > 0.5 and first["moe/load_imbalance"] >= 1.0, first
        assert {"moe/load_balancing_loss_layer_1", "moe/load_imbalance_layer_1"} <= first.keys()
    for a, b in zip(outs[1]["history"], outs[2]["history"], strict=True):
        for key in ("loss", "rewards/accuracies", "grad_norm", "moe/load_balancing_loss", "moe/load_imbalance"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert finals[1].keys() == finals[2].keys()
    assert any(".local_experts.3." in k for k in finals[2])
    for key, value in finals[1].items():
        err = (finals[2][key] - value).abs().max().item()
        assert err <= 1e-5, f"{key}: EP=2 final weights differ from EP=1 by {err:.3g}"


def test_hf_megatron_hf_is_bit_exact_and_fused_experts_read(models, tmp_path):
    """Import ∘ export = identity (tensors, config.json) for Qwen3 at TP=2 and both MoE families; the fused expert
    layout converts to the same checkpoint as the per-expert one; the export loads in ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    from megatron_dil.convert import megatron_to_hf

    for name in ("qwen3", "qwen3_moe", "mixtral"):
        tp = max(models[name]["ckpt"])
        exported = tmp_path / f"{name}_hf"
        megatron_to_hf(models[name]["ckpt"][tp], exported, progress=False)
        original, roundtrip = _hf_tensors(models[name]["hf"]), _hf_tensors(exported)
        assert original.keys() == roundtrip.keys(), name
        for key, tensor in original.items():
            assert torch.equal(roundtrip[key], tensor), f"{name}: {key}"
        assert json.loads((exported / "config.json").read_text()) == \
            json.loads((models[name]["hf"] / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(model(TOKENS).logits, models[name]["logits"]), name
    per_expert, fused = (Path(models[n]["ckpt"][1]) / "shards" for n in ("qwen3_moe", "qwen3_moe_fused"))
    files = sorted(p.name for p in per_expert.iterdir())
    assert files == sorted(p.name for p in fused.iterdir()) and "tp00_experts_l0001_e0000.safetensors" in files
    for file in files:
        a, b = load_file(per_expert / file), load_file(fused / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_generated_hf_config_round_trips_for_moe(models):
    """A config.json written from model_config.yaml alone (no stored HF config) describes the same model."""
    from megatron_dil.convert import MegatronCheckpoint
    from megatron_dil.convert.hf_config import hf_config_from_model, model_config_from_hf, same_architecture

    for name in ("qwen3", "qwen3_moe", "mixtral"):
        model = MegatronCheckpoint(models[name]["ckpt"][1]).model
        assert same_architecture(model_config_from_hf(hf_config_from_model(model, "float32")), model), name


@pytest.mark.parametrize("parallel, world, model_changes, fragments", [
    (dict(expert=3), 6, dict(num_moe_experts=4), ["num_moe_experts (4)", "expert parallel size 3"]),
    (dict(expert=4), 6, dict(num_moe_experts=8), ["world size 6", "expert(4)", "= 4"]),
    (dict(tensor=2), 2, dict(num_moe_experts=4), ["tensor=2", "sequence_parallel", "GPU option"]),
    (dict(expert=2), 2, {}, ["parallel.expert=2", "num_moe_experts is not set"]),
    (dict(expert_tensor=2), 2, dict(num_moe_experts=4), ["parallel.expert_tensor=2", "parallel.expert"]),
])
def test_bad_expert_layouts_are_refused_in_one_line(parallel, world, model_changes, fragments):
    import dataclasses

    from megatron_dil.models.config import ModelConfig
    from megatron_dil.runtime import LayoutError, ParallelConfig, validate_layout

    model = dataclasses.replace(ModelConfig.from_preset("tiny"), **model_changes)
    with pytest.raises(LayoutError) as err:
        validate_layout(ParallelConfig(**parallel), world, model)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_moe_hf_configs_refused_and_presets_sized():
    from megatron_dil.convert.hf_config import ConversionError, model_config_from_hf
    from megatron_dil.models.config import ModelConfig

    qwen3_moe = hf_configs()["qwen3_moe"].to_dict()
    for field, value in (("decoder_sparse_step", 2), ("mlp_only_layers", [0])):
        with pytest.raises(ConversionError, match=f"{field}="):
            model_config_from_hf({**qwen3_moe, field: value})
    with pytest.raises(ConversionError, match="router_jitter_noise"):
        model_config_from_hf({**hf_configs()["mixtral"].to_dict(), "router_jitter_noise": 0.1})
    # published sizes: Qwen3-30B-A3B 30.5B total / 3.3B active, Mixtral-8x7B 46.7B / 12.9B, Qwen3-8B 8.2B
    sizes = {"qwen3-30b-a3b": (30.5e9, 3.3e9), "mixtral-8x7b": (46.7e9, 12.9e9), "qwen3-8b": (8.2e9, 8.2e9)}
    for preset, (total, active) in sizes.items():
        model = ModelConfig.from_preset(preset)
        assert model.num_parameters() == pytest.approx(total, rel=0.01), preset
        assert model.active_parameters() == pytest.approx(active, rel=0.02), preset


def test_recipes_load():
    from megatron_dil.config import load_config
    from megatron_dil.training.config import RunConfig

    repo = Path(__file__).resolve().parents[1]
    qwen3 = load_config(RunConfig, repo / "examples/qwen3-8b/dil_lsif.yaml")
    moe = load_config(RunConfig, repo / "examples/qwen3-30b-a3b/dil_lsif.yaml")
    assert qwen3.parallel.tensor == 4 and moe.parallel.expert == 8 and moe.train.global_batch_size == 128


def test_expert_times_pipeline_parallel_matches_transformers_and_trains_alike(models, tmp_path):
    """EP=2 × PP=2 × DP=2 on 4 ranks: Qwen3-MoE logits equal transformers'; one step leaves the same weights as
    EP=1 × PP=2 × DP=2 (same global batch)."""
    from megatron_dil.convert import megatron_to_hf

    ckpt = models["qwen3_moe"]["ckpt"][1]
    layouts = {"ep1": {"pipeline": 2}, "ep2": {"pipeline": 2, "expert": 2}}
    cases = [("logits", ("logits", "ep2"), ckpt, layouts["ep2"], "")]
    cases += [("step", (name,), ckpt, parallel, str(tmp_path / name)) for name, parallel in layouts.items()]
    results = {}
    for per_rank in run_ranks(_run_cases, 4, cases):
        results.update(per_rank)
    err = (results[("logits", "ep2")] - models["qwen3_moe"]["logits"]).abs().max().item()
    assert err <= 1e-4, f"EP=2 x PP=2: max |Δlogit| vs transformers = {err:.3g}"
    assert results[("grad_norm", "ep2")] == pytest.approx(results[("grad_norm", "ep1")], rel=1e-5)
    trained = {}
    for name in layouts:
        megatron_to_hf(tmp_path / name, tmp_path / f"{name}_hf", progress=False)
        trained[name] = _hf_tensors(tmp_path / f"{name}_hf")
    assert trained["ep1"].keys() == trained["ep2"].keys()
    for key, value in trained["ep1"].items():
        assert (trained["ep2"][key] - value).abs().max().item() <= 1e-5, key
