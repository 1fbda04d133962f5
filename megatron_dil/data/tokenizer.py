"""One tokenizer interface over a Hugging Face tokenizer directory or a sentencepiece ``.model`` file.

The preprocessor and the trainer both load the tokenizer through :func:`load_tokenizer`; the ``fingerprint`` (a hash
of the token→id map and the special-token ids, independent of the path) is stored in the dataset metadata so that a
run with a different tokenizer is refused instead of silently training on mismatched ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template


@dataclass
class PreferenceTokenizer:
    """Tokenizer facade: plain encoding (no special tokens), special ids and the chat template.

    ``vocab_size`` is the real, unpadded vocabulary: one more than the largest id the tokenizer can produce (more than
    its number of tokens when its ids have gaps; Megatron pads it for TP itself). ``pad_id`` falls back to ``eos_id`` when
    the tokenizer has no pad token (padding positions are masked out anyway).
    ``adds_bos`` says whether the tokenizer prepends BOS when asked for special tokens (e.g. Llama), so plain-text
    rows get exactly that BOS while chat-templated text, whose template writes BOS itself, gets none more.
    """

    kind: str  # "hf" or "sentencepiece"
    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    adds_bos: bool
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    _backend: Any = field(repr=False, compare=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special token ADDED; special-token strings written in the text (e.g. a
        chat template's ``<s>``) map to their ids, for sentencepiece as for HF tokenizers."""
        if self.kind == "hf":
            if self._backend.is_fast:  # the Rust tokenizer directly: same ids, a fraction of the call overhead
                return self._backend.backend_tokenizer.encode(text, add_special_tokens=False).ids
            return list(self._backend(text, add_special_tokens=False)["input_ids"])
        specials = {tok: i for tok, i in ((self.bos_token, self.bos_id), (self.eos_token, self.eos_id)) if tok}
        if not specials:
            return list(self._backend.encode(text, out_type=int))
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                ids.extend(self._backend.encode(piece, out_type=int))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.kind == "hf":
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._backend.decode(list(ids))  # sentencepiece writes no control pieces

    def render_chat(self, messages: list[dict[str, str]], template: str, add_generation_prompt: bool) -> str:
        """Render ``messages`` with the jinja chat ``template`` (the same renderer transformers uses)."""
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )
        return rendered[0]

    @property
    def fingerprint(self) -> str:
        """sha256 over the sorted token→id map and the special ids: same vocabulary ⇔ same fingerprint."""
        if self.kind == "hf":
            vocab = sorted(self._backend.get_vocab().items(), key=lambda kv: kv[1])
        else:
            vocab = [(self._backend.id_to_piece(i), i) for i in range(self._backend.get_piece_size())]
        payload = json.dumps([vocab, self.bos_id, self.eos_id, self.pad_id, self.adds_bos], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def identity(self) -> dict[str, Any]:
        """What the dataset metadata records about the tokenizer."""
        return {
            "kind": self.kind, "path": self.path, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "adds_bos": self.adds_bos,
        }


class TokenizerError(ValueError):
    """A tokenizer path that cannot be loaded (names the path and what was expected)."""


EXPECTED = ("a Hugging Face tokenizer directory (tokenizer.json, or tokenizer.model with tokenizer_config.json) or a "
            "sentencepiece .model file")


def load_tokenizer(path: str) -> PreferenceTokenizer:
    """Load a HF tokenizer directory (local files only) or a sentencepiece ``.model`` file."""
    if not (os.path.isdir(path) or os.path.isfile(path) and path.endswith(".model")):
        raise FileNotFoundError(f"tokenizer {path!r}: expected {EXPECTED}")
    try:
        return _load_sentencepiece(path) if os.path.isfile(path) else _load_hf(path)
    except TokenizerError:
        raise
    except Exception as e:  # the libraries' own errors (truncated JSON, empty directory, ...) do not name the path
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"tokenizer {path!r} cannot be loaded ({type(e).__name__}: {detail}); expected "
                             f"{EXPECTED}, complete and readable") from None


def _load_hf(path: str) -> PreferenceTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer {path!r} has no eos token; preference training needs one to end responses")
    with_specials = tok("a", add_special_tokens=True)["input_ids"]
    adds_bos = tok.bos_token_id is not None and len(with_specials) > 0 and with_specials[0] == tok.bos_token_id
    return PreferenceTokenizer(
        kind="hf", path=os.path.abspath(path), vocab_size=max(len(tok), max(tok.get_vocab().values()) + 1),
        bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, adds_bos=adds_bos,
        chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
        bos_token=tok.bos_token, eos_token=tok.eos_token, _backend=tok,
    )


def _load_sentencepiece(path: str) -> PreferenceTokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.eos_id() < 0:
        raise TokenizerError(f"sentencepiece model {path!r} has no eos piece; preference training needs one")
    bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    return PreferenceTokenizer(
        kind="sentencepiece", path=os.path.abspath(path), vocab_size=sp.get_piece_size(), bos_id=bos_id,
        eos_id=sp.eos_id(), pad_id=sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id(), adds_bos=bos_id is not None,
        chat_template=None, bos_token=sp.id_to_piece(bos_id) if bos_id is not None else None,
        eos_token=sp.id_to_piece(sp.eos_id()), _backend=sp,
    )
