#!/usr/bin/env bash
# Multi-node launch with torchrun: run this same command on every node, changing only NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.cluster MASTER_PORT=29500 GPUS_PER_NODE=8 \
#       bash examples/launch/torchrun_multinode.sh examples/llama3-8b/dil_lsif.yaml [section.key=value ...]
#
# Every node needs the same code, config, converted checkpoint and preprocessed data at the same paths (a shared
# filesystem), and output_dir on shared storage: checkpoints are written by several nodes (one shard per TP/PP rank)
# and resume reads them back. The reference log-prob cache is computed once and written beside the dataset.
# Data parallelism spans all nodes: DP = NNODES * GPUS_PER_NODE / (TP * PP); keep TP inside a node (TP <= 8).
#
# Environment: NNODES (default 1), NODE_RANK (0..NNODES-1, default 0), MASTER_ADDR (host of node 0, default
# localhost), MASTER_PORT (default 29500), GPUS_PER_NODE (default: visible GPUs, else 1), TORCHRUN (default torchrun;
# the quick start's venv has .venv/bin/torchrun). NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) pass through.
set -euo pipefail
CONFIG="${1:?usage: torchrun_multinode.sh CONFIG.yaml [section.key=value ...]}"
shift
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l)"
    [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
fi
# Megatron overlaps the TP/DP communication with compute only when kernels queue in order on one CUDA connection.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

exec "${TORCHRUN:-torchrun}" \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m megatron_dil.train --config "$CONFIG" "$@"
