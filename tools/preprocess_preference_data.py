"""Preprocess preference pairs into Megatron indexed datasets; same as the `megatron-dil-preprocess` command.

    python tools/preprocess_preference_data.py --help
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dil.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
