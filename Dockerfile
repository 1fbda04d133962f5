# megatron_dil on the NGC PyTorch image: CUDA, NCCL, cuDNN, Transformer Engine and apex come with the base image
# (Python 3.12 and NVIDIA's own torch build, which is kept: the image's /etc/pip/constraint.txt pins it).
#
#   docker build -t megatron-dil:latest .
#   docker run --rm --gpus all --ipc=host --network=host -v $PWD:/workspace/run -w /workspace/run megatron-dil:latest \
#       torchrun --nproc_per_node 8 -m megatron_dil.train --config examples/llama3-8b/dil_lsif.yaml
# Multi-node: examples/launch/docker_run.sh on every node (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT).
#
# megatron-core: the image has Python 3.12, where megatron-core >= 0.17 would also install, but this package is
# written and tested against 0.16.x (as CI on Python 3.11), so the same version is pinned here; raise MCORE_VERSION
# only together with setup.py. Checkpoints are megatron_dil's own (safetensors / torch.save), not Megatron
# dist-checkpoints, so they move between this image and a CPU venv.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ARG MCORE_VERSION=0.16.1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/megatron_dil
# Dependencies first (a layer that survives source edits), then the package, editable so examples/ and tools/ stay
# beside it.
COPY setup.py README.md ./
COPY megatron_dil/__init__.py megatron_dil/__init__.py
RUN pip install --no-cache-dir "megatron-core==${MCORE_VERSION}" -e ".[test]" \
    && python -c "import torch, megatron.core, transformer_engine; print('torch', torch.__version__, \
'megatron-core', megatron.core.__version__, 'TE', transformer_engine.__version__)"
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -c "import megatron_dil.train"

WORKDIR /workspace/run
CMD ["bash"]
