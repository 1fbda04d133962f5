"""Validation and normalisation of raw preference rows (string or TRL-conversational form).

A row becomes a :class:`PreferenceRow` or raises :class:`RowError` whose ``reason`` is one of :data:`DROP_REASONS`
(the preprocessor counts rows per reason and shows the first few row numbers).

Accepted shapes (column names configurable):
- strings: ``{"prompt": str, "chosen": str, "rejected": str}``;
- conversational: ``prompt`` a list of ``{role, content}`` messages (or a string, taken as one user turn), ``chosen``
  and ``rejected`` lists of messages holding either only the response turns or the whole conversation (as in
  UltraFeedback-binarized, where the prompt turns are the shared prefix of chosen and rejected; then ``prompt`` may be
  absent).

Demonstrations (``--kind demonstrations``, SFT rows: a prompt and one good response, no rejected one):
- TRL prompt/completion: ``{"prompt": str | messages, "completion": str | messages}``;
- a conversation ``{"messages": [...]}`` (single- or multi-turn, UltraChat-style): its last turn is the response and
  must be ``assistant``; every turn before it is the prompt;
- a preference-style row's ``chosen`` side (``--response-column chosen``), so the chosen responses of a pair file
  are demonstrations.

Roles follow the chat-template convention (the Hugging Face ``messages`` format every named template and most
tokenizer templates are written for): prompt messages are ``system``, ``user`` or ``assistant``; the chosen and
rejected replies are ``assistant`` messages. Anything else (a reply by ``user``, a ``wizard`` turn) is a bad row
(``bad_role``), as is a conversation the template itself rejects (``template_error``, e.g. roles that do not
alternate).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DROP_REASONS = (
    "malformed_json", "missing_field", "empty_field", "non_string_content", "bad_role", "template_error",
    "identical_responses", "prompt_too_long",
)
PROMPT_ROLES = ("system", "user", "assistant")
REPLY_ROLE = "assistant"

Message = dict[str, str]


class RowError(ValueError):
    """A row that cannot become a training pair; ``reason`` in :data:`DROP_REASONS`."""

    def __init__(self, reason: str, detail: str):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # pickled by (reason, detail), so it crosses from a worker process to the parent
        return RowError, (self.reason, self.detail)


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "completion"  # demonstrations: the response column (beside ``prompt``)
    messages: str = "messages"  # demonstrations: a whole conversation, the last assistant turn being the response


@dataclass
class PreferenceRow:
    """``kind == "text"``: prompt/chosen/rejected are strings. ``kind == "chat"``: prompt is the list of prompt
    messages, chosen/rejected the lists of response messages (without the prompt turns)."""

    kind: str
    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message] | None  # None: a demonstration (no rejected response)


def row_object(raw: Any) -> dict[str, Any]:
    """A raw row as read (a JSONL line still as text, or an already parsed record) → its JSON object."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise RowError("malformed_json", f"{err.msg} at column {err.colno}") from None
    if not isinstance(raw, dict):
        raise RowError("malformed_json", f"row is a {type(raw).__name__}, not an object")
    return raw


def parse_row(raw: Any, columns: Columns = Columns()) -> PreferenceRow:
    """Validate one raw row and bring it to a :class:`PreferenceRow`."""
    row = row_object(raw)
    for key in (columns.chosen, columns.rejected):
        if key not in row or row[key] is None:
            raise RowError("missing_field", f"no {key!r}")
    prompt, chosen, rejected = row.get(columns.prompt), row[columns.chosen], row[columns.rejected]
    if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, list):
        if prompt is None:
            raise RowError("missing_field", f"no {columns.prompt!r}")
        if not isinstance(prompt, str):
            raise RowError("non_string_content", f"{columns.prompt!r} is a {type(prompt).__name__}")
        for key, value in ((columns.prompt, prompt), (columns.chosen, chosen), (columns.rejected, rejected)):
            if not value.strip():
                raise RowError("empty_field", f"{key!r} is empty")
        if chosen == rejected:
            raise RowError("identical_responses", "chosen and rejected are identical")
        return PreferenceRow("text", prompt, chosen, rejected)
    return _parse_chat(prompt, chosen, rejected, columns)


def parse_demonstration(raw: Any, columns: Columns = Columns()) -> PreferenceRow:
    """Validate one raw demonstration row (see the module docstring) and bring it to a :class:`PreferenceRow` with
    ``rejected=None``."""
    row = row_object(raw)
    if row.get(columns.response) is None and row.get(columns.messages) is not None:
        conversation = as_messages(row[columns.messages], columns.messages, default_role="user")
        if conversation[-1]["role"] != REPLY_ROLE:
            raise RowError("missing_field", f"{columns.messages!r} does not end with an {REPLY_ROLE!r} turn (the "
                                            f"response)")
        prompt: Any = conversation[:-1]
        if not prompt:
            raise RowError("empty_field", f"{columns.messages!r} has no turn before the response (no prompt)")
        response: Any = conversation[-1:]
    else:
        if row.get(columns.response) is None:
            raise RowError("missing_field", f"no {columns.response!r} (the response) and no {columns.messages!r}")
        prompt, response = row.get(columns.prompt), row[columns.response]
    if isinstance(prompt, str) and isinstance(response, str):
        for key, value in ((columns.prompt, prompt), (columns.response, response)):
            if not value.strip():
                raise RowError("empty_field", f"{key!r} is empty")
        return PreferenceRow("text", prompt, response, None)
    if prompt is None:
        raise RowError("missing_field", f"no {columns.prompt!r}")
    prompt_msgs = as_messages(prompt, columns.prompt, default_role="user")
    _check_roles(prompt_msgs, PROMPT_ROLES, columns.prompt, "prompt messages")
    response_msgs = _strip_prefix(as_messages(response, columns.response, default_role="assistant"), prompt_msgs)
    if not any(m["content"].strip() for m in prompt_msgs):
        raise RowError("empty_field", f"{columns.prompt!r} is empty")
    if not response_msgs or not any(m["content"].strip() for m in response_msgs):
        raise RowError("empty_field", f"{columns.response!r} has an empty response")
    _check_roles(response_msgs, (REPLY_ROLE,), columns.response, "replies")
    return PreferenceRow("chat", prompt_msgs, response_msgs, None)


def _parse_chat(prompt: Any, chosen: Any, rejected: Any, columns: Columns) -> PreferenceRow:
    chosen_msgs = as_messages(chosen, columns.chosen, default_role="assistant")
    rejected_msgs = as_messages(rejected, columns.rejected, default_role="assistant")
    if isinstance(prompt, list):
        prompt_msgs = as_messages(prompt, columns.prompt, default_role="user")
        _check_roles(prompt_msgs, PROMPT_ROLES, columns.prompt, "prompt messages")
        chosen_msgs = _strip_prefix(chosen_msgs, prompt_msgs)
        rejected_msgs = _strip_prefix(rejected_msgs, prompt_msgs)
    elif len(chosen_msgs) > 1 or len(rejected_msgs) > 1:
        # Whole conversations: the prompt is their shared prefix, the responses the final turns.
        if chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise RowError("missing_field", "chosen and rejected conversations do not share the prompt turns")
        _check_roles(chosen_msgs[:-1], PROMPT_ROLES, columns.chosen, "prompt turns")
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:-1], chosen_msgs[-1:], rejected_msgs[-1:]
    elif prompt is None:
        raise RowError("missing_field", f"no {columns.prompt!r}")
    elif not isinstance(prompt, str):
        raise RowError("non_string_content", f"{columns.prompt!r} is a {type(prompt).__name__}")
    else:
        prompt_msgs = [{"role": "user", "content": prompt}]
    if not prompt_msgs or not any(m["content"].strip() for m in prompt_msgs):
        raise RowError("empty_field", f"{columns.prompt!r} is empty")
    for key, msgs in ((columns.chosen, chosen_msgs), (columns.rejected, rejected_msgs)):
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise RowError("empty_field", f"{key!r} has an empty response")
        _check_roles(msgs, (REPLY_ROLE,), key, "replies")
    if chosen_msgs == rejected_msgs:
        raise RowError("identical_responses", "chosen and rejected responses are identical")
    return PreferenceRow("chat", prompt_msgs, chosen_msgs, rejected_msgs)


def as_messages(value: Any, key: str, default_role: str) -> list[Message]:
    """A string becomes one message of ``default_role``; a list must hold ``{role: str, content: str}`` dicts."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise RowError("non_string_content", f"{key!r} is a {type(value).__name__}, not a string or message list")
    if not value:
        raise RowError("empty_field", f"{key!r} is an empty list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "content" not in message or "role" not in message:
            raise RowError("missing_field", f"{key!r}[{i}] is not a {{role, content}} message")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            bad = "role" if not isinstance(role, str) else "content"
            raise RowError("non_string_content", f"{key!r}[{i}].{bad} is a {type(message[bad]).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_roles(messages: list[Message], allowed: tuple[str, ...], key: str, what: str) -> None:
    for message in messages:
        if message["role"] not in allowed:
            raise RowError("bad_role", f"{key!r} has a message with role {message['role']!r}; {what} must be "
                                       f"{' or '.join(allowed)}")


def _strip_prefix(messages: list[Message], prefix: list[Message]) -> list[Message]:
    return messages[len(prefix):] if messages[:len(prefix)] == prefix else messages
