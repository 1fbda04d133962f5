"""GPU check: one command that proves (or disproves) the fast path on one GPU within a fixed time budget.

    bash bench/gpu_check.sh --output OUT_DIR          # on a GPU machine (installs what is missing first)
    bash bench/gpu_check.sh --dry-run --output DIR    # on CPU: every step that needs no CUDA, at tiny sizes

Rows (each PASS / FAIL / NOT RUN with the reason; one row's failure never stops the others):

1. Environment: python/torch/CUDA/NCCL/Transformer Engine/apex/megatron-core/transformers versions, GPU, the layer
   spec ``build_model`` picks, and the measured dense matmul peak (bf16 8192³ on GPU; fp32 on CPU in the dry run).
2. Parity: random Hugging Face Llama (Llama-3 RoPE scaling, GQA), Qwen2 (QKV bias, tied), Qwen3 (QK-norm) and
   Mistral (sliding window shorter than the sequence) converted with
   ``hf_to_megatron`` and built by ``build_model`` (TE spec when TE imports with CUDA) must reproduce transformers'
   logits: fp32 max |Δlogit| ≤ 1e-4 on CPU / 2e-3 on GPU (cuBLAS and fused-kernel summation order); bf16
   max |Δ| ≤ 2·(transformers' own bf16 error) + 1e-2, both against transformers in fp32. The built model's state dict
   must round-trip: ``save_megatron_checkpoint`` rewrites the converter's shards bit for bit and ``megatron_to_hf``
   gives back the original HF tensors bit for bit.
3. Training on the fast path: the real ``Trainer`` (``bench_training._run_trainer`` on ranks from ``run_ranks``) runs
   DIL-LSIF on synthetic pairs from random init: the ``llama3.2-1b`` preset at sequence 2048, bf16, distributed
   optimizer, for ``--steps`` steps (the first is warm-up); tokens/s, MFU (against row 1's peak and the Trainer's
   own), peak memory; then ``reference.mode: model`` (the reference cost ratio), ``recompute_activations`` and
   ``sequence_parallel`` (needs TP=2, i.e. two GPUs: otherwise reported as not measured).
4. Log-prob kernel at vocabulary 128256 over 8192 tokens (``bench_logprobs`` cases, fresh process each): time and
   extra peak memory of the vocab-parallel path (unchunked and chunked at the Trainer's default chunk) against a naive
   fp32 ``log_softmax``; FAIL if the chunked path needs as much memory as the naive one.
5. Generation: greedy decode through the project's engine (``generation.decode``, what ``megatron-dil-generate``
   runs per batch; timed by ``bench_generation.time_decoders``) of the ``llama3.2-1b`` preset from random init in bf16,
   at batch 1 and 16, prompt 128 + 128 new tokens (EOS off): generated tokens/s and time to first token (prefill +
   one token), medians of 3 after a warm-up, and peak memory; FAIL unless every row gets exactly its new tokens, all
   inside the vocabulary.

Every row runs in its own process group with a time budget (``ROW_CAPS``), inside a global budget (``--budget``):
a row that overruns is killed with its children and keeps the cases it finished. Rows run one at a time on the GPU
(timings stay clean), two at a time in the dry run. ``OUT_DIR/gpu_check.json`` is
rewritten after every row, so it exists whatever happens; ``OUT_DIR/rowN.log`` holds each row's output. Exit status:
1 when a row FAILed, else 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_dil.io.files import atomic_write_text  # noqa: E402  (stdlib only: the parent stays light)

PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT RUN"
TITLES = {1: "environment", 2: "parity vs transformers", 3: "training fast path", 4: "log-prob kernel",
          5: "generation"}
ORDER = (1, 2, 4, 5, 3)  # the long training row last: it takes whatever time the quick rows leave
DRY_RUN_ORDER = (3, 1, 2, 4, 5)  # two at a time: the long row on one core, the others on the other
ROW_CAPS = {1: 60, 2: 120, 3: 300, 4: 90, 5: 60}  # seconds per row, at most
ROW_FLOOR = 20  # seconds kept back for each row still to run
GRACE = 10  # seconds between a row's own deadline and its process being killed
RESERVE = 5  # seconds kept for writing the report


@dataclass
class Plan:
    """What each row runs: the issue's GPU sizes, or tiny CPU sizes for ``--dry-run``."""

    dry_run: bool
    scratch: str  # models, checkpoints, datasets (never in the output folder)
    steps: int  # training steps per case (first is warm-up)
    peak_dtype: str = "bfloat16"
    peak_size: int = 8192
    peak_repeats: int = 10
    parity_seq: int = 256
    mistral_window: int = 64
    train_model: dict = field(default_factory=lambda: {"preset": "llama3.2-1b"})
    train_seq: int = 2048
    micro_batch: int = 1
    global_batch: int = 4
    logprob_tokens: int = 8192
    logprob_chunk: int | None = None  # None: the Trainer's default (TrainConfig.logprob_chunk_size)
    logprob_repeats: int = 3
    gen_preset: str = "llama3.2-1b"
    gen_dtype: str = "bfloat16"
    gen_batches: tuple[int, ...] = (1, 16)
    gen_prompt: int = 128
    gen_new_tokens: int = 128
    gen_repeats: int = 3
    deadline: float = 0.0  # time.time() by which the row must be done

    @classmethod
    def for_mode(cls, dry_run: bool, scratch: str, steps: int | None) -> "Plan":
        if not dry_run:
            return cls(dry_run=False, scratch=scratch, steps=steps or 20)
        return cls(dry_run=True, scratch=scratch, steps=steps or 3, peak_dtype="float32", peak_size=1024,
                   peak_repeats=3, parity_seq=32, mistral_window=8, train_model={"preset": "tiny"}, train_seq=64,
                   micro_batch=2, global_batch=4, logprob_tokens=128, logprob_chunk=32, logprob_repeats=1,
                   gen_preset="tiny", gen_dtype="float32", gen_batches=(1, 4), gen_prompt=16, gen_new_tokens=16,
                   gen_repeats=1)


@dataclass
class Case:
    name: str
    status: str
    summary: str  # one line: the numbers, or why it failed / did not run
    metrics: dict[str, Any] = field(default_factory=dict)


Report = Callable[[Case], None]


# ------------------------------------------------------------------------------------------------ row helpers
def _seconds_left(plan: Plan) -> float:
    return plan.deadline - time.time()


def _error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().replace("\n", " | ")
    return text if len(text) <= 400 else text[:200] + " … " + text[-190:]


def _no_cuda_reason(plan: Plan) -> str:
    return "dry run (CPU only)" if plan.dry_run else "no CUDA device visible to torch"


def _version(module: str, distribution: str) -> str | None:
    """Installed version of ``distribution`` when ``module`` is importable (found), else None; never imports it."""
    import importlib.metadata
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


# ------------------------------------------------------------------------------------------- 1: environment
def row_environment(plan: Plan, report: Report) -> None:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "megatron-core": _version("megatron.core", "megatron-core"),
                "transformer-engine": _version("transformer_engine", "transformer_engine")
                or _version("transformer_engine", "transformer-engine"),
                "apex": _version("apex", "apex"), "transformers": _version("transformers", "transformers"),
                "flash-attn": _version("flash_attn", "flash-attn")}
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        versions["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        versions["cudnn"] = torch.backends.cudnn.version()
    report(Case("versions", PASS, ", ".join(f"{k} {v or '-'}" for k, v in versions.items()), versions))

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": props.total_memory / 2**30,
               "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
        report(Case("gpu", PASS, f"{gpu['count']} × {gpu['name']} ({gpu['memory_gib']:.0f} GiB, sm_{props.major}"
                                 f"{props.minor}, {gpu['multiprocessors']} SMs)", gpu))
    else:
        report(Case("gpu", NOT_RUN if plan.dry_run else FAIL, _no_cuda_reason(plan)))

    from megatron_dil.models.builder import transformer_engine_available

    spec = "transformer_engine" if transformer_engine_available() else "local"
    why = "" if spec == "transformer_engine" else \
        (" (Transformer Engine not importable)" if torch.cuda.is_available() else " (no CUDA)")
    report(Case("layer spec", PASS, f"build_model uses the {spec} spec{why}", {"spec": spec}))

    if not plan.dry_run and not torch.cuda.is_available():
        report(Case("matmul peak", NOT_RUN, f"{_no_cuda_reason(plan)}: the {plan.peak_dtype} peak is a GPU figure"))
        return
    from megatron_dil.training.monitor import measure_peak_flops

    dtype = getattr(torch, plan.peak_dtype)
    flops = measure_peak_flops(dtype, size=plan.peak_size, repeats=plan.peak_repeats)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unit, scale = ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)
    report(Case("matmul peak", PASS, f"{flops / scale:.1f} {unit} ({plan.peak_dtype} {plan.peak_size}³ on {device}, "
                                     f"best of {plan.peak_repeats})",
                {"peak_flops": flops, "dtype": plan.peak_dtype, "size": plan.peak_size, "device": device}))


# --------------------------------------------------------------------------------------------------- 2: parity
def _parity_models(plan: Plan) -> list[tuple[str, Any, str | None]]:
    """(name, transformers config, reason it cannot run here or None)."""
    from transformers import Qwen3Config

    from tests.test_convert_models import COMMON, hf_configs

    configs = hf_configs()
    mistral = configs["mistral"]
    mistral.sliding_window = plan.mistral_window
    models = [("llama", configs["llama"], None), ("qwen2", configs["qwen2"], None),
              ("qwen3", Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=16), None),
              (f"mistral (window {plan.mistral_window} < seq {plan.parity_seq})", mistral, None)]
    return models


def _load_safetensors_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _parity_case(plan: Plan, index: int, name: str, hf_config: Any) -> Case:
    """Convert a random HF model, build it with ``build_model`` in fp32 (and bf16 on GPU), compare logits with
    transformers in fp32; round-trip the fp32 model's state dict through the converter."""
    import copy

    import torch
    from megatron.core import parallel_state

    from megatron_dil.convert import (MegatronCheckpoint, hf_to_megatron, load_megatron_checkpoint, megatron_to_hf,
                                      save_megatron_checkpoint)
    from megatron_dil.models.builder import build_model, transformer_engine_available
    from megatron_dil.models.forward import forward_logits
    from megatron_dil.runtime import ParallelConfig, initialize
    from tests.test_convert_models import random_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(plan.scratch, f"parity{index}")
    hf = random_model(hf_config, seed=index)
    hf.save_pretrained(work / "hf")
    hf = hf.to(device)
    generator = torch.Generator().manual_seed(index)
    tokens = torch.randint(0, hf_config.vocab_size, (2, plan.parity_seq), generator=generator).to(device)
    with torch.no_grad():
        reference = hf(tokens).logits.float()
        hf_bf16_err = None
        if device.type == "cuda":
            hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
            hf_bf16_err = (hf_bf16(tokens).logits.float() - reference).abs().max().item()
            del hf_bf16
    hf_to_megatron(work / "hf", work / "converted", tensor_parallel=1, pipeline_parallel=1, progress=False)
    model_cfg = MegatronCheckpoint(work / "converted").model
    spec = "transformer_engine" if transformer_engine_available() else "local"
    metrics: dict[str, Any] = {"spec": spec, "scale_max_abs_logit": reference.abs().max().item()}
    failures: list[str] = []
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    position_ids = torch.arange(plan.parity_seq, device=device).expand_as(tokens)
    for dtype in dtypes:
        initialize(ParallelConfig(), model_cfg, seed=index)
        try:
            chunks = build_model(model_cfg, params_dtype=dtype, max_sequence_length=plan.parity_seq)
            load_megatron_checkpoint(chunks, work / "converted")
            logits = forward_logits(chunks, tokens, position_ids)[..., : model_cfg.vocab_size].float()
            err = (logits - reference).abs().max().item()
            if dtype == torch.float32:
                tol = 2e-3 if device.type == "cuda" else 1e-4
                metrics.update(fp32_max_abs_diff=err, fp32_tolerance=tol)
                if not err <= tol:
                    failures.append(f"fp32 max|Δlogit| {err:.3g} > {tol:g}")
                failures += _round_trip(chunks, model_cfg, work, save_megatron_checkpoint, megatron_to_hf)
            else:
                tol = 2 * hf_bf16_err + 1e-2
                metrics.update(bf16_max_abs_diff=err, bf16_tolerance=tol, hf_bf16_max_abs_diff=hf_bf16_err)
                if not err <= tol:
                    failures.append(f"bf16 max|Δlogit| {err:.3g} > {tol:.3g} (transformers' own bf16 error "
                                    f"{hf_bf16_err:.3g})")
            del chunks
        finally:
            parallel_state.destroy_model_parallel()
    metrics["round_trip"] = not any("round trip" in f for f in failures)
    summary = f"spec {spec}: fp32 max|Δlogit| {metrics['fp32_max_abs_diff']:.2g}"
    if "bf16_max_abs_diff" in metrics:
        summary += f", bf16 {metrics['bf16_max_abs_diff']:.2g} (tol {metrics['bf16_tolerance']:.2g})"
    else:
        summary += f", bf16 not run ({_no_cuda_reason(plan)})"
    summary += ", state dict round-trips" if metrics["round_trip"] else ""
    if failures:
        return Case(name, FAIL, "; ".join(failures) + f" [{summary}]", metrics)
    return Case(name, PASS, summary, metrics)


def _round_trip(chunks: list, model_cfg: Any, work: Path, save_megatron_checkpoint, megatron_to_hf) -> list[str]:
    """The built model saved by ``save_megatron_checkpoint`` equals the converter's shards; exported back to HF it
    equals the original HF tensors (bit for bit)."""
    import torch
    from safetensors.torch import load_file

    failures = []
    save_megatron_checkpoint(chunks, work / "resaved", model_cfg)
    for shard in sorted((work / "converted" / "shards").iterdir()):
        written, saved = load_file(shard), load_file(work / "resaved" / "shards" / shard.name)
        differ = sorted(k for k in written.keys() | saved.keys()
                        if k not in written or k not in saved or not torch.equal(written[k], saved[k]))
        if differ:
            failures.append(f"round trip: saved shard {shard.name} differs at {differ[:3]}")
    megatron_to_hf(work / "resaved", work / "hf_back", progress=False)
    original, exported = _load_safetensors_dir(work / "hf"), _load_safetensors_dir(work / "hf_back")
    differ = sorted(k for k in original.keys() | exported.keys()
                    if k not in original or k not in exported or not torch.equal(original[k], exported[k]))
    if differ:
        failures.append(f"round trip: exported HF tensors differ at {differ[:3]}")
    return failures


def row_parity(plan: Plan, report: Report) -> None:
    import torch

    from tests.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # one-rank group for Megatron's state
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for index, (name, hf_config, reason) in enumerate(_parity_models(plan)):
        if reason is not None:
            report(Case(name, NOT_RUN, reason))
            continue
        if _seconds_left(plan) < 10:
            report(Case(name, NOT_RUN, "row time budget exhausted"))
            continue
        try:
            report(_parity_case(plan, index, name, hf_config))
        except Exception as err:  # noqa: BLE001 - one model's failure is a FAIL row entry, the next model runs
            report(Case(name, FAIL, _error(err)))


# ------------------------------------------------------------------------------------------------- 3: training
def _synthetic_pairs(plan: Plan) -> dict:
    """Preprocessed synthetic pairs (the bundled tiny tokenizer, random words) whose sequences fill ``train_seq``:
    prompt ≈ half, each response ≈ the other half. Enough pairs for two optimizer steps (the sampler cycles)."""
    import random

    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import preprocess_pairs
    from megatron_dil.data.tiny_task import WORDS, tiny_example_dir

    rng = random.Random(0)
    prompt_words, response_words = plan.train_seq // 2 - 8, plan.train_seq // 2 - 8  # room for template tokens
    path = Path(plan.scratch, "synthetic_pairs.jsonl")
    with path.open("w") as out:
        for _ in range(2 * plan.global_batch):
            def text(n: int) -> str:
                return " ".join(rng.choice(WORDS) for _ in range(n))

            out.write(json.dumps({"prompt": [{"role": "user", "content": text(prompt_words)}],
                                  "chosen": [{"role": "assistant", "content": text(response_words)}],
                                  "rejected": [{"role": "assistant", "content": text(response_words)}]}) + "\n")
    tokenizer = os.path.join(tiny_example_dir(), "tokenizer")
    prefixes = preprocess_pairs(PreprocessConfig(
        inputs=[str(path)], output_prefix=str(Path(plan.scratch, "synthetic")), tokenizer=tokenizer,
        max_length=plan.train_seq, max_prompt_length=plan.train_seq // 2, progress=False, strict=True)).prefixes
    return {"train": prefixes["train"], "tokenizer": tokenizer}


def _training_cases(plan: Plan) -> list[tuple[str, dict, str | None, float]]:
    """(name, run-dict changes, reason it cannot run here or None, time cap in seconds)."""
    import torch

    from megatron_dil.models.builder import transformer_engine_available

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    no_gpu = None if gpus else f"GPU option, refused on CPU ({_no_cuda_reason(plan)})"
    te = transformer_engine_available()
    sp_reason = no_gpu or (None if gpus >= 2 and te else
                           "not measured: sequence_parallel needs tensor parallelism (Megatron refuses it at TP=1) "
                           f"and Transformer Engine; TP=2 needs 2 GPUs ({gpus} visible, TE "
                           f"{'present' if te else 'absent'})")
    return [
        ("reference precompute", {}, None, 150),
        ("reference model", {"reference": {"mode": "model"}}, None, 120),
        ("recompute_activations", {"train": {"recompute_activations": True}}, no_gpu, 120),
        ("sequence_parallel TP=2", {"parallel": {"tensor": 2, "sequence_parallel": True}}, sp_reason, 120),
    ]


def _training_summary(result: dict) -> tuple[str, dict]:
    line = (f"{result['tokens_per_second']:.0f} tok/s, {result['step_seconds']:.3f} s/step, "
            f"MFU {100 * result['mfu']:.1f}% (Trainer's peak {result['peak_flops'] / 1e12:.3g} TFLOP/s), "
            f"peak mem {result['memory_gib']:.2f} GiB, loss {result['loss']:.4g}")
    return line, dict(result)


def relate_mfu_to_row1_peak(rows: list[dict]) -> None:
    """Row 3's MFU against row 1's peak (the Trainer measures its own at 1024³, far below a GPU's peak):
    MFU · Trainer's peak / row 1's peak, added to each training case."""
    peak = next((case["metrics"].get("peak_flops") for row in rows if row["row"] == 1 for case in row["cases"]
                 if case["name"] == "matmul peak"), None)
    for case in (case for row in rows if row["row"] == 3 for case in row["cases"]):
        if peak and "mfu" in case["metrics"]:
            case["metrics"]["mfu_vs_row1_peak"] = case["metrics"]["mfu"] * case["metrics"]["peak_flops"] / peak
            case["summary"] += f"; MFU {100 * case['metrics']['mfu_vs_row1_peak']:.1f}% of row 1's peak"


def row_training(plan: Plan, report: Report) -> None:
    import math

    from bench_training import _run_trainer, run_dict
    from tests.distributed import run_ranks

    data = _synthetic_pairs(plan)
    steps_seconds: dict[str, float] = {}
    for name, changes, reason, cap in _training_cases(plan):
        if reason is not None:
            report(Case(name, NOT_RUN, reason))
            continue
        budget = min(cap, _seconds_left(plan) - 5)
        if budget < 20:
            report(Case(name, NOT_RUN, f"row time budget exhausted ({max(budget, 0):.0f} s left)"))
            continue
        run = run_dict(data, str(Path(plan.scratch, name.replace(" ", "_"))), plan.train_model,
                       micro=plan.micro_batch, global_batch=plan.global_batch)
        run["data"]["max_length"] = plan.train_seq
        for section, values in changes.items():
            run[section] = {**run.get(section, {}), **values}
        world = run["parallel"].get("tensor", 1)
        try:
            result = run_ranks(_run_trainer, world, run, plan.steps, timeout=budget)[-1]
        except Exception as err:  # noqa: BLE001 - reported as this case's FAIL; the next case runs
            report(Case(name, FAIL, _error(err)))
            continue
        line, metrics = _training_summary(result)
        metrics.update(steps=plan.steps, sequence_length=plan.train_seq, world_size=world,
                       global_batch_pairs=plan.global_batch, model=plan.train_model)
        steps_seconds[name] = result["step_seconds"]
        if name == "reference model" and "reference precompute" in steps_seconds:
            ratio = result["step_seconds"] / steps_seconds["reference precompute"]
            metrics["reference_cost_ratio"] = ratio
            line += f"; co-resident / precomputed step time {ratio:.2f}×"
        ok = math.isfinite(result["loss"]) and result["tokens_per_second"] > 0
        report(Case(name, PASS if ok else FAIL, line if ok else f"non-finite loss or no throughput: {line}", metrics))


# ------------------------------------------------------------------------------------------ 4: log-prob kernel
def row_logprobs(plan: Plan, report: Report) -> None:
    import torch
    from bench_logprobs import VOCAB, _run_case

    from megatron_dil.training.config import TrainConfig

    chunk = plan.logprob_chunk or TrainConfig().logprob_chunk_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(batch=1, seq=plan.logprob_tokens, repeats=plan.logprob_repeats, device=device, tp=1)
    results = {}
    for label, case in (("naive log_softmax", dict(method="naive", chunk=None)),
                        ("vocab-parallel unchunked", dict(method="vocab_parallel", chunk=None)),
                        (f"vocab-parallel chunk {chunk}", dict(method="vocab_parallel", chunk=chunk))):
        if _seconds_left(plan) < 10:
            report(Case(label, NOT_RUN, "row time budget exhausted"))
            continue
        try:
            result = _run_case({**case, **shape})
        except Exception as err:  # noqa: BLE001
            report(Case(label, FAIL, _error(err)))
            continue
        results[case["method"], case["chunk"]] = result
        line = (f"V={VOCAB}, {plan.logprob_tokens} tokens, bf16 logits on {device}: fwd+bwd {result['seconds']:.4f} s, "
                f"extra peak {result['peak_extra_mib']:.0f} MiB")
        status, naive = PASS, results.get(("naive", None))
        if case["chunk"] is not None and naive is not None:
            ratio = result["peak_extra_mib"] / naive["peak_extra_mib"]
            result["memory_vs_naive"], result["time_vs_naive"] = ratio, result["seconds"] / naive["seconds"]
            line += f" = {ratio:.2f}× naive's memory, {result['time_vs_naive']:.2f}× its time"
            if ratio >= 1.0:
                status, line = FAIL, "chunked path needs no less memory than the naive one: " + line
        report(Case(label, status, line, result))


# ------------------------------------------------------------------------------------------------ 5: generation
def row_generation(plan: Plan, report: Report) -> None:
    """Greedy decode tokens/s and time to first token of a randomly initialised ``gen_preset`` model, per batch size."""
    import torch
    from bench_generation import equal_length_prompts, megatron_decoder, time_decoders

    from megatron_dil.models.builder import build_model, transformer_engine_available
    from megatron_dil.models.config import ModelConfig
    from megatron_dil.runtime import ParallelConfig, initialize
    from tests.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    model_cfg = ModelConfig.from_preset(plan.gen_preset)
    initialize(ParallelConfig(), model_cfg)
    model = build_model(model_cfg, params_dtype=getattr(torch, plan.gen_dtype),
                        max_sequence_length=plan.gen_prompt + plan.gen_new_tokens)[0]
    cuda = torch.cuda.is_available()
    shape = (f"{plan.gen_preset} ({model_cfg.num_parameters() / 1e6:,.1f}M params, random init), {plan.gen_dtype}, "
             f"{'transformer_engine' if transformer_engine_available() else 'local'} spec, "
             f"{'cuda' if cuda else 'cpu'}")
    for batch in plan.gen_batches:
        name = f"greedy decode batch {batch}"
        if _seconds_left(plan) < 10:
            report(Case(name, NOT_RUN, "row time budget exhausted"))
            continue
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            prompts = equal_length_prompts(batch, plan.gen_prompt, model_cfg.vocab_size, seed=batch)
            ours = megatron_decoder(model, prompts, model_cfg.vocab_size)
            completions = ours(plan.gen_new_tokens)  # the warm-up, checked
            bad = [i for i, c in enumerate(completions) if len(c.token_ids) != plan.gen_new_tokens
                   or not all(0 <= t < model_cfg.vocab_size for t in c.token_ids)]
            if bad:
                report(Case(name, FAIL, f"rows {bad[:4]} did not get {plan.gen_new_tokens} tokens inside the "
                                        f"vocabulary of {model_cfg.vocab_size}"))
                continue
            times = time_decoders({"ours": ours}, batch, plan.gen_new_tokens, plan.gen_repeats)["ours"]
        except Exception as err:  # noqa: BLE001 - this batch's FAIL; the next one runs
            report(Case(name, FAIL, _error(err)))
            continue
        metrics = dict(times, batch=batch, prompt_length=plan.gen_prompt, new_tokens=plan.gen_new_tokens,
                       repeats=plan.gen_repeats, model=plan.gen_preset, dtype=plan.gen_dtype)
        line = (f"{times['tokens_per_s']:.1f} tok/s, TTFT {times['ttft_s'] * 1e3:.1f} ms ({batch} × prompt "
                f"{plan.gen_prompt} + {plan.gen_new_tokens} new, median of {plan.gen_repeats}; {shape}")
        if cuda:
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            line += f", peak mem {metrics['peak_memory_gib']:.2f} GiB"
        report(Case(name, PASS, line + ")", metrics))


ROWS: dict[int, Callable[[Plan, Report], None]] = {1: row_environment, 2: row_parity, 3: row_training,
                                                   4: row_logprobs, 5: row_generation}


def worker(row: int, plan: Plan, partial: str) -> None:
    """Run one row in this process, rewriting ``partial`` (the cases so far) after each case."""
    cases: list[dict] = []

    def report(case: Case) -> None:
        cases.append(dataclasses.asdict(case))
        atomic_write_text(partial, json.dumps(cases))
        print(f"[row {row}] {case.name}: {case.status} — {case.summary}", flush=True)

    try:
        if not plan.dry_run and row in (2, 3, 4, 5):
            import torch

            if not torch.cuda.is_available():
                report(Case("all", NOT_RUN, "no CUDA device visible to torch (on CPU use --dry-run)"))
                return
        ROWS[row](plan, report)
    except Exception as err:  # noqa: BLE001 - set-up failure of the whole row: reported, never raised
        import traceback

        traceback.print_exc()
        report(Case("row set-up", FAIL, _error(err)))


# ------------------------------------------------------------------------------------------------- orchestrator
def row_status(cases: list[dict]) -> tuple[str, str]:
    """FAIL if any case failed, PASS if any passed (the others not run), NOT RUN otherwise; with the reason."""
    failed = [c for c in cases if c["status"] == FAIL]
    if failed:
        return FAIL, f"{failed[0]['name']}: {failed[0]['summary']}"
    skipped = [c for c in cases if c["status"] == NOT_RUN]
    if any(c["status"] == PASS for c in cases):
        return PASS, "" if not skipped else f"{len(skipped)} of {len(cases)} not run: " + "; ".join(
            f"{c['name']}: {c['summary']}" for c in skipped)
    return NOT_RUN, "; ".join(f"{c['name']}: {c['summary']}" for c in skipped) or "nothing ran"


class RowProcess:
    """One row's ``command`` in its own process group, killed with all its children once ``timeout`` + ``GRACE``
    seconds have passed; the cases it wrote to ``partial`` before that are kept."""

    def __init__(self, row: int, command: list[str], partial: Path, timeout: float, log_path: Path):
        self.row, self.partial, self.timeout, self.log_path = row, partial, timeout, log_path
        self.started = time.monotonic()
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)

    @classmethod
    def start(cls, row: int, plan: Plan, timeout: float, log_path: Path) -> "RowProcess":
        """This script's ``--worker`` for ``row``, told to be done within ``timeout`` seconds."""
        partial = Path(plan.scratch, f"row{row}.json")
        plan = dataclasses.replace(plan, deadline=time.time() + timeout)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(row), "--plan",
                   json.dumps(dataclasses.asdict(plan)), "--partial", str(partial)]
        return cls(row, command, partial, timeout, log_path)

    def done(self) -> bool:
        return self.proc.poll() is not None or time.monotonic() - self.started > self.timeout + GRACE

    def result(self) -> dict:
        code = self.proc.poll()
        if code is None:
            note = Case("row time budget", NOT_RUN, f"killed after {self.timeout + GRACE:.0f} s; cases not listed "
                                                    "did not finish")
        elif code != 0:
            note = Case("row process", FAIL, f"exited with status {code} (see {self.log_path.name})")
        else:
            note = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the row's leftover children (spawned ranks) too
        except ProcessLookupError:
            pass
        self.proc.wait()
        cases = json.loads(self.partial.read_text()) if self.partial.exists() else []
        if note is not None:
            cases.append(dataclasses.asdict(note))
        status, reason = row_status(cases)
        return {"row": self.row, "title": TITLES[self.row], "status": status, "reason": reason,
                "seconds": round(time.monotonic() - self.started, 1), "budget_s": round(self.timeout),
                "log": self.log_path.name, "cases": cases}


def run_rows(selected: set[int], order: tuple[int, ...], plan: Plan, budget: float, jobs: int, output: Path,
             record: Callable[[dict], None]) -> None:
    """Run the selected rows in ``order``, ``jobs`` at a time, each within its cap and what the global ``budget``
    leaves after keeping ``ROW_FLOOR`` for every row still waiting."""
    deadline = time.monotonic() + budget
    waiting = [row for row in order if row in selected]
    for row in order:
        if row not in selected:
            record({"row": row, "title": TITLES[row], "status": NOT_RUN, "reason": "not selected (--rows)",
                    "seconds": 0.0, "cases": []})
    running: list[RowProcess] = []
    while waiting or running:
        while waiting and len(running) < jobs:
            row = waiting.pop(0)
            timeout = min(ROW_CAPS[row], deadline - time.monotonic() - RESERVE - GRACE - ROW_FLOOR * len(waiting))
            if timeout < ROW_FLOOR / 2:
                record({"row": row, "title": TITLES[row], "status": NOT_RUN, "seconds": 0.0, "cases": [],
                        "reason": f"global budget of {budget:.0f} s exhausted ({max(timeout, 0):.0f} s left for "
                                  f"this row)"})
            else:
                running.append(RowProcess.start(row, plan, timeout, output / f"row{row}.log"))
        for process in [r for r in running if r.done()]:
            running.remove(process)
            record(process.result())
        time.sleep(0.2)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'row':<4}{'check':<40}{'status':<9}result", "-" * 110]
    for row in sorted(rows, key=lambda r: r["row"]):
        lines.append(f"{row['row']:<4}{row['title']:<40}{row['status']:<9}{row['reason']}")
        for case in row["cases"]:
            lines.append(f"{'':<6}{case['name']:<38}{case['status']:<9}{case['summary']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "gpu_check"),
                        help="folder for gpu_check.json and the row logs")
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes (CUDA hidden)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all rows together")
    parser.add_argument("--steps", type=int, help="training steps per case (default 20; 3 in the dry run)")
    parser.add_argument("--rows", default="1,2,3,4,5", help="comma-separated rows to run")
    parser.add_argument("--jobs", type=int, help="rows run at a time (default 1; 2 in the dry run, which times "
                                                 "nothing that matters)")
    parser.add_argument("--install-log", help="the installer's log (recorded in the report)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--partial", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        plan = Plan(**json.loads(args.plan))
        sys.path.insert(0, str(ROOT / "bench"))  # bench_training, bench_logprobs (and their procfs)
        worker(args.worker, plan, args.partial)
        return 0
    try:
        selected = {int(r) for r in args.rows.split(",") if r.strip()}
    except ValueError:
        parser.error(f"--rows {args.rows!r}: expected comma-separated row numbers 1-5")
    if not selected <= set(TITLES):
        parser.error(f"--rows {args.rows!r}: rows are 1-5")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by every row: the dry run never touches a GPU

    started = time.monotonic()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    plan = Plan.for_mode(args.dry_run, scratch, args.steps)
    report: dict[str, Any] = {
        "mode": "dry-run" if args.dry_run else "gpu", "started": datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="seconds"), "budget_s": args.budget, "host": platform.node(), "plan": {
            k: v for k, v in dataclasses.asdict(plan).items() if k not in ("scratch", "deadline")},
        "install_log": Path(args.install_log).read_text()[-4000:] if args.install_log and
        Path(args.install_log).exists() else None, "rows": []}
    json_path = output / "gpu_check.json"

    def record(result: dict) -> None:
        report["rows"].append(result)
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        atomic_write_text(json_path, json.dumps(report, indent=2))
        print(f"row {result['row']} {result['title']}: {result['status']} ({result['seconds']:.0f} s) "
              f"{result['reason']}", flush=True)

    try:
        run_rows(selected, DRY_RUN_ORDER if args.dry_run else ORDER, plan, args.budget,
                 args.jobs or (2 if args.dry_run else 1), output, record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["rows"].sort(key=lambda r: r["row"])
    relate_mfu_to_row1_peak(report["rows"])
    report["table"] = format_table(report["rows"])
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(json_path, json.dumps(report, indent=2))
    print("\n" + report["table"] + f"\n\nwrote {json_path} ({report['elapsed_s']:.0f} s)", flush=True)
    return 1 if any(r["status"] == FAIL for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
