"""Preference data pipeline: preprocessing to Megatron indexed datasets, reading, sampling, collating, blending."""
from megatron_dil.runtime.cpu_compat import silence_expected_warnings

silence_expected_warnings()  # megatron-dil-preprocess imports Megatron-Core through this package (import-time notices)

from megatron_dil.data.collator import PreferenceBatch, PreferenceCollator  # noqa: E402
from megatron_dil.data.config import DataConfig, PreprocessConfig  # noqa: E402
from megatron_dil.data.dataset import BlendedPreferenceDataset, PreferenceDataset, PreferencePair  # noqa: E402
from megatron_dil.data.loader import build_dataloader, build_datasets  # noqa: E402
from megatron_dil.data.sampler import PreferenceSampler  # noqa: E402
from megatron_dil.data.tokenizer import PreferenceTokenizer, load_tokenizer  # noqa: E402

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
