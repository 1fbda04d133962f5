"""Regenerate the bundled tiny preference task: examples/tiny/tokenizer/ and examples/tiny/pairs.jsonl.

    python examples/tiny/make_tiny_task.py
    megatron-dil-preprocess --input examples/tiny/pairs.jsonl --tokenizer examples/tiny/tokenizer \
        --output-prefix runs/data/tiny --max-length 64 --max-prompt-length 32 --valid-fraction 0.1
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_dil.data.tiny_task import build_tiny_tokenizer, tiny_example_dir, write_tiny_pairs  # noqa: E402

if __name__ == "__main__":
    here = tiny_example_dir()
    build_tiny_tokenizer(os.path.join(here, "tokenizer"))
    write_tiny_pairs(os.path.join(here, "pairs.jsonl"))
    print(f"wrote {here}/tokenizer and {here}/pairs.jsonl")
