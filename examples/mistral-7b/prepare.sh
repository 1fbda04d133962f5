#!/usr/bin/env bash
# Prepare the Mistral-7B recipes (dil_lsif.yaml): convert the SFT model to a megatron_dil
# checkpoint at the training TP size, then tokenize UltraFeedback-binarized with its tokenizer.
#
#   HF_MODEL=hf/mistral-7b-sft-beta UF_DATA=data/ultrafeedback_binarized bash examples/mistral-7b/prepare.sh
#
# Inputs (fetch them yourself; nothing here downloads):
#   HF_MODEL  Mistral-7B SFT model directory, e.g. `hf download HuggingFaceH4/mistral-7b-sft-beta --local-dir ...`
#             (the SFT model the DIL and SimPO papers start from)
#   UF_DATA   HuggingFaceH4/ultrafeedback_binarized saved by `datasets` (splits train_prefs, test_prefs):
#             python -c "import datasets; datasets.load_dataset('HuggingFaceH4/ultrafeedback_binarized')\
#                        .save_to_disk('data/ultrafeedback_binarized')"
# Outputs (the paths the recipes read): checkpoints/mistral-7b-sft-tp2, runs/data/uf_mistral_train (train_prefs),
# runs/data/uf_mistral_test_train (test_prefs, the validation set).
set -euo pipefail
HF_MODEL="${HF_MODEL:?set HF_MODEL to the Mistral-7B SFT model directory}"
UF_DATA="${UF_DATA:?set UF_DATA to the saved ultrafeedback_binarized dataset directory}"
TP="${TP:-2}"  # must equal parallel.tensor of the recipe (the checkpoint is sharded for it; PP is free)
CKPT="${CKPT:-checkpoints/mistral-7b-sft-tp${TP}}"
DATA="${DATA:-runs/data/uf_mistral}"
WORKERS="${WORKERS:-16}"

[[ -d "$CKPT" ]] || megatron-dil-hf-to-megatron --source "$HF_MODEL" --output "$CKPT" --tensor-parallel "$TP" \
    --dtype bfloat16

# Released recipe: max length 1024, max prompt 512, prompt truncated keeping its end.
for split in train_prefs test_prefs; do
    prefix="$DATA"; [[ "$split" == test_prefs ]] && prefix="${DATA}_test"
    [[ -f "${prefix}_train.json" ]] || megatron-dil-preprocess --input "$UF_DATA" --input-split "$split" \
        --tokenizer "$CKPT/tokenizer" --output-prefix "$prefix" --max-length 1024 --max-prompt-length 512 \
        --truncation-mode keep_end --workers "$WORKERS"
done
