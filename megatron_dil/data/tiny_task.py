"""The bundled tiny preference task and its word-level tokenizer (examples/tiny/).

Task: the prompt asks to sort a few digits ``ascending`` or ``descending``; the chosen response is the correctly
sorted sequence, the rejected one breaks the rule: sorted the other way (so the model must read the instruction) or an
unsorted permutation (a bigram-level error). A randomly initialised 2-layer decoder learns to prefer chosen responses
within a few dozen DPO/DIL steps, which is what the quick start and the trainer's learning test rely on.

Tokenizer: a ``tokenizers`` WordLevel model split on whitespace, with ``<s>`` added as BOS by its post-processor and a
chat template that also writes ``{{ bos_token }}`` (so every run exercises the double-BOS guard). Regenerate the files
with ``python examples/tiny/make_tiny_task.py``.
"""
from __future__ import annotations

import json
import os
import random

from megatron_dil.io.files import atomic_write_text

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["sort", "ascending", "descending", ":"] + [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|> "
    "{{ message['content'] }} {{ eos_token }} {% else %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_tokenizer(output_dir: str) -> str:
    """Write the tiny HF tokenizer (tokenizer.json + config with chat template) to ``output_dir``; return it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=SPECIAL_TOKENS[4:])
    tokenizer.chat_template = CHAT_TEMPLATE
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def make_pair(rng: random.Random) -> dict:
    """One conversational row: ``sort <order> : d1 d2 ...`` → sorted digits (chosen) vs a rule-breaking order."""
    order = rng.choice(["ascending", "descending"])
    while True:
        digits = [rng.randrange(10) for _ in range(rng.randint(4, 7))]
        if len(set(digits)) >= 3:
            break
    chosen = sorted(digits, reverse=order == "descending")
    if rng.random() < 0.5:
        rejected = chosen[::-1]  # sorted the wrong way
    else:
        rejected = chosen[:]
        while rejected == chosen or rejected == chosen[::-1]:
            rng.shuffle(rejected)
    text = " ".join
    return {
        "prompt": [{"role": "user", "content": f"sort {order} : {text(map(str, digits))}"}],
        "chosen": [{"role": "assistant", "content": text(map(str, chosen))}],
        "rejected": [{"role": "assistant", "content": text(map(str, rejected))}],
    }


def write_tiny_pairs(path: str, num_pairs: int = 3600, seed: int = 0) -> str:
    """Write ``num_pairs`` deterministic rows as JSONL to ``path`` (atomically); return it."""
    rng = random.Random(seed)
    atomic_write_text(path, "".join(json.dumps(make_pair(rng)) + "\n" for _ in range(num_pairs)))
    return path


def tiny_example_dir() -> str:
    """The repository's examples/tiny directory (tokenizer/ and pairs.jsonl)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "examples", "tiny")


TINY_MAX_LENGTH = 32
TINY_MAX_PROMPT_LENGTH = 16


def prepare_tiny_dataset(output_prefix: str, valid_fraction: float = 0.1, workers: int = 1) -> dict[str, str]:
    """Preprocess the bundled examples/tiny/pairs.jsonl with its tokenizer; return ``{"train": prefix, "valid":
    prefix, "tokenizer": dir}`` ready for ``DataConfig(train=[...], valid=..., tokenizer=...)``."""
    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import preprocess_pairs

    here = tiny_example_dir()
    tokenizer_dir = os.path.join(here, "tokenizer")
    result = preprocess_pairs(PreprocessConfig(
        inputs=[os.path.join(here, "pairs.jsonl")], output_prefix=output_prefix, tokenizer=tokenizer_dir,
        max_length=TINY_MAX_LENGTH, max_prompt_length=TINY_MAX_PROMPT_LENGTH, valid_fraction=valid_fraction,
        workers=workers, progress=False))
    return dict(result.prefixes, tokenizer=tokenizer_dir)
