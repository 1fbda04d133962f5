"""Tokenization of one preference pair with exact prompt/response boundaries and literature truncation.

Each sequence is tokenized JOINTLY (prompt and response in one string), so the ids are those a tokenizer gives the
whole text. The loss-mask boundary is then found on token ids, not characters:

    b = min(LCP(ids(prompt), ids(prompt + chosen)), LCP(ids(prompt), ids(prompt + rejected)))

(LCP = longest common prefix). When the tokenizer merges the prompt's last characters with the response's first
(the boundary-shift trap) the merged token counts as response, as in TRL's ``build_tokenized_answer``. The pair is
stored as ``prompt = ids[:b]`` (shared), ``chosen = ids_c[b:]``, ``rejected = ids_r[b:]``; so
``prompt + chosen`` is exactly the joint tokenization of the chosen text.

Text rows: ``[BOS if the tokenizer adds one] + ids(prompt + response) + [EOS]``. Chat rows: the template's rendering
tokenized with no special tokens added (the template writes BOS itself: adding one more is the double-BOS trap);
repeated leading BOS are collapsed in both cases.

A demonstration (``row.rejected is None``) is tokenized the same way with one response; its ``rejected`` is ``[]``.

Truncation (TRL 0.8.6, used by the DIL release): if ``len(prompt) + max(len(chosen), len(rejected)) > max_length``,
the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its last tokens, and its leading BOS; ``keep_start``
its first), then each response is cut to ``max_length - len(prompt)``. A prompt alone longer than ``max_length`` drops
the pair (reason ``prompt_too_long``) unless ``overlong_prompt == "truncate"``.
"""
from __future__ import annotations

from dataclasses import dataclass

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from megatron_dil.data.rows import PreferenceRow, RowError
from megatron_dil.data.tokenizer import PreferenceTokenizer


@dataclass(frozen=True)
class TruncationConfig:
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation_mode: str = "keep_end"  # or "keep_start"
    overlong_prompt: str = "drop"  # or "truncate"

    def __post_init__(self) -> None:
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length})")
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be keep_end or keep_start, not {self.truncation_mode!r}")
        if self.overlong_prompt not in ("drop", "truncate"):
            raise ValueError(f"overlong_prompt must be drop or truncate, not {self.overlong_prompt!r}")


@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: bool
    boundary_shifted: bool
    prompt_text: str  # rendered prompt (the deterministic train/valid split hashes it)


def tokenize_pair(row: PreferenceRow, tokenizer: PreferenceTokenizer, template: str | None,
                  truncation: TruncationConfig) -> TokenizedPair:
    """Tokenize ``row`` (``template``: jinja source for chat rows) and apply the truncation policy."""
    responses = (row.chosen,) if row.rejected is None else (row.chosen, row.rejected)
    if row.kind == "text":
        bos = [tokenizer.bos_id] if tokenizer.adds_bos else []
        prompt_text = row.prompt
        prompt_ids = bos + tokenizer.encode(row.prompt)
        full = [bos + tokenizer.encode(row.prompt + r) + [tokenizer.eos_id] for r in responses]
    else:
        if template is None:
            raise ValueError("conversational rows need a chat template")
        try:
            prompt_text = tokenizer.render_chat(row.prompt, template, add_generation_prompt=True)
            rendered = [tokenizer.render_chat(row.prompt + r, template, add_generation_prompt=False)
                        for r in responses]
        except TemplateSyntaxError:  # the template itself is broken: not the row's fault
            raise
        except TemplateError as e:  # the template refuses this conversation (raise_exception), e.g. role order
            raise RowError("template_error", f"the chat template rejects the conversation: {e}") from None
        prompt_ids = tokenizer.encode(prompt_text)
        full = [tokenizer.encode(text) for text in rendered]
    prompt_ids = _collapse_leading_bos(prompt_ids, tokenizer.bos_id)
    full = [_collapse_leading_bos(ids, tokenizer.bos_id) for ids in full]
    boundary = min(_common_prefix_length(prompt_ids, ids) for ids in full)
    prompt, chosen = prompt_ids[:boundary], full[0][boundary:]
    rejected = full[1][boundary:] if len(full) == 2 else []
    if not chosen or (row.rejected is not None and not rejected):
        raise RowError("empty_field", "a response has no tokens of its own after the prompt")
    if row.rejected is not None and chosen == rejected:
        raise RowError("identical_responses", "chosen and rejected tokenize identically")
    prompt, chosen, rejected, truncated = _truncate(prompt, chosen, rejected, tokenizer.bos_id, truncation)
    return TokenizedPair(prompt, chosen, rejected, truncated, boundary < len(prompt_ids), prompt_text)


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], bos_id: int | None,
              cfg: TruncationConfig) -> tuple[list[int], list[int], list[int], bool]:
    if len(prompt) > cfg.max_length and cfg.overlong_prompt == "drop":
        raise RowError("prompt_too_long", f"prompt has {len(prompt)} tokens > max_length {cfg.max_length}")
    if len(prompt) + max(len(chosen), len(rejected)) <= cfg.max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > cfg.max_prompt_length:
        if cfg.truncation_mode == "keep_start":
            prompt = prompt[:cfg.max_prompt_length]
        else:
            head = prompt[:1] if bos_id is not None and prompt[0] == bos_id else []
            prompt = head + prompt[len(prompt) - (cfg.max_prompt_length - len(head)):]
    budget = cfg.max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget], True


def _collapse_leading_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """``[BOS, BOS, x...] -> [BOS, x...]``: the double-BOS trap's guard."""
    start = 0
    while bos_id is not None and start + 1 < len(ids) and ids[start] == bos_id and ids[start + 1] == bos_id:
        start += 1
    return ids[start:]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
