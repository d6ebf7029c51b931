"""The model integration: the only package that knows the internals of transformers (and of TRL and
PEFT, which users wrap around it). `api` puts the parts together; docs/DESIGN.md draws the layers."""

from fastdca.hf import peft as _peft
from fastdca.hf.adapter import DCAAdapter
from fastdca.hf.api import from_pretrained, load_adapter, patch, unpatch
from fastdca.hf.architectures import SUPPORTED_MODEL_TYPES
from fastdca.hf.patching import (describe, disable_adapter, print_trainable_parameters, trainable_parameter_count,
                                 trainable_parameters)
from fastdca.hf.records import AdapterAttentionRecord, record_adapter_attention
from fastdca.hf.saving import save_adapter
from fastdca.hf.state import adapted_layers, adapter_state_dict, decoder_layer_class_names, get_config, is_patched

_peft.load_dca_with_peft_adapters()

__all__ = ["patch", "unpatch", "save_adapter", "load_adapter", "from_pretrained", "describe", "disable_adapter",
           "print_trainable_parameters", "trainable_parameters", "is_patched", "get_config", "adapter_state_dict",
           "adapted_layers", "decoder_layer_class_names", "record_adapter_attention", "AdapterAttentionRecord",
           "DCAAdapter", "trainable_parameter_count", "SUPPORTED_MODEL_TYPES"]
