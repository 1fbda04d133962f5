"""Convert a Hugging Face model into a megatron_dil checkpoint (or reshard one); same as the `megatron-dil-hf-to-megatron` command.

    python tools/convert_hf_to_megatron.py --help
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dil.convert.hf_to_megatron import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
