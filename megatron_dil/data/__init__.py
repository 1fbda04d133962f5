"""Preference data pipeline: preprocessing to Megatron indexed datasets, reading, sampling, collating, blending."""
from megatron_dil.data.collator import PreferenceBatch, PreferenceCollator
from megatron_dil.data.config import DataConfig, PreprocessConfig
from megatron_dil.data.dataset import BlendedPreferenceDataset, PreferenceDataset, PreferencePair
from megatron_dil.data.loader import build_dataloader, build_datasets
from megatron_dil.data.sampler import PreferenceSampler
from megatron_dil.data.tokenizer import PreferenceTokenizer, load_tokenizer

__all__ = [
    "BlendedPreferenceDataset", "DataConfig", "PreferenceBatch", "PreferenceCollator", "PreferenceDataset",
    "PreferencePair", "PreferenceSampler", "PreferenceTokenizer", "PreprocessConfig", "build_dataloader",
    "build_datasets", "load_tokenizer", "preprocess_pairs",
]


def __getattr__(name: str):
    # imported on first use, so that `python -m megatron_dil.data.preprocess` does not find it half-imported
    if name == "preprocess_pairs":
        from megatron_dil.data.preprocess import preprocess_pairs
        return preprocess_pairs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
