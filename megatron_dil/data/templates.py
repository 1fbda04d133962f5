"""Named chat templates for tokenizers that ship none, and the choice between them and the tokenizer's own.

Templates are jinja strings in the Hugging Face convention (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``), rendered by transformers' own renderer. A template that writes ``{{ bos_token }}`` must be tokenized
without adding special tokens again (the double-BOS trap), which :mod:`megatron_dil.data.tokenize` does.
"""
from __future__ import annotations

from megatron_dil.data.tokenizer import PreferenceTokenizer

NAMED_TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, many SFT models): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Zephyr (the alignment-handbook SFT models used by DPO/SimPO/DIL on Mistral-7B).
    "zephyr": (
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    # Llama-2-chat style with BOS written by the template.
    "llama2": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
        "{{ message['content'] }} [/INST]{% elif message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}"
        "\n<</SYS>>\n\n{% else %} {{ message['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    # No markup: turns concatenated, BOS first, EOS after each assistant turn.
    "plain": (
        "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    ),
}


def resolve_template(name: str, tokenizer: PreferenceTokenizer) -> tuple[str, str]:
    """Return ``(template_name, jinja_source)`` for ``name``.

    ``"auto"``: the tokenizer's own chat template when it has one, else ``"chatml"``;
    ``"tokenizer"``: the tokenizer's own (error if it has none); any key of :data:`NAMED_TEMPLATES`.
    """
    if name in ("auto", "tokenizer"):
        if tokenizer.chat_template:
            return "tokenizer", tokenizer.chat_template
        if name == "tokenizer":
            raise ValueError(f"--template tokenizer: tokenizer {tokenizer.path!r} has no chat template; pick one of "
                             f"{sorted(NAMED_TEMPLATES)}")
        return "chatml", NAMED_TEMPLATES["chatml"]
    if name not in NAMED_TEMPLATES:
        raise ValueError(f"unknown --template {name!r}; choose auto, tokenizer or one of {sorted(NAMED_TEMPLATES)}")
    return name, NAMED_TEMPLATES[name]
