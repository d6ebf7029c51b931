#!/usr/bin/env bash
# Issue 33: DCA against LLaMA-Adapter under the paper's own recipe, on SmolLM2-135M-Instruct, on the CPU.
# The paper's recipe for both methods: maximum sequence length 256, AdamW at lr 1e-3, 5 epochs of batch 4,
# L = 20, M = 10, H = 2, L' by task (20 letters, 10 Date Understanding); DCA at alpha = 1 with the default
# causal loss (variance token, xg_space hidden), LLaMA-Adapter at alpha = 0, nothing else different.
# 3 seeds each, seed-major, paired by seed. The sweep's schedule: cosine with 5% warmup (the paper names none).
# Resumable: run it again and finished runs are skipped; an interrupted run resumes from its checkpoint.
# OUT (default studies/paper_recipe) is where the task folders go; TASKS picks them (default both, letters
# first). The runs are deterministic on the CPU: OUT=/tmp/rerun reproduces the rows, and its run folders
# hold the per-item predictions that studies/paired_comparison.py --runs /tmp/rerun copies into the study.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-studies/paper_recipe}
RECIPE="--model smollm2 --batch-size 4 --lr 1e-3 --max-length 256 --grid alpha=0,1"

# Letter Concatenation, second-last letters: N_TRAIN names (5 epochs = 5 * N_TRAIN / 4 steps), 400 held out.
# N_TRAIN = 800 is what fits a run into the issue's 25 minutes on the 2-core CPU (RESULTS.md has the timings).
LETTERS_TRAIN=${LETTERS_TRAIN:-800}
# Date Understanding (BIG-bench, 369 items): 300 held out, the other 69 trained on (5 epochs = 87 steps).
# The second task, chosen by a base-model check (`fastdca eval --model smollm2 --task T`, 100 items) and the
# earlier short runs (studies/date_understanding, studies/math401): the base model answers 10% of Date
# Understanding and an adapter of the demo's recipe 20-23% (off the floor, far from the ceiling); Math401 is at
# the floor (base 5%, adapters 5.7-7.3%); AddSub holds out only 61 items (the rest of it is in the training
# mix), short of the 300 the comparison needs.
# Per task (TASKS names them): its folder under OUT, the task with its options, and its steps
declare -A FOLDER=([letters]=letters [dates]=date_understanding)
declare -A TASK=(
  [letters]="--task letter_concat --task-option train_variants=second_last --task-option n_train=$LETTERS_TRAIN
             --task-option n_test=400"
  [dates]="--task date_understanding --task-option test_size=300")
declare -A STEPS=([letters]=$(( 5 * LETTERS_TRAIN / 4 )) [dates]=87)

TASKS=${TASKS:-letters dates}
for task in $TASKS; do
  [[ -v "FOLDER[$task]" ]] || { echo "TASKS: expected letters and/or dates, got $task" >&2; exit 2; }
done
for seed in ${SEEDS:-0 1 2}; do
  for task in $TASKS; do
    fastdca sweep $RECIPE ${TASK[$task]} --steps ${STEPS[$task]} --output $OUT/${FOLDER[$task]} --seeds $seed
  done
done
for task in $TASKS; do
  folder=$OUT/${FOLDER[$task]}
  # the base model on the same held-out items (no adapter): where the adapters start from
  [[ -f $folder/base_model.jsonl ]] || fastdca eval --model smollm2 ${TASK[$task]} --output $folder/base_model.jsonl
  # held-out Var(X_G) and Var / mean x^2 of every run's adapter on the task's test prompts (xg_stats.jsonl)
  python studies/xg_stats.py $folder ${TASK[$task]}
done
