#!/usr/bin/env bash
# The paper's Fig. 5a on Letter Concatenation: accuracy against H (causal_len, the adapter tokens that
# form X_G) in {1, 2, 4, 6, 8} for the study's chosen definition (variance token, xg_space hidden) at
# alpha = 1, with LLaMA-Adapter (alpha = 0) as the baseline line. The recipe is studies/letters.sh's.
# Resumable: rerun the script and finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--model smollm2 --task letter_concat --task-option train_variants=second_last --task-option n_train=1200
        --steps 150 --batch-size 8 --lr 1e-2 --max-length 128 --output studies/letters_h"
for seed in ${SEEDS:-0 1 2}; do
  fastdca sweep $COMMON --seeds $seed --grid alpha=0 --grid causal_len=2 --grid variance=token --grid xg_space=hidden
  fastdca sweep $COMMON --seeds $seed --grid alpha=1 --grid causal_len=1,2,4,6,8 --grid variance=token --grid xg_space=hidden
done
