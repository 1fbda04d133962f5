"""Reading preprocessed preference datasets: one prefix, or a weighted blend of several.

A prefix is complete iff its metadata JSON exists (written last by the preprocessor) and the ``.bin/.idx`` byte sizes
match the ones recorded there; anything else is refused with the reason.
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

from megatron_dil.data.preprocess import FORMAT_VERSION
from megatron_dil.data.tokenizer import PreferenceTokenizer


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

    ``tokenizer`` (optional): refuse the dataset unless it was written with a tokenizer of the same fingerprint.
    """

    def __init__(self, prefix: str, tokenizer: PreferenceTokenizer | None = None):
        self.prefix = prefix
        meta_path = prefix + ".json"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"dataset {prefix!r} is missing or incomplete: no {meta_path} (the preprocessor "
                                    f"writes it last; rerun megatron-dil-preprocess)")
        with open(meta_path) as f:
            self.metadata: dict[str, Any] = json.load(f)
        if self.metadata.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format {self.metadata.get('format')!r}, expected {FORMAT_VERSION!r}")
        for ext, key in ((".bin", "bin_bytes"), (".idx", "idx_bytes")):
            path, expected = prefix + ext, self.metadata["files"][key]
            actual = os.path.getsize(path) if os.path.exists(path) else None
            if actual != expected:
                raise ValueError(f"dataset {prefix!r} is inconsistent: {path} has {actual} bytes, metadata says "
                                 f"{expected}; rerun megatron-dil-preprocess")
        if tokenizer is not None:
            check_tokenizer(self.metadata, tokenizer, prefix)
        # an empty split (e.g. a small --valid-fraction that no prompt hashed into) has an empty .bin: no mmap
        self._indexed = IndexedDataset(prefix) if self.metadata["num_pairs"] else None
        if self._indexed is not None and len(self._indexed) != 3 * self.metadata["num_pairs"]:
            raise ValueError(f"dataset {prefix!r}: {len(self._indexed)} sequences, expected 3 x "
                             f"{self.metadata['num_pairs']} pairs")

    def __len__(self) -> int:
        return self.metadata["num_pairs"]

    def __getitem__(self, index: int) -> PreferencePair:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs in {self.prefix!r}")
        prompt, chosen, rejected = (a.astype(np.int64) for a in self._indexed[3 * index:3 * index + 3])
        return PreferencePair(int(index), prompt, chosen, rejected)

    @property
    def max_sequence_length(self) -> int:
        """Longest ``prompt + response`` in the dataset."""
        if self._indexed is None:
            return 0
        lengths = self._indexed.sequence_lengths.reshape(-1, 3).astype(np.int64)
        return int((lengths[:, 0] + lengths[:, 1:].max(axis=1)).max())


def check_tokenizer(metadata: dict[str, Any], tokenizer: PreferenceTokenizer, prefix: str) -> None:
    """Refuse a dataset written with another vocabulary (fingerprints differ)."""
    written = metadata["tokenizer"]
    if written["fingerprint"] != tokenizer.fingerprint:
        raise ValueError(f"dataset {prefix!r} was tokenized with {written['path']!r} (vocab {written['vocab_size']}, "
                         f"fingerprint {written['fingerprint'][:12]}) but the run uses {tokenizer.path!r} (vocab "
                         f"{tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint[:12]}); preprocess again with "
                         f"the run's tokenizer or point data.tokenizer at the original one")


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
