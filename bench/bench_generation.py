"""Benchmark: megatron_dil generation (Megatron-Core KV cache, vocab-parallel greedy) vs transformers ``generate()``.

One process, same converted model (a random Llama shape, fp32), same prompts (a batch of equal-length random ids, so
neither side pads), greedy, EOS disabled so both generate exactly ``--new-tokens`` per row; the token ids are checked
equal. Reported: time to first token (a 1-new-token run: prefill + one choice), generated tokens/s of the whole run
(batch × new tokens / seconds), each as the median of ``--repeats`` (the two sides interleaved) after a warm-up, and their ratio; and the KV
cache's allocated bytes (Megatron's static buffers, read after the run) against 2 · layers · batch · positions ·
kv_heads · head_dim · bytes. This is the engine ``megatron-dil-generate`` runs per batch (its process start-up,
prompt reading and output writing are not included). ``equal_length_prompts``, ``megatron_decoder`` and
``time_decoders`` also time row 5 of ``bench/gpu_check.py``.

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
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def equal_length_prompts(batch: int, prompt_length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[batch, prompt_length] random ids in [3, vocab_size) (0-2 stay free for pad/BOS/EOS), so no side pads."""
    return torch.randint(3, vocab_size, (batch, prompt_length), generator=torch.Generator().manual_seed(seed))


def megatron_decoder(model, prompts: torch.Tensor, vocab_size: int) -> Callable[..., list]:
    """``fn(new_tokens, context=None)``: greedy ``decode`` of ``prompts`` (one request per row) with no EOS, so every
    row generates exactly ``new_tokens``; ``context`` is an optional KV cache to fill."""
    from megatron_dil.generation.decode import DecodeLimits, DecodeRequest, decode
    from megatron_dil.generation.sampler import SamplingConfig

    requests = [DecodeRequest(p.tolist(), i, 0) for i, p in enumerate(prompts)]
    greedy = SamplingConfig(temperature=0.0)

    def run(new_tokens: int, context=None) -> list:
        limits = DecodeLimits(new_tokens, prompts.shape[1] + new_tokens, ())
        return decode(model, requests, greedy, limits, vocab_size, context)

    return run


def time_decoders(sides: dict[str, Callable[[int], object]], batch: int, new_tokens: int,
                  repeats: int) -> dict[str, dict[str, float]]:
    """Per side: ``ttft_s`` (a 1-new-token run: prefill + one choice) and ``total_s`` (a ``new_tokens`` run), each the
    median of ``repeats`` with the sides interleaved (a change in machine load hits all alike), and
    ``tokens_per_s`` = batch · new_tokens / total_s. Warm the sides up first."""
    def timed(fn: Callable[[int], object], n: int) -> float:
        start = time.perf_counter()
        fn(n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: {"ttft_s": [], "total_s": []} for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name]["ttft_s"].append(timed(fn, 1))
            times[name]["total_s"].append(timed(fn, new_tokens))
    result = {name: {key: statistics.median(values) for key, values in side.items()} for name, side in times.items()}
    for side in result.values():
        side["tokens_per_s"] = batch * new_tokens / side["total_s"]
    return result


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
    import transformers
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_dil.convert import MegatronCheckpoint, hf_to_megatron, load_megatron_checkpoint
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
    prompts = equal_length_prompts(args.batch, args.prompt_length, args.vocab)

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        hf_to_megatron(Path(tmp) / "hf", Path(tmp) / "ckpt", tensor_parallel=1, pipeline_parallel=1, progress=False)
        model_cfg = MegatronCheckpoint(Path(tmp) / "ckpt").model
        os.environ.setdefault("MASTER_PORT", "29517")
        initialize(ParallelConfig(), model_cfg)
        chunks = build_model(model_cfg)
        load_megatron_checkpoint(chunks, Path(tmp) / "ckpt")
    ours = megatron_decoder(chunks[0], prompts, model_cfg.vocab_size)

    def theirs(new_tokens: int):
        with torch.no_grad():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    same = [c.token_ids for c in ours(args.new_tokens)] == theirs(args.new_tokens)[:, args.prompt_length:].tolist()
    theirs(1)  # warm-up of both sides done above and here
    result = {"shape": vars(args), "parameters_m": model_cfg.num_parameters() / 1e6, "tokens_equal": same,
              "torch_threads": torch.get_num_threads(), "transformers_version": transformers.__version__,
              "load_average_1min": os.getloadavg()[0],
              **time_decoders({"megatron_dil": ours, "transformers": theirs}, args.batch, args.new_tokens,
                              args.repeats)}
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
