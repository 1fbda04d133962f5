"""Configuration of the preference data pipeline: training-time reading (DataConfig) and preprocessing."""
from __future__ import annotations

from dataclasses import dataclass, field

PACKING_MODES = ("none", "mask", "thd")
VERIFY_MODES = ("full", "idx")
DATASET_KINDS = ("pairs", "demonstrations")


@dataclass
class DataConfig:
    """The run config's ``data:`` section.

    ``train``: dataset prefixes written by the preprocessor (``PREFIX_train``), each optionally weighted for blending
    as ``"WEIGHT:PREFIX"`` (e.g. ``["0.7:/d/a_train", "0.3:/d/b_train"]``; unweighted entries weigh their pair count).
    ``tokenizer`` must be the tokenizer the datasets were written with (checked against their metadata).
    ``max_length``: longest sequence the model takes (datasets preprocessed for longer are refused); also the row
    length of packed rows. ``pad_to_multiple_of``: sequence length multiple (8 suits tensor cores; TP with sequence
    parallelism needs a multiple of TP, context parallelism of 2·CP). ``packing``: ``none`` (right-padded rows,
    chosen and rejected stacked), ``mask`` (several sequences per row, block-diagonal causal mask: CPU path) or
    ``thd`` (one packed row with ``PackedSeqParams``: Transformer Engine path on GPU).
    ``verify_checksums``: ``full`` (default) checks every dataset's ``.idx`` and ``.bin`` against the BLAKE2b digests
    recorded by the preprocessor when the run opens it (one streamed read of the ``.bin`` per rank); ``idx``
    checks the ``.idx`` digest and only the size of the ``.bin``, for datasets too large to read at every start (a
    damaged ``.bin`` byte then goes unnoticed).
    """

    train: list[str] = field(default_factory=list)
    valid: str | None = None
    tokenizer: str = ""
    max_length: int = 1024
    pad_to_multiple_of: int = 8
    packing: str = "none"
    seed: int = 1234
    shuffle: bool = True
    num_workers: int = 0
    blend_size: int | None = None  # samples in the blended train set; None: the sum of the datasets' sizes
    verify_checksums: str = "full"

    def __post_init__(self) -> None:
        if self.packing not in PACKING_MODES:
            raise ValueError(f"data.packing must be one of {PACKING_MODES}, not {self.packing!r}")
        if self.verify_checksums not in VERIFY_MODES:
            raise ValueError(f"data.verify_checksums must be one of {VERIFY_MODES}, not {self.verify_checksums!r}")
        if self.pad_to_multiple_of < 1 or self.max_length < 2:
            raise ValueError("data.pad_to_multiple_of must be >= 1 and data.max_length >= 2")


@dataclass
class PreprocessConfig:
    """Everything ``megatron-dil-preprocess`` does, one field per CLI flag (see its ``--help``)."""

    inputs: list[str]
    output_prefix: str
    tokenizer: str
    input_format: str = "auto"  # auto | jsonl | json | parquet | datasets
    input_split: str = "train"  # split of a `datasets` DatasetDict directory
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    kind: str = "pairs"  # pairs | demonstrations (prompt + one response: SFT data, megatron-dil-iterate)
    response_column: str = "completion"  # demonstrations: the response column
    messages_column: str = "messages"  # demonstrations: whole conversations (last assistant turn = response)
    template: str = "auto"
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation_mode: str = "keep_end"
    overlong_prompt: str = "drop"
    valid_fraction: float = 0.0
    split_seed: int = 1234
    workers: int = 1
    chunk_size: int = 256
    strict: bool = False
    progress: bool = True
    max_rows_shown: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), not {self.valid_fraction}")
        if self.workers < 1 or self.chunk_size < 1:
            raise ValueError("--workers and --chunk-size must be >= 1")
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"unknown --kind {self.kind!r}; choose one of {DATASET_KINDS}")
        if self.input_format not in ("auto", "jsonl", "json", "parquet", "datasets"):
            raise ValueError(f"unknown --input-format {self.input_format!r}")
