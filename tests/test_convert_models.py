"""Shared fixtures of the convert tests (no tests here): tiny random Llama (GQA, untied, Llama-3 RoPE scaling),
Mistral (sliding window of 7 keys, well inside the 256-token sequences) and Qwen2 (QKV bias, tied, non-integer
rope_theta 10000.5: truncating it moves the logits by 2e-3) models saved three ways (sharded safetensors, .bin,
single safetensors), with their fp32 reference logits."""
from __future__ import annotations

from pathlib import Path

import torch

TOKENS = torch.randint(0, 200, (2, 256), generator=torch.Generator().manual_seed(0))
COMMON = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5, max_position_embeddings=16384)


def hf_configs() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    llama3_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_theta": 50000.0}
    return {
        "llama": LlamaConfig(**COMMON, num_hidden_layers=4, rope_parameters=llama3_scaling),
        "mistral": MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=7,
                                 rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
        "qwen2": Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.5}),
    }


def random_model(config, seed: int):
    """A transformers model with every weight random (norm weights around 1, biases non-zero)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def build_hf_models(root: Path) -> dict[str, tuple[Path, torch.Tensor]]:
    """name -> (HF directory, reference logits [b, s, V] in fp32)."""
    out = {}
    for seed, (name, config) in enumerate(hf_configs().items()):
        model = random_model(config, seed)
        directory = root / name
        if name == "llama":
            model.save_pretrained(directory, max_shard_size="100KB")  # several shards + index
            save_tokenizer(directory, config.vocab_size)
        elif name == "mistral":
            directory.mkdir(parents=True)
            config.save_pretrained(directory)
            torch.save(model.state_dict(), directory / "pytorch_model.bin")
        else:
            model.save_pretrained(directory)
        with torch.no_grad():
            out[name] = (directory, model(TOKENS).logits.float())
    return out
