"""DCA fine-tuning on a task, built on transformers' Trainer: `fastdca.train.train` and what it needs.

Trainer brings gradient accumulation, mixed precision, checkpoints, resume and multi-GPU launch
(torchrun / accelerate launch); fastdca adds the data pipeline, the adapter-only checkpoints
(adapter.safetensors + dca_config.json, never the frozen base weights) and a progress bar that shows
the cross-entropy and the causal loss separately.

Its modules, from the bottom up (each imports only those above it in this list):

    guards       NonFiniteGuard and InterruptGuard, the callbacks that keep a run from losing work
    locks        one writer per output folder (an OS lock naming its pid); fastdca sweep's too
    run_record   run.json: the settings that decide a run's result, and what a new run into the folder does
    checkpoints  what resuming needs of a checkpoint-N folder; its partial folder until it is whole; the adapter
                 a diverged run leaves
    memory       out of memory in training: the error that says what to change; --auto-batch-size's search
    fsdp         what `--fsdp` adds to Trainer: the FSDP2 options, float32 reduction, the checks
    settings     TrainSettings, the optimisation settings (the paper's defaults)
    data         the examples tokenized, and the collators (padded, bucketed, packed)
    trainer      DCATrainer (adapter-only checkpoints, CE and the causal loss logged apart) and its callbacks
    run          train(): one run into its output folder
"""

from fastdca.train.checkpoints import check_checkpoint
from fastdca.train.data import IGNORE_INDEX, PadCollator, length_buckets, packing_collator, tokenize_examples
from fastdca.train.run import is_rank_zero, train
from fastdca.train.settings import TrainSettings, compile_mode
from fastdca.train.trainer import DCATrainer

__all__ = ["train", "TrainSettings", "DCATrainer", "tokenize_examples", "PadCollator", "packing_collator",
           "length_buckets", "IGNORE_INDEX", "compile_mode", "check_checkpoint", "is_rank_zero"]
