"""Task verifiers: score a completion for its prompt (1.0 correct, 0.0 wrong; None = not this task's prompt).

``tiny_sort`` (the bundled task, ``data.tiny_task``): the prompt ``sort <ascending|descending> : d1 d2 ...`` is
(also found inside a rendered chat prompt, e.g. one decoded from an indexed dataset) is answered correctly iff the completion's whitespace-separated tokens are exactly the digits sorted in that order.
"""
from __future__ import annotations

import re
from typing import Any, Callable

Verifier = Callable[[Any, str], "float | None"]

_SORT_PROMPT = re.compile(r"sort (ascending|descending) :((?: \d)+)")  # also inside a rendered chat prompt


def prompt_text(prompt: Any) -> str:
    """The last user turn of a message list, or the string itself."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt)


def tiny_sort(prompt: Any, completion: str) -> float | None:
    match = _SORT_PROMPT.search(prompt_text(prompt))
    if match is None:
        return None
    digits = match.group(2).split()
    expected = sorted(digits, key=int, reverse=match.group(1) == "descending")
    return float(completion.split() == expected)


VERIFIERS: dict[str, Verifier] = {"tiny_sort": tiny_sort}


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}")
    return VERIFIERS[name]
