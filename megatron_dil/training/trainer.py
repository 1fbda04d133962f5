"""The DIL training loop: preflight, set up, reference log-probs, then step → log → periodic components (evaluation,
checkpoint) → exit check until done, then export."""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dil.config import save_config, to_dict
from megatron_dil.data.collator import PreferenceBatch, PreferenceCollator
from megatron_dil.data.loader import build_dataloader
from megatron_dil.lora import base_model, merged
from megatron_dil.losses import PairLogProbs, PreferenceLoss, build_loss
from megatron_dil.models.moe import MoEMonitor
from megatron_dil.runtime import distributed as runtime
from megatron_dil.training.builders import build_policy, build_reference, build_scheduler, params_dtype
from megatron_dil.training.cadence import Periodic
from megatron_dil.training.checkpoint import TrainState, check_finite_weights
from megatron_dil.training.checkpointer import Checkpointer
from megatron_dil.training.config import RunConfig
from megatron_dil.training.monitor import Monitor, measure_peak_flops
from megatron_dil.training.nonfinite import NonFinitePolicy
from megatron_dil.training.preflight import preflight
from megatron_dil.training.reference import ReferenceTable, model_identity, reference_table, table_reference
from megatron_dil.training.signals import ExitSignal
from megatron_dil.reward import BradleyTerryLoss, pair_rewards
from megatron_dil.training.step import (LogProbSetup, MicroBatchResults, compute_logprobs, pair_logprobs,
                                        preference_losses)

ReferenceFn = Callable[[int, PreferenceBatch], PairLogProbs | None]


@dataclass
class TrainResult:
    """What a run produced (metrics are filled on the last rank, which holds the last pipeline stage)."""

    history: list[dict[str, float]] = field(default_factory=list)  # per optimizer step: loss metrics + scalars
    evaluations: list[dict[str, float]] = field(default_factory=list)
    state: TrainState = field(default_factory=TrainState)
    exit_reason: str | None = None  # why the run left before train_iters (exit_interval, a signal)
    generations: list = field(default_factory=list)  # GenerationEvalResult per evaluation by generation


class Trainer:
    """Holds the run's pieces; ``fit()`` reads top to bottom."""

    def __init__(self, run: RunConfig):
        self.run = run
        checked = preflight(run, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group or model
        self.model_config, self.tokenizer, self.plan = checked.model, checked.tokenizer, checked.plan
        self.train_set, self.valid_set = checked.train_set, checked.valid_set
        self.dp_size = runtime.initialize(run.parallel, self.model_config, seed=run.train.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        train = run.train
        self.accumulation, self.train_iters = self.plan.accumulation, self.plan.train_iters
        self.loss: PreferenceLoss | BradleyTerryLoss = BradleyTerryLoss(run.reward) if run.reward is not None \
            else build_loss(run.loss)
        self.inputs = pair_rewards if run.reward is not None else pair_logprobs  # what the loss reads
        self.setup = LogProbSetup(vocab_size=self.model_config.vocab_size, chunk_size=train.logprob_chunk_size)
        self.policy, self.optimizer = build_policy(self.model_config, run, run.data.max_length)
        self.scheduler = build_scheduler(self.optimizer, train, self.train_iters)
        self.moe = MoEMonitor([c.module for c in self.policy], self.model_config) if self.model_config.is_moe \
            else None
        self.collator = PreferenceCollator(self.tokenizer.pad_id, run.data.pad_to_multiple_of, run.data.packing,
                                           run.data.max_length)
        is_logger = dist.get_rank() == dist.get_world_size() - 1
        self.monitor = Monitor(is_logger, run.output_dir, run.logging.tensorboard, self.train_iters,
                               measure_peak_flops(params_dtype(train)), self.model_config, train.global_batch_size,
                               run.logging.log_interval)
        for note in checked.notes:
            self.monitor.log(note)
        self.nonfinite = NonFinitePolicy(train.nonfinite_loss, train.max_consecutive_skips,
                                         check_gradients=params_dtype(train) != torch.float16, log=self.monitor.log)
        self.checkpointer = Checkpointer(run, self.train_iters, self.policy, self.optimizer, self.scheduler,
                                         self.monitor.log)
        self.evaluator = Periodic(run.logging.eval_interval, self.train_iters, self._record_eval)
        self.periodic: list[Periodic] = [self.evaluator, self.checkpointer]  # in this order after each step
        self.generation: Periodic | None = None
        if run.generate_eval.prompts:
            from megatron_dil.generation.evaluator import GenerationEvaluator

            self.generator = GenerationEvaluator(run.generate_eval, self.tokenizer, run.data.max_length,
                                                 self.model_config.vocab_size)
            self.generation = Periodic(run.generate_eval.interval, self.train_iters, self._record_generation)
            self.periodic.insert(1, self.generation)
        self.exit_signal = ExitSignal()
        self.result = TrainResult()
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
        if self.run.reference.mode == "base":
            return  # the policy's frozen base, every step (reference_for)
        model_id = model_identity(self.run.init.checkpoint, to_dict(self.model_config), self.run.train.seed)
        for chunk in self.policy:  # LoRA: B is still zero here, so the adapted policy is the base exactly
            chunk.eval()
        for name, dataset in (("train", self.train_set), ("valid", self.valid_set)):
            if dataset is not None:
                self.tables[name] = reference_table(
                    self.policy, dataset, self.collator, self.setup, model_id, str(params_dtype(self.run.train)),
                    self.run.train.micro_batch_size, self.run.reference, self.device, self.monitor.log)

    def reference_for(self, split: str, batches: list[PreferenceBatch]) -> ReferenceFn:
        if not self.loss.needs_reference:
            return lambda index, batch: None
        if self.run.reference.mode == "base":  # LoRA: the policy with its adapters switched off
            with base_model(self.policy):
                logprobs = compute_logprobs(self.policy, batches, self.setup)
            return lambda index, batch: logprobs[index]
        if self.reference_model is not None:
            logprobs = compute_logprobs(self.reference_model, batches, self.setup)
            return lambda index, batch: logprobs[index]
        return table_reference(self.tables[split])

    # --------------------------------------------------------------------------------------------------- steps
    def train_step(self, batches: list[PreferenceBatch], state: TrainState
                   ) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step over ``accumulation`` micro-batches: zero grads → losses (forward-backward) → non-finite
        policy → optimizer step. Returns the loss metrics (last stage) and the step's lr, grad norm and loss scale."""
        for chunk in self.policy:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = preference_losses(self.policy, batches, self.loss, self.setup, self.reference_for("train", batches),
                                    forward_only=False, inputs=self.inputs)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        grad_norm = None
        if not self.nonfinite.skip_step(state.iteration + 1, state, results.nonfinite, self.policy):
            updated, grad_norm, _ = self.optimizer.step()
            if updated:  # False: fp16 loss-scale overflow, handled by Megatron's scaler
                self.scheduler.step(increment=1)
        metrics = results.metrics.reduce(parallel_state.get_data_parallel_group()) \
            if parallel_state.is_pipeline_last_stage() else {}
        scalars = {"lr": lr, "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                   "loss_scale": float(self.optimizer.get_loss_scale()), "skipped_steps": float(state.skipped_steps)}
        if self.moe is not None:  # router aux loss and load imbalance: beside the loss metrics, never inside them
            scalars.update(self.moe.collect(len(batches)))
        return metrics, scalars

    def evaluate(self) -> dict[str, float]:
        """Loss metrics on the validation split (capped at ``logging.eval_pairs``), reduced over DP."""
        if self.valid_set is None:
            return {}
        for chunk in self.policy:
            chunk.eval()
        loader = build_dataloader(self.valid_set, self.run.data, self.tokenizer, self.run.train.micro_batch_size,
                                  parallel_state.get_data_parallel_rank(), self.dp_size, train=False)
        results = MicroBatchResults()
        batches = (b.to(self.device) for b in islice(loader, self.plan.eval_micro_batches))
        while window := list(islice(batches, self.accumulation)):
            preference_losses(self.policy, window, self.loss, self.setup, self.reference_for("valid", window),
                              forward_only=True, results=results, inputs=self.inputs)
        if not parallel_state.is_pipeline_last_stage():
            return {}
        return results.metrics.reduce(parallel_state.get_data_parallel_group())

    # ----------------------------------------------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        run, result = self.run, self.result
        if dist.get_rank() == 0:
            save_config(run, Path(run.output_dir) / "config.yaml")
        lora = "" if run.lora is None else \
            f" (LoRA rank {run.lora.rank}: {run.lora.num_parameters(self.model_config) / 1e6:.2f}M trainable)"
        self.monitor.log(f"model: {self.model_config.num_parameters() / 1e6:.2f}M parameters{lora} | layout TP="
                         f"{run.parallel.tensor} PP={run.parallel.pipeline} DP={self.dp_size}"
                         + (f" EP={run.parallel.expert}" if self.model_config.is_moe else "")
                         + f" | {self.plan.describe()} | loss {self.loss.name}")
        self.prepare_reference()  # before resuming: the policy still holds the initial (= reference) weights
        state = result.state = self.checkpointer.resume()
        if self.generation is not None and state.iteration == 0:
            self.generation.run(0)  # the starting point the run is measured against
        if state.iteration >= self.train_iters:
            self.monitor.log("training already complete: evaluating and exporting only")
        with self.exit_signal:  # installed before the DataLoader forks its workers, which inherit it
            loader = build_dataloader(self.train_set, run.data, self.tokenizer, run.train.micro_batch_size,
                                      parallel_state.get_data_parallel_rank(), self.dp_size,
                                      consumed_samples=state.consumed_samples, train=True)
            batches_iter = iter(loader)
            while state.iteration < self.train_iters:
                batches = [next(batches_iter).to(self.device) for _ in range(self.accumulation)]
                self.monitor.start_step()
                metrics, scalars = self.train_step(batches, state)
                state.iteration += 1
                state.consumed_samples += run.train.global_batch_size
                scalars = self.monitor.end_step(state.iteration, batches, metrics, scalars)
                result.history.append({**metrics, **scalars})
                for component in self.periodic:
                    component.maybe_run(state.iteration)
                if (reason := self._exit_reason(state.iteration)) is not None:
                    self.checkpointer.run(state.iteration)
                    self.monitor.log(f"{reason}: leaving at step {state.iteration} after saving; run again to resume")
                    result.exit_reason = reason
                    self.monitor.close()
                    return result
        for component in self.periodic:  # a resumed, already complete run: the final evaluation and save
            component.run(state.iteration)
        self.export()
        self.monitor.close()
        return result

    def _exit_reason(self, step: int) -> str | None:
        """Collective: why to leave after ``step`` before ``train_iters`` (a termination signal, exit_interval)."""
        if step >= self.train_iters:
            return None
        if (received := self.exit_signal.any_rank_received()) is not None:
            return f"{received.name} received"
        every = self.run.train.exit_interval
        if every and step % every == 0:
            return "train.exit_interval"
        return None

    def _record_eval(self, step: int) -> None:
        metrics = self.evaluate()
        if metrics:
            self.result.evaluations.append({"step": step, **metrics})
            self.monitor.log(f"eval @ step {step}: " + " | ".join(
                f"{k} {metrics[k]:.4g}" for k in ("loss", "rewards/accuracies", "rewards/margins") if k in metrics))
            self.monitor.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})

    def _record_generation(self, step: int) -> None:
        evaluation = self.generator.run(step, self.policy)
        if evaluation is not None and self.monitor.enabled:
            self.result.generations.append(evaluation)
            self.monitor.log(evaluation.summary())
            if evaluation.score is not None:
                self.monitor.scalars(step, {"generate/score": evaluation.score})
            self.monitor.text(step, "generate/samples", evaluation.summary())

    def reward_normalization(self) -> dict:
        """μ and σ of the trained reward on ``reward.normalize_on`` (else the train set's chosen responses)."""
        from megatron_dil.data.loader import build_datasets
        from megatron_dil.reward.normalize import reward_statistics

        cfg = self.run.reward
        dataset, name = self.train_set, ",".join(self.run.data.train)
        if cfg.normalize_on is not None:
            data = dataclasses.replace(self.run.data, train=[cfg.normalize_on], valid=None)
            dataset, name = build_datasets(data, self.tokenizer)[0], cfg.normalize_on
        stats = reward_statistics(self.policy, dataset, self.run.data, self.tokenizer, self.run.train.micro_batch_size,
                                  self.accumulation, self.device, name, cfg.normalize_max_pairs)
        self.monitor.log(f"reward normalisation on {name}: mean {stats['mean']:.4g} std {stats['std']:.4g} over "
                         f"{stats['count']} responses")
        return stats

    def export(self) -> None:
        """Final weights in the converter's Megatron format (``OUTPUT_DIR/final``) and, if asked, as HF. The initial
        checkpoint's HF config and tokenizer go along, so the export loads exactly like the model that came in."""
        check_finite_weights(self.policy, f"the final weights {Path(self.run.output_dir) / 'final'}")
        from megatron_dil.convert import MegatronCheckpoint, megatron_to_hf, save_megatron_checkpoint
        from megatron_dil.convert.hf_files import has_tokenizer
        from megatron_dil.io import publish

        init = self.run.init.checkpoint
        hf_config = MegatronCheckpoint(init).hf_config if init else None
        tokenizer_dir = next((str(p) for p in ([Path(init) / "tokenizer"] if init else []) + [Path(self.run.data.tokenizer)]
                              if has_tokenizer(p)), None)
        final = Path(self.run.output_dir) / "final"
        lora = self.run.lora
        if lora is not None and lora.final == "adapters":
            from megatron_dil.lora.export import save_adapters

            save_adapters([c.module for c in self.policy], final, self.model_config, lora, init)
        else:
            normalization = self.reward_normalization() if self.run.reward is not None else None
            with merged(self.policy):  # LoRA: W + (α/r)·B·A, a normal checkpoint (no-op without adapters)
                save_megatron_checkpoint([c.module for c in self.policy], final, self.model_config, tokenizer_dir,
                                         hf_config, source="megatron-dil-train",
                                         reward_normalization=normalization)
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

