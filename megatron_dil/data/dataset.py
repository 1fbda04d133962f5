"""Reading preprocessed preference datasets: one prefix, or a weighted blend of several.

A prefix (format: :mod:`megatron_dil.data.writer`) is opened only once it is shown to be what the preprocessor wrote:
its metadata JSON exists (written last) and is well-formed; the ``.idx`` matches its recorded size and BLAKE2b digest
(always: it is small); the ``.bin`` matches its recorded size and, with ``verify="full"`` (the default), its digest;
the index is internally consistent (three sequences per pair, contiguous pointers ending at the end of ``.bin``); and,
given the run's tokenizer, the dataset was written with that vocabulary and every stored token id is below its size.
Anything else is refused with one line naming the file and saying to rerun megatron-dil-preprocess.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from megatron.core.datasets import helpers_cpp
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import Dataset

from megatron_dil.data.config import VERIFY_MODES
from megatron_dil.data.tokenizer import PreferenceTokenizer
from megatron_dil.data.writer import FORMAT_VERSION
from megatron_dil.io.files import verify_file

REMEDY = "rerun megatron-dil-preprocess"


class DatasetError(ValueError):
    """A dataset prefix that is missing, damaged, inconsistent or incompatible with the run (names the file)."""


@dataclass
class PreferencePair:
    """One pair: ``prompt + chosen`` and ``prompt + rejected`` are the two full token sequences; the response tokens
    (after ``len(prompt)``) carry the loss. ``sample_id`` is unique within a (blended) dataset."""

    sample_id: int
    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


class PreferenceDataset(Dataset):
    """Pairs of the prefix ``PREFIX`` (``PREFIX.bin/.idx/.json``); ``dataset[i]`` is a :class:`PreferencePair`.

    ``tokenizer`` (optional): refuse the dataset unless it was written with a tokenizer of the same fingerprint and
    all its token ids are below ``tokenizer.vocab_size``. ``verify``: ``"full"`` checks the ``.bin`` digest (one
    streamed read), ``"idx"`` only its size (the ``.idx`` digest is checked in both modes).
    """

    def __init__(self, prefix: str, tokenizer: PreferenceTokenizer | None = None, verify: str = "full"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.prefix = prefix
        self.metadata = read_metadata(prefix)
        what, files = f"dataset {prefix!r}", self.metadata["files"]
        verify_file(prefix + ".idx", files["idx"], what, REMEDY)
        verify_file(prefix + ".bin", files["bin"], what, REMEDY, check_digest=verify == "full")
        if tokenizer is not None:
            check_tokenizer(self.metadata, tokenizer, prefix)
        # an empty split (e.g. a small --valid-fraction that no prompt hashed into) has an empty .bin: no mmap
        self._indexed = _open_indexed(prefix, self.metadata["num_pairs"]) if self.metadata["num_pairs"] else None

    def __len__(self) -> int:
        return self.metadata["num_pairs"]

    def __getitem__(self, index: int) -> PreferencePair:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs in {self.prefix!r}")
        prompt, chosen, rejected = (a.astype(np.int64) for a in self._indexed[3 * index:3 * index + 3])
        return PreferencePair(int(index), prompt, chosen, rejected)

    @property
    def kind(self) -> str:
        """``pairs``, or ``demonstrations`` (``--kind demonstrations``: every rejected sequence is empty)."""
        return self.metadata.get("kind", "pairs")

    @property
    def max_sequence_length(self) -> int:
        """Longest ``prompt + response`` in the dataset."""
        if self._indexed is None:
            return 0
        lengths = self._indexed.sequence_lengths.reshape(-1, 3).astype(np.int64)
        return int((lengths[:, 0] + lengths[:, 1:].max(axis=1)).max())


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("size"), int) and isinstance(value.get("blake2b"), str)


_REQUIRED = {  # metadata field -> validity test (what the reader relies on)
    "num_pairs": lambda v: isinstance(v, int) and v >= 0,
    "files.bin": _is_record,
    "files.idx": _is_record,
    "tokenizer.fingerprint": lambda v: isinstance(v, str),
    "tokenizer.path": lambda v: isinstance(v, str),
    "tokenizer.vocab_size": lambda v: isinstance(v, int),
    "token_ids": lambda v: v is None or isinstance(v, dict) and all(isinstance(v.get(k), int) for k in ("min", "max")),
}


def read_metadata(prefix: str) -> dict[str, Any]:
    """``PREFIX.json`` parsed and checked for the fields the reader relies on."""
    path = prefix + ".json"
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {prefix!r} is missing or incomplete: no {path} (the preprocessor writes it "
                                f"last); {REMEDY}")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"dataset metadata {path} is not valid JSON ({e}); {REMEDY}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise DatasetError(f"dataset metadata {path}: format {found!r}, this code reads {FORMAT_VERSION!r} (with "
                           f"checksums and token-id range); {REMEDY}")
    for key, valid in _REQUIRED.items():
        value: Any = metadata
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not valid(value):
            raise DatasetError(f"dataset metadata {path}: field {key!r} is missing or malformed; {REMEDY}")
    if metadata["num_pairs"] and metadata["token_ids"] is None:
        raise DatasetError(f"dataset metadata {path}: field 'token_ids' is missing or malformed; {REMEDY}")
    return metadata


def _open_indexed(prefix: str, num_pairs: int) -> IndexedDataset:
    """The Megatron index of ``prefix``, checked for the pair layout: 3 sequences per document, each sequence's
    bytes right after the previous one's, the last ending at the end of ``.bin``."""
    try:
        indexed = IndexedDataset(prefix)
    except Exception as e:  # megatron-core asserts on a bad header/version and numpy raises on a short buffer
        raise DatasetError(f"dataset {prefix!r}: {prefix}.idx cannot be read ({type(e).__name__}: {e}); "
                           f"{REMEDY}") from None
    index = indexed.index
    consistent = len(index.sequence_lengths) == 3 * num_pairs and len(index.document_indices) == num_pairs + 1 \
        and _pair_layout(index.sequence_lengths, index.sequence_pointers, index.document_indices, index.dtype_size,
                         os.path.getsize(prefix + ".bin"))
    if not consistent:
        raise DatasetError(f"dataset {prefix!r}: {prefix}.idx does not describe {num_pairs} pairs laid out "
                           f"contiguously in {prefix}.bin (lengths or pointers damaged); {REMEDY}")
    return indexed


def _pair_layout(lengths: np.ndarray, pointers: np.ndarray, documents: np.ndarray, itemsize: int, bin_size: int,
                 block: int = 1 << 20) -> bool:
    """``documents == 0, 3, 6, ...``, ``pointers[0] == 0``, ``pointers[i+1] == pointers[i] + lengths[i]·itemsize`` and
    the last sequence ends at ``bin_size``; checked ``block`` sequences at a time (bounded memory on huge indexes)."""
    if pointers[0] != 0 or (lengths < 0).any():
        return False
    for start in range(0, len(documents), block):
        stop = min(start + block, len(documents))
        if not np.array_equal(documents[start:stop], np.arange(3 * start, 3 * stop, 3)):
            return False
    for start in range(0, len(lengths), block):
        stop = min(start + block, len(lengths))
        following = pointers[start + 1:stop + 1]
        if stop == len(lengths):
            following = np.append(following, bin_size)
        if not np.array_equal(pointers[start:stop] + lengths[start:stop].astype(np.int64) * itemsize, following):
            return False
    return True


def check_tokenizer(metadata: dict[str, Any], tokenizer: PreferenceTokenizer, prefix: str) -> None:
    """Refuse a dataset written with another vocabulary (fingerprints differ) or holding a token id the tokenizer
    does not have (``id >= tokenizer.vocab_size``; the trainer checks ``tokenizer.vocab_size <= model vocab``, so the
    embedding never reads an untrained padding row or past its end)."""
    written = metadata["tokenizer"]
    if written["fingerprint"] != tokenizer.fingerprint:
        raise DatasetError(f"dataset {prefix!r} was tokenized with {written['path']!r} (vocab "
                           f"{written['vocab_size']}, fingerprint {written['fingerprint'][:12]}) but the run uses "
                           f"{tokenizer.path!r} (vocab {tokenizer.vocab_size}, fingerprint "
                           f"{tokenizer.fingerprint[:12]}); preprocess again with the run's tokenizer or point "
                           f"data.tokenizer at the original one")
    ids = metadata["token_ids"]
    if ids is not None and not 0 <= ids["min"] <= ids["max"] < tokenizer.vocab_size:
        bad = ids["max"] if ids["max"] >= tokenizer.vocab_size else ids["min"]
        raise DatasetError(f"dataset {prefix!r} holds token id {bad} outside the vocabulary of tokenizer "
                           f"{tokenizer.path!r} (ids 0..{tokenizer.vocab_size - 1}); {REMEDY} with that tokenizer")


class BlendedPreferenceDataset(Dataset):
    """Weighted, deterministic mixture of datasets (Megatron's blending rule).

    Position k goes to the dataset whose achieved share lags its weight most, i.e.
    ``d_k = argmax_d (w_d·(k+1) − n_d(k))`` (megatron.core.datasets.helpers ``build_blending_indices``); the j-th draw
    from dataset d reads pair ``perm_{d,e}[j mod |d|]`` with ``e = j div |d|`` (a fresh seeded permutation per pass,
    so an oversampled dataset cycles through all its pairs before repeating any). ``sample_id`` of a pair is
    ``offset_d + index`` with ``offset_d`` the total size of the datasets before d: stable and unique per pair.
    """

    def __init__(self, datasets: list[PreferenceDataset], weights: list[float], size: int | None = None,
                 seed: int = 1234):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("blending needs one weight per dataset and at least one dataset")
        if any(w <= 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {weights}")
        self.datasets = datasets
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.size = int(size if size is not None else sum(len(d) for d in datasets))
        self.seed = seed
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets])[:-1]]).astype(np.int64)
        self.dataset_index = np.zeros(self.size, dtype=np.int16)
        self.dataset_draw = np.zeros(self.size, dtype=np.int64)
        helpers_cpp.build_blending_indices(self.dataset_index, self.dataset_draw, self.weights, len(datasets),
                                           self.size, False)
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self.metadata = {"blend": [{"prefix": d.prefix, "weight": float(w)} for d, w in zip(datasets, self.weights)],
                         "tokenizer": datasets[0].metadata["tokenizer"]}

    def __len__(self) -> int:
        return self.size

    def _permutation(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._permutations:
            self._permutations[key] = np.random.default_rng([self.seed, d, epoch]).permutation(len(self.datasets[d]))
        return self._permutations[key]

    def source(self, index: int) -> tuple[int, int]:
        """``(dataset number, pair index within it)`` of blended position ``index``."""
        d, draw = int(self.dataset_index[index]), int(self.dataset_draw[index])
        n = len(self.datasets[d])
        return d, int(self._permutation(d, draw // n)[draw % n])

    def __getitem__(self, index: int) -> PreferencePair:
        if not 0 <= index < self.size:
            raise IndexError(f"position {index} out of range for a blend of {self.size}")
        d, inner = self.source(index)
        pair = self.datasets[d][inner]
        pair.sample_id = int(self.offsets[d] + inner)
        return pair

    @property
    def max_sequence_length(self) -> int:
        return max(d.max_sequence_length for d in self.datasets)


def parse_blend(entries: list[str]) -> list[tuple[float | None, str]]:
    """``["0.7:/d/a_train", "/d/b_train"]`` → ``[(0.7, "/d/a_train"), (None, "/d/b_train")]``."""
    out = []
    for entry in entries:
        head, sep, tail = entry.partition(":")
        try:
            weight = float(head) if sep else None
        except ValueError:
            weight = None
        out.append((weight, tail) if weight is not None else (None, entry))
    return out
