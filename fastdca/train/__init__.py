"""DCA fine-tuning on a task, built on transformers' Trainer: `fastdca.train.train` and what it needs.

Trainer brings gradient accumulation, mixed precision, checkpoints, resume and multi-GPU launch
(torchrun / accelerate launch); fastdca adds the data pipeline, the adapter-only checkpoints
(adapter.safetensors + dca_config.json, never the frozen base weights) and a progress bar that shows
the cross-entropy and the causal loss separately.
"""

from fastdca.train.data import IGNORE_INDEX, PadCollator, length_buckets, packing_collator, tokenize_examples
from fastdca.train.settings import TrainSettings, compile_mode
from fastdca.train.checkpoints import check_checkpoint
from fastdca.train.trainer import DCATrainer
from fastdca.train.run import is_rank_zero, train

__all__ = ["train", "TrainSettings", "DCATrainer", "tokenize_examples", "PadCollator", "packing_collator",
           "length_buckets", "IGNORE_INDEX", "compile_mode", "check_checkpoint", "is_rank_zero"]
