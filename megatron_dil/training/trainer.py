"""The DIL training loop: set up, reference log-probs, then step → log → evaluate → checkpoint until done."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dil.config import save_config, to_dict
from megatron_dil.data.collator import PreferenceBatch, PreferenceCollator
from megatron_dil.data.loader import build_dataloader, build_datasets
from megatron_dil.data.tokenizer import load_tokenizer
from megatron_dil.losses import PairLogProbs, PreferenceLoss, build_loss
from megatron_dil.models.config import ModelConfig
from megatron_dil.models.moe import MoEMonitor
from megatron_dil.runtime import distributed as runtime
from megatron_dil.training.builders import build_policy, build_reference, build_scheduler, params_dtype
from megatron_dil.training.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_dil.training.config import RunConfig
from megatron_dil.training.monitor import Monitor, measure_peak_flops, peak_memory_gib, training_flops_per_token
from megatron_dil.training.reference import ReferenceTable, model_identity, reference_table, table_reference
from megatron_dil.training.step import LogProbSetup, MicroBatchResults, compute_logprobs, preference_losses

ReferenceFn = Callable[[int, PreferenceBatch], PairLogProbs | None]


@dataclass
class TrainResult:
    """What a run produced (metrics are filled on the last rank, which holds the last pipeline stage)."""

    history: list[dict[str, float]] = field(default_factory=list)  # per optimizer step: loss metrics + scalars
    evaluations: list[dict[str, float]] = field(default_factory=list)
    state: TrainState = field(default_factory=TrainState)


def resolve_model_config(run: RunConfig) -> ModelConfig:
    """``model:`` for random init, else the architecture stored with ``init.checkpoint``."""
    if run.model is not None:
        return run.model
    from megatron_dil.convert import MegatronCheckpoint

    return MegatronCheckpoint(run.init.checkpoint).model


def _check_compatible(run: RunConfig, model: ModelConfig, tokenizer_vocab: int) -> None:
    if tokenizer_vocab > model.vocab_size:
        raise ValueError(f"tokenizer {run.data.tokenizer} has {tokenizer_vocab} tokens but the model's vocabulary "
                         f"is {model.vocab_size}: wrong tokenizer for this model")
    if run.data.max_length > model.max_position_embeddings:
        raise ValueError(f"data.max_length {run.data.max_length} exceeds the model's max_position_embeddings "
                         f"{model.max_position_embeddings}")
    if run.parallel.context > 1:
        raise ValueError("parallel.context > 1 is not supported by the trainer yet (sequences are not split)")


def _all_reduce(value: float, op: dist.ReduceOp = dist.ReduceOp.SUM, group=None) -> float:
    """A scalar reduced over ``group`` (the world by default), on the device the backend needs."""
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=op, group=group)
    return float(tensor.item())


class Trainer:
    """Holds the run's pieces; ``fit()`` reads top to bottom."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.model_config = resolve_model_config(run)
        self.tokenizer = load_tokenizer(run.data.tokenizer)
        _check_compatible(run, self.model_config, self.tokenizer.vocab_size)
        self.dp_size = runtime.initialize(run.parallel, self.model_config, seed=run.train.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        train = run.train
        if train.global_batch_size % (train.micro_batch_size * self.dp_size):
            raise ValueError(f"train.global_batch_size {train.global_batch_size} pairs is not divisible by "
                             f"micro_batch_size {train.micro_batch_size} × data-parallel size {self.dp_size}")
        self.accumulation = train.global_batch_size // (train.micro_batch_size * self.dp_size)
        if run.parallel.virtual_pipeline and self.accumulation % run.parallel.pipeline:
            raise ValueError(f"the interleaved schedule needs gradient accumulation ({self.accumulation} micro-batches)"
                             f" to be a multiple of parallel.pipeline {run.parallel.pipeline}")
        self.train_set, self.valid_set = build_datasets(run.data, self.tokenizer)
        self.train_iters = train.train_iters or max(1, int(train.epochs * len(self.train_set))
                                                    // train.global_batch_size)
        self.loss: PreferenceLoss = build_loss(run.loss)
        self.setup = LogProbSetup(vocab_size=self.model_config.vocab_size, chunk_size=train.logprob_chunk_size)
        self.policy, self.optimizer = build_policy(self.model_config, run, run.data.max_length)
        self.scheduler = build_scheduler(self.optimizer, train, self.train_iters)
        self.moe = MoEMonitor([c.module for c in self.policy], self.model_config) if self.model_config.is_moe \
            else None
        self.collator = PreferenceCollator(self.tokenizer.pad_id, run.data.pad_to_multiple_of, run.data.packing,
                                           run.data.max_length)
        is_logger = dist.get_rank() == dist.get_world_size() - 1
        self.monitor = Monitor(is_logger, run.output_dir, run.logging.tensorboard, self.train_iters,
                               measure_peak_flops(params_dtype(train)))
        self.reference_model: list | None = None
        self.tables: dict[str, ReferenceTable] = {}

    # ----------------------------------------------------------------------------------------------- reference
    def prepare_reference(self) -> None:
        """Precompute (or reuse) reference log-probs with the initial weights, or build the co-resident copy."""
        if not self.loss.needs_reference:
            return
        if self.run.reference.mode == "model":
            self.reference_model = build_reference(self.model_config, self.run, self.run.data.max_length)
            return
        model_id = model_identity(self.run.init.checkpoint, to_dict(self.model_config), self.run.train.seed)
        for chunk in self.policy:
            chunk.eval()
        for name, dataset in (("train", self.train_set), ("valid", self.valid_set)):
            if dataset is not None:
                self.tables[name] = reference_table(
                    self.policy, dataset, self.collator, self.setup, model_id, str(params_dtype(self.run.train)),
                    self.run.train.micro_batch_size, self.run.reference.recompute, self.device, self.monitor.log)

    def reference_for(self, split: str, batches: list[PreferenceBatch]) -> ReferenceFn:
        if not self.loss.needs_reference:
            return lambda index, batch: None
        if self.reference_model is not None:
            logprobs = compute_logprobs(self.reference_model, batches, self.setup)
            return lambda index, batch: logprobs[index]
        return table_reference(self.tables[split])

    # --------------------------------------------------------------------------------------------------- steps
    def train_step(self, batches: list[PreferenceBatch], state: TrainState
                   ) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step over ``accumulation`` micro-batches; returns the loss metrics (last stage) and the step's
        scalars (lr, grad norm, throughput, ...)."""
        started = time.perf_counter()
        reference = self.reference_for("train", batches)
        for chunk in self.policy:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = preference_losses(self.policy, batches, self.loss, self.setup, reference, forward_only=False)
        step = state.iteration + 1
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if _all_reduce(float(bool(results.nonfinite)), dist.ReduceOp.MAX):
            state.skipped_steps += 1
            detail = "; ".join(results.nonfinite) or "on another rank"
            if self.run.train.nonfinite_loss == "stop":
                raise FloatingPointError(f"step {step}: non-finite loss: {detail} (train.nonfinite_loss=stop)")
            self.monitor.log(f"step {step}: non-finite loss, step skipped ({state.skipped_steps} so far): {detail}")
            grad_norm = float("nan")
        else:
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        seconds = time.perf_counter() - started
        tokens = _all_reduce(sum(b.num_tokens for b in batches), group=parallel_state.get_data_parallel_group())
        padded = max(b.tokens.shape[1] for b in batches)
        metrics = results.metrics.reduce(parallel_state.get_data_parallel_group()) \
            if parallel_state.is_pipeline_last_stage() else {}
        flops = tokens * training_flops_per_token(self.model_config, padded) / seconds
        world = dist.get_world_size()
        scalars = {"lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "loss_scale": float(self.optimizer.get_loss_scale()), "tokens_per_second": tokens / seconds,
                   "pairs_per_second": self.run.train.global_batch_size / seconds, "step_seconds": seconds,
                   "mfu": flops / (self.monitor.peak_flops * world), "memory_gib": peak_memory_gib(),
                   "skipped_steps": float(state.skipped_steps)}
        if self.moe is not None:  # router aux loss and load imbalance: beside the loss metrics, never inside them
            scalars.update(self.moe.collect(len(batches)))
        return metrics, scalars

    def evaluate(self) -> dict[str, float]:
        """Loss metrics on the validation split (capped at ``logging.eval_pairs``), reduced over DP."""
        if self.valid_set is None:
            return {}
        for chunk in self.policy:
            chunk.eval()
        train = self.run.train
        loader = build_dataloader(self.valid_set, self.run.data, self.tokenizer, train.micro_batch_size,
                                  parallel_state.get_data_parallel_rank(), self.dp_size, train=False)
        per_step = train.micro_batch_size * self.dp_size
        limit = len(loader) if self.run.logging.eval_pairs is None else \
            min(len(loader), max(1, self.run.logging.eval_pairs // per_step))
        results = MicroBatchResults()
        batches = (b.to(self.device) for b in islice(loader, limit))
        while window := list(islice(batches, self.accumulation)):
            preference_losses(self.policy, window, self.loss, self.setup, self.reference_for("valid", window),
                              forward_only=True, results=results)
        if not parallel_state.is_pipeline_last_stage():
            return {}
        return results.metrics.reduce(parallel_state.get_data_parallel_group())

    # ----------------------------------------------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        run, result = self.run, TrainResult()
        checkpoints = Path(run.output_dir) / "checkpoints"
        if dist.get_rank() == 0:
            save_config(run, Path(run.output_dir) / "config.yaml")
        self.monitor.log(f"model: {self.model_config.num_parameters() / 1e6:.2f}M parameters | layout TP="
                         f"{run.parallel.tensor} PP={run.parallel.pipeline} DP={self.dp_size}"
                         + (f" EP={run.parallel.expert}" if self.model_config.is_moe else "") + " | micro-batch "
                         f"{run.train.micro_batch_size} pairs ({2 * run.train.micro_batch_size} sequences) × "
                         f"{self.accumulation} accumulation × DP {self.dp_size} = global batch "
                         f"{run.train.global_batch_size} pairs | {self.train_iters} steps | loss {self.loss.name}")
        self.prepare_reference()  # before resuming: the policy still holds the initial (= reference) weights
        state = TrainState()
        latest = latest_checkpoint(checkpoints) if run.checkpoint.resume else None
        if latest is not None:
            state = load_checkpoint(latest, self.policy, self.optimizer, self.scheduler)
            self.monitor.log(f"resumed from {latest} at step {state.iteration} ({state.consumed_samples} pairs seen)"
                             + (" — training already complete: evaluating and exporting only"
                                if state.iteration >= self.train_iters else ""))
        loader = build_dataloader(self.train_set, run.data, self.tokenizer, run.train.micro_batch_size,
                                  parallel_state.get_data_parallel_rank(), self.dp_size,
                                  consumed_samples=state.consumed_samples, train=True)
        batches_iter = iter(loader)
        while state.iteration < self.train_iters:
            batches = [next(batches_iter).to(self.device) for _ in range(self.accumulation)]
            metrics, scalars = self.train_step(batches, state)
            state.iteration += 1
            state.consumed_samples += run.train.global_batch_size
            result.history.append({**metrics, **scalars})
            if state.iteration % run.logging.log_interval == 0 or state.iteration == self.train_iters:
                self.monitor.step(state.iteration, metrics, scalars)
            if run.logging.eval_interval and state.iteration % run.logging.eval_interval == 0 \
                    and state.iteration < self.train_iters:
                self._record_eval(state, result)
            if run.checkpoint.save_interval and state.iteration % run.checkpoint.save_interval == 0 \
                    and state.iteration < self.train_iters:
                save_checkpoint(checkpoints, self.policy, self.optimizer, self.scheduler, state,
                                run.checkpoint.keep_last)
            if run.train.exit_interval and state.iteration % run.train.exit_interval == 0 \
                    and state.iteration < self.train_iters:
                save_checkpoint(checkpoints, self.policy, self.optimizer, self.scheduler, state,
                                run.checkpoint.keep_last)
                self.monitor.log(f"exit_interval: leaving at step {state.iteration}; run again to resume")
                result.state = state
                return result
        self._record_eval(state, result)
        save_checkpoint(checkpoints, self.policy, self.optimizer, self.scheduler, state, run.checkpoint.keep_last)
        self.export()
        result.state = state
        self.monitor.close()
        return result

    def _record_eval(self, state: TrainState, result: TrainResult) -> None:
        metrics = self.evaluate()
        if metrics:
            result.evaluations.append({"step": state.iteration, **metrics})
            self.monitor.log(f"eval @ step {state.iteration}: " + " | ".join(
                f"{k} {metrics[k]:.4g}" for k in ("loss", "rewards/accuracies", "rewards/margins") if k in metrics))
            self.monitor.scalars(state.iteration, {f"eval/{k}": v for k, v in metrics.items()})

    def export(self) -> None:
        """Final weights in the converter's Megatron format (``OUTPUT_DIR/final``) and, if asked, as HF. The initial
        checkpoint's HF config and tokenizer go along, so the export loads exactly like the model that came in."""
        from megatron_dil.convert import MegatronCheckpoint, megatron_to_hf, save_megatron_checkpoint
        from megatron_dil.convert.checkpoint import publish

        init = self.run.init.checkpoint
        hf_config = MegatronCheckpoint(init).hf_config if init else None
        tokenizer_dir = next((str(p) for p in ([Path(init) / "tokenizer"] if init else []) + [Path(self.run.data.tokenizer)]
                              if p.is_dir()), None)
        final = Path(self.run.output_dir) / "final"
        save_megatron_checkpoint([c.module for c in self.policy], final, self.model_config, tokenizer_dir, hf_config,
                                 source="megatron-dil-train")
        if self.run.checkpoint.export_hf and dist.get_rank() == 0:
            target = Path(self.run.checkpoint.export_hf)
            staging = target.with_name(target.name + ".exporting")  # a re-run replaces an older export whole
            shutil.rmtree(staging, ignore_errors=True)
            megatron_to_hf(final, staging, progress=False)
            publish(staging, target)
            print(f"exported Hugging Face model to {target}", flush=True)
        dist.barrier()


def train(run: RunConfig) -> TrainResult:
    """Run one training job (inside torchrun, or as a single process); always tears the process groups down."""
    try:
        return Trainer(run).fit()
    finally:
        runtime.shutdown()

