#!/usr/bin/env bash
# Math401 and Date Understanding at the paper's L' (1 and 10, the tasks' causal_layers): the study's
# chosen definition (variance token, xg_space hidden, alpha = 1) against LLaMA-Adapter (alpha = 0), on
# the Letter Concatenation recipe (150 steps of 8, lr 1e-2); 100 seeded held-out items per task.
# Resumable: rerun the script and finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="--model smollm2 --steps 150 --batch-size 8 --lr 1e-2 --grid alpha=0,1 --grid variance=token --grid xg_space=hidden"
for seed in ${SEEDS:-0 1 2}; do
  fastdca sweep $COMMON --seeds $seed --task math401 --max-length 96 --output studies/math401
  fastdca sweep $COMMON --seeds $seed --task date_understanding --max-length 200 --output studies/date_understanding
done
