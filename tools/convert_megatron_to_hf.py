"""Export a megatron_dil checkpoint to a Hugging Face model directory; same as the `megatron-dil-megatron-to-hf` command.

    python tools/convert_megatron_to_hf.py --help
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dil.convert.megatron_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
