"""HF (or megatron_dil) checkpoint → megatron_dil checkpoint at a chosen TP/PP layout, single process, streaming.

Each (tp, pp) shard file is built in turn from slices read straight out of the source files, so the host holds at
most one shard's tensors (≈ model size / (TP·PP)) plus the slice being read. Everything is validated — architecture,
shard files, every tensor's presence and shape, dtype, TP/PP divisibility — before the first byte is written; the
output appears only when complete (``<output>.partial`` renamed).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_dil.convert.checkpoint import (Manifest, MegatronCheckpoint, is_megatron_checkpoint, shard_file,
                                             write_metadata)
from megatron_dil.convert.hf_config import ConversionError, model_config_from_hf, read_hf_config
from megatron_dil.convert.hf_files import HFWeights, dtype_name, parse_dtype
from megatron_dil.convert.sharding import (TensorParallelLayout, expert_file, expert_keys, hf_shapes, hf_tensor,
                                           megatron_keys, megatron_shard, moe_names, validate_pipeline)
from megatron_dil.io import IntegrityError, publish


@dataclass
class ConversionSummary:
    output_dir: str
    tensor_parallel: int
    pipeline_parallel: int
    padded_vocab_size: int
    vocab_size: int
    dtype: str
    files: int
    tensors: int
    bytes_written: int
    tokenizer_files: list[str]

    def __str__(self) -> str:
        return (f"wrote {self.output_dir}: {self.files} shard files (TP={self.tensor_parallel}, "
                f"PP={self.pipeline_parallel}), {self.tensors} tensors, {self.bytes_written / 2**20:.1f} MiB "
                f"{self.dtype}; vocab {self.vocab_size} padded to {self.padded_vocab_size}; tokenizer: "
                f"{', '.join(self.tokenizer_files) or 'none found'}")


class _MegatronAsHF:
    """A megatron_dil checkpoint seen through HF tensor names (full tensors merged from its TP shards)."""

    def __init__(self, ckpt: MegatronCheckpoint):
        self.ckpt = ckpt
        self._cached: tuple[str, torch.Tensor] | None = None

    def read(self, key: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, hf_tensor(key, self.ckpt.read, self.ckpt.layout))
        full = self._cached[1]
        return full[start:stop] if dim == 0 else full[:, start:stop]


def _check_hf_weights(weights: HFWeights, expected: dict[str, tuple[int, ...]], tied: bool) -> torch.dtype:
    """Every expected tensor present with its shape, nothing unexpected, one float dtype; returns that dtype."""
    present = set(weights.keys())
    for key, shape in expected.items():
        if key not in present:
            raise ConversionError(f"{weights.dir}: tensor {key} is missing from the checkpoint")
        if weights.shape(key) != shape:
            raise ConversionError(f"{weights.dir}: tensor {key} has shape {list(weights.shape(key))} but config.json "
                                  f"implies {list(shape)}")
    unexpected = sorted(present - set(expected) - ({"lm_head.weight"} if tied else set()))
    if unexpected:
        raise ConversionError(f"{weights.dir}: tensor {unexpected[0]} is not part of a supported model "
                              f"({len(unexpected)} unexpected tensors)")
    dtypes = {weights.dtype(k) for k in expected}
    if len(dtypes) != 1:
        raise ConversionError(f"{weights.dir}: tensors have mixed dtypes {sorted(map(str, dtypes))}; pass dtype")
    return dtypes.pop()


def hf_to_megatron(hf_dir: str | Path, output_dir: str | Path, tensor_parallel: int, pipeline_parallel: int,
                   dtype: str | None = None, make_vocab_size_divisible_by: int | None = None,
                   progress: bool = True) -> ConversionSummary:
    """Convert a HF Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE/Mixtral directory — or reshard a megatron_dil checkpoint —
    to ``output_dir``.

    ``dtype`` (float32/bfloat16/float16) casts the weights; None keeps the source dtype. Raises ``ConversionError``
    before writing anything when the input or request is invalid.
    """
    source, output = Path(hf_dir), Path(output_dir)
    target_dtype = parse_dtype(dtype)
    if output.exists():
        raise ConversionError(f"output directory {output} already exists; remove it or choose another")
    if is_megatron_checkpoint(source):
        ckpt = MegatronCheckpoint(source)
        ckpt.validate()
        model, hf_config, tokenizer_dir = ckpt.model, ckpt.hf_config, source / "tokenizer"
        if make_vocab_size_divisible_by is not None:
            model = type(model)(**{**model.__dict__, "make_vocab_size_divisible_by": make_vocab_size_divisible_by})
        reader, source_dtype, closer = _MegatronAsHF(ckpt), parse_dtype(ckpt.manifest.dtype), None
        normalization = ckpt.manifest.reward_normalization
        fused = False
    else:
        hf_config = read_hf_config(source)
        try:
            model = model_config_from_hf(hf_config, make_vocab_size_divisible_by or 128)
        except ConversionError as err:  # its messages start with "config.json": name the file in full
            raise ConversionError(f"{source}/{err}") from None
        weights = HFWeights(source)
        fused = model.is_moe and any(k.endswith(moe_names(model).fused_gate_up) for k in weights.keys())
        source_dtype = _check_hf_weights(weights, hf_shapes(model, fused), model.tie_embeddings)
        reader, tokenizer_dir, closer = weights, source, weights
        normalization = hf_config.get("reward_normalization") if model.head == "reward" else None
    layout = TensorParallelLayout(model, tensor_parallel, hf_fused_experts=fused)
    validate_pipeline(model, pipeline_parallel)
    out_dtype = target_dtype or source_dtype
    per_stage = model.num_layers // pipeline_parallel
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "shards").mkdir(parents=True)
    tensors = bytes_written = 0
    try:
        ranks = [(t, p) for p in range(pipeline_parallel) for t in range(tensor_parallel)]
        # TP-sharded files, one per (tp, pp) rank; then MoE experts whole, one file per layer (a layer's experts are
        # the largest unit held in memory)
        files = [(shard_file(t, p), megatron_keys(model, range(p * per_stage, (p + 1) * per_stage), p == 0,
                                                  p == pipeline_parallel - 1), t) for t, p in ranks]
        if model.is_moe:
            files += [(expert_file(layer, 0), expert_keys(model, layer, range(model.num_moe_experts)), 0)
                      for layer in range(model.num_layers)]
        for name, keys, tp_rank in tqdm(files, desc="shard files", disable=not progress):
            shard = {k: megatron_shard(k, reader.read, layout, tp_rank).to(out_dtype).contiguous() for k in keys}
            save_file(shard, str(partial / name), metadata={"format": "pt"})
            tensors += len(shard)
            bytes_written += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
        manifest = Manifest(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                            padded_vocab_size=layout.padded_vocab, vocab_size=model.vocab_size,
                            dtype=dtype_name(out_dtype), source=str(source.resolve()),
                            shards=[name for name, _, _ in files], reward_normalization=normalization)
        tokenizer_files = write_metadata(partial, manifest, model,
                                         tokenizer_dir if tokenizer_dir.is_dir() else None, hf_config)
        publish(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if closer is not None:
            closer.__exit__(None, None, None)
    return ConversionSummary(str(output), tensor_parallel, pipeline_parallel, layout.padded_vocab, model.vocab_size,
                             dtype_name(out_dtype), len(files), tensors, bytes_written, tokenizer_files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dil-hf-to-megatron",
        description="Convert a Hugging Face Llama-2/3, Mistral, Qwen2, Qwen3, Qwen3-MoE or Mixtral directory "
                    "(safetensors, sharded or not, or "
                    "pytorch_model.bin) into a megatron_dil checkpoint at the given tensor/pipeline-parallel sizes.",
        epilog="Resharding: pass an existing megatron_dil checkpoint as --source to rewrite it at another layout "
               "(e.g. --source ckpt_tp2 --output ckpt_tp4 --tensor-parallel 4). Only the TP size is fixed at load "
               "time: shards hold global layer indices, so the trainer loads any checkpoint at any PP/VPP split.",
    )
    parser.add_argument("--source", required=True, help="HF model directory, or a megatron_dil checkpoint to reshard")
    parser.add_argument("--output", required=True, help="checkpoint directory to create (must not exist)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="TP size the trainer will use (default 1)")
    parser.add_argument("--pipeline-parallel", type=int, default=1,
                        help="PP split of the shard files (default 1; any PP loads any split)")
    parser.add_argument("--dtype", default=None, help="cast weights to float32, bfloat16 or float16 (default: keep)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="vocab padding divisor (padded to a multiple of this × TP; default 128)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``megatron-dil-hf-to-megatron``."""
    args = build_parser().parse_args(argv)
    try:
        summary = hf_to_megatron(args.source, args.output, args.tensor_parallel, args.pipeline_parallel,
                                 dtype=args.dtype, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                 progress=not args.no_progress)
    except (ConversionError, IntegrityError) as err:
        print(f"megatron-dil-hf-to-megatron: error: {err}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
