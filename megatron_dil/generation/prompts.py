"""Prompts to generate from: rows of JSONL/JSON/Parquet/``datasets`` directories, or an indexed preference dataset.

Rows are read by the preprocessor's reader and tokenized as preprocessing tokenizes a pair's prompt: a string prompt
is plain text (``[BOS if the tokenizer adds one] + ids(prompt)``); a TRL message list is rendered with the chat
template (``add_generation_prompt``) and tokenized with no special token added (repeated leading BOS collapsed).
A row without a usable prompt is skipped and counted per reason (as in preprocessing). An indexed dataset prefix
(``PREFIX.{bin,idx,json}`` from ``megatron-dil-preprocess``) gives the prompts of its pairs, each distinct prompt once
(its ``prompt`` in the output is the decoded text without special tokens).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megatron_dil.data.preprocess import iter_raw_rows
from megatron_dil.data.rows import RowError, as_messages, row_object
from megatron_dil.data.templates import resolve_template
from megatron_dil.data.tokenize import _collapse_leading_bos
from megatron_dil.data.tokenizer import PreferenceTokenizer
from megatron_dil.generation.model import GenerationInputError


@dataclass
class Prompt:
    index: int  # position among the usable prompts: keys the samples' noise and orders the output
    source: Any  # the prompt as given (string or messages), written back with each sample
    ids: list[int]


@dataclass
class PromptSet:
    prompts: list[Prompt]
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.skipped:
            return f"{len(self.prompts)} prompts"
        detail = ", ".join(f"{reason} {n} (first: {', '.join(self.skipped_rows[reason])})"
                           for reason, n in sorted(self.skipped.items()))
        return f"{len(self.prompts)} prompts; skipped {sum(self.skipped.values())} rows: {detail}"


def is_indexed_dataset(path: str) -> bool:
    return os.path.isfile(path + ".json") and os.path.isfile(path + ".idx")


def tokenize_prompt(value: Any, tokenizer: PreferenceTokenizer, template: str) -> list[int]:
    """Token ids of one prompt (string or message list); raises ``RowError`` for an unusable one."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_field", "the prompt is empty")
        ids = ([tokenizer.bos_id] if tokenizer.adds_bos else []) + tokenizer.encode(value)
    else:
        messages = as_messages(value, "prompt", default_role="user")
        if not any(m["content"].strip() for m in messages):
            raise RowError("empty_field", "the prompt is empty")
        ids = tokenizer.encode(tokenizer.render_chat(messages, template, add_generation_prompt=True))
    return _collapse_leading_bos(ids, tokenizer.bos_id)


def load_prompts(path: str, tokenizer: PreferenceTokenizer, *, template: str = "auto", column: str = "prompt",
                 input_format: str = "auto", split: str = "train", window: int, limit: int | None = None,
                 max_rows_shown: int = 5) -> PromptSet:
    """Read and tokenize the prompts of ``path``; a prompt with no room to generate within ``window`` positions is an
    error naming its row."""
    if is_indexed_dataset(path):
        return _dataset_prompts(path, tokenizer, window, limit)
    if not os.path.exists(path):
        raise GenerationInputError(f"--prompts {path}: no such file, directory or dataset prefix")
    template_source = resolve_template(template, tokenizer)[1]
    result = PromptSet([])
    for number, raw in iter_raw_rows(path, input_format, split):
        if limit is not None and len(result.prompts) >= limit:
            break
        try:
            raw = row_object(raw)
            if raw.get(column) is None:
                raise RowError("missing_field", f"no {column!r}")
            ids = tokenize_prompt(raw[column], tokenizer, template_source)
        except RowError as err:
            result.skipped[err.reason] += 1
            shown = result.skipped_rows.setdefault(err.reason, [])
            if len(shown) < max_rows_shown:
                shown.append(f"{path}:{number}")
            continue
        if len(ids) >= window:
            raise GenerationInputError(f"{path}: row {number}: prompt of {len(ids)} tokens does not fit the model's "
                                       f"window of {window} positions with room to generate; shorten it")
        result.prompts.append(Prompt(len(result.prompts), raw[column], ids))
    if not result.prompts:
        raise GenerationInputError(f"--prompts {path}: no usable prompt ({result.summary()})")
    return result


def _dataset_prompts(prefix: str, tokenizer: PreferenceTokenizer, window: int, limit: int | None) -> PromptSet:
    from megatron_dil.data.dataset import PreferenceDataset

    dataset = PreferenceDataset(prefix, tokenizer)
    seen: set[tuple[int, ...]] = set()
    result = PromptSet([])
    for i in range(len(dataset)):
        if limit is not None and len(result.prompts) >= limit:
            break
        ids = tuple(int(t) for t in dataset[i].prompt)
        if ids in seen:
            continue
        seen.add(ids)
        if len(ids) >= window:
            raise GenerationInputError(f"{prefix}: pair {i}: prompt of {len(ids)} tokens does not fit the model's "
                                       f"window of {window} positions with room to generate")
        result.prompts.append(Prompt(len(result.prompts), tokenizer.decode(list(ids), skip_special_tokens=True),
                                     list(ids)))
    return result
