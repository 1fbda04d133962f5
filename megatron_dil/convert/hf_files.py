"""Reading a Hugging Face weight directory lazily, and writing one (sharded safetensors + index).

``HFWeights`` opens ``model.safetensors``, a sharded ``model.safetensors.index.json`` set, or ``pytorch_model.bin``
(+ its index) and reads tensors — or just a slice along one dimension — without loading the rest: safetensors through
``safe_open(...).get_slice``, ``.bin`` through ``torch.load(mmap=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dil.convert.hf_config import ConversionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")  # the last: kept with the tokenizer, for export
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old Llama checkpoints saved


def parse_dtype(name: str | None, flag: str = "dtype") -> torch.dtype | None:
    """``None`` or one of ``DTYPES``; anything else is a clear error naming ``flag``."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"{flag}={name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(n for n, d in DTYPES.items() if d == dtype)


class HFWeights:
    """Lazy, read-only view of a HF checkpoint's tensors. Use as a context manager (it holds files open)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._stack = ExitStack()
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._index_files()

    def _index_files(self) -> None:
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.dir / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                    raise ConversionError(f"{index} is not a valid weight index (no readable 'weight_map': "
                                          f"{type(err).__name__}: {err}); re-download it") from None
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (self.dir / f).is_file()]
                if missing:
                    raise ConversionError(f"{index} lists {missing[0]} (of {len(files)} shard files), which does not "
                                          f"exist in {self.dir}")
                self._file_of = {k: self.dir / f for k, f in weight_map.items()}
                return
            if (self.dir / single).is_file():
                self._file_of = {k: self.dir / single for k in self._open(self.dir / single).keys()}
                return
        raise ConversionError(f"{self.dir} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                              f"or pytorch_model.bin.index.json")

    def _open(self, path: Path):
        if path not in self._handles:
            if path.suffix == ".safetensors":
                try:
                    self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
                except Exception as err:  # noqa: BLE001 - SafetensorError (truncated, not safetensors) or OSError
                    raise ConversionError(f"{path} is not a readable safetensors file ({err}): damaged or "
                                          f"truncated; re-download it") from None
            else:
                try:
                    self._handles[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as err:  # noqa: BLE001 - any unpickling failure: name the file
                    raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({err}): damaged or "
                                          f"truncated; re-download it") from None
        return self._handles[path]

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._stack.close()

    def keys(self) -> list[str]:
        return [k for k in self._file_of if not k.endswith(IGNORED_SUFFIXES)]

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._open(self._file_of[key])
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        handle = self._open(self._file_of[key])
        if isinstance(handle, dict):
            return handle[key].dtype
        code = handle.get_slice(key).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {key} in {self._file_of[key]} has dtype {code}; expected a float type")
        return SAFETENSORS_DTYPES[code]

    def read(self, key: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``key``, or its ``[start, stop)`` slice along ``dim`` (0 or 1), reading only that slice."""
        handle = self._open(self._file_of[key])
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        if isinstance(handle, dict):
            return handle[key][index].clone()
        return handle.get_slice(key)[index]


def has_tokenizer(path: str | Path) -> bool:
    """``path`` holds tokenizer files (a checkpoint's ``tokenizer/`` may hold only the kept ``generation_config.json``)."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES if name != "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` into ``dst``; return their names."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(src / name, dst / name)
    return names


def write_sharded_safetensors(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                              max_shard_bytes: int) -> dict[str, str]:
    """Write (name, tensor) pairs, in order, into ``model-XXXXX-of-YYYYY.safetensors`` files of at most
    ``max_shard_bytes`` each (one file = ``model.safetensors``), plus the index when sharded. Only one shard's
    tensors are held at a time. Returns the weight map."""
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = 0
    weight_map: dict[str, str] = {}

    def flush() -> None:
        name = f"part-{len(shards):05d}.safetensors"
        save_file(current, str(out_dir / name), metadata={"format": "pt"})
        shards.append(list(current))
        current.clear()

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
            current_bytes = 0
        current[key] = tensor.contiguous()
        current_bytes += nbytes
        total_bytes += nbytes
    if current:
        flush()
    if len(shards) == 1:
        os.replace(out_dir / "part-00000.safetensors", out_dir / "model.safetensors")
        return {k: "model.safetensors" for k in shards[0]}
    for i, keys in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out_dir / f"part-{i:05d}.safetensors", out_dir / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map
