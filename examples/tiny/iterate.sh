#!/usr/bin/env bash
# Alignment from demonstrations alone on the tiny task (CPU, 2 ranks), side by side in one run:
#   SFT (100 steps) on demonstrations -> 2 self-play iterations of DIL-LSIF | SPIN (DPO, summed log-probs, beta 0.1)
#   | the control: plain SFT on the same demonstrations for the same number of extra steps.
#   bash examples/tiny/iterate.sh          (after bash scripts/setup_env.sh; ~5 min on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
RUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2)

"$PY" -m megatron_dil.data.preprocess --kind demonstrations --response-column chosen \
    --input examples/tiny/pairs.jsonl --tokenizer examples/tiny/tokenizer --output-prefix runs/data/tiny_demo \
    --max-length 32 --max-prompt-length 16 --valid-fraction 0.1 --no-progress
rm -rf runs/tiny_demo_sft runs/tiny_iterate_{dil,spin,sft}
"${RUN[@]}" -m megatron_dil.train --config examples/tiny/sft_demonstrations.yaml
"${RUN[@]}" -m megatron_dil.iterate --config examples/tiny/iterate.yaml output_dir=runs/tiny_iterate_dil
"${RUN[@]}" -m megatron_dil.iterate --config examples/tiny/iterate.yaml output_dir=runs/tiny_iterate_spin \
    train.loss.name=dpo train.loss.logps=sum train.loss.beta=0.1 train.loss.sft_weight=0
"${RUN[@]}" -m megatron_dil.iterate --config examples/tiny/iterate.yaml output_dir=runs/tiny_iterate_sft \
    train.loss.name=sft train.loss.sft_weight=0
for name in dil spin sft; do echo "== $name"; cat "runs/tiny_iterate_$name/summary.tsv"; done
