"""Foundation acceptance (issue 2), on CPU with real gloo ranks and fp32:

* the tiny preset's logits at TP=2, PP=2 (Megatron's pipeline schedule, forward-only) and TP=2×PP=2 equal its TP=1
  logits for the same weights (one HF model converted to each layout), and TP=1 equals transformers' own forward;
* one step through Megatron DDP + DistributedOptimizer at DP=2, on different data per rank, leaves identical weights
  on both ranks, and the step is the Adam step of the full-batch (DP=1) gradient: grads normalised by the global
  token count even when the ranks hold different counts;
* invalid layouts and config keys fail with one-line errors that name the problem;
* the CPU bridge is inert when CUDA is available and active (CUDA placements land on CPU) when it is not.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_convert_models import random_model

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tensor, pipeline)
SEQ = 12


def _tiny():
    from megatron_dil.models import ModelConfig

    return ModelConfig.from_preset("tiny")


def _tokens(batch: int, seed: int) -> torch.Tensor:
    vocab = _tiny().vocab_size
    return torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# 1. Logits agree across TP / PP layouts


def _save_tiny_hf_model(directory) -> torch.Tensor:
    """A transformers Llama with the tiny preset's architecture and random O(1) weights; returns its fp32 logits."""
    from transformers import LlamaConfig

    tiny = _tiny()
    config = LlamaConfig(
        vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size, intermediate_size=tiny.ffn_hidden_size,
        num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.query_groups, head_dim=tiny.head_dim, rms_norm_eps=tiny.norm_epsilon,
        max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=tiny.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": tiny.rotary_base})
    model = random_model(config, seed=0)
    with torch.no_grad():
        logits = model(_tokens(2, seed=1)).logits
    model.save_pretrained(directory)
    return logits


def _logits_at_layouts(rank: int, world_size: int, checkpoints: dict) -> dict:
    """For each (TP, PP): initialise, build the tiny preset, load its converted checkpoint, run ``forward_logits`` and
    gather the vocabulary shards. The rank that is TP rank 0 and DP rank 0 of the last pipeline stage reports
    {layout: [b, s, V] logits}; every rank reports its DP size per layout and what the CPU bridge does."""
    from megatron.core import parallel_state

    from megatron_dil.convert import load_megatron_checkpoint
    from megatron_dil.models.builder import build_model
    from megatron_dil.models.forward import forward_logits
    from megatron_dil.runtime import ParallelConfig, cpu_compat, initialize

    tiny = _tiny()
    tokens = _tokens(2, seed=1)
    position_ids = torch.arange(SEQ).expand_as(tokens)
    results: dict = {"data_parallel": {}}
    for tp, pp in LAYOUTS:
        data_parallel = initialize(ParallelConfig(tensor=tp, pipeline=pp), tiny, seed=100 + tp * 10 + pp)
        results["data_parallel"][(tp, pp)] = data_parallel
        chunks = build_model(tiny, max_sequence_length=SEQ)
        load_megatron_checkpoint(chunks, checkpoints[(tp, pp)])
        logits = forward_logits(chunks, tokens, position_ids)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        assert (logits is not None) == last_stage, f"rank {rank} at {(tp, pp)}: logits only on the last stage"
        if logits is not None:
            assert logits.shape == (2, SEQ, tiny.padded_vocab_size(tp) // tp), logits.shape
            shards = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(shards, logits.contiguous(),
                                         group=parallel_state.get_tensor_model_parallel_group())
            if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
                results[(tp, pp)] = torch.cat(shards, dim=-1)[..., : tiny.vocab_size]
        parallel_state.destroy_model_parallel()
    results["bridge"] = (cpu_compat.is_active(), torch.empty(2, device="cuda").device.type,
                         torch.ones(2).cuda().device.type, torch.ones(2).type())
    return results


def test_logits_equal_across_tensor_and_pipeline_layouts(tmp_path):
    from megatron_dil.convert import hf_to_megatron

    hf_dir = tmp_path / "hf"
    hf_logits = _save_tiny_hf_model(hf_dir)
    divisor = _tiny().make_vocab_size_divisible_by
    checkpoints = {}
    for tp, pp in LAYOUTS:
        checkpoints[(tp, pp)] = str(tmp_path / f"tp{tp}_pp{pp}")
        hf_to_megatron(hf_dir, checkpoints[(tp, pp)], tensor_parallel=tp, pipeline_parallel=pp,
                       make_vocab_size_divisible_by=divisor, progress=False)

    per_rank = run_ranks(_logits_at_layouts, 4, checkpoints)
    for rank, result in enumerate(per_rank):
        assert result["data_parallel"] == {(1, 1): 4, (2, 1): 2, (1, 2): 2, (2, 2): 1}, (rank, result)
        assert result["bridge"] == (True, "cpu", "cpu", "torch.cuda.FloatTensor"), (rank, result["bridge"])
    logits = {}
    for result in per_rank:
        for layout in LAYOUTS:
            if layout in result:
                assert layout not in logits, f"two ranks reported logits for {layout}"
                logits[layout] = result[layout]
    assert sorted(logits) == sorted(LAYOUTS)

    reference = logits[(1, 1)]
    assert reference.abs().max() > 1.0  # O(1) logits: the 1e-5 tolerance below is meaningful
    assert (reference - hf_logits).abs().max().item() <= 1e-4, "TP=1 logits differ from transformers"
    for layout in LAYOUTS[1:]:
        err = (logits[layout] - reference).abs().max().item()
        assert err <= 1e-5, f"(tp, pp)={layout}: max |logit - TP=1 logit| = {err:.3g}"


# --------------------------------------------------------------------------------------------------------------------
# 2. One DDP + DistributedOptimizer step at DP=2

LR, ADAM_EPS = 1e-2, 1e-4


def _full_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 sequences (2 per DP rank) with next-token labels and a loss mask holding unequal token counts per rank."""
    tokens = _tokens(4, seed=2)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(4, SEQ)
    mask[0, :7] = 0  # rank 0 counts 2·SEQ - 7 - 1 tokens, rank 1 counts 2·SEQ - 3
    mask[1, -1] = 0
    mask[3, :3] = 0
    return tokens, labels, mask


def _masked_token_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask_t · CE(logits_t, label_t) (a sum: the caller normalises)."""
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (ce * mask.flatten()).sum()


def _ddp_step(rank: int, world_size: int) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_dil.runtime import initialize, shutdown
    from megatron_dil.training.builders import build_policy
    from megatron_dil.data.config import DataConfig
    from megatron_dil.training.config import RunConfig, TrainConfig

    tiny = _tiny()
    run = RunConfig(model=tiny, data=DataConfig(tokenizer="examples/tiny/tokenizer"), train=TrainConfig(
        precision="fp32", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=1e6, warmup_fraction=0.0,
        distributed_optimizer=True, micro_batch_size=2, global_batch_size=4, seed=3))
    assert initialize(run.parallel, tiny, seed=run.train.seed) == 2
    wrapped, optimizer = build_policy(tiny, run, max_sequence_length=SEQ)
    module = wrapped[0].module
    params = [p for p in module.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params]).clone()

    tokens, labels, mask = _full_batch()
    position_ids = torch.arange(SEQ).expand_as(tokens)
    # DP=1 reference: gradient of the full batch's mean token loss, by plain autograd (no DDP buffers touched).
    full_loss = _masked_token_loss(module(tokens, position_ids, None), labels, mask) / mask.sum()
    reference_grad = torch.cat([g.flatten() for g in torch.autograd.grad(full_loss, params)])

    rows = slice(2 * rank, 2 * rank + 2)  # different data on each DP rank
    batch = (tokens[rows], position_ids[rows], labels[rows], mask[rows])

    def loss_func(labels, mask, logits):
        loss_sum = _masked_token_loss(logits, labels, mask)
        return loss_sum, mask.sum().to(torch.int), {"loss_sum": loss_sum.detach()}

    def forward_step(data_iterator, model):
        tok, pos, lab, msk = next(data_iterator)
        return model(tok, pos, None), lambda logits: loss_func(lab, msk, logits)

    optimizer.zero_grad()
    for chunk in wrapped:
        chunk.train()
        chunk.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=wrapped[0],
                                num_microbatches=1, seq_length=SEQ, micro_batch_size=2, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    after = torch.cat([p.detach().flatten() for p in params])

    gathered = [torch.empty_like(after) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, after)
    shutdown()
    return {"ok": update_successful, "grad_norm": float(grad_norm), "before": before, "after": after,
            "gathered": gathered, "reference_grad": reference_grad, "local_tokens": int(mask[rows].sum())}


def test_ddp_distributed_optimizer_step_is_identical_and_normalised():
    rank0, rank1 = run_ranks(_ddp_step, 2)
    assert rank0["local_tokens"] != rank1["local_tokens"]  # unequal counts: a mean of rank means would be wrong
    assert rank0["ok"] and rank1["ok"]
    assert torch.equal(rank0["before"], rank1["before"]), "ranks started from different weights"
    assert torch.equal(rank0["gathered"][1], rank1["after"])
    assert torch.equal(rank0["after"], rank1["after"]), "DP ranks hold different weights after the step"

    delta = rank0["after"] - rank0["before"]
    assert delta.abs().max() > 0.5 * LR, "the step did not change the weights"
    grad = rank0["reference_grad"].double()
    # the reported gradient norm is the full-batch (DP=1) gradient's norm
    assert rank0["grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-4)
    assert rank1["grad_norm"] == pytest.approx(rank0["grad_norm"], rel=1e-6)
    # first Adam step: m̂ = g, sqrt(v̂) = |g|, so Δw = -lr · g / (|g| + eps); with |g| ~ eps this sees the grad's scale
    expected = -LR * grad / (grad.abs() + ADAM_EPS)
    assert (grad.abs() > ADAM_EPS).float().mean() > 0.1 and (grad.abs() < ADAM_EPS).float().mean() > 0.1
    err = (delta.double() - expected).abs().max().item()
    assert err <= 2e-6, f"max |Δw - Adam step of the full-batch gradient| = {err:.3g}"


# --------------------------------------------------------------------------------------------------------------------
# 3. Invalid layouts and config keys: one line naming the problem


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("parallel, world, model_changes, fragments", [
    (dict(tensor=2, pipeline=2), 6, {}, ["world size 6", "tensor(2)", "pipeline(2)", "= 4"]),
    (dict(tensor=4), 4, dict(num_attention_heads=6, num_query_groups=2, kv_channels=16), ["num_attention_heads (6)", "size 4"]),
    (dict(tensor=4), 4, {}, ["num_query_groups (2)", "tensor parallel size 4"]),
    (dict(pipeline=2), 2, dict(num_layers=3), ["num_layers (3)", "pipeline(2)"]),
    (dict(pipeline=2, virtual_pipeline=2), 2, dict(num_layers=6),
     ["num_layers (6)", "pipeline(2)", "virtual_pipeline(2)", "= 4"]),
])
def test_invalid_layouts_fail_with_one_line(parallel, world, model_changes, fragments):
    from megatron_dil.runtime import LayoutError, ParallelConfig, validate_layout

    model = dataclasses.replace(_tiny(), **model_changes)
    with pytest.raises(LayoutError) as err:
        validate_layout(ParallelConfig(**parallel), world, model)
    _one_line(err, *fragments)


def test_valid_layout_returns_data_parallel_size():
    from megatron_dil.runtime import ParallelConfig, validate_layout

    assert validate_layout(ParallelConfig(tensor=2, pipeline=2), 8, _tiny()) == 2
    assert validate_layout(ParallelConfig(pipeline=2, virtual_pipeline=1), 2, _tiny()) == 1


@pytest.mark.parametrize("yaml_text, overrides, fragments", [
    ("model: {preset: tiny}\ntrain: {lrr: 1.0}\n", [], ["train.lrr", "unknown key", "lr"]),
    ("model: {preset: tiny}\n", ["train.lr=fast"], ["train.lr", "expected float", "'fast'"]),
    ("model: {preset: tiny}\n", ["parallel.tensor=2.5"], ["parallel.tensor", "expected int", "2.5"]),
    ("model: {preset: tiny}\n", ["train.lr"], ["override 'train.lr'", "key=value"]),
    ("model: {preset: tiny}\n", ["=3"], ["override '=3'", "key=value"]),
    ("model: {preset: huge}\n", [], ["model.preset", "unknown preset 'huge'", "tiny"]),
    ("model: {preset: tiny, num_layer: 3}\n", [], ["model.num_layer", "unknown key"]),
    ("model: {preset: tiny}\nbogus: {a: 1}\n", [], ["bogus", "unknown key"]),
    ("model: {preset: tiny}\ntrain: {lr_schedule: wavy}\n", [], ["train", "lr_schedule", "'wavy'"]),
    ("model: {preset: tiny}\nparallel: {tensor: 0}\n", [], ["parallel", "tensor must be >= 1"]),
    ("model: {preset: tiny}\ntrain: {lr: [1e-6\n", [], ["run.yaml is not valid YAML", "line 2"]),
    ("model: {preset: tiny}\n", ["train.lr.x=1"], ["train.lr", "expected float", "{'x': 1}"]),
])
def test_invalid_config_fails_with_one_line(tmp_path, yaml_text, overrides, fragments):
    from megatron_dil.config import ConfigError, load_config
    from megatron_dil.training.config import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path, overrides)
    _one_line(err, *fragments)


def test_config_overrides_and_presets_apply(tmp_path):
    from megatron_dil.config import load_config, save_config
    from megatron_dil.training.config import RunConfig

    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny, num_layers: 4}\ndata: {tokenizer: tok}\ntrain: {lr: 1e-6, min_lr: 2E-8}\n")
    assert load_config(RunConfig, path).train.lr == 1e-6  # YAML 1.1 would read 1e-6 (no dot) as a string
    run = load_config(RunConfig, path, ["train.lr=5e-7", "parallel.tensor=2", "data.train=[a, b]",
                                        "model.rotary_base=5e5"])
    assert run.train.lr == 5e-7 and run.train.min_lr == 2e-8 and run.parallel.tensor == 2
    assert run.data.train == ["a", "b"] and run.model.rotary_base == 5e5
    assert run.model == dataclasses.replace(_tiny(), num_layers=4, rotary_base=5e5)
    save_config(run, tmp_path / "resolved.yaml")  # the saved config reproduces the run by itself
    assert load_config(RunConfig, tmp_path / "resolved.yaml") == run


# --------------------------------------------------------------------------------------------------------------------
# 4. The CPU bridge is inert with CUDA


def test_cpu_bridge_is_a_no_op_when_cuda_is_available(monkeypatch):
    from megatron_dil.runtime import cpu_compat

    current_device, synchronize = torch.cuda.current_device, torch.cuda.synchronize
    mode_before = torch._C._is_torch_function_mode_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.install() is False
    assert torch.cuda.current_device is current_device and torch.cuda.synchronize is synchronize
    assert torch._C._is_torch_function_mode_enabled() == mode_before


# --------------------------------------------------------------------------------------------------------------------
# 5. Megatron's fused masked softmax only where its compiled kernels exist


@pytest.mark.parametrize("cuda, missing, fused", [
    (True, "all", False),  # CUDA without apex's kernels (a plain megatron-core wheel): the torch softmax
    (True, "scaled_masked_softmax_cuda", False),
    (True, None, True),
    (False, None, False),
])
def test_masked_softmax_fusion_needs_the_compiled_kernels(monkeypatch, cuda, missing, fused):
    """``FusedScaleMaskSoftmax`` imports ``scaled_*_softmax_cuda`` in its fp16/bf16 forward: asking for the fusion on
    a GPU without them fails there with ModuleNotFoundError, so the config asks for it only when they are found."""
    import importlib.machinery
    import importlib.util
    import inspect
    import re

    from megatron.core.fusions import fused_softmax

    kernels = set(re.findall(r"import (scaled_\w+_cuda)", inspect.getsource(fused_softmax)))  # what Megatron imports
    assert "scaled_masked_softmax_cuda" in kernels
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in kernels:
            return None if missing in ("all", name) else importlib.machinery.ModuleSpec(name, None)
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert _single_rank_config(monkeypatch, cuda).masked_softmax_fusion is fused


def _single_rank_config(monkeypatch, cuda: bool):
    """``transformer_config`` for the tiny preset in bf16 at TP = PP = CP = 1, as if CUDA were (not) present."""
    from megatron.core import parallel_state

    from megatron_dil.models.builder import transformer_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for getter, value in (("get_tensor_model_parallel_world_size", 1), ("get_pipeline_model_parallel_world_size", 1),
                          ("get_virtual_pipeline_model_parallel_world_size", None),
                          ("get_context_parallel_world_size", 1)):
        monkeypatch.setattr(parallel_state, getter, lambda value=value: value)
    return transformer_config(_tiny(), params_dtype=torch.bfloat16)


def test_local_spec_norm_accepts_the_gpu_config(monkeypatch):
    """On CUDA without Transformer Engine the local spec's RMSNorm is ``WrappedTorchNorm``, which refuses
    ``persist_layer_norm`` (an apex FusedLayerNorm option): the GPU config must not set it."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = _single_rank_config(monkeypatch, cuda=True)
    norm = WrappedTorchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
    x = torch.randn(3, config.hidden_size, dtype=torch.float64)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon)
    torch.testing.assert_close(norm.double()(x), expected)
