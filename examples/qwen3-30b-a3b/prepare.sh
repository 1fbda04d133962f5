#!/usr/bin/env bash
# Prepare the Qwen3-30B-A3B (mixture of experts) recipe (dil_lsif.yaml): checkpoint at TP=1 (experts are stored whole
# under their global index, so it loads at any expert-parallel size) and UltraFeedback-binarized at max length 2048 /
# max prompt 1800 (see examples/prepare_ultrafeedback.sh). Conversion streams one layer's experts at a time.
#
#   HF_MODEL=hf/Qwen3-30B-A3B-SFT UF_DATA=data/ultrafeedback_binarized bash examples/qwen3-30b-a3b/prepare.sh
#
# Outputs: checkpoints/qwen3-30b-a3b-sft, runs/data/uf_qwen3moe_train, runs/data/uf_qwen3moe_test_train.
set -euo pipefail
export TP="${TP:-1}" CKPT="${CKPT:-checkpoints/qwen3-30b-a3b-sft}" DATA="${DATA:-runs/data/uf_qwen3moe}"
export MAX_LENGTH=2048 MAX_PROMPT_LENGTH=1800
exec bash "$(dirname "${BASH_SOURCE[0]}")/../prepare_ultrafeedback.sh"
