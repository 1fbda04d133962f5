"""Benchmark: megatron_dil generation (Megatron-Core KV cache, vocab-parallel greedy) vs transformers ``generate()``.

One process, same converted model (a random Llama shape, fp32), same prompts (a batch of equal-length random ids, so
neither side pads), greedy, EOS disabled so both generate exactly ``--new-tokens`` per row; the token ids are checked
equal. Reported: time to first token (a 1-new-token run: prefill + one choice), generated tokens/s of the whole run
(batch × new tokens / seconds), each as the median of ``--repeats`` (the two sides interleaved) after a warm-up, and their ratio; and the KV
cache's allocated bytes (Megatron's static buffers, read after the run) against 2 · layers · batch · positions ·
kv_heads · head_dim · bytes. This is the engine ``megatron-dil-generate`` runs per batch (its process start-up,
prompt reading and output writing are not included).

    python bench/bench_generation.py --output bench/results/generation.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output")
    args = parser.parse_args()

    from megatron_dil.runtime.cpu_compat import silence_expected_warnings

    silence_expected_warnings()
    import torch
    import transformers
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_dil.convert import MegatronCheckpoint, hf_to_megatron, load_megatron_checkpoint
    from megatron_dil.generation.decode import DecodeLimits, DecodeRequest, decode
    from megatron_dil.generation.sampler import SamplingConfig
    from megatron_dil.models.builder import build_model
    from megatron_dil.runtime import ParallelConfig, initialize, shutdown

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_length + args.new_tokens, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.generation_config.eos_token_id = None
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_length))

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        hf_to_megatron(Path(tmp) / "hf", Path(tmp) / "ckpt", tensor_parallel=1, pipeline_parallel=1, progress=False)
        model_cfg = MegatronCheckpoint(Path(tmp) / "ckpt").model
        os.environ.setdefault("MASTER_PORT", "29517")
        initialize(ParallelConfig(), model_cfg)
        chunks = build_model(model_cfg)
        load_megatron_checkpoint(chunks, Path(tmp) / "ckpt")
    model = chunks[0]
    requests = [DecodeRequest(p.tolist(), i, 0) for i, p in enumerate(prompts)]
    greedy = SamplingConfig(temperature=0.0)

    def ours(new_tokens: int, context=None):
        return decode(model, requests, greedy, DecodeLimits(new_tokens, 10 ** 9, ()), model_cfg.vocab_size, context)

    def theirs(new_tokens: int):
        with torch.no_grad():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    sides = {"megatron_dil": ours, "transformers": theirs}
    same = [c.token_ids for c in ours(args.new_tokens)] == theirs(args.new_tokens)[:, args.prompt_length:].tolist()
    theirs(1)  # warm-up of both sides done above and here
    times: dict[str, dict[str, list[float]]] = {name: {"ttft_s": [], "total_s": []} for name in sides}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits both sides alike
        for name, fn in sides.items():
            for key, new_tokens in (("ttft_s", 1), ("total_s", args.new_tokens)):
                start = time.perf_counter()
                fn(new_tokens)
                times[name][key].append(time.perf_counter() - start)
    result = {"shape": vars(args), "parameters_m": model_cfg.num_parameters() / 1e6, "tokens_equal": same,
              "torch_threads": torch.get_num_threads(), "transformers_version": transformers.__version__,
              "load_average_1min": os.getloadavg()[0]}
    for name in sides:
        result[name] = {key: statistics.median(values) for key, values in times[name].items()}
        result[name]["tokens_per_s"] = args.batch * args.new_tokens / result[name]["total_s"]
    result["tokens_per_s_ratio"] = result["megatron_dil"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    result["ttft_ratio"] = result["megatron_dil"]["ttft_s"] / result["transformers"]["ttft_s"]

    context = StaticInferenceContext(args.batch, args.prompt_length + args.new_tokens)
    ours(args.new_tokens, context)
    allocated = sum(t.numel() * t.element_size() for kv in context.key_value_memory_dict.values() for t in kv)
    theoretical = (2 * args.layers * args.batch * (args.prompt_length + args.new_tokens) * args.kv_heads
                   * (args.hidden // args.heads) * 4)
    result["kv_cache"] = {"allocated_bytes": allocated, "theoretical_bytes": theoretical,
                          "ratio": allocated / theoretical}
    shutdown()

    m, t = result["megatron_dil"], result["transformers"]
    print(f"model {result['parameters_m']:.1f}M params ({args.layers} L, hidden {args.hidden}, vocab {args.vocab}), "
          f"batch {args.batch} × prompt {args.prompt_length} + {args.new_tokens} new, greedy fp32, "
          f"{result['torch_threads']} threads; tokens equal: {same}; load average {result['load_average_1min']:.1f}")
    print(f"generated tokens/s: megatron_dil {m['tokens_per_s']:.1f}, transformers {t['tokens_per_s']:.1f} "
          f"-> ratio {result['tokens_per_s_ratio']:.2f}")
    print(f"time to first token: megatron_dil {m['ttft_s'] * 1e3:.1f} ms, transformers {t['ttft_s'] * 1e3:.1f} ms "
          f"-> ratio {result['ttft_ratio']:.2f}")
    print(f"KV cache: allocated {allocated / 2 ** 20:.2f} MiB, theoretical {theoretical / 2 ** 20:.2f} MiB "
          f"-> ratio {result['kv_cache']['ratio']:.3f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
