"""Benchmark: LoRA vs full-parameter DIL-LSIF on the same model and batch, one run.

Each case is the real ``Trainer`` in a fresh process (one thread, so the peak RSS is that case's alone) on the
~85M-parameter Llama shape of ``bench_training.py`` (12 layers, hidden 768, ffn 2048, 12 heads), the bundled tiny
task (64 pairs, max length 32), 8 pairs per step, 6 optimizer steps of which the first is warm-up:

  full        every parameter trains (Adam state for all, fp32 main params), reference log-probs precomputed;
  lora        rank 16 on linear_qkv/proj/fc1/fc2, base frozen, reference = the base with adapters off (every step);
  lora+pre    the same adapters, reference log-probs precomputed (no reference forward in the step).

    python bench/bench_lora.py --output bench/results/lora.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_training import LLAMA_100M, peak_rss_mib, prepare_data, run_dict, timed_steps  # noqa: E402

RANK = 16


def _case(run: dict, steps: int, result_path: str) -> None:
    """One case in this (fresh, single-rank) process: mean step seconds over steps 2.., peak RSS, trainable count."""
    from tests.distributed import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import torch

    from megatron_dil.config import from_dict
    from megatron_dil.runtime import distributed as runtime
    from megatron_dil.training.config import RunConfig
    from megatron_dil.training.trainer import Trainer

    torch.set_num_threads(1)
    try:
        trainer = Trainer(from_dict(RunConfig, run))
        records = timed_steps(trainer, steps)
        trainable = sum(p.numel() for c in trainer.policy for p in c.module.parameters() if p.requires_grad)
    finally:
        runtime.shutdown()
    seconds = [r["step_seconds"] for r in records[1:]]
    Path(result_path).write_text(json.dumps({"step_seconds": sum(seconds) / len(seconds),
                                             "peak_rss_mib": peak_rss_mib(), "trainable": trainable,
                                             "losses": [r["loss"] for r in records]}))


def _in_fresh_process(run: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from bench import bench_lora as b; "
                f"b._case(*json.loads(sys.argv[1]), {out!r})")
        subprocess.run([sys.executable, "-c", code, json.dumps([run, steps])], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    lora = {"rank": RANK, "alpha": 2.0 * RANK}
    cases = {"full": ("precompute", None), "lora": ("base", lora), "lora+pre": ("precompute", lora)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(tmp, 64)
        for name, (reference, adapters) in cases.items():
            run = run_dict(data, str(Path(tmp, name)), LLAMA_100M, reference=reference, micro=4, global_batch=8)
            if adapters is not None:
                run["lora"] = adapters
            results[name] = _in_fresh_process(run, args.steps)
            print(f"{name:9s} {results[name]['step_seconds']:.2f} s/step, peak RSS "
                  f"{results[name]['peak_rss_mib']:.0f} MiB", flush=True)
    full = results["full"]
    from megatron_dil.config import from_dict
    from megatron_dil.lora import LoRAConfig
    from megatron_dil.models.config import ModelConfig

    expected = from_dict(LoRAConfig, lora).num_parameters(from_dict(ModelConfig, LLAMA_100M))
    assert results["lora"]["trainable"] == expected, (results["lora"]["trainable"], expected)
    summary = {"parameters": full["trainable"], "trainable_lora": results["lora"]["trainable"],
               **{f"{n}_vs_full_step_time": r["step_seconds"] / full["step_seconds"] for n, r in results.items()},
               **{f"{n}_vs_full_peak_rss": r["peak_rss_mib"] / full["peak_rss_mib"] for n, r in results.items()}}
    print(json.dumps(summary, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"cases": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
