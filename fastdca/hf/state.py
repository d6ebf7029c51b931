"""The per-model state of a patched model (kept on the model as a plain attribute, never saved) and the
questions asked of it: is it patched, with what config, which are its DCA parameters."""

from __future__ import annotations

from torch import nn

from fastdca.config import DCAConfig
from fastdca.hf import peft as peft_integration


STATE_ATTR = "_fastdca_state"


class PatchState:
    """Per-model bookkeeping, kept on the model as a plain attribute (not a module, not saved)."""

    def __init__(self, config: DCAConfig, base_impl: str, layer_ids, causal_ids, requires_grad, backend):
        self.config = config
        self.base_impl = base_impl
        self.layer_ids = list(layer_ids)            # adapted layers, ascending
        self.causal_ids = frozenset(causal_ids)     # the top L' adapted layers
        self.requires_grad = requires_grad          # name -> original requires_grad of base params
        self.backend = backend
        self.xg_mode = None                         # "sample" / "token" / None, decided per forward
        self.recording = False
        self.stats = {}
        self.padding_cache = None
        self.packing_cache = None
        self.packing_possible = True                # False for a forward given neither position_ids nor cu_seq_lens_q
        self.grad_enabled = False
        self.handles = []
        self.attn_modules = {}                      # layer_idx -> attention module
        self.model_info = {}
        self.attention_records = None               # layer_idx -> AdapterAttentionRecord while recording
        self.recorded_layers = frozenset()
        self.adapters_disabled = False              # inside disable_adapter: every layer attends as the base model
        self.peft_wrapper = None                    # the PeftModel that was patched, if one was
        self.static_cache = None                    # this forward's cache when it is a static one (slots)
        self.output_attentions = False              # this forward returns attention weights
        self.keys_to_ignore_on_save = None          # the model's own _keys_to_ignore_on_save, restored by unpatch

    def dca_parameters(self) -> list:
        """Every adapter's prompt and gate, from the adapted modules (no walk over the model's parameters)."""
        return [p for attn in self.attn_modules.values() for p in attn.dca.parameters()]


def unwrap(model):
    """The transformers model inside a PeftModel; any other model as it is."""
    return model.get_base_model() if peft_integration.is_peft_model(model) else model


def state_of(model) -> PatchState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched with fastdca; call fastdca.patch(model, config) first")
    return state


def is_patched(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def get_config(model: nn.Module) -> DCAConfig:
    return state_of(model).config


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter parameters, keyed by their names in `model` (e.g. model.layers.3.self_attn.dca.prompt; in
    the transformers model inside a PeftModel)."""
    model = unwrap(model)
    state_of(model)
    return {name: p for name, p in model.named_parameters() if is_dca_name(name)}


def is_dca_name(name: str) -> bool:
    return ".dca." in name or name.startswith("dca.")


def adapted_layers(model: nn.Module) -> list:
    """The decoder layer indices that carry a DCA adapter, ascending."""
    return list(state_of(model).layer_ids)


def decoder_layer_class_names(model: nn.Module) -> list:
    """The class names of the modules that hold an adapted attention module as a child: the decoder layers,
    the units FSDP shards one by one (each with its DCA parameters)."""
    attn = {id(m) for m in state_of(unwrap(model)).attn_modules.values()}
    return sorted({type(parent).__name__ for parent in unwrap(model).modules()
                   if any(id(child) in attn for child in parent.children())})
