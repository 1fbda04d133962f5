#!/usr/bin/env bash
# Quick start on a fresh machine (CPU is enough): set up .venv, tokenize the bundled tiny sorting task, then the real
# alignment pipeline on 2 ranks (DP=2, gloo; NCCL on a GPU machine):
#   1. SFT on the chosen responses from random init                       (examples/tiny/sft.yaml)
#   2. DIL-LSIF from the SFT model, which is also the reference            (examples/tiny/dil_lsif_sft.yaml)
# and after each stage greedy generation on 300 held-out prompts with megatron-dil-generate, scored by the task's
# verifier (exactly the digits sorted in the asked order).
#
#   bash examples/quickstart.sh [section.key=value ...]     # extra args are config overrides for both training stages
#
# Output: runs/tiny_sft/ and runs/tiny_sft_dil_lsif/ (config.yaml, tensorboard/, checkpoints/, final/, heldout.jsonl);
# data in runs/data/tiny_{train,valid}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup_env.sh

DATA=runs/data/tiny  # re-tokenized every time (about a second): never a dataset written by an older format
.venv/bin/megatron-dil-preprocess --input examples/tiny/pairs.jsonl --tokenizer examples/tiny/tokenizer \
    --output-prefix "$DATA" --max-length 32 --max-prompt-length 16 --valid-fraction 0.1 --no-progress

export OMP_NUM_THREADS=1
RUN=(.venv/bin/torchrun --standalone --nproc_per_node 2)

generate() {  # generate RUN_DIR: greedy completions of 300 held-out prompts, scored
    "${RUN[@]}" -m megatron_dil.generate --checkpoint "$1/final" --prompts "${DATA}_valid" \
        --output "$1/heldout.jsonl" --greedy --max-new-tokens 12 --max-prompts 300 --batch-size 50 \
        --verifier tiny_sort --show 3 --overwrite --no-progress
}

echo "== quickstart 1/2: SFT on the chosen responses (random init) =="
"${RUN[@]}" -m megatron_dil.train --config examples/tiny/sft.yaml "$@"
generate runs/tiny_sft

echo "== quickstart 2/2: DIL-LSIF from the SFT model (reference = SFT model) =="
"${RUN[@]}" -m megatron_dil.train --config examples/tiny/dil_lsif_sft.yaml "$@"
generate runs/tiny_sft_dil_lsif

.venv/bin/python - <<'EOF'
import json
for name, path in (("SFT", "runs/tiny_sft"), ("SFT -> DIL-LSIF", "runs/tiny_sft_dil_lsif")):
    scores = [json.loads(line)["score"] for line in open(f"{path}/heldout.jsonl")]
    print(f"quickstart: held-out prompts sorted exactly (greedy): {name}: {sum(scores):.0f}/{len(scores)}")
EOF
