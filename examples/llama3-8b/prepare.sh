#!/usr/bin/env bash
# Prepare the Llama-3-8B recipes (dil_lsif.yaml, dpo.yaml, simpo.yaml): convert the SFT model to a megatron_dil
# checkpoint at the training TP size, then tokenize UltraFeedback-binarized with its tokenizer.
#
#   HF_MODEL=hf/Llama-3-Base-8B-SFT UF_DATA=data/ultrafeedback_binarized bash examples/llama3-8b/prepare.sh
#
# Inputs (fetch them yourself; nothing here downloads):
#   HF_MODEL  Llama-3-8B SFT model directory, e.g. `hf download princeton-nlp/Llama-3-Base-8B-SFT --local-dir ...`
#             (the SFT model the DIL and SimPO papers start from)
#   UF_DATA   HuggingFaceH4/ultrafeedback_binarized saved by `datasets` (splits train_prefs, test_prefs):
#             python -c "import datasets; datasets.load_dataset('HuggingFaceH4/ultrafeedback_binarized')\
#                        .save_to_disk('data/ultrafeedback_binarized')"
# Outputs (the paths the recipes read): checkpoints/llama3-8b-sft-tp4, runs/data/uf_llama3_train (train_prefs),
# runs/data/uf_llama3_test_train (test_prefs, the validation set).
set -euo pipefail
HF_MODEL="${HF_MODEL:?set HF_MODEL to the Llama-3-8B SFT model directory}"
UF_DATA="${UF_DATA:?set UF_DATA to the saved ultrafeedback_binarized dataset directory}"
TP="${TP:-4}"  # must equal parallel.tensor of the recipe (the checkpoint is sharded for it; PP is free)
CKPT="${CKPT:-checkpoints/llama3-8b-sft-tp${TP}}"
DATA="${DATA:-runs/data/uf_llama3}"
WORKERS="${WORKERS:-16}"

[[ -d "$CKPT" ]] || megatron-dil-hf-to-megatron --source "$HF_MODEL" --output "$CKPT" --tensor-parallel "$TP" \
    --dtype bfloat16

# Released recipe: max length 2048, max prompt 1800, prompt truncated keeping its end.
for split in train_prefs test_prefs; do
    prefix="$DATA"; [[ "$split" == test_prefs ]] && prefix="${DATA}_test"
    [[ -f "${prefix}_train.json" ]] || megatron-dil-preprocess --input "$UF_DATA" --input-split "$split" \
        --tokenizer "$CKPT/tokenizer" --output-prefix "$prefix" --max-length 2048 --max-prompt-length 1800 \
        --truncation-mode keep_end --workers "$WORKERS"
done
