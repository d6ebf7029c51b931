"""DCA fine-tuning on a task, built on transformers' Trainer: `fastdca.train.train` and what it needs.

Trainer brings gradient accumulation, mixed precision, checkpoints, resume and multi-GPU launch
(torchrun / accelerate launch); fastdca adds the data pipeline, the adapter-only checkpoints
(adapter.safetensors + dca_config.json, never the frozen base weights) and a progress bar that shows
the cross-entropy and the causal loss separately.
"""

from fastdca.train.run import (DCATrainer, PadCollator, TrainSettings, check_checkpoint, compile_mode, is_rank_zero,
                               length_buckets, packing_collator, tokenize_examples, train)

__all__ = ["train", "TrainSettings", "DCATrainer", "tokenize_examples", "PadCollator", "packing_collator",
           "length_buckets", "compile_mode", "check_checkpoint", "is_rank_zero"]
