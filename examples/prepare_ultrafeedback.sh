#!/usr/bin/env bash
# Shared by the recipes' prepare.sh: convert an SFT model to a megatron_dil checkpoint at the training TP size, then
# tokenize UltraFeedback-binarized (train_prefs -> ${DATA}_train, test_prefs -> ${DATA}_test_train for validation)
# with its tokenizer, truncating prompts keeping their end (the released recipe).
#
# Inputs (fetch them yourself; nothing here downloads):
#   HF_MODEL  the SFT model directory
#   UF_DATA   HuggingFaceH4/ultrafeedback_binarized saved by `datasets` (splits train_prefs, test_prefs):
#             python -c "import datasets; datasets.load_dataset('HuggingFaceH4/ultrafeedback_binarized')\
#                        .save_to_disk('data/ultrafeedback_binarized')"
# Set by the caller: TP (must equal the recipe's parallel.tensor; PP is free), CKPT, DATA, MAX_LENGTH,
# MAX_PROMPT_LENGTH; optional WORKERS (16).
set -euo pipefail
HF_MODEL="${HF_MODEL:?set HF_MODEL to the SFT model directory}"
UF_DATA="${UF_DATA:?set UF_DATA to the saved ultrafeedback_binarized dataset directory}"
: "${TP:?}" "${CKPT:?}" "${DATA:?}" "${MAX_LENGTH:?}" "${MAX_PROMPT_LENGTH:?}"
WORKERS="${WORKERS:-16}"

[[ -d "$CKPT" ]] || megatron-dil-hf-to-megatron --source "$HF_MODEL" --output "$CKPT" --tensor-parallel "$TP" \
    --dtype bfloat16

for split in train_prefs test_prefs; do
    prefix="$DATA"; [[ "$split" == test_prefs ]] && prefix="${DATA}_test"
    [[ -f "${prefix}_train.json" ]] || megatron-dil-preprocess --input "$UF_DATA" --input-split "$split" \
        --tokenizer "$CKPT/tokenizer" --output-prefix "$prefix" --max-length "$MAX_LENGTH" \
        --max-prompt-length "$MAX_PROMPT_LENGTH" --truncation-mode keep_end --workers "$WORKERS"
done
