import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_HF = dict(vocab_size=47, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The bundled tiny task preprocessed, and one tiny HF Llama (random weights) converted at several layouts."""
    import torch
    import transformers

    from megatron_dil.convert import hf_to_megatron
    from megatron_dil.data.tiny_task import prepare_tiny_dataset

    from megatron_dil.data.config import PreprocessConfig
    from megatron_dil.data.preprocess import preprocess_pairs
    from megatron_dil.data.tiny_task import TINY_MAX_LENGTH, TINY_MAX_PROMPT_LENGTH, tiny_example_dir

    root = tmp_path_factory.mktemp("trainer")
    full = prepare_tiny_dataset(str(root / "data" / "tiny"))
    subset = root / "subset.jsonl"  # 480 pairs: enough for the short runs, cheap to precompute references for
    lines = Path(tiny_example_dir(), "pairs.jsonl").read_text().splitlines()[:480]
    subset.write_text("\n".join(lines) + "\n")
    small = preprocess_pairs(PreprocessConfig(
        inputs=[str(subset)], output_prefix=str(root / "data" / "small"), tokenizer=full["tokenizer"],
        max_length=TINY_MAX_LENGTH, max_prompt_length=TINY_MAX_PROMPT_LENGTH, valid_fraction=0.15,
        progress=False)).prefixes
    data = dict(small, tokenizer=full["tokenizer"])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF, bos_token_id=1, eos_token_id=2))
    hf.save_pretrained(root / "hf", safe_serialization=True)
    checkpoints = {}
    for tp in (1, 2):  # shards hold global layer indices: any PP / virtual-PP split loads them
        checkpoints[tp] = str(root / f"ckpt_tp{tp}")
        hf_to_megatron(root / "hf", checkpoints[tp], tensor_parallel=tp, pipeline_parallel=1, progress=False)
    return {"root": root, "data": data, "full": full, "checkpoints": checkpoints}
