"""Run the real Megatron-Core code paths on CPU (gloo), for tests and the quick start.

Megatron-Core assumes CUDA in a handful of places that are not about the math. ``install()`` bridges exactly those,
and only when CUDA is unavailable: with a GPU it returns without touching anything, so the product runs the stock
fast path (TE spec, NCCL, fused kernels).

What is covered, and where Megatron-Core (0.16) needs it:

| Megatron-Core call                                   | where                                   | CPU bridge                |
|------------------------------------------------------|-----------------------------------------|---------------------------|
| ``torch.cuda.current_device()``                      | layer init, DDP buffers, optimizer      | returns 0, mapped to CPU  |
| factory kwargs ``device="cuda"`` / ``device=0``      | ``pipeline_parallel/schedules.py``, DDP | rewritten to ``cpu``      |
| ``Tensor.cuda()`` / ``.to("cuda")``                  | schedules, optimizer, clip_grads        | stays on CPU              |
| ``torch.cuda.synchronize()`` / streams / events      | ``p2p_communication.py``, timers        | no-ops                    |
| CUDA RNG tracker ``get_cuda_rng_tracker().fork()``   | tensor-parallel init, dropout           | CPU generator states      |
| ``param.type() == 'torch.cuda.FloatTensor'`` checks  | ``optimizer/optimizer.py``, clip_grads  | reports the CUDA name     |
| factory calls inside ``autograd.Function.backward``  | tensor-parallel mappings, MoE (all      | the mode re-entered around|
|   (the autograd engine runs them with an empty mode  |   custom backward code)                 |   custom backward nodes   |
|   stack)                                             |                                         |                           |
| ``te_general_gemm`` (TE-only name)                   | ``moe/moe_utils.py`` router GEMM        | set to None (torch GEMM)  |
| ``stream.record_event()``                            | ``moe/token_dispatcher.py`` (alltoall)  | returns a no-op event     |
| split sizes via ``maybe_move_tensor_to_cpu``         | alltoall dispatcher: only CUDA tensors  | CPU tensors → NumPy, as   |
|   (``as_numpy=True``)                                |   are converted, gloo needs sizes       |   the GPU path gives      |

Factory-call rewriting uses a ``torch.overrides.TorchFunctionMode`` pushed for the process (thread-local in torch; the
trainer runs single-threaded). Everything here is idempotent.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``0``, ``torch.device("cuda")``) to CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA placements to CPU and report CUDA tensor type names, leaving the computation untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return torch.Tensor.type(args[0]).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for ``torch.cuda.Stream``: work on CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return _Event()


class _Event:
    """Stand-in for ``torch.cuda.Event``: already complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _patch_rng_tracker() -> None:
    """Back Megatron's CUDA RNG tracker with CPU generator states (same seeds and fork semantics)."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_custom_backward(mode: TorchFunctionMode) -> None:
    """Run custom autograd backward code under ``mode`` too: the engine calls it with an empty mode stack."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        if torch._C._len_torch_function_stack():
            return original(self, *args)
        with mode:
            return original(self, *args)

    BackwardCFunction.apply = apply


def _patch_moe() -> None:
    """Megatron-Core's MoE code paths that name CUDA-only objects (see the table above)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def install() -> bool:
    """Install the CPU bridge when CUDA is unavailable; return whether it is active. No-op with a GPU."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Event
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.default_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.set_device = lambda *args, **kwargs: None
    _patch_rng_tracker()
    _patch_moe()
    mode = _CudaToCpuMode()
    _patch_custom_backward(mode)
    mode.__enter__()
    _installed = True
    return True


_EXPECTED_ON_CPU = (
    r".*Transformer Engine and Apex are not installed",  # Megatron-Core's import-time notices
    r"Apex is not installed",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",  # called by Megatron DDP
    r"The \.grad attribute of a Tensor that is not a leaf",  # Megatron reads main_grad views' .grad
    r"full scope is deprecated",  # TransformerConfig default cuda_graph_scope
    r"When using async grad allreduce",  # CUDA_DEVICE_MAX_CONNECTIONS advice for GPUs
)


def silence_expected_warnings() -> None:
    """Hide the warnings every CPU run prints by design (TE/apex absent, Megatron's own deprecations), so the
    console shows the run; call before importing Megatron-Core. With CUDA nothing is hidden."""
    if torch.cuda.is_available():
        return
    import warnings

    for pattern in _EXPECTED_ON_CPU:
        warnings.filterwarnings("ignore", message=pattern)


def is_active() -> bool:
    return _installed
