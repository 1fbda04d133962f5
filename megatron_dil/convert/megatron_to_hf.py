"""megatron_dil checkpoint (any TP/PP layout) → Hugging Face directory that ``AutoModelForCausalLM`` loads.

Each HF tensor is rebuilt from the TP shards (padding rows stripped) one at a time and written into sharded
safetensors; the config is the source ``config.json`` when the checkpoint still matches it, else one generated from
``model_config.yaml``. Special token ids missing from the config (always, for a run started from a preset) come from
the checkpoint's tokenizer and also go to ``generation_config.json``. The output appears only when complete.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_dil.convert.checkpoint import MegatronCheckpoint
from megatron_dil.convert.hf_config import (ConversionError, hf_config_from_model, model_config_from_hf, same_architecture,
                                            sequence_classification_config)
from megatron_dil.convert.hf_files import (copy_tokenizer, dtype_name, has_tokenizer, parse_dtype,
                                           write_sharded_safetensors)
from megatron_dil.convert.sharding import hf_keys, hf_tensor
from megatron_dil.io import IntegrityError, publish

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad token ids of the checkpoint's tokenizer (none without one)."""
    if not has_tokenizer(tokenizer_dir):
        return {}
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (ValueError, OSError) as err:
        raise ConversionError(f"cannot read the checkpoint's tokenizer {tokenizer_dir}: {err}") from None
    ids = {field: getattr(tok, field) for field in TOKEN_ID_FIELDS}
    return {k: v for k, v in ids.items() if v is not None}


def write_generation_config(path: Path, config: dict) -> None:
    """``generation_config.json`` with the model's special token ids: the source's (copied with the tokenizer) with
    missing ids filled in, or a new one. Without ``eos_token_id`` there, ``generate()`` never stops at EOS."""
    generation = json.loads(path.read_text()) if path.is_file() else {}
    for field in TOKEN_ID_FIELDS:
        if generation.get(field) is None and config.get(field) is not None:
            generation[field] = config[field]
    path.write_text(json.dumps(generation, indent=2))


def megatron_to_hf(path: str | Path, output_dir: str | Path, dtype: str | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                   pad_token_id: int | None = None) -> dict[str, str]:
    """Export the checkpoint at ``path`` to ``output_dir``; returns the HF weight map (tensor → file). A reward model
    (``head: reward``) becomes *ForSequenceClassification (``score.weight``, num_labels 1, ``pad_token_id`` = the
    argument, else the tokenizer's; its normalisation statistics go to ``config.json`` as ``reward_normalization``)."""
    output = Path(output_dir)
    target_dtype = parse_dtype(dtype)
    if output.exists():
        raise ConversionError(f"output directory {output} already exists; remove it or choose another")
    ckpt = MegatronCheckpoint(path)
    ckpt.validate()
    out_dtype = target_dtype or parse_dtype(ckpt.manifest.dtype, f"{path} manifest dtype")
    stored = ckpt.hf_config
    if stored is not None and same_architecture(model_config_from_hf(stored), ckpt.model):
        config = dict(stored)  # verbatim, only the dtype recorded (transformers' default when absent: float32)
        dtype_field = next((f for f in ("dtype", "torch_dtype") if f in config), None)
        if dtype_field or out_dtype != torch.float32:
            config[dtype_field or "dtype"] = dtype_name(out_dtype)
    else:
        config = hf_config_from_model(ckpt.model, dtype_name(out_dtype))
        if stored is not None:
            config = {**{k: stored[k] for k in TOKEN_ID_FIELDS if k in stored}, **config}
    for field, value in special_token_ids(Path(path) / "tokenizer").items():
        if config.get(field) is None:  # e.g. a run started from a preset: no HF config to inherit them from
            config[field] = value
    if ckpt.model.head == "reward":  # *ForSequenceClassification, pooling where training pools
        config = sequence_classification_config(config, config.get("pad_token_id") if pad_token_id is None
                                                else pad_token_id)
        if ckpt.manifest.reward_normalization:
            config["reward_normalization"] = ckpt.manifest.reward_normalization
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        keys = hf_keys(ckpt.model)
        tensors = ((k, hf_tensor(k, ckpt.read, ckpt.layout).to(out_dtype))
                   for k in tqdm(keys, desc="HF tensors", disable=not progress))
        weight_map = write_sharded_safetensors(partial, tensors, max_shard_bytes)
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(Path(path) / "tokenizer", partial)
        write_generation_config(partial / "generation_config.json", config)
        publish(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return weight_map


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-dil-megatron-to-hf",
        description="Export a megatron_dil checkpoint (any TP/PP layout) to a Hugging Face directory: sharded "
                    "safetensors, config.json and the tokenizer, loadable by AutoModelForCausalLM.from_pretrained.",
        epilog="To reshard a checkpoint for another TP size, use megatron-dil-hf-to-megatron --source CHECKPOINT.")
    parser.add_argument("--source", required=True, help="megatron_dil checkpoint directory")
    parser.add_argument("--output", required=True, help="HF directory to create (must not exist)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30,
                        help="largest safetensors file, in GiB (default 5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--pad-token-id", type=int, default=None,
                        help="reward models: the pad_token_id of the *ForSequenceClassification config (default: the "
                             "tokenizer's; it must differ from EOS, where training pools the score)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="SOURCE is a LoRA adapters directory (a run's final/ with lora.final=adapters): write a "
                             "PEFT directory (adapter_config.json + adapter_model.safetensors) for peft.PeftModel")
    parser.add_argument("--base-model", default=None,
                        help="with --adapter-only: base_model_name_or_path recorded in adapter_config.json "
                             "(default: the run's init.checkpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``megatron-dil-megatron-to-hf``."""
    args = build_parser().parse_args(argv)
    if args.adapter_only:
        from megatron_dil.lora.export import export_peft

        try:
            export_peft(args.source, args.output, args.base_model)
        except (ConversionError, IntegrityError) as err:
            print(f"megatron-dil-megatron-to-hf: error: {err}", file=sys.stderr)
            return 1
        print(f"wrote PEFT adapters {args.output}")
        return 0
    try:
        weight_map = megatron_to_hf(args.source, args.output, dtype=args.dtype,
                                    max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.no_progress,
                                    pad_token_id=args.pad_token_id)
    except (ConversionError, IntegrityError) as err:
        print(f"megatron-dil-megatron-to-hf: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {len(weight_map)} tensors in {len(set(weight_map.values()))} safetensors files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
