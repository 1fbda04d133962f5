"""megatron_dil checkpoint (any TP/PP layout) → Hugging Face directory that ``AutoModelForCausalLM`` loads.

Each HF tensor is rebuilt from the TP shards (padding rows stripped) one at a time and written into sharded
safetensors; the config is the source ``config.json`` when the checkpoint still matches it, else one generated from
``model_config.yaml``. The output appears only when complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from megatron_dil.convert.checkpoint import MegatronCheckpoint, publish
from megatron_dil.convert.hf_config import ConversionError, hf_config_from_model, model_config_from_hf, same_architecture
from megatron_dil.convert.hf_files import copy_tokenizer, dtype_name, parse_dtype, write_sharded_safetensors
from megatron_dil.convert.sharding import hf_keys, hf_tensor

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def megatron_to_hf(path: str | Path, output_dir: str | Path, dtype: str | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> dict[str, str]:
    """Export the checkpoint at ``path`` to ``output_dir``; returns the HF weight map (tensor → file)."""
    output = Path(output_dir)
    target_dtype = parse_dtype(dtype)
    if output.exists():
        raise ConversionError(f"output directory {output} already exists; remove it or choose another")
    ckpt = MegatronCheckpoint(path)
    ckpt.validate()
    out_dtype = target_dtype or parse_dtype(ckpt.manifest.dtype, f"{path} manifest dtype")
    stored = ckpt.hf_config
    if stored is not None and same_architecture(model_config_from_hf(stored), ckpt.model):
        config = dict(stored)
        config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name(out_dtype)
    else:
        config = hf_config_from_model(ckpt.model, dtype_name(out_dtype))
        if stored is not None:
            config = {**{k: stored[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in stored},
                      **config}
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
        publish(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return weight_map
