"""Benchmark: peak host memory of checkpoint conversion against the size of the model's weights.

A random Llama-style model (bf16, ~0.6 GB by default; GQA, untied) is written as a two-file sharded HF safetensors
checkpoint. Each conversion then runs in a fresh Python process, which reports:
  baseline  = VmRSS after importing everything (torch, megatron_dil.convert), before converting;
  peak      = VmHWM (peak resident set, file-backed pages of the memory-mapped inputs included) at the end;
  extra     = peak − baseline: what the conversion itself held at its worst moment;
  ratio     = extra / weight bytes (1.0 = one full copy of the model in memory);
  anon peak = the largest RssAnon sampled every 2 ms: memory the conversion allocated itself, without the clean,
              reclaimable file pages of the memory-mapped source files that ``peak`` also counts.

    python bench/bench_convert_memory.py --output bench_convert_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from procfs import status_kib  # bench/ is on sys.path when a benchmark runs as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_random_llama(directory: Path, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int,
                       vocab: int) -> int:
    """A random bf16 Llama checkpoint in two safetensors files + index; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       p + "post_attention_layernorm.weight": (hidden,), p + "mlp.gate_proj.weight": (ffn, hidden),
                       p + "mlp.up_proj.weight": (ffn, hidden), p + "mlp.down_proj.weight": (hidden, ffn)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    keys = list(shapes)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map, total = {}, 0
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for n, names in enumerate(halves):
        file = f"model-{n + 1:05d}-of-00002.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=generator) * 0.02).to(torch.bfloat16) for k in names}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                         "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    return total


def _worker(case: dict) -> dict:
    """One conversion in this fresh process; returns seconds and memory figures in MiB."""
    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(2)
    from megatron_dil.convert import hf_to_megatron, megatron_to_hf

    baseline, anon_baseline = status_kib("VmRSS"), status_kib("RssAnon")
    anon_peak = [anon_baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            anon_peak[0] = max(anon_peak[0], status_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if case["direction"] == "hf_to_megatron":
        hf_to_megatron(case["source"], case["output"], case["tp"], case["pp"], progress=False)
    else:
        megatron_to_hf(case["source"], case["output"], progress=False)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = status_kib("VmHWM")
    return {"seconds": seconds, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024,
            "extra_mib": (peak - baseline) / 1024, "anon_extra_mib": (anon_peak[0] - anon_baseline) / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--output", default="bench_convert_memory.json", help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weight_bytes = write_random_llama(tmp_path / "hf", args.hidden, args.ffn, args.layers, args.heads,
                                          args.kv_heads, args.vocab)
        cases = [
            {"name": "HF → Megatron TP=1 PP=1", "direction": "hf_to_megatron", "source": str(tmp_path / "hf"),
             "output": str(tmp_path / "tp1pp1"), "tp": 1, "pp": 1},
            {"name": "HF → Megatron TP=2 PP=2", "direction": "hf_to_megatron", "source": str(tmp_path / "hf"),
             "output": str(tmp_path / "tp2pp2"), "tp": 2, "pp": 2},
            {"name": "HF → Megatron TP=4 PP=1", "direction": "hf_to_megatron", "source": str(tmp_path / "hf"),
             "output": str(tmp_path / "tp4pp1"), "tp": 4, "pp": 1},
            {"name": "Megatron TP=2 PP=2 → Megatron TP=1 PP=2", "direction": "hf_to_megatron",
             "source": str(tmp_path / "tp2pp2"), "output": str(tmp_path / "reshard"), "tp": 1, "pp": 2},
            {"name": "Megatron TP=2 PP=2 → HF", "direction": "megatron_to_hf", "source": str(tmp_path / "tp2pp2"),
             "output": str(tmp_path / "hf_out")},
        ]
        results = []
        for case in cases:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)],
                                  capture_output=True, text=True, check=True)
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append({"case": case["name"], **measured,
                            "ratio_extra_to_weights": measured["extra_mib"] * 2**20 / weight_bytes,
                            "ratio_anon_extra_to_weights": measured["anon_extra_mib"] * 2**20 / weight_bytes})
    weights_mib = weight_bytes / 2**20
    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
          f"bf16 weights {weights_mib:.0f} MiB")
    print(f"{'case':<42}{'time s':>8}{'baseline MiB':>14}{'peak MiB':>10}{'extra MiB':>11}{'extra/weights':>15}"
          f"{'anon extra MiB':>16}{'anon/weights':>14}")
    for r in results:
        print(f"{r['case']:<42}{r['seconds']:>8.1f}{r['baseline_mib']:>14.0f}{r['peak_mib']:>10.0f}"
              f"{r['extra_mib']:>11.0f}{r['ratio_extra_to_weights']:>15.2f}"
              f"{r['anon_extra_mib']:>16.0f}{r['ratio_anon_extra_to_weights']:>14.2f}")
    Path(args.output).write_text(json.dumps({"weights_mib": weights_mib, "model": vars(args) | {"worker": None},
                                             "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
