"""The self-play loop: for k = 0..K−1, generate → pairs → train (+ evaluate), each stage complete-or-absent.

Layout of ``output_dir``::

    iter_K/samples.jsonl        π_k's samples for the demonstration prompts (megatron-dil-generate's writer: a killed
                                run resumes its .partial/ at the next sample)
    iter_K/pairs_train.*        the self-play pair dataset (published last-file-last)
    iter_K/train/               the training run of π_{k+1} (resumes from its checkpoints); final/ = π_{k+1}
    iter_K/eval.json            the iteration's metrics, written atomically last: the iteration is done
    iterate.yaml                the loop's config: a rerun with other settings (but ``iterations``) is refused
    summary.tsv                 one row per iteration

A rerun skips finished stages, so it resumes at the first unfinished stage of the first unfinished iteration. All
ranks of one torchrun take part in every stage (generation and training at the training layout).

Metrics per iteration (eval.json): ``demo_loglik_before/after`` = Σ log π(y|x) / Σ |y| over the held-out
demonstrations under π_k and π_{k+1}; ``reward_accuracy``/``reward_margin`` = the trained loss's implicit-reward
accuracy/margin on this iteration's pairs (the run's evaluation, capped by ``logging.eval_pairs``);
``score_before/after`` = the ``generate_eval`` verifier score of π_k and π_{k+1} when configured (a resumed
training takes π_k's from iteration k−1's ``score_after``).
"""
from __future__ import annotations

import copy
import gc
import json
import os
import sys
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from megatron_dil.config import from_dict, save_config, to_dict
from megatron_dil.data.dataset import PreferenceDataset
from megatron_dil.data.loader import build_dataloader
from megatron_dil.data.tokenizer import load_tokenizer
from megatron_dil.generation.model import resolve_checkpoint
from megatron_dil.io.files import atomic_write_text
from megatron_dil.iterate.config import IterateConfig
from megatron_dil.iterate.pairs import write_selfplay_pairs
from megatron_dil.training.config import RunConfig
from megatron_dil.training.step import compute_logprobs

PROG = "megatron-dil-iterate"
SUMMARY_KEYS = ("pairs", "dropped_equal", "demo_loglik_before", "demo_loglik_after", "reward_accuracy",
                "reward_margin", "score_before", "score_after")


class IterateError(ValueError):
    """Bad input to megatron-dil-iterate (names the file/key and what to do)."""


def iteration_dir(cfg: IterateConfig, k: int) -> Path:
    return Path(cfg.output_dir) / f"iter_{k}"


def iterations_done(cfg: IterateConfig) -> int:
    k = 0
    while (iteration_dir(cfg, k) / "eval.json").is_file():
        k += 1
    return k


def policy_checkpoint(cfg: IterateConfig, k: int) -> str:
    """π_k: the initial checkpoint, or the export of iteration k−1's training."""
    return cfg.init if k == 0 else str(iteration_dir(cfg, k - 1) / "train" / "final")


def check_inputs(cfg: IterateConfig) -> None:
    """Before any process group: π_0, the demonstrations and their tokenizer, and the iterations already done."""
    check_same_config(cfg)
    done = iterations_done(cfg)
    if done > cfg.iterations:
        raise IterateError(f"iterations: {cfg.iterations}, but {cfg.output_dir} already holds {done} finished "
                           f"iterations: set iterations >= {done} or choose a new output_dir")
    source = resolve_checkpoint(cfg.init)
    if source.tokenizer is None:
        raise IterateError(f"init {cfg.init}: the checkpoint carries no tokenizer/ directory")
    tokenizer = load_tokenizer(source.tokenizer)
    for prefix in filter(None, (cfg.demonstrations, cfg.valid_demonstrations)):
        dataset = PreferenceDataset(prefix, tokenizer, verify="idx")  # refuses another tokenizer in one line
        if dataset.kind != "demonstrations":
            raise IterateError(f"{prefix}: a {dataset.kind} dataset; megatron-dil-iterate reads demonstrations "
                               f"(megatron-dil-preprocess --kind demonstrations)")


def check_same_config(cfg: IterateConfig) -> None:
    """A rerun must be the same loop (only ``iterations`` may change): finished stages are reused as they are."""
    saved_path = Path(cfg.output_dir) / "iterate.yaml"
    if not saved_path.is_file():
        return
    saved, current = yaml.safe_load(saved_path.read_text()), to_dict(cfg)
    changed = sorted(k for k in set(saved) | set(current) if k != "iterations" and saved.get(k) != current.get(k))
    if changed:
        raise IterateError(f"{cfg.output_dir} was started with other settings ({', '.join(changed)} differ from "
                           f"{saved_path}); its finished stages would be reused as they are: restore them or choose "
                           f"a new output_dir")


def training_run(cfg: IterateConfig, k: int) -> RunConfig:
    """Iteration k's training config: the ``train:`` template with π_k as init (and reference) and the blended pairs."""
    first = {"previous": max(0, k - 1), "all": 0, "none": k}[cfg.history]
    data = copy.deepcopy(cfg.train)
    data["output_dir"] = str(iteration_dir(cfg, k) / "train")
    data["init"] = {"checkpoint": policy_checkpoint(cfg, k)}
    data.setdefault("loss", {}).setdefault("name", "dil_lsif")
    section = data.setdefault("data", {})
    section["train"] = [str(iteration_dir(cfg, j) / "pairs_train") for j in range(first, k + 1)]
    section["valid"] = str(iteration_dir(cfg, k) / "pairs_train")
    return from_dict(RunConfig, data)


def _log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def generate_config(cfg: IterateConfig, k: int, run: RunConfig):
    """What megatron-dil-generate runs for iteration k (samples of π_k for the demonstration prompts)."""
    from megatron_dil.generation.cli import GenerateConfig

    return GenerateConfig(checkpoint=policy_checkpoint(cfg, k), prompts=cfg.demonstrations,
                          output=str(iteration_dir(cfg, k) / "samples.jsonl"), tensor_parallel=run.parallel.tensor,
                          pipeline_parallel=run.parallel.pipeline, batch_size=cfg.generate_batch_size,
                          max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, progress=False)


def generate_stage(cfg: IterateConfig, k: int, run: RunConfig) -> None:
    from megatron_dil.generation.cli import run as generate

    config = generate_config(cfg, k, run)
    if Path(config.output).is_file():
        return
    _log(f"iteration {k}: generating from {policy_checkpoint(cfg, k)}")
    generate(config)


def pairs_stage(cfg: IterateConfig, k: int, run: RunConfig) -> None:
    prefix = str(iteration_dir(cfg, k) / "pairs")
    if not Path(prefix + "_train.json").is_file() and dist.get_rank() == 0:
        tokenizer = load_tokenizer(resolve_checkpoint(policy_checkpoint(cfg, k)).tokenizer)
        counts = write_selfplay_pairs(
            PreferenceDataset(cfg.demonstrations, tokenizer), iteration_dir(cfg, k) / "samples.jsonl", prefix,
            tokenizer, run.data.max_length,
            {"generator": str(Path(policy_checkpoint(cfg, k)).resolve()), "iteration": k,
             "sampling": asdict(cfg.sampling), "max_new_tokens": cfg.max_new_tokens})
        _log(f"iteration {k}: {counts['pairs_written']} pairs, {counts['dropped_equal']} dropped (sample = "
             f"demonstration), {counts['samples_truncated']} samples truncated")
    dist.barrier()


@torch.no_grad()
def demonstration_loglik(trainer, dataset: PreferenceDataset | None) -> float | None:
    """Σ log π(y|x) / Σ |y| over ``dataset`` (a whole number of DP-sharded micro-batches) with the trainer's current
    weights; collective over the world, the value on last-stage ranks."""
    if dataset is None:
        return None
    mbs, dp = trainer.run.train.micro_batch_size, trainer.dp_size
    steps = len(dataset) // (mbs * dp)
    if steps == 0:
        raise IterateError(f"{dataset.prefix}: {len(dataset)} held-out demonstrations < micro_batch_size × DP "
                           f"= {mbs * dp}")
    for chunk in trainer.policy:
        chunk.eval()
    loader = build_dataloader(dataset, trainer.run.data, trainer.tokenizer, mbs,
                              parallel_state.get_data_parallel_rank(), dp, train=False)
    batches = [b.to(trainer.device) for b in islice(loader, steps)]
    totals = torch.zeros(2, dtype=torch.float64, device=trainer.device)
    for logprobs in compute_logprobs(trainer.policy, batches, trainer.setup):
        totals += torch.stack([logprobs.chosen.sum.double().sum(), logprobs.chosen.count.double().sum()])
    if not parallel_state.is_pipeline_last_stage():
        return None
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return float(totals[0] / totals[1])


def train_stage(cfg: IterateConfig, k: int, run: RunConfig) -> None:
    """Train π_{k+1} in-process (resuming its checkpoints) and write eval.json."""
    from megatron_dil.training.trainer import Trainer

    done = iteration_dir(cfg, k) / "eval.json"
    _log(f"iteration {k}: training {run.loss.name} from {run.init.checkpoint} on {run.data.train}")
    trainer = Trainer(run)
    try:
        valid = None
        if cfg.valid_demonstrations:
            valid = PreferenceDataset(cfg.valid_demonstrations, trainer.tokenizer, verify="idx")
        before = demonstration_loglik(trainer, valid)
        result = trainer.fit()
        if result.exit_reason is not None:
            raise SystemExit(f"{PROG}: training left early ({result.exit_reason}); rerun to resume")
        after = demonstration_loglik(trainer, valid)
        if dist.get_rank() == dist.get_world_size() - 1:
            pairs = json.loads(Path(str(iteration_dir(cfg, k) / "pairs_train.json")).read_text())["counts"]
            last_eval = result.evaluations[-1] if result.evaluations else {}
            scores = [g.score for g in result.generations]
            if result.generations and result.generations[0].step != 0:  # resumed: π_k's score is the last one's
                previous = iteration_dir(cfg, k - 1) / "eval.json"
                scores.insert(0, json.loads(previous.read_text())["score_after"] if k else None)
            metrics = {"iteration": k, "loss": run.loss.name, "pairs": pairs["pairs_written"],
                       "dropped_equal": pairs["dropped_equal"], "demo_loglik_before": before,
                       "demo_loglik_after": after, "reward_accuracy": last_eval.get("rewards/accuracies"),
                       "reward_margin": last_eval.get("rewards/margins"),
                       "score_before": scores[0] if scores else None, "score_after": scores[-1] if scores else None,
                       "samples": [s for g in result.generations[-1:] for s in g.samples]}
            atomic_write_text(done, json.dumps(metrics, indent=1))
        dist.barrier()
    finally:
        del trainer
        gc.collect()
        parallel_state.destroy_model_parallel()


def summary_table(cfg: IterateConfig) -> str:
    rows = [json.loads((iteration_dir(cfg, k) / "eval.json").read_text()) for k in range(iterations_done(cfg))]
    fmt = (lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
    lines = ["\t".join(("iteration",) + SUMMARY_KEYS)]
    lines += ["\t".join([str(r["iteration"])] + [fmt(r[key]) for key in SUMMARY_KEYS]) for r in rows]
    return "\n".join(lines)


def write_report(cfg: IterateConfig) -> str:
    """summary.tsv and TensorBoard scalars ``iterate/*`` (step = iteration + 1, the policy π_{k+1})."""
    table = summary_table(cfg)
    atomic_write_text(Path(cfg.output_dir) / "summary.tsv", table + "\n")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"))
    for k in range(iterations_done(cfg)):
        metrics = json.loads((iteration_dir(cfg, k) / "eval.json").read_text())
        for key in SUMMARY_KEYS:
            if metrics[key] is not None:
                writer.add_scalar(f"iterate/{key}", metrics[key], k + 1)
    writer.close()
    return table


def iterate(cfg: IterateConfig) -> str:
    """Run (or resume) the loop on every rank of this torchrun; returns the summary table."""
    from megatron_dil.runtime.distributed import initialize, shutdown

    check_inputs(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":
        save_config(cfg, Path(cfg.output_dir) / "iterate.yaml")
    first_run = training_run(cfg, 0)
    initialize(first_run.parallel, seed=first_run.train.seed)  # the world's process group, kept across stages
    parallel_state.destroy_model_parallel()  # each stage builds its own model-parallel groups
    try:
        start = iterations_done(cfg)
        if start:
            _log(f"resuming at iteration {start} ({start} of {cfg.iterations} done)")
        for k in range(start, cfg.iterations):
            iteration_dir(cfg, k).mkdir(parents=True, exist_ok=True)
            run = training_run(cfg, k)
            generate_stage(cfg, k, run)
            pairs_stage(cfg, k, run)
            train_stage(cfg, k, run)
        table = write_report(cfg) if dist.get_rank() == 0 else summary_table(cfg)
        dist.barrier()
        return table
    finally:
        shutdown()
