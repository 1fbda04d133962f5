#!/usr/bin/env bash
# Prepare the Qwen3-8B recipe (dil_lsif.yaml): checkpoint at TP=4 and UltraFeedback-binarized at max length 2048 /
# max prompt 1800 (see examples/prepare_ultrafeedback.sh).
#
#   HF_MODEL=hf/Qwen3-8B-SFT UF_DATA=data/ultrafeedback_binarized bash examples/qwen3-8b/prepare.sh
#
# HF_MODEL: a Qwen3-8B SFT model directory (e.g. `hf download Qwen/Qwen3-8B-Base --local-dir ...`, then SFT). Outputs:
# checkpoints/qwen3-8b-sft-tp4, runs/data/uf_qwen3_train, runs/data/uf_qwen3_test_train.
set -euo pipefail
export TP="${TP:-4}" CKPT="${CKPT:-checkpoints/qwen3-8b-sft-tp${TP:-4}}" DATA="${DATA:-runs/data/uf_qwen3}"
export MAX_LENGTH=2048 MAX_PROMPT_LENGTH=1800
exec bash "$(dirname "${BASH_SOURCE[0]}")/../prepare_ultrafeedback.sh"
