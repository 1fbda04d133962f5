"""Benchmark: DIL training throughput, MFU, reference cost, CPU scaling, TRL DPOTrainer side by side, log-prob kernel.

Every figure is measured in this one run, so ratios compare like with like on a noisy machine:

1. DIL-LSIF step throughput (tokens/s, pairs/s) and MFU as the Trainer reports them (MFU = model FLOPs / peak matmul
   FLOP/s measured by the Trainer at start-up, ``monitor.training_flops_per_token``: 6·N + 12·L·heads·head_dim·S per
   token) for the ``tiny`` preset and a ~85M-parameter Llama shape (12 layers, hidden 768, ffn 2048, 12 heads).
   The first step is warm-up and is not counted; the reported figure is the mean over the remaining steps.
2. TRL's DPOTrainer (optional: skipped when ``trl`` is not importable) on the same tiny Llama shape, data and batch:
   tokens/s ratio, peak-RSS ratio (each side in a fresh process), and DPO loss agreement on identical log-probs.
3. Reference cost: step time with precomputed reference log-probs vs a co-resident reference model.
4. Scaling: tokens/s at DP=1,2 and TP=1,2 on gloo CPU ranks (one thread per rank), as efficiency vs linear:
   tokens/s(N ranks) / (N · tokens/s(1 rank)), fixed global batch (16 pairs, 4 layers, hidden 512).
5. Vocab-parallel log-prob kernel vs naive log_softmax: ``bench/bench_logprobs.py`` run with small settings.

    python bench/bench_training.py --output bench/results/training.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_100M = {"num_layers": 12, "hidden_size": 768, "ffn_hidden_size": 2048, "num_attention_heads": 12,
              "vocab_size": 47, "max_position_embeddings": 64}
SCALING_MODEL = {"num_layers": 4, "hidden_size": 512, "ffn_hidden_size": 1408, "num_attention_heads": 8,
                 "vocab_size": 47, "max_position_embeddings": 64}
TINY_HF = dict(vocab_size=47, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------ our trainer
def timed_steps(trainer, steps: int) -> list[dict]:
    """Prepare the reference and run ``steps`` optimizer steps of ``trainer`` (no checkpoints, evaluations or export);
    per step the loss metrics plus the Monitor's scalars (step_seconds, tokens/s, MFU, memory, ...)."""
    from megatron.core import parallel_state

    from megatron_dil.data.loader import build_dataloader
    from megatron_dil.training.checkpoint import TrainState

    trainer.prepare_reference()
    loader = build_dataloader(trainer.train_set, trainer.run.data, trainer.tokenizer, trainer.run.train.micro_batch_size,
                              parallel_state.get_data_parallel_rank(), trainer.dp_size, train=True)
    batches_iter, state, records = iter(loader), TrainState(), []
    for _ in range(steps):
        batches = [next(batches_iter).to(trainer.device) for _ in range(trainer.accumulation)]
        trainer.monitor.start_step()
        metrics, scalars = trainer.train_step(batches, state)
        state.iteration += 1
        records.append({**metrics, **trainer.monitor.end_step(state.iteration, batches, metrics, scalars)})
    return records


def _run_trainer(rank: int, world_size: int, run: dict, steps: int) -> dict:
    """Build the Trainer and run ``steps`` optimizer steps; mean metrics of steps 2..steps."""
    from megatron_dil.config import from_dict
    from megatron_dil.runtime import distributed as runtime
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import Trainer

    try:
        trainer = Trainer(from_dict(RunConfig, run))
        timed = timed_steps(trainer, steps)[1:]
        keys = ("tokens_per_second", "pairs_per_second", "mfu", "step_seconds", "memory_gib")
        return {**{k: sum(r[k] for r in timed) / len(timed) for k in keys},
                "loss": timed[-1].get("loss", float("nan")), "peak_flops": trainer.monitor.peak_flops,
                "parameters": trainer.model_config.num_parameters()}
    finally:
        runtime.shutdown()


def run_dict(data: dict, output_dir: str, model: dict, reference: str = "precompute", tensor: int = 1,
             micro: int = 4, global_batch: int = 8) -> dict:
    return {
        "output_dir": output_dir, "model": model,
        "data": {"train": [data["train"]], "tokenizer": data["tokenizer"], "max_length": 32},
        "loss": {"name": "dil_lsif"},
        "parallel": {"tensor": tensor},
        "train": {"micro_batch_size": micro, "global_batch_size": global_batch, "train_iters": 100, "lr": 1e-5,
                  "warmup_fraction": 0.0, "lr_schedule": "constant"},
        "reference": {"mode": reference, "recompute": True},
        "logging": {"tensorboard": False},
    }


def trainer_case(data: dict, tmp: str, name: str, world_size: int, steps: int, **kwargs) -> dict:
    from tests.distributed import run_ranks

    results = run_ranks(_run_trainer, world_size, run_dict(data, os.path.join(tmp, name), **kwargs), steps)
    return results[-1]  # the last rank reports (last pipeline stage)


# ------------------------------------------------------------------------------------------------------- TRL
def _trl_worker(data_jsonl: str, tokenizer_dir: str, steps: int, batch: int, result_path: str) -> None:
    """TRL DPOTrainer (sigmoid DPO, β 0.1) on the tiny Llama; tokens/s over steps 2.. and this process's peak RSS."""
    import torch
    import transformers
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF))
    ref_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF))  # co-resident, as ours can be
    dataset = load_dataset("json", data_files=data_jsonl, split="train")

    class Timer(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                           beta=0.1, max_length=32, report_to=[], logging_steps=1, save_strategy="no",
                           use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
        tokens: list[int] = []
        original = trainer.training_step

        def counting_step(model, inputs, *args, **kw):
            masks = [v for k, v in inputs.items() if k.endswith("attention_mask")]
            tokens.append(int(sum(m.sum() for m in masks)))
            return original(model, inputs, *args, **kw)

        trainer.training_step = counting_step
        trainer.train()
        loss_check = dpo_loss_agreement(trainer, model, ref_model)
    seconds = [e - s for s, e in zip(timer.starts, timer.ends)][1:]
    result = {"tokens_per_second": sum(tokens[1:]) / sum(seconds), "step_seconds": sum(seconds) / len(seconds),
              "peak_rss_mib": peak_rss_mib(), "dpo_loss": loss_check}
    Path(result_path).write_text(json.dumps(result))


def dpo_loss_agreement(trainer, model, ref_model) -> dict:
    """TRL's DPO loss (its ``_compute_loss``) vs ours (``vocab_parallel_logprobs`` → sum log-probs → our ``dpo``
    loss, β 0.1) on one identical batch and the same policy/reference logits; TRL batches are [chosen; rejected]."""
    import torch

    from megatron_dil.losses import LossConfig, PairLogProbs, build_loss
    from megatron_dil.ops import SequenceLogProbs, vocab_parallel_logprobs

    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        theirs = float(trainer._compute_loss(model, batch, return_outputs=False))

        def pair(m) -> PairLogProbs:
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            token_logps = vocab_parallel_logprobs(logits.float(), batch["input_ids"][:, 1:])
            mask = batch["completion_mask"][:, 1:].float()
            seq = SequenceLogProbs(sum=(token_logps * mask).sum(1), count=mask.sum(1))
            half = seq.sum.shape[0] // 2
            return PairLogProbs(SequenceLogProbs(seq.sum[:half], seq.count[:half]),
                                SequenceLogProbs(seq.sum[half:], seq.count[half:]))

        ours = float(build_loss(LossConfig(name="dpo", beta=0.1))(pair(model), pair(ref_model)).losses.mean())
    return {"pairs": int(batch["input_ids"].shape[0] // 2), "ours": ours, "trl": theirs, "abs_diff": abs(ours - theirs)}


def _ours_rss_worker(run: dict, steps: int, result_path: str) -> None:
    from tests.distributed import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(1)
    result = _run_trainer(0, 1, run, steps)
    result["peak_rss_mib"] = peak_rss_mib()
    Path(result_path).write_text(json.dumps(result))


def _in_fresh_process(function: str, *args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from bench import bench_training as b; "
                f"b.{function}(*json.loads(sys.argv[1]), {out!r})")
        subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(Path(out).read_text())


def trl_comparison(data: dict, tmp: str, steps: int) -> dict:
    try:
        import trl
    except ImportError:
        return {"skipped": "trl is not installed"}
    pairs = Path(tmp, "trl_pairs.jsonl")
    _write_pairs_jsonl(pairs, 64)
    ours = _in_fresh_process("_ours_rss_worker", run_dict(data, os.path.join(tmp, "ours_vs_trl"),
                                                         {"preset": "tiny"}, reference="model", micro=8, global_batch=8), steps)
    theirs = _in_fresh_process("_trl_worker", str(pairs), data["tokenizer"], steps, 8)
    return {"trl_version": trl.__version__, "ours": ours, "trl": theirs,
            "tokens_per_second_ratio": ours["tokens_per_second"] / theirs["tokens_per_second"],
            "peak_rss_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"]}


def _write_pairs_jsonl(path: Path, count: int) -> None:
    from megatron_dil.data.tiny_task import tiny_example_dir

    lines = Path(tiny_example_dir(), "pairs.jsonl").read_text().splitlines()[:count]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------- log-probs
def logprob_kernel(tmp: str) -> dict:
    out = os.path.join(tmp, "logprobs.json")
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_logprobs.py"), "--output", out, "--shapes", "1x1024",
                    "--repeats", "1"], check=True, cwd=ROOT)
    return json.loads(Path(out).read_text())


# ------------------------------------------------------------------------------------------------------ main
def prepare_data(tmp: str, pairs: int) -> dict:
    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import preprocess_pairs
    from megatron_dil.data.tiny_task import TINY_MAX_LENGTH, TINY_MAX_PROMPT_LENGTH, tiny_example_dir

    subset = Path(tmp, "pairs.jsonl")
    _write_pairs_jsonl(subset, pairs)
    tokenizer = os.path.join(tiny_example_dir(), "tokenizer")
    prefixes = preprocess_pairs(PreprocessConfig(
        inputs=[str(subset)], output_prefix=os.path.join(tmp, "data"), tokenizer=tokenizer,
        max_length=TINY_MAX_LENGTH, max_prompt_length=TINY_MAX_PROMPT_LENGTH, progress=False)).prefixes
    return {"train": prefixes["train"], "tokenizer": tokenizer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "training.json"))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per case (the first is warm-up)")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the TRL DPOTrainer comparison")
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []
    report: dict = {"cpu_cores": os.cpu_count(), "steps": args.steps}

    def row(section: str, case: str, value: str) -> None:
        rows.append((section, case, value))
        print(f"{section:<22} {case:<44} {value}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(tmp, 64)
        # 1 + 3: throughput, MFU, reference cost
        for name, model in (("tiny", {"preset": "tiny"}), ("llama_85m", LLAMA_100M)):
            cases = {}
            for mode in ("precompute", "model"):
                if name == "tiny" and mode == "model":
                    continue
                cases[mode] = trainer_case(data, tmp, f"{name}_{mode}", 1, args.steps, model=model, reference=mode)
            report[f"throughput_{name}"] = cases["precompute"]
            r = cases["precompute"]
            row("1 throughput", f"{name} ({r['parameters'] / 1e6:.1f}M params)",
                f"{r['tokens_per_second']:.0f} tok/s, {r['pairs_per_second']:.2f} pairs/s, MFU "
                f"{100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e9:.0f} GFLOP/s, RSS {r['memory_gib']:.2f} GiB")
            if "model" in cases:
                ratio = cases["model"]["step_seconds"] / r["step_seconds"]
                report["reference_cost"] = {"model": name, "precompute_step_s": r["step_seconds"],
                                            "coresident_step_s": cases["model"]["step_seconds"], "ratio": ratio}
                row("3 reference cost", f"{name}: co-resident / precomputed step time",
                    f"{cases['model']['step_seconds']:.2f} s / {r['step_seconds']:.2f} s = {ratio:.2f}x")
        # 4: scaling
        scale = dict(model=SCALING_MODEL, global_batch=16)  # 16 pairs: DP=1 accumulates 4 micro-batches, DP=2 two
        base = trainer_case(data, tmp, "scale_1", 1, args.steps, **scale)
        dp2 = trainer_case(data, tmp, "scale_dp2", 2, args.steps, **scale)
        tp2 = trainer_case(data, tmp, "scale_tp2", 2, args.steps, tensor=2, **scale)
        report["scaling"] = {"model": SCALING_MODEL, "one_rank": base, "dp2": dp2, "tp2": tp2}
        for label, r in (("DP=1 TP=1", base), ("DP=2", dp2), ("TP=2", tp2)):
            ranks = 1 if r is base else 2
            eff = r["tokens_per_second"] / (ranks * base["tokens_per_second"])
            report["scaling"][f"efficiency_{label}"] = eff
            row("4 scaling (1 thr/rank)", f"{label} ({SCALING_MODEL['num_layers']}L h{SCALING_MODEL['hidden_size']})",
                f"{r['tokens_per_second']:.0f} tok/s, efficiency vs linear {100 * eff:.0f}%")
        # 2: TRL
        if not args.skip_trl:
            trl = trl_comparison(data, tmp, args.steps)
            report["trl"] = trl
            if "skipped" in trl:
                row("2 vs TRL DPOTrainer", "skipped", trl["skipped"])
            else:
                row("2 vs TRL DPOTrainer", f"tiny Llama, batch 8 pairs, TRL {trl['trl_version']}",
                    f"tokens/s ratio {trl['tokens_per_second_ratio']:.2f}x, peak RSS ratio "
                    f"{trl['peak_rss_ratio']:.2f}x, DPO loss max |diff| {trl['trl']['dpo_loss']['abs_diff']:.1e}")
        # 5: log-prob kernel
        kernel = logprob_kernel(tmp)
        report["logprobs"] = kernel
        for r in kernel["results"]:
            row("5 logprob kernel", f"V={kernel['vocab']} {r['batch']}x{r['seq']} {r['method']} tp={r['tp']} "
                f"chunk={r['chunk']}", f"{r['seconds']:.3f} s, extra peak {r['peak_extra_mib']:.0f} MiB")
    report["table"] = rows
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    staging = args.output + ".tmp"
    Path(staging).write_text(json.dumps(report, indent=2))
    os.replace(staging, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
