"""Preprocessing throughput (pairs/s) of megatron-dil-preprocess with 1 and more tokenizer workers, and the cost of
the dataset checksums.

    python bench/bench_preprocess.py [--pairs 20000] [--workers 1 2] [--json bench/results/preprocess.json]

Input: the tiny task's generator (conversational rows through the chat template, and the same pairs as string rows)
tokenized with the bundled tiny tokenizer. Prints a table and writes JSON. Each configuration is timed end to end
(reading, tokenizing, writing .bin/.idx/.json), best of --repeats. ``checksum ms`` is the time of the BLAKE2b records
of the written ``.bin/.idx`` (what the writer adds to a run, and the reader's ``verify_checksums: full`` at start);
``--digest-mib`` more MiB are hashed once to give the digest throughput that scales it to large datasets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dil.data.config import PreprocessConfig  # noqa: E402
from megatron_dil.data.preprocess import preprocess_pairs  # noqa: E402
from megatron_dil.data.tiny_task import make_pair, tiny_example_dir  # noqa: E402
from megatron_dil.io.files import file_digest, file_record  # noqa: E402


def write_inputs(directory: str, num_pairs: int) -> dict[str, str]:
    rng = random.Random(0)
    rows = [make_pair(rng) for _ in range(num_pairs)]
    paths = {"conversational": os.path.join(directory, "chat.jsonl"), "string": os.path.join(directory, "text.jsonl")}
    with open(paths["conversational"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(paths["string"], "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"][0]["content"], "chosen": " " + r["chosen"][0]["content"],
                                 "rejected": " " + r["rejected"][0]["content"]}) + "\n" for r in rows)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000, help="pairs per input file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per work item")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (best is reported)")
    parser.add_argument("--digest-mib", type=int, default=256, help="MiB hashed to measure the digest throughput")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "preprocess.json"), help="where to write the results")
    args = parser.parse_args()
    tokenizer = os.path.join(tiny_example_dir(), "tokenizer")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(tmp, args.pairs)
        for kind, path in inputs.items():
            for workers in args.workers:
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    result = preprocess_pairs(PreprocessConfig(
                        inputs=[path], output_prefix=os.path.join(tmp, "out"), tokenizer=tokenizer, max_length=64,
                        max_prompt_length=32, valid_fraction=0.05, workers=workers, chunk_size=args.chunk_size,
                        progress=False))
                    best = min(best, time.perf_counter() - start)
                assert result.counts["pairs_written"] == args.pairs
                outputs = [p + ext for p in result.prefixes.values() for ext in (".bin", ".idx")]
                start = time.perf_counter()
                for output in outputs:
                    file_record(output)
                checksum = time.perf_counter() - start
                results.append({"rows": kind, "workers": workers, "pairs": args.pairs, "seconds": round(best, 3),
                                "pairs_per_s": round(args.pairs / best, 1), "checksum_ms": round(1e3 * checksum, 2),
                                "data_bytes": sum(os.path.getsize(p) for p in outputs)})
        blob = os.path.join(tmp, "blob")
        with open(blob, "wb") as f:
            for _ in range(args.digest_mib):
                f.write(os.urandom(1 << 20))
        file_digest(blob)  # page cache warm, as right after writing
        start = time.perf_counter()
        file_digest(blob)
        digest_gb_s = args.digest_mib * 2**20 / (time.perf_counter() - start) / 1e9
    print(f"{'rows':<15}{'workers':>8}{'pairs':>9}{'seconds':>10}{'pairs/s':>11}{'data KiB':>10}{'checksum ms':>13}")
    for r in results:
        print(f"{r['rows']:<15}{r['workers']:>8}{r['pairs']:>9}{r['seconds']:>10.2f}{r['pairs_per_s']:>11.0f}"
              f"{r['data_bytes'] / 1024:>10.0f}{r['checksum_ms']:>13.2f}")
    print(f"BLAKE2b digest throughput: {digest_gb_s:.2f} GB/s ({args.digest_mib} MiB, page cache warm)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"benchmark": "preprocess", "cpu_count": os.cpu_count(), "python": platform.python_version(),
                   "results": results, "digest_gb_per_s": round(digest_gb_s, 3)}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
