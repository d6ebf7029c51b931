#!/usr/bin/env bash
# The Letter Concatenation study of RESULTS.md: LLaMA-Adapter (alpha = 0) and DCA under the four
# definitions of the causal loss, at alpha values chosen from the alpha = 1 grad shares so that each
# definition spans a causal grad share from about 1e-3 to about 1. Seed-major: every point gets seed 0
# before any gets seed 1. Resumable: rerun the script and finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--model smollm2 --task letter_concat --task-option train_variants=second_last --task-option n_train=1200
        --steps 150 --batch-size 8 --lr 1e-2 --max-length 128 --output studies/letters"
for seed in ${SEEDS:-0 1 2}; do
  fastdca sweep $COMMON --seeds $seed --grid alpha=0 --grid variance=sample --grid xg_space=head
  fastdca sweep $COMMON --seeds $seed --grid alpha=0.03,1,30 --grid variance=token --grid xg_space=hidden
  fastdca sweep $COMMON --seeds $seed --grid alpha=1,10,300 --grid variance=token --grid xg_space=head
  fastdca sweep $COMMON --seeds $seed --grid alpha=1,30,300 --grid variance=sample --grid xg_space=hidden
  fastdca sweep $COMMON --seeds $seed --grid alpha=1,30,1000,10000 --grid variance=sample --grid xg_space=head
done
