#!/usr/bin/env bash
# Quick start on a fresh machine (CPU is enough): set up .venv, tokenize the bundled tiny preference task, and train
# DIL-LSIF on it with TP=2 x DP=2 (4 gloo ranks; on a GPU machine the same command uses NCCL).
#
#   bash examples/quickstart.sh [section.key=value ...]     # extra args are config overrides, e.g. train.train_iters=20
#
# Output: runs/tiny_dil_lsif/ (config.yaml, tensorboard/, checkpoints/, final/); data in runs/data/tiny_{train,valid}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup_env.sh

DATA=runs/data/tiny
if [[ -f "${DATA}_train.json" && -f "${DATA}_valid.json" ]]; then
    echo "quickstart: reusing preprocessed ${DATA}_{train,valid}"
else
    .venv/bin/megatron-dil-preprocess --input examples/tiny/pairs.jsonl --tokenizer examples/tiny/tokenizer \
        --output-prefix "$DATA" --max-length 32 --max-prompt-length 16 --valid-fraction 0.1 --no-progress
fi

.venv/bin/torchrun --standalone --nproc_per_node 4 -m megatron_dil.train --config examples/tiny/dil_lsif.yaml "$@"
