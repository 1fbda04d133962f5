"""``megatron-dil-generate``: sample completions from a megatron_dil checkpoint at any TP × PP, DP splitting prompts.

    torchrun --nproc_per_node 4 -m megatron_dil.generate --checkpoint runs/tiny_sft/final \\
        --prompts runs/data/tiny_valid --output runs/tiny_sft/samples.jsonl --temperature 0 --max-new-tokens 16

One JSONL row per sample: prompt_index, sample_index, prompt, completion (text), completion_token_ids, logprobs (per
token, under the sampling model, as in training), finish_reason (eos / stop / length).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_dil.runtime.cpu_compat import silence_expected_warnings

silence_expected_warnings()  # before Megatron-Core is imported (it warns at import time)

from megatron_dil.generation.model import GenerationInputError  # noqa: E402
from megatron_dil.generation.sampler import SamplingConfig  # noqa: E402
from megatron_dil.generation.verifier import VERIFIERS  # noqa: E402
from megatron_dil.runtime.errors import report_rank_error  # noqa: E402

PROG = "megatron-dil-generate"


@dataclass
class GenerateConfig:
    checkpoint: str
    prompts: str
    output: str
    tokenizer: str | None = None
    template: str = "auto"
    prompt_column: str = "prompt"
    input_format: str = "auto"
    input_split: str = "train"
    max_prompts: int | None = None
    tensor_parallel: int | None = None  # None: the checkpoint's
    pipeline_parallel: int | None = None  # None: 1 (a training checkpoint's own)
    batch_size: int = 16
    max_new_tokens: int = 256
    n: int = 1
    stop: list[str] = field(default_factory=list)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dtype: str = "auto"
    verifier: str | None = None  # adds a "score" per row and prints the total (e.g. tiny_sort)
    show: int = 0  # samples printed at the end
    overwrite: bool = False
    progress: bool = True


def _stop_ids(tokenizer, stop: list[str]) -> tuple[int, ...]:
    ids = []
    for text in stop:
        encoded = tokenizer.encode(text)
        if len(encoded) != 1:
            raise GenerationInputError(f"--stop {text!r} is {len(encoded)} tokens {encoded}; stop tokens must be "
                                       f"single tokens of the tokenizer")
        ids.append(encoded[0])
    return tuple(ids)


def generation_settings(cfg: GenerateConfig) -> dict:
    """What determines the samples (a resumed run must match it); layout, batch size and output flags do not."""
    settings = asdict(cfg)
    for key in ("output", "overwrite", "progress", "batch_size", "tensor_parallel", "pipeline_parallel", "show"):
        settings.pop(key)
    settings.update(checkpoint=str(Path(cfg.checkpoint).resolve()), prompts=str(Path(cfg.prompts).resolve()))
    return settings


class _Progress:
    """Samples done / total, tokens/s and ETA for this rank's share, at most every ``interval`` seconds."""

    def __init__(self, total: int, enabled: bool, interval: float = 5.0):
        self.total, self.enabled, self.interval = total, enabled, interval
        self.done = self.tokens = 0
        self.started = self.shown = time.monotonic()

    def update(self, samples: int, tokens: int) -> None:
        self.done += samples
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and (now - self.shown >= self.interval or self.done == self.total):
            self.shown = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{PROG}: {self.done}/{self.total} samples | {self.tokens / elapsed:.1f} tokens/s | "
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", file=sys.stderr, flush=True)


def run(cfg: GenerateConfig) -> int:
    """Generate (collective over the world); returns the number of rows in ``cfg.output`` (on every rank).

    Initialises torch.distributed from torchrun's environment unless it already is (then it is left up)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dil.generation import writer
    from megatron_dil.generation.decode import DecodeLimits, DecodeRequest
    from megatron_dil.generation.engine import generate
    from megatron_dil.generation.model import load_weights, resolve_checkpoint, resolve_tokenizer
    from megatron_dil.generation.prompts import load_prompts
    from megatron_dil.generation.verifier import get_verifier
    from megatron_dil.models.builder import build_model
    from megatron_dil.runtime.distributed import ParallelConfig, initialize, shutdown

    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise GenerationInputError(f"--output {output} already exists; remove it or pass --overwrite")
    if cfg.n < 1:
        raise GenerationInputError(f"--num-samples must be >= 1, got {cfg.n}")
    verifier = get_verifier(cfg.verifier) if cfg.verifier else None
    source = resolve_checkpoint(cfg.checkpoint)
    tokenizer = resolve_tokenizer(source, cfg.tokenizer)
    window = source.model.max_position_embeddings
    prompt_set = load_prompts(cfg.prompts, tokenizer, template=cfg.template, column=cfg.prompt_column,
                              input_format=cfg.input_format, split=cfg.input_split, window=window,
                              limit=cfg.max_prompts)
    limits = DecodeLimits(cfg.max_new_tokens, window, (tokenizer.eos_id,), _stop_ids(tokenizer, cfg.stop))
    tp = cfg.tensor_parallel or source.tensor_parallel
    pp = cfg.pipeline_parallel or source.pipeline_parallel or 1
    if tp != source.tensor_parallel:
        raise GenerationInputError(
            f"--tensor-parallel {tp}: {source.path} is stored for tensor parallel {source.tensor_parallel}; reshard it "
            f"with `megatron-dil-hf-to-megatron --source {source.path} --output NEW --tensor-parallel {tp}`")
    if source.pipeline_parallel is not None and pp != source.pipeline_parallel:
        raise GenerationInputError(f"--pipeline-parallel {pp}: training checkpoint {source.path} loads only at "
                                   f"pipeline parallel {source.pipeline_parallel}; use the run's final/ for others")
    owns_process_group = not dist.is_initialized()  # embedded callers (tests, scripts) keep theirs
    dp = initialize(ParallelConfig(tensor=tp, pipeline=pp), source.model, seed=cfg.sampling.seed)
    try:
        rank = dist.get_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        writes = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                  and parallel_state.get_tensor_model_parallel_rank() == 0)
        settings = generation_settings(cfg)
        if rank == 0:
            print(f"{PROG}: {prompt_set.summary()} × {cfg.n} samples | TP={tp} PP={pp} DP={dp} | "
                  f"{source.path}", file=sys.stderr, flush=True)
            writer.prepare(output, settings)
        dist.barrier()
        finished = writer.finished_keys(output)
        todo = [DecodeRequest(p.ids, p.index, s) for p in prompt_set.prompts for s in range(cfg.n)
                if (p.index, s) not in finished]
        todo.sort(key=lambda r: (len(r.prompt), r.prompt_index, r.sample_index))
        mine = todo[dp_rank::dp]
        if rank == 0 and finished:
            print(f"{PROG}: resuming: {len(finished)} samples already written", file=sys.stderr, flush=True)
        dtype = {"auto": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "fp32": torch.float32,
                 "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
        chunks = build_model(source.model, params_dtype=dtype)
        load_weights(chunks, source)
        part = writer.PartWriter(output, dp_rank) if writes else None
        progress = _Progress(len(mine), cfg.progress and writes and dp_rank == 0)
        prompts = {p.index: p for p in prompt_set.prompts}
        eos_or_stop = {tokenizer.eos_id, *limits.stop_ids}

        def on_batch(requests, completions) -> None:
            if part is None:
                return
            rows = []
            for request, completion in zip(requests, completions):
                text_ids = completion.token_ids
                if completion.finish_reason != "length" and text_ids and text_ids[-1] in eos_or_stop:
                    text_ids = text_ids[:-1]
                prompt, text = prompts[request.prompt_index].source, tokenizer.decode(text_ids)
                rows.append({"prompt_index": request.prompt_index, "sample_index": request.sample_index,
                             "prompt": prompt, "completion": text, "completion_token_ids": completion.token_ids,
                             "logprobs": completion.logprobs, "finish_reason": completion.finish_reason})
                if verifier is not None:
                    rows[-1]["score"] = verifier(prompt, text)
            part.write(rows)
            progress.update(len(rows), sum(len(c.token_ids) for c in completions))

        generate(chunks[0], mine, cfg.sampling, limits, source.model.vocab_size, cfg.batch_size, on_batch)
        if part is not None:
            part.close()
        dist.barrier()
        count = torch.zeros(1, dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")  # NCCL: GPU
        failure = None
        if rank == 0:
            try:
                count[0] = writer.finalize(output, len(prompt_set.prompts) * cfg.n)
            except RuntimeError as err:  # every rank must leave, not wait in the broadcast
                failure, count[0] = err, -1
        dist.broadcast(count, src=0)
        if failure is not None or int(count[0]) < 0:
            raise failure or RuntimeError(f"rank 0 could not write {output}")
        if rank == 0:
            print(f"{PROG}: wrote {int(count[0])} samples to {output}", file=sys.stderr, flush=True)
            _report(output, cfg)
        return int(count[0])
    finally:
        if owns_process_group:
            shutdown()
        else:
            parallel_state.destroy_model_parallel()


def _report(output: Path, cfg: GenerateConfig) -> None:
    """The verifier's total and the first ``cfg.show`` samples, on stdout."""
    import json

    if not cfg.verifier and not cfg.show:
        return
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    if cfg.verifier:
        scores = [r["score"] for r in rows if r.get("score") is not None]
        print(f"verifier {cfg.verifier}: {sum(scores):g}/{len(scores)} correct"
              + (f" ({100 * sum(scores) / len(scores):.1f}%)" if scores else ""), flush=True)
    for row in rows[:cfg.show]:
        prompt = row["prompt"][-1]["content"] if isinstance(row["prompt"], list) else row["prompt"]
        score = f"  [{row['score']:g}]" if row.get("score") is not None else ""
        print(f"  {prompt!r} -> {row['completion']!r}{score}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    d = GenerateConfig(checkpoint="", prompts="", output="")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="megatron_dil checkpoint (converted HF model or a run's final/), a run directory, or a run's "
                        "checkpoints/iter_N")
    p.add_argument("--prompts", required=True,
                   help=".jsonl/.json/.parquet file or datasets directory (string or message-list prompts), or an "
                        "indexed preference dataset prefix (its pairs' distinct prompts)")
    p.add_argument("--output", required=True, help="JSONL file of samples (written when complete)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's; must match it)")
    p.add_argument("--template", default=d.template,
                   help="chat template for message-list prompts: auto, tokenizer, chatml, zephyr, llama2, plain")
    p.add_argument("--prompt-column", default=d.prompt_column)
    p.add_argument("--input-format", default=d.input_format, choices=["auto", "jsonl", "json", "parquet", "datasets"])
    p.add_argument("--input-split", default=d.input_split, help="split of a datasets DatasetDict directory")
    p.add_argument("--max-prompts", type=int, help="use only the first N usable prompts")
    p.add_argument("--tensor-parallel", type=int, help="default: the checkpoint's")
    p.add_argument("--pipeline-parallel", type=int, help="default: 1 (a training checkpoint's own)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples decoded together per DP rank")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--num-samples", dest="n", type=int, default=d.n,
                   help="samples per prompt (not --n: torchrun would take it as an abbreviation of its own flags)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="samples depend only on (seed, prompt, sample index)")
    p.add_argument("--stop", nargs="*", default=[], help="extra single-token stop strings (EOS always stops)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--verifier", choices=sorted(VERIFIERS),
                   help="score each sample (adds a score field) and print the total")
    p.add_argument("--show", type=int, default=0, help="print the first N samples at the end")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        sampling = SamplingConfig(temperature=0.0 if args.pop("greedy") else args.pop("temperature"),
                                  top_k=args.pop("top_k"), top_p=args.pop("top_p"), seed=args.pop("seed"))
        args.pop("temperature", None)
        run(GenerateConfig(**args, sampling=sampling))
    except (GenerationInputError, ValueError, FileNotFoundError, RuntimeError) as err:
        return report_rank_error(PROG, err)
    return 0
