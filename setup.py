"""megatron_dil: preference alignment (DIL and the DPO family) on Megatron-Core with TP/PP/DP.

Install (CPU / CI): install torch first so pip never resolves a CUDA build, then this package:
    pip install torch==2.13.0 && pip install -e .[test]        # or: bash scripts/setup_env.sh
GPU: use the NGC PyTorch image (see Dockerfile); it ships torch, Transformer Engine and apex.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "megatron_dil" / "__init__.py").read_text()).group(1)

# Ranges here, exact versions in scripts/constraints.txt: CI (scripts/setup_env.sh) installs torch==2.13.0 (the CPU
# wheel) FIRST and then this package under those constraints, so CI runs exactly the pinned set; the NGC image
# (Dockerfile) keeps its own CUDA torch and numpy, which exact pins here would replace. Lower bounds are not tested.
INSTALL_REQUIRES = [
    "torch>=2.6",
    # 0.16.x: newest for Python 3.11 (>=0.17 needs 3.12); the CPU compatibility layer is written against 0.16.1
    "megatron-core>=0.16.1,<0.17",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "sentencepiece>=0.2",
    "datasets>=3.0",
    "tensorboard>=2.15",
    "psutil>=5.9",  # megatron.core.dist_checkpointing needs it but does not declare it (save hangs without it)
    "einops>=0.7",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "tqdm>=4.66",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "peft>=0.21"],  # peft: the LoRA export is checked against PeftModel
    # Transformer Engine and apex are not pip-installable without a CUDA toolchain; they come with the NGC PyTorch
    # image (nvcr.io/nvidia/pytorch), where megatron_dil uses them automatically when importable with CUDA.
    "gpu": [],
    # Optional comparison against TRL's DPOTrainer in bench/.
    "bench": ["trl"],
}

setup(
    name="megatron_dil",
    version=VERSION,
    description="Direct Imitation Learning (DIL) and DPO-family preference alignment on Megatron-Core (TP/PP/DP)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dil", "megatron_dil.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "megatron-dil-train = megatron_dil.train:main",
            "megatron-dil-preprocess = megatron_dil.data.preprocess:main",
            "megatron-dil-iterate = megatron_dil.iterate.cli:main",
            "megatron-dil-hf-to-megatron = megatron_dil.convert.hf_to_megatron:main",
            "megatron-dil-megatron-to-hf = megatron_dil.convert.megatron_to_hf:main",
            "megatron-dil-generate = megatron_dil.generate:main",
            "megatron-dil-score = megatron_dil.reward.cli:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
