#!/usr/bin/env bash
# Prepare the Llama-3-8B recipes (dil_lsif.yaml, dpo.yaml, simpo.yaml): checkpoint at TP=4 and UltraFeedback-binarized
# at the released max length 2048 / max prompt 1800 (see examples/prepare_ultrafeedback.sh).
#
#   HF_MODEL=hf/Llama-3-Base-8B-SFT UF_DATA=data/ultrafeedback_binarized bash examples/llama3-8b/prepare.sh
#
# HF_MODEL: e.g. `hf download princeton-nlp/Llama-3-Base-8B-SFT --local-dir ...` (the SFT model the DIL and SimPO
# papers start from). Outputs: checkpoints/llama3-8b-sft-tp4, runs/data/uf_llama3_train, runs/data/uf_llama3_test_train.
set -euo pipefail
export TP="${TP:-4}" CKPT="${CKPT:-checkpoints/llama3-8b-sft-tp${TP:-4}}" DATA="${DATA:-runs/data/uf_llama3}"
export MAX_LENGTH=2048 MAX_PROMPT_LENGTH=1800
exec bash "$(dirname "${BASH_SOURCE[0]}")/../prepare_ultrafeedback.sh"
