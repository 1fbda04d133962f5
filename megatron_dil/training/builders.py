"""Build the policy (Megatron DDP chunks), its optimizer and LR schedule, and the frozen reference."""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_dil.models.builder import build_model
from megatron_dil.models.config import ModelConfig
from megatron_dil.training.config import RunConfig, TrainConfig


def params_dtype(train: TrainConfig) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU."""
    precision = train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_initial_weights(chunks: list[GPTModel], run: RunConfig) -> None:
    """Initial weights from ``init.checkpoint`` (a converted HF model); random init (seeded) otherwise."""
    if run.init.checkpoint is not None:
        from megatron_dil.convert import load_megatron_checkpoint

        load_megatron_checkpoint(chunks, run.init.checkpoint)


def build_policy(model: ModelConfig, run: RunConfig, max_sequence_length: int
                 ) -> tuple[list[DistributedDataParallel], MegatronOptimizer]:
    """Policy chunks with initial weights (and LoRA adapters, the base frozen, with ``lora:``), wrapped in Megatron
    DDP, and the (distributed) AdamW optimizer over the trainable parameters.

    With MoE, DDP keeps dense and expert parameters in separate buffers (dense grads reduced over DP, expert grads over
    the expert-data-parallel group) and the optimizer is Megatron's chain of a dense and an expert optimizer.

    Gradients are normalised by the global number of pairs: the loss function returns Σ per-pair losses and the pair
    count, ``calculate_per_token_loss`` makes the schedule sum (not average) over micro-batches and DP ranks, and
    ``finalize_model_grads`` divides by the all-reduced count — exact even when micro-batches hold different counts.
    """
    train = run.train
    dtype = params_dtype(train)
    chunks = build_model(model, params_dtype=dtype, sequence_parallel=run.parallel.sequence_parallel,
                         recompute=train.recompute_activations, max_sequence_length=max_sequence_length,
                         moe_dispatcher=run.parallel.expert_dispatcher, local_spec=run.lora is not None,
                         head_seed=train.seed, head_std=run.reward.head_init_std if run.reward else None)
    load_initial_weights(chunks, run)
    if run.lora is not None:  # before the DDP wrap: only the adapters get gradient buffers and optimizer state
        from megatron_dil.lora import apply_lora

        apply_lora(chunks, run.lora, train.seed)
    config = chunks[0].config
    config.calculate_per_token_loss = True  # read by DDP's constructor: gradients summed over DP, not averaged
    if model.is_moe:
        # Megatron adds each micro-batch's router loss gradient (coefficient included) before finalize_model_grads
        # divides every gradient by the global pair count N = micro_batch_size · micro-batches · DP. Scaling the
        # coefficients by micro_batch_size makes the router losses enter as coeff × (their mean over micro-batches
        # and DP ranks), Megatron's convention; the logged values are divided by the coefficient and stay unscaled.
        config.moe_aux_loss_coeff = model.moe_aux_loss_coeff * train.micro_batch_size
        if model.moe_z_loss_coeff:
            config.moe_z_loss_coeff = model.moe_z_loss_coeff * train.micro_batch_size
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=train.overlap_grad_reduce,
        use_distributed_optimizer=train.distributed_optimizer, check_for_nan_in_grad=False)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=index > 0)
               for index, chunk in enumerate(chunks)]
    no_sync = [w.no_sync for w in wrapped]
    config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    if train.overlap_grad_reduce:
        grad_sync = [w.start_grad_sync for w in wrapped]
        config.grad_sync_func = grad_sync if len(grad_sync) > 1 else grad_sync[0]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
            clip_grad=train.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            params_dtype=dtype, use_distributed_optimizer=train.distributed_optimizer),
        wrapped)
    return wrapped, optimizer


def build_scheduler(optimizer: MegatronOptimizer, train: TrainConfig, train_iters: int) -> OptimizerParamScheduler:
    """Megatron's LR schedule in optimizer steps: linear warmup over ``warmup_fraction``, then cosine/linear/constant
    decay from ``lr`` to ``min_lr`` at the last step."""
    warmup = int(train.warmup_fraction * train_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else train.lr, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(train_iters, warmup + 1), lr_decay_style=train.lr_schedule,
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=max(train_iters, 1),
        wd_incr_style="constant")


def build_reference(model: ModelConfig, run: RunConfig, max_sequence_length: int) -> list[GPTModel]:
    """A frozen copy of the initial weights (co-resident reference mode): same seed, same checkpoint."""
    from megatron_dil.runtime.distributed import seed_everything

    seed_everything(run.train.seed)  # the policy was built right after seeding with the same seed
    chunks = build_model(model, params_dtype=params_dtype(run.train), max_sequence_length=max_sequence_length,
                         moe_dispatcher=run.parallel.expert_dispatcher)
    load_initial_weights(chunks, run)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks
