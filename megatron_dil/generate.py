"""Sample completions from a megatron_dil checkpoint (any TP × PP; DP splits the prompts).

    torchrun --nproc_per_node 4 -m megatron_dil.generate --checkpoint CKPT --prompts PROMPTS --output OUT.jsonl

See ``megatron_dil/generation/cli.py`` (``--help``) for the flags and the output rows.
"""
from __future__ import annotations

import sys

from megatron_dil.generation.cli import main

if __name__ == "__main__":
    sys.exit(main())
