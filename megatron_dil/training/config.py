"""The run config: one YAML file with these sections (``python -m megatron_dil.train --config RUN.yaml k=v ...``).

Batch sizes count preference PAIRS; a micro-batch of N pairs runs 2N sequences (chosen and rejected together).
Gradient accumulation = global_batch_size / (micro_batch_size × data-parallel size).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dil.config import at_least
from megatron_dil.data.config import DataConfig
from megatron_dil.generation.config import GenerationEvalConfig
from megatron_dil.lora.config import LoRAConfig
from megatron_dil.losses.config import LossConfig
from megatron_dil.models.config import ModelConfig
from megatron_dil.reward.config import RewardConfig
from megatron_dil.runtime.distributed import ParallelConfig


@dataclass
class InitConfig:
    """Initial (and reference) weights: a checkpoint from ``megatron-dil-hf-to-megatron``, or random init."""

    checkpoint: str | None = None  # its model_config.yaml defines the architecture; `model:` must then be omitted


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # pairs per micro-batch per DP rank (2× sequences)
    global_batch_size: int = 128  # pairs per optimizer step, over all DP ranks and micro-batches
    train_iters: int | None = None  # optimizer steps; None = `epochs` passes over the train set
    epochs: float = 1.0
    lr: float = 5e-7
    min_lr: float = 0.0
    lr_schedule: str = "cosine"  # cosine | linear | constant (Megatron's OptimizerParamScheduler)
    warmup_fraction: float = 0.1  # of train_iters
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True  # overlap the DP gradient reduction with the backward pass
    recompute_activations: bool = False  # full activation recomputation (GPU option)
    logprob_chunk_size: int | None = 4096  # tokens per chunk of the vocab-parallel log-softmax
    nonfinite_loss: str = "skip"  # skip (drop the step, count it) | stop (raise, naming the step)
    max_consecutive_skips: int = 5  # with `skip`: stop once this many steps in a row were non-finite
    exit_interval: int | None = None  # leave (after a checkpoint) at a multiple of this step: time-limited jobs
    seed: int = 1234

    def __post_init__(self) -> None:
        at_least(self, 1, "micro_batch_size", "global_batch_size", "train_iters", "max_consecutive_skips",
                 "exit_interval", "logprob_chunk_size")
        if self.global_batch_size < self.micro_batch_size:
            raise ValueError(f"global_batch_size must be >= micro_batch_size {self.micro_batch_size}, "
                             f"got {self.global_batch_size}")
        for name in ("epochs", "lr", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        at_least(self, 0.0, "weight_decay", "clip_grad")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be cosine, linear or constant, not {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if self.nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"nonfinite_loss must be skip or stop, not {self.nonfinite_loss!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), not {self.warmup_fraction}")


@dataclass
class ReferenceConfig:
    """Where reference log-probs come from (reference-free losses such as SimPO/CPO/ORPO/SFT use none).

    ``precompute``: one forward pass of the frozen initial weights over the train/valid sets before training, cached
    per dataset under a key of its content, the model's and the precision (``NAME.reference_logps.KEY.npz``, see
    ``training/reference.py``) and reused by later runs and losses; caches of different models coexist; a damaged
    cache is refused. ``model``: a co-resident frozen copy run every step. ``base`` (with ``lora:``): the policy's
    own frozen base with the adapters switched off, run every step — no second copy of the weights.
    """

    mode: str = "precompute"  # precompute | model | base
    recompute: bool = False  # recompute and overwrite the cache (the remedy for a damaged one)
    cache_dir: str | None = None  # where caches go; None = beside each dataset (must then be writable)

    def __post_init__(self) -> None:
        if self.mode not in ("precompute", "model", "base"):
            raise ValueError(f"mode must be precompute, model or base, not {self.mode!r}")


@dataclass
class CheckpointConfig:
    save_interval: int | None = None  # steps between saves; a final save always happens
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints
    export_hf: str | None = None  # write a Hugging Face model directory here at the end

    def __post_init__(self) -> None:
        at_least(self, 1, "save_interval")
        at_least(self, 0, "keep_last")  # 0 keeps every checkpoint


@dataclass
class LoggingConfig:
    log_interval: int = 1
    eval_interval: int | None = None  # steps between validation passes; None = only at the end
    eval_pairs: int | None = None  # cap on validation pairs per pass; None = the whole split
    tensorboard: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "log_interval", "eval_interval", "eval_pairs")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    model: ModelConfig | None = None  # or a preset: `model: {preset: tiny}`; omit when init.checkpoint is set
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generate_eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    lora: LoRAConfig | None = None  # low-rank adapters on a frozen base; absent = full-parameter training
    reward: RewardConfig | None = None  # train a reward model (Bradley–Terry) instead of a policy; see reward/

    def __post_init__(self) -> None:
        if self.reward is not None:
            if self.loss != LossConfig():
                raise ValueError("reward: a reward model trains with the Bradley–Terry loss of the reward: section "
                                 "(margin, center_rewards_coefficient); remove the loss: section")
            if self.lora is not None:
                raise ValueError("reward: lora is not supported for reward models (the new head must train)")
            if self.generate_eval.prompts:
                raise ValueError("reward: generate_eval needs a policy; a reward model does not generate")
        elif self.model is not None and self.model.head == "reward":
            raise ValueError("model.head is reward but the run has no reward: section (it configures the "
                             "Bradley–Terry training of a reward model)")
        if self.reference.mode == "base" and self.lora is None:
            raise ValueError("reference.mode=base needs a `lora:` section (the frozen base is the reference); use "
                             "precompute or model for full-parameter training")
        if self.lora is not None and self.parallel.sequence_parallel:
            raise ValueError("lora does not support parallel.sequence_parallel (the adapters take the full sequence)")
        if self.lora is not None and self.lora.final == "adapters" and self.checkpoint.export_hf:
            raise ValueError("checkpoint.export_hf writes a full model: set lora.final=merged, or export the adapters "
                             "with megatron-dil-megatron-to-hf --adapter-only")
        if self.model is None and self.init.checkpoint is None:
            raise ValueError("set `model` (e.g. model: {preset: tiny}) or `init.checkpoint`")
        if self.model is not None and self.init.checkpoint is not None:
            raise ValueError("`model` and `init.checkpoint` are exclusive: the checkpoint's model_config.yaml is used")
        if self.generate_eval.prompts and self.parallel.virtual_pipeline:
            raise ValueError("generate_eval needs one model chunk per rank: unset parallel.virtual_pipeline (or "
                             "generate_eval.prompts and run megatron-dil-generate on the run's final/ instead)")
        if not self.data.tokenizer and self.init.checkpoint is None:
            raise ValueError("data.tokenizer is required with random init (a Hugging Face tokenizer directory or a "
                             "sentencepiece .model file); with init.checkpoint it defaults to the checkpoint's")
        if not self.output_dir:
            raise ValueError("output_dir is required")
