"""Benchmark: vocab-parallel per-token log-probs vs naive full-vocab log_softmax + gather (forward + backward).

Every case runs in a fresh Python process. Logits are bf16 (Megatron's output dtype), vocabulary 128256 (Llama 3).
Peak memory = extra resident memory during forward + backward: the process's peak RSS is reset (Linux
/proc/self/clear_refs "5") once the inputs exist, and the reported number is VmHWM − VmRSS-before, i.e. everything the
log-prob path allocates on top of its input logits (including the bf16 gradient of the logits). TP=2 runs two gloo ranks
(one thread each) holding half the vocabulary each and reports the slower / larger rank. With ``--device cuda`` the
logits live on the GPU and the extra peak is ``torch.cuda.max_memory_allocated`` above the allocation before the step
(timed with synchronisation; TP=2 then needs two GPUs and NCCL).

    python bench/bench_logprobs.py --output bench_logprobs.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from procfs import status_kib  # bench/ is on sys.path when a benchmark runs as a script

VOCAB = 128256


def _worker(case: dict) -> dict:
    """One measurement in this (fresh) process; returns seconds and extra peak MiB of forward + backward."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_dil.ops import vocab_parallel_logprobs

    group = None
    tp = case["tp"]
    device = torch.device(case.get("device", "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("RANK", "0")))
        torch.cuda.set_device(device)
    if tp > 1:
        torch.set_num_threads(1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        group = dist.group.WORLD
    rank = dist.get_rank() if tp > 1 else 0
    batch, seq = case["batch"], case["seq"]
    gen = torch.Generator(device=device).manual_seed(0)
    targets = torch.randint(0, VOCAB, (batch, seq), generator=gen, device=device)
    mask = torch.rand(batch, seq, generator=gen, device=device) > 0.3
    local = VOCAB // tp
    logits = torch.randn(batch, seq, local, generator=gen, dtype=torch.bfloat16, device=device).requires_grad_()

    def step() -> None:
        if case["method"] == "naive":
            logps = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            logps = vocab_parallel_logprobs(logits, targets, group, vocab_size=VOCAB, chunk_size=case["chunk"])
        (logps * mask).sum().backward()
        logits.grad = None

    times, peaks = [], []
    for _ in range(case["repeats"]):
        if group is not None:
            dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
            before = status_kib("VmRSS") * 1024
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_kib("VmHWM") * 1024
        peaks.append((peak - before) / 2**20)
    result = {"rank": rank, "seconds": min(times), "peak_extra_mib": max(peaks),
              "logits_mib": logits.numel() * logits.element_size() / 2**20}
    if group is not None:
        dist.destroy_process_group()
    return result


def _run_case(case: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if case["tp"] > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(case["tp"]):
            rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(case["tp"]), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(29500 + os.getpid() % 1000)}
            out = os.path.join(tmp, f"rank{rank}.json")
            procs.append((subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(case), "--worker-output",
                                            out], env=rank_env), out))
        for proc, _ in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"case {case} failed (exit {proc.returncode})")
        ranks = [json.load(open(out)) for _, out in procs]
    return {**case, "seconds": max(r["seconds"] for r in ranks),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in ranks), "logits_mib_per_rank": ranks[0]["logits_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench_logprobs.json", help="JSON file for the results")
    parser.add_argument("--shapes", default="1x2048,2x4096", help="comma-separated batch x sequence shapes")
    parser.add_argument("--chunk", type=int, default=256, help="chunk_size (tokens) of the chunked cases")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per case (best time is reported)")
    parser.add_argument("--max-naive-tokens", type=int, default=4096,
                        help="skip the naive path above this many tokens (it needs ~6 fp32 copies of the logits)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the logits live")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = _worker(json.loads(args.worker))
        with open(args.worker_output, "w") as out:
            json.dump(result, out)
        return

    results = []
    print(f"{'tokens':>10} {'method':<28} {'fwd+bwd s':>10} {'extra peak MiB':>15} {'logits MiB/rank':>16}")
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        cases = [dict(method="naive", tp=1, chunk=None), dict(method="vocab_parallel", tp=1, chunk=None),
                 dict(method="vocab_parallel", tp=1, chunk=args.chunk),
                 dict(method="vocab_parallel", tp=2, chunk=args.chunk)]
        for case in cases:
            case.update(batch=batch, seq=seq, repeats=args.repeats, device=args.device)
            label = f"{case['method']} tp={case['tp']} chunk={case['chunk']}"
            if case["method"] == "naive" and batch * seq > args.max_naive_tokens:
                print(f"{shape:>10} {label:<28} {'skipped (memory)':>10}")
                continue
            result = _run_case(case)
            results.append(result)
            print(f"{shape:>10} {label:<28} {result['seconds']:>10.3f} {result['peak_extra_mib']:>15.0f} "
                  f"{result['logits_mib_per_rank']:>16.0f}", flush=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as out:
        json.dump({"vocab": VOCAB, "dtype": "bfloat16", "device": args.device, "memory_method":
                   "max_memory_allocated - memory_allocated" if args.device == "cuda" else
                   "VmHWM - VmRSS (peak RSS reset after inputs)",
                   "results": results}, out, indent=2)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
