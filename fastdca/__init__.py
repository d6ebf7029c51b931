"""fastdca: fast, low-memory Deconfounded Causal Adaptation (DCA) fine-tuning for LLaMA-family models."""

from fastdca.config import DCAConfig
from fastdca.ops import dca_attention
from fastdca.patch import describe, load_adapter, patch, save_adapter, unpatch

__all__ = ["DCAConfig", "dca_attention", "patch", "unpatch", "save_adapter", "load_adapter", "describe"]
__version__ = "0.1.0"
