"""The megatron_dil checkpoint: one directory the trainer loads at its TP size and any PP/VPP split.

    megatron_dil_checkpoint.json   manifest (format version, TP, PP, vocab sizes, dtype, source, shard files, and
                                   ``files``: {relative path: {"size": bytes, "blake2b": hex}} of every other file)
    model_config.yaml              the ModelConfig (to_dict), so no architecture flags are needed
    hf_config.json                 the source HF config.json, when converted from HF (reused on export)
    tokenizer/                     the HF tokenizer files, when the source had them
    shards/tp{TT}_pp{PPP}.safetensors  one per (tp, pp) rank: canonical keys = local-spec names, GLOBAL layer indices
    shards/tp00_experts_l{LLLL}_e{EEEE}.safetensors  MoE: whole experts from global index EEEE on, of layer LLLL

Because layer (and expert) indices are global, a rank finds its layers and experts in whichever file holds them, so
the PP size, the virtual-pipeline split and the expert-parallel size are free at load time; only the TP size (the
slicing of each dense tensor) is fixed.
Directories are written under ``<path>.partial`` and renamed into place when complete; the manifest is written last.

Integrity (format 2): opening a checkpoint checks every recorded file's size and the small files' digests; a shard's
BLAKE2b digest is checked before its first tensor is read, once per process. Format-1 checkpoints (no ``files``) are
read with a warning that they cannot be verified; re-converting one adds the records.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dil.config import ConfigError, from_dict, save_config
from megatron_dil.convert.hf_config import ConversionError
from megatron_dil.convert.hf_files import DTYPES, copy_tokenizer, dtype_name
from megatron_dil.convert.sharding import (EMBEDDING, OUTPUT, TensorParallelLayout, canonical_key, expert_file,
                                           expert_keys, is_expert_key, megatron_keys, megatron_shard_shape)
from megatron_dil.io import file_digest, publish, record_files, verify_file, verify_files
from megatron_dil.models.config import ModelConfig

MANIFEST_NAME = "megatron_dil_checkpoint.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no file records (unverifiable, read with a warning)
RESHARD_HINT = ("reshard it with `megatron-dil-hf-to-megatron --source {path} --output NEW_DIR --tensor-parallel {tp} "
                "--pipeline-parallel P` (a Megatron→Megatron conversion)")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the built model; the message says what differs and how to reshard."""


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"shards/tp{tp_rank:02d}_pp{pp_rank:03d}.safetensors"


@dataclass
class Manifest:
    tensor_parallel: int
    pipeline_parallel: int
    padded_vocab_size: int
    vocab_size: int
    dtype: str
    source: str
    shards: list[str] = field(default_factory=list)
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)  # every file but the manifest: size, blake2b
    reward_normalization: dict[str, Any] | None = None  # reward models: mean/std of r on demonstrations (reward/)
    format_version: int = FORMAT_VERSION
    format: str = "megatron_dil"


def reconvert_hint(source: Any) -> str:
    """What to do about a damaged or unverifiable checkpoint converted from ``source``."""
    return (f"re-convert it: `megatron-dil-hf-to-megatron --source {source or 'SOURCE_MODEL'} --output NEW_DIR`"
            if source is None or not str(source).startswith("megatron-dil-train")
            else "re-create it (it was written by a training run: rerun or resume that run)")


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


_VERIFIED: set[tuple[str, str]] = set()  # (resolved shard path, digest) checked by this process


def read_manifest(path: Path) -> Manifest:
    """The manifest of checkpoint directory ``path``; any problem is a ``ConversionError`` naming the file."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ConversionError(f"{path} is not a megatron_dil checkpoint (no {MANIFEST_NAME})")
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{manifest_path} is not valid JSON ({err}); " + reconvert_hint(None)) from None
    if not isinstance(data, dict) or data.get("format") != "megatron_dil" \
            or data.get("format_version") not in READABLE_VERSIONS:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ConversionError(f"{manifest_path}: unsupported format version {version!r} (this code reads "
                              f"versions {list(READABLE_VERSIONS)})")
    try:
        manifest = from_dict(Manifest, data)
    except ConfigError as err:
        raise ConversionError(f"{manifest_path}: {err} (damaged or edited); "
                              + reconvert_hint(data.get("source"))) from None
    if manifest.format_version < FORMAT_VERSION:
        warnings.warn(f"{path} is a format-{manifest.format_version} megatron_dil checkpoint without file "
                      f"checksums: its files cannot be verified; to add them, convert it again: "
                      f"`megatron-dil-hf-to-megatron --source {path} --output NEW_DIR`", stacklevel=3)
    return manifest


class MegatronCheckpoint:
    """Read-only access to a checkpoint's tensors by (canonical key, TP rank), across its pipeline files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._remedy = reconvert_hint(self.manifest.source)
        shards = set(self.manifest.shards)
        # Sizes of everything (cheap); digests of the small files now, of each shard before its first read.
        verify_files(self.path, {n: r for n, r in self.manifest.files.items() if n not in shards}, "checkpoint",
                     self._remedy)
        verify_files(self.path, {n: r for n, r in self.manifest.files.items() if n in shards}, "checkpoint",
                     self._remedy, check_digest=False)
        self.model = self._model_config()
        self.layout = TensorParallelLayout(self.model, self.manifest.tensor_parallel)
        self._handles: dict[str, Any] = {}
        self._file_of: dict[tuple[str, int], str] = {}
        for name in self.manifest.shards:
            if not (self.path / name).is_file():
                raise ConversionError(f"{self.path / name} is listed in {MANIFEST_NAME} but missing")
            if self.manifest.files and name not in self.manifest.files:
                raise ConversionError(f"{self.path / MANIFEST_NAME}: shard {name} has no size/checksum record; "
                                      + self._remedy)
            tp_rank = int(Path(name).stem.split("_")[0][2:])
            for key in self._open(name).keys():
                self._file_of[(key, tp_rank)] = name

    def _model_config(self) -> ModelConfig:
        path = self.path / "model_config.yaml"
        if not path.is_file():
            raise ConversionError(f"{path} is missing: the checkpoint cannot say its architecture; " + self._remedy)
        try:
            return from_dict(ModelConfig, yaml.safe_load(path.read_text()))
        except (yaml.YAMLError, ConfigError, ValueError, TypeError) as err:
            raise ConversionError(f"{path} is not a valid model config ({err}); " + self._remedy) from None

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.path / name), framework="pt")
            except Exception as err:  # noqa: BLE001 - SafetensorError or OSError: name the file
                raise ConversionError(f"{self.path / name} is not a readable safetensors file ({err}); "
                                      + self._remedy) from None
        return self._handles[name]

    def _verify_shard(self, name: str) -> None:
        """BLAKE2b of shard ``name`` against the manifest, once per process (format 2)."""
        record = self.manifest.files.get(name)
        if record is None:
            return
        key = (str((self.path / name).resolve()), str(record["blake2b"]))
        if key not in _VERIFIED:
            verify_file(self.path / name, record, "checkpoint", self._remedy)
            _VERIFIED.add(key)

    def content_digest(self) -> str:
        """A digest of the weights and architecture: the shards' recorded BLAKE2b digests (computed for format 1)
        and model_config.yaml. Equal for two checkpoints exactly when they hold the same model."""
        digests = {name: self.manifest.files[name]["blake2b"] if name in self.manifest.files
                   else file_digest(self.path / name) for name in sorted(self.manifest.shards)}
        digests["model_config.yaml"] = file_digest(self.path / "model_config.yaml")
        return hashlib.blake2b(json.dumps(digests, sort_keys=True).encode(), digest_size=32).hexdigest()

    @property
    def hf_config(self) -> dict[str, Any] | None:
        path = self.path / "hf_config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConversionError(f"{path} is not valid JSON ({err}); " + self._remedy) from None

    def has(self, key: str, tp_rank: int) -> bool:
        return (key, tp_rank) in self._file_of

    def shape(self, key: str, tp_rank: int) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[(key, tp_rank)]).get_slice(key).get_shape())

    def read(self, key: str, tp_rank: int) -> torch.Tensor:
        if (key, tp_rank) not in self._file_of:
            raise ConversionError(f"{self.path}: tensor {key} of tensor-parallel rank {tp_rank} is in no shard file")
        name = self._file_of[(key, tp_rank)]
        self._verify_shard(name)
        return self._open(name).get_tensor(key)

    def validate(self) -> None:
        """Every tensor the config implies is present on every TP rank with the shape the config implies."""
        for rank in range(self.layout.tensor_parallel):
            for key in megatron_keys(self.model, range(self.model.num_layers), True, True):
                expected = megatron_shard_shape(key, self.layout)
                if not self.has(key, rank):
                    raise ConversionError(f"{self.path}: tensor {key} of tensor-parallel rank {rank} is missing")
                if self.shape(key, rank) != expected:
                    raise ConversionError(f"{self.path / self._file_of[(key, rank)]}: {key} has shape "
                                          f"{list(self.shape(key, rank))} but model_config.yaml implies "
                                          f"{list(expected)} at tensor_parallel={self.layout.tensor_parallel}")
        if self.model.is_moe:  # experts are whole, stored once (under tensor-parallel rank 0)
            for layer in range(self.model.num_layers):
                for key in expert_keys(self.model, layer, range(self.model.num_moe_experts)):
                    if not self.has(key, 0):
                        raise ConversionError(f"{self.path}: expert tensor {key} is missing")
                    if self.shape(key, 0) != megatron_shard_shape(key, self.layout):
                        raise ConversionError(f"{self.path / self._file_of[(key, 0)]}: {key} has shape "
                                              f"{list(self.shape(key, 0))} but model_config.yaml implies "
                                              f"{list(megatron_shard_shape(key, self.layout))}")


def write_metadata(directory: Path, manifest: Manifest, model: ModelConfig, tokenizer_dir: str | Path | None,
                   hf_config: dict[str, Any] | None, shard_records: dict[str, dict] | None = None) -> list[str]:
    """Model config, HF config and tokenizer files into ``directory`` (whose shards are written), then the manifest
    with the size and digest of every file (``shard_records``: those already taken by the ranks that wrote the
    shards); returns the tokenizer file names."""
    save_config(model, directory / "model_config.yaml")
    names = list(manifest.shards) + ["model_config.yaml"]
    if hf_config is not None:
        (directory / "hf_config.json").write_text(json.dumps(hf_config, indent=2))
        names.append("hf_config.json")
    tokenizer = copy_tokenizer(Path(tokenizer_dir), directory / "tokenizer") if tokenizer_dir else []
    names += [f"tokenizer/{name}" for name in tokenizer]
    known = shard_records or {}
    manifest.files = {**record_files(directory, [name for name in names if name not in known]), **known}
    (directory / MANIFEST_NAME).write_text(json.dumps(asdict(manifest), indent=2))
    return tokenizer


def _global_layers(chunk: torch.nn.Module) -> dict[int, int]:
    """Stage-local layer index → global index (Megatron's ``layer_number`` is 1-based and global)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}


def _first_local_expert(chunk: torch.nn.Module) -> int:
    """Global index of this rank's first expert: EP rank × experts per rank (0 for dense models)."""
    from megatron.core import parallel_state

    experts = chunk.config.num_moe_experts
    if not experts:
        return 0
    ep = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (experts // ep)


def _canonical_tensors(chunk: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """The chunk's weights under canonical keys (TE ``_extra_state`` and the tied output layer dropped; experts under
    their global index)."""
    layers, first_expert = _global_layers(chunk), _first_local_expert(chunk)
    out = {}
    for name, tensor in chunk.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
            continue
        key = canonical_key(name, layers, first_expert)
        if tied and key == OUTPUT:
            continue
        out[key] = tensor
    return out


def load_megatron_checkpoint(chunks: list[torch.nn.Module], path: str | Path) -> None:
    """Copy this rank's tensors from the checkpoint at ``path`` into the built model chunks (any PP/VPP/EP split).

    Refuses with ``CheckpointMismatchError`` when the TP size, padded vocabulary or architecture differ from the built
    model; with tied embeddings, a last pipeline stage reads the output layer from the embedding.
    """
    from megatron.core import parallel_state

    ckpt = MegatronCheckpoint(path)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if ckpt.manifest.tensor_parallel != tp:
        raise CheckpointMismatchError(
            f"{path} was written for tensor_parallel={ckpt.manifest.tensor_parallel} but the model is built with "
            f"tensor_parallel={tp}; " + RESHARD_HINT.format(path=path, tp=tp))
    config, model = chunks[0].config, ckpt.model
    built = {"num_layers": config.num_layers, "hidden_size": config.hidden_size,
             "ffn_hidden_size": config.ffn_hidden_size, "num_attention_heads": config.num_attention_heads,
             "num_query_groups": config.num_query_groups, "kv_channels": config.kv_channels,
             "padded_vocab_size": chunks[0].vocab_size, "num_moe_experts": config.num_moe_experts}
    stored = {"num_layers": model.num_layers, "hidden_size": model.hidden_size,
              "ffn_hidden_size": model.ffn_hidden_size, "num_attention_heads": model.num_attention_heads,
              "num_query_groups": model.query_groups, "kv_channels": model.head_dim,
              "padded_vocab_size": ckpt.manifest.padded_vocab_size, "num_moe_experts": model.num_moe_experts}
    for name, value in built.items():
        if stored[name] != value:
            raise CheckpointMismatchError(
                f"{path}: {name}={stored[name]} in the checkpoint but {value} in the built model; build the model "
                f"from the checkpoint's model_config.yaml (padded vocabulary depends on make_vocab_size_divisible_by "
                f"× TP: " + RESHARD_HINT.format(path=path, tp=tp) + ")")
    from megatron_dil.reward.head import built_head

    head = built_head(chunks)
    if model.head == "reward" and head != "reward":
        raise CheckpointMismatchError(f"{path} is a reward model (model_config.yaml head: reward); a policy is "
                                      f"expected here")
    with torch.no_grad():
        for chunk in chunks:
            for key, param in _canonical_tensors(chunk, tied=False).items():
                if key == OUTPUT and head == "reward" and model.head == "lm":
                    continue  # a policy's trunk under a new reward head (drawn at build time)
                source_key = EMBEDDING if key == OUTPUT and model.tie_embeddings and model.head == "lm" else key
                value = ckpt.read(source_key, 0 if is_expert_key(key) else tp_rank)
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointMismatchError(f"{path}: {source_key} (tp rank {tp_rank}) has shape "
                                                  f"{list(value.shape)}, the model expects {list(param.shape)}")
                param.copy_(value)


def save_megatron_checkpoint(chunks: list[torch.nn.Module], path: str | Path, model_cfg: ModelConfig,
                             tokenizer_dir: str | Path | None = None, hf_config: dict[str, Any] | None = None,
                             source: str = "save_megatron_checkpoint",
                             reward_normalization: dict[str, Any] | None = None) -> None:
    """Collective: every (tp, pp) rank of the first data/context-parallel replica writes its shard, and (MoE) every
    expert-parallel rank of the first expert-data-parallel replica its experts, one file per layer; global rank 0
    writes manifest, model config, ``hf_config`` (optional, reused by the HF export) and tokenizer, then renames
    ``<path>.partial`` to ``path``. Each writer hashes the files it wrote (in parallel, not all on rank 0) and rank 0
    gathers their records into the manifest. All ranks of the default group must call it."""
    from megatron.core import parallel_state

    final = Path(path)
    partial = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "shards").mkdir(parents=True)
    dist.barrier()
    tp, pp = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size())
    tensors: dict[str, torch.Tensor] = {}
    written: list[str] = []
    for chunk in chunks:
        tensors.update(_canonical_tensors(chunk, tied=model_cfg.tie_embeddings and model_cfg.head == "lm"))
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        name = shard_file(parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_pipeline_model_parallel_rank())
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items() if not is_expert_key(k)},
                  str(partial / name), metadata={"format": "pt"})
        written.append(name)
    ep = parallel_state.get_expert_model_parallel_world_size()
    per_rank = (model_cfg.num_moe_experts or 0) // ep
    if model_cfg.is_moe and parallel_state.get_expert_data_parallel_rank() == 0:
        first = _first_local_expert(chunks[0])
        for layer in sorted({int(k.split(".")[2]) for k in tensors if is_expert_key(k)}):
            keys = expert_keys(model_cfg, layer, range(first, first + per_rank))
            save_file({k: tensors[k].detach().cpu().contiguous() for k in keys},
                      str(partial / expert_file(layer, first)), metadata={"format": "pt"})
            written.append(expert_file(layer, first))
    records = record_files(partial, written)
    gathered: list[dict[str, dict]] | None = [{} for _ in range(dist.get_world_size())] if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank == 0:
        dtype = next(chunks[0].parameters()).dtype
        manifest = Manifest(tensor_parallel=tp, pipeline_parallel=pp, padded_vocab_size=model_cfg.padded_vocab_size(tp),
                            vocab_size=model_cfg.vocab_size, dtype=dtype_name(dtype), source=source,
                            shards=[shard_file(t, p) for p in range(pp) for t in range(tp)]
                            + [expert_file(layer, r * per_rank) for layer in range(model_cfg.num_layers)
                               for r in range(ep if model_cfg.is_moe else 0)],
                            reward_normalization=reward_normalization)
        write_metadata(partial, manifest, model_cfg, tokenizer_dir, hf_config,
                       shard_records={name: record for part in gathered for name, record in part.items()})
        publish(partial, final)
    dist.barrier()


__all__ = ["CheckpointMismatchError", "DTYPES", "Manifest", "MegatronCheckpoint", "is_megatron_checkpoint",
           "load_megatron_checkpoint", "save_megatron_checkpoint"]
