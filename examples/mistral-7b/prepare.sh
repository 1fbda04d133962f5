#!/usr/bin/env bash
# Prepare the Mistral-7B recipe (dil_lsif.yaml): checkpoint at TP=2 and UltraFeedback-binarized at the released max
# length 1024 / max prompt 512 (see examples/prepare_ultrafeedback.sh).
#
#   HF_MODEL=hf/mistral-7b-sft-beta UF_DATA=data/ultrafeedback_binarized bash examples/mistral-7b/prepare.sh
#
# HF_MODEL: e.g. `hf download HuggingFaceH4/mistral-7b-sft-beta --local-dir ...`. Outputs: checkpoints/mistral-7b-sft-tp2,
# runs/data/uf_mistral_train, runs/data/uf_mistral_test_train.
set -euo pipefail
export TP="${TP:-2}" CKPT="${CKPT:-checkpoints/mistral-7b-sft-tp${TP:-2}}" DATA="${DATA:-runs/data/uf_mistral}"
export MAX_LENGTH=1024 MAX_PROMPT_LENGTH=512
exec bash "$(dirname "${BASH_SOURCE[0]}")/../prepare_ultrafeedback.sh"
