"""From a :class:`DataConfig` to datasets and DP-sharded DataLoaders: what the trainer calls."""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from megatron_dil.data.collator import PreferenceCollator
from megatron_dil.data.config import DataConfig
from megatron_dil.data.dataset import BlendedPreferenceDataset, PreferenceDataset, parse_blend
from megatron_dil.data.sampler import PreferenceSampler
from megatron_dil.data.tokenizer import PreferenceTokenizer, load_tokenizer


def build_datasets(config: DataConfig, tokenizer: PreferenceTokenizer | None = None
                   ) -> tuple[PreferenceDataset | BlendedPreferenceDataset, PreferenceDataset | None]:
    """Open ``config.train`` (blended when several prefixes or weights are given) and ``config.valid``.

    Each dataset is verified against the checksums in its metadata (``config.verify_checksums``) and refused if it
    was written with another tokenizer than ``config.tokenizer``, holds a token id outside that tokenizer's
    vocabulary or sequences longer than ``config.max_length``. Unweighted blend entries weigh their pair count.
    """
    if not config.train:
        raise ValueError("data.train names no dataset prefix")
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
    blend = parse_blend(config.train)
    train_sets = [_open(prefix, tokenizer, config) for _, prefix in blend]
    if len(train_sets) == 1 and blend[0][0] is None:
        train: PreferenceDataset | BlendedPreferenceDataset = train_sets[0]
    else:
        if any(w is None for w, _ in blend) and any(w is not None for w, _ in blend):
            raise ValueError(f"data.train mixes weighted and unweighted entries: {config.train}")
        weights = [w if w is not None else float(len(d)) for (w, _), d in zip(blend, train_sets)]
        train = BlendedPreferenceDataset(train_sets, weights, size=config.blend_size, seed=config.seed)
    valid = _open(config.valid, tokenizer, config) if config.valid else None
    return train, valid


def _open(prefix: str, tokenizer: PreferenceTokenizer, config: DataConfig) -> PreferenceDataset:
    dataset = PreferenceDataset(prefix, tokenizer, verify=config.verify_checksums)
    if dataset.max_sequence_length > config.max_length:
        raise ValueError(f"dataset {prefix!r} holds sequences of {dataset.max_sequence_length} tokens > "
                         f"data.max_length {config.max_length}; preprocess with --max-length {config.max_length}")
    return dataset


def build_dataloader(dataset: Dataset, config: DataConfig, tokenizer: PreferenceTokenizer, micro_batch_size: int,
                     dp_rank: int, dp_size: int, consumed_samples: int = 0, train: bool = True) -> DataLoader:
    """DataLoader of :class:`PreferenceBatch` for one DP rank: endless and shuffled for training, one ordered pass
    for validation."""
    sampler = PreferenceSampler(len(dataset), micro_batch_size, dp_rank, dp_size, consumed_samples,
                                seed=config.seed, shuffle=config.shuffle and train, max_epochs=None if train else 1)
    collator = PreferenceCollator(tokenizer.pad_id, config.pad_to_multiple_of, config.packing, config.max_length)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=config.num_workers,
                      persistent_workers=config.num_workers > 0)
