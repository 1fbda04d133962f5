"""Step bookkeeping (time, throughput, MFU, memory), console progress and TensorBoard scalars; printing and writing
happen on the last rank (which sits on the last pipeline stage), every ``logging.log_interval`` steps and at the last.

MFU = achieved model FLOP/s ÷ peak matmul FLOP/s measured on this device at start-up. Model FLOPs of a training step
(PaLM appendix B): per token 6·N (N = non-embedding parameters + the output layer) plus the attention term
12·L·(heads·head_dim)·S (S = padded sequence length), forward + backward of the policy only.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_dil.data.collator import PreferenceBatch
from megatron_dil.models.config import ModelConfig
from megatron_dil.training.collectives import all_reduce_values


def measure_peak_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Best observed dense matmul FLOP/s (2·n³ per product) on this device in ``dtype``."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def training_flops_per_token(model: ModelConfig, sequence_length: int) -> float:
    """6·N + 12·L·(heads·head_dim)·S FLOPs per trained token (the formula beside the code); N counts the parameters
    a token passes through (for MoE: the router and its top-k experts)."""
    n = model.active_parameters(include_embeddings=False) + model.vocab_size * model.hidden_size
    attention = 12 * model.num_layers * model.num_attention_heads * model.head_dim * sequence_length
    return 6 * n + attention


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Monitor:
    """Prints progress lines and writes TensorBoard scalars (only where ``enabled``, i.e. on the logging rank)."""

    SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "dil/f_chosen", "dil/f_rejected")

    def __init__(self, enabled: bool, output_dir: str, tensorboard: bool, total_steps: int, peak_flops: float,
                 model: ModelConfig, global_batch_size: int, log_interval: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.peak_flops = peak_flops
        self.model, self.global_batch_size, self.log_interval = model, global_batch_size, log_interval
        self.started = self.step_started = time.perf_counter()
        self.eta_from: int | None = None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def start_step(self) -> None:
        self.step_started = time.perf_counter()

    def end_step(self, step: int, batches: list[PreferenceBatch], metrics: dict[str, float],
                 scalars: dict[str, float]) -> dict[str, float]:
        """Collective (DP): ``scalars`` of optimizer step ``step`` plus its time, tokens/s, pairs/s, MFU and peak
        memory; reported at the log cadence. Returns the completed scalars."""
        seconds = time.perf_counter() - self.step_started
        tokens = all_reduce_values([float(sum(b.num_tokens for b in batches))],
                                   group=parallel_state.get_data_parallel_group())[0]
        padded = max(b.tokens.shape[1] for b in batches)
        flops = tokens * training_flops_per_token(self.model, padded) / seconds
        scalars = {**scalars, "tokens_per_second": tokens / seconds,
                   "pairs_per_second": self.global_batch_size / seconds, "step_seconds": seconds,
                   "mfu": flops / (self.peak_flops * torch.distributed.get_world_size()),
                   "memory_gib": peak_memory_gib()}
        if step % self.log_interval == 0 or step == self.total_steps:
            self.report(step, metrics, scalars)
        return scalars

    def report(self, step: int, metrics: dict[str, float], scalars: dict[str, float]) -> None:
        """Print and record optimizer step ``step`` (1-based): loss metrics plus lr, grad norm, throughput, MFU."""
        if not self.enabled:
            return
        if self.eta_from is None:
            self.eta_from, self.started = step - 1, time.perf_counter() - scalars["step_seconds"]
        elapsed = time.perf_counter() - self.started
        eta = elapsed / (step - self.eta_from) * (self.total_steps - step)
        shown = " | ".join(f"{k.split('/')[-1] if k != 'loss' else k} {metrics[k]:.4g}"
                           for k in self.SHOWN if k in metrics)
        self.log(f"step {step}/{self.total_steps} | {shown} | grad {scalars['grad_norm']:.3g} | lr "
                 f"{scalars['lr']:.3g} | {scalars['tokens_per_second']:.0f} tok/s {scalars['pairs_per_second']:.1f} "
                 f"pairs/s | MFU {100 * scalars['mfu']:.2f}% | mem {scalars['memory_gib']:.2f} GiB | ETA "
                 f"{format_seconds(eta)}" + "".join(f" | {label} {scalars[key]:.4g}" for key, label in (
                     ("moe/load_balancing_loss", "router aux"), ("moe/load_imbalance", "expert imbalance"))
                     if key in scalars))
        self.scalars(step, {f"train/{k}": v for k, v in metrics.items()})
        self.scalars(step, {f"train/{k}": v for k, v in scalars.items()})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        """A text entry in TensorBoard (markdown; shown as preformatted text)."""
        if self.writer is not None:
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
