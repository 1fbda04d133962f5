#!/usr/bin/env bash
# Run a recipe in the container built from the repository's Dockerfile (NGC PyTorch base: CUDA, NCCL, TE, apex).
#
#   docker build -t megatron-dil:latest .
#   bash examples/launch/docker_run.sh examples/llama3-8b/dil_lsif.yaml [section.key=value ...]
#
# The current directory (with checkpoints/, runs/ and data/ as the recipes expect) is mounted at /workspace/run
# and is the working directory, so relative paths in configs resolve as on the host; the package itself lives in
# the image. Multi-node: run this on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set (host
# networking makes the rendezvous and NCCL reach the other nodes directly).
set -euo pipefail
CONFIG="${1:?usage: docker_run.sh CONFIG.yaml [section.key=value ...]}"
shift
IMAGE="${IMAGE:-megatron-dil:latest}"
TTY_FLAGS=()
[[ -t 0 ]] && TTY_FLAGS=(-it)
exec docker run --rm "${TTY_FLAGS[@]}" --gpus all --ipc=host --network=host \
    --ulimit memlock=-1 --ulimit stack=67108864 \
    -e NNODES="${NNODES:-1}" -e NODE_RANK="${NODE_RANK:-0}" \
    -e MASTER_ADDR="${MASTER_ADDR:-localhost}" -e MASTER_PORT="${MASTER_PORT:-29500}" \
    -e GPUS_PER_NODE="${GPUS_PER_NODE:-8}" \
    -v "$PWD":/workspace/run -w /workspace/run \
    "$IMAGE" bash /opt/megatron_dil/examples/launch/torchrun_multinode.sh "$CONFIG" "$@"
