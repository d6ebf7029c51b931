"""fastdca: fast, low-memory Deconfounded Causal Adaptation (DCA) fine-tuning for LLaMA-family models."""

from fastdca import dependency_notices

dependency_notices.install()   # before anything imports bitsandbytes

from fastdca.config import DCAConfig
from fastdca.errors import AdapterError, TrainingDiverged, TrainingInterrupted
from fastdca.ops import dca_attention
from fastdca.out_of_memory import OutOfMemory
from fastdca.patch import (describe, disable_adapter, from_pretrained, load_adapter, patch, print_trainable_parameters,
                           save_adapter, unpatch)

__all__ = ["DCAConfig", "dca_attention", "patch", "unpatch", "save_adapter", "load_adapter", "from_pretrained",
           "describe", "disable_adapter", "print_trainable_parameters", "AdapterError", "TrainingDiverged",
           "TrainingInterrupted", "OutOfMemory"]
__version__ = "0.1.0"
