"""Patching a transformers model in place and undoing it; what a patched model's adapter is made of.

`patch_model` freezes the base, adds a DCAAdapter to the top L layers' attention modules, gives the model
a private copy of its config switched to the fastdca attention implementation, and registers the loss
hooks. `fastdca.hf.api` puts the save/load integrations on top.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from typing import Optional

from torch import nn

from fastdca.config import DCAConfig
from fastdca.hf import peft as peft_integration
from fastdca.hf.adapter import DCAAdapter
from fastdca.hf.architectures import architecture_of, find
from fastdca.hf.attention import base_implementation, register, set_attn_implementation, switch_attn_implementation
from fastdca.hf.hooks import declared_output_class, post_hook, pre_hook, with_dca_losses
from fastdca.hf.state import STATE_ATTR, PatchState, adapter_state_dict, state_of, unwrap
from fastdca.ops import MAX_ADAPTER_LEN, MAX_HEAD_DIM
from fastdca.quantized import Linear4bitGradients




TRANSFORMERS_MIN = "5.0.0"
TRANSFORMERS_MAX_EXCLUSIVE = "6.0.0"


def patch_model(model: nn.Module, config: DCAConfig, backend: Optional[str]):
    """Add DCA adapters to the top `config.adapter_layers` decoder layers of `model`, in place.

    Every base parameter is frozen; each adapted attention module gets a `dca` submodule with float32
    `prompt` (M, hidden) ~ N(0, 1) and `gate` (num_attention_heads,) = 0, so the patched model's
    logits equal the unpatched model's until training moves the gates. A forward with labels returns
    CE + alpha * L_causal and sets `causal_loss` on the output. `backend` ("torch", "triton",
    "reference", "auto") is passed to `fastdca.ops.dca_attention`; None = FASTDCA_BACKEND or auto.
    `model` may be a PeftModel: the transformers model inside it is patched. Returns that model.
    """
    check_transformers_version()
    wrapper = model
    if peft_integration.is_peft_model(model):
        model = model.get_base_model()
    under_peft = peft_integration.has_tuner_layers(model)
    if getattr(model, STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already patched with fastdca; call fastdca.unpatch(model) before "
                           "patching it again")
    hf_config = getattr(model, "config", None)
    arch = architecture_of(model)
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         "AttentionInterface, which fastdca.patch hooks into")
    layers = decoder_layers(model)
    attentions = [find(layer, arch.attention) for layer in layers]
    n_layers = len(layers)
    if config.adapter_layers > n_layers:
        raise ValueError(f"DCAConfig.adapter_layers={config.adapter_layers} is larger than the model's "
                         f"{n_layers} decoder layers")
    if config.adapter_len > MAX_ADAPTER_LEN:
        raise ValueError(f"DCAConfig.adapter_len={config.adapter_len} exceeds the op's maximum of "
                         f"{MAX_ADAPTER_LEN} adapter tokens")
    # A model built from a patched model's config (assisted decoding's assistant) says "fastdca_sdpa": its base.
    base_impl = base_implementation(hf_config._attn_implementation)

    info = model_info(model)
    hidden, num_heads = info["hidden_size"], info["num_attention_heads"]
    num_kv_heads, head_dim = info["num_key_value_heads"], info["head_dim"]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} exceeds the op's maximum of {MAX_HEAD_DIM}")
    layer_ids = list(range(n_layers - config.adapter_layers, n_layers))
    for i in layer_ids:
        if hasattr(attentions[i], "dca"):
            raise RuntimeError(f"layer {i}'s attention already has a `dca` submodule")

    # Every check is done: from here on the model changes.
    causal_ids = layer_ids[len(layer_ids) - config.causal_layers:]
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state = PatchState(config, base_impl, layer_ids, causal_ids, requires_grad, backend)
    state.model_info = info
    state.linear_4bit = Linear4bitGradients(model)
    # Under PEFT the base is frozen already and what PEFT made trainable (LoRA) stays so.
    for p in model.parameters():
        p.requires_grad_(p.requires_grad and under_peft)
    for i in layer_ids:
        attn = attentions[i]
        device = next(attn.parameters()).device
        attn.dca = DCAAdapter(config.adapter_len, hidden, num_heads, i, device=device)
        attn.dca._state = state
        attn.dca._shape = (num_kv_heads, head_dim)
        attn.dca._architecture = arch
        state.attn_modules[i] = attn
    # Layers without an adapter still attend within each packed sequence, and need the state for it.
    state.plain_attn_modules = [attn for i, attn in enumerate(attentions) if i not in state.attn_modules]
    for attn in state.plain_attn_modules:
        setattr(attn, STATE_ATTR, state)

    # A private copy of the HF config for the patched model: configs are often shared between model
    # instances (from_config keeps the object it is given), and switching the attention implementation
    # must not reroute another model. unpatch puts the original object back.
    state.orig_config = hf_config
    hf_config = copy.deepcopy(hf_config)
    _swap_config(model, state.orig_config, hf_config)
    name = register(base_impl)
    set_attn_implementation(model, name)
    model.set_attn_implementation = functools.partial(switch_attn_implementation, model)
    state.handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    state.handles.append(model.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
    state.forward_signature = inspect.signature(type(model).forward)
    output_class = declared_output_class(model)
    if output_class is not None:
        with_dca_losses(output_class)
    # Trainer's evaluation gathers every output key except these as "logits"; keep the scalars out. A config
    # without the attribute gets Trainer's own default for it.
    ignore = list(getattr(hf_config, "keys_to_ignore_at_inference", None) or ["cache"])
    hf_config.keys_to_ignore_at_inference = ignore + ["causal_loss", "causal_term"]
    state.peft_wrapper = wrapper if wrapper is not model else None
    setattr(model, STATE_ATTR, state)
    return model


def unpatch_model(model: nn.Module) -> None:
    """Undo `patch_model` on the transformers model: remove the adapters and hooks, restore the attention
    implementation and the parameters' requires_grad flags."""
    state = state_of(model)
    for handle in state.handles:
        handle.remove()
    for attn in state.attn_modules.values():
        if hasattr(attn, "dca"):
            del attn.dca
    for attn in state.plain_attn_modules:
        delattr(attn, STATE_ATTR)
    state.linear_4bit.restore()
    model.__dict__.pop("set_attn_implementation", None)
    _swap_config(model, model.config, state.orig_config)
    if state.orig_config._attn_implementation != state.base_impl:
        # The base chosen while patched (set_attn_implementation) outlives the patch.
        model.set_attn_implementation(state.base_impl)
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    delattr(model, STATE_ATTR)


def model_info(model) -> dict:
    """The architecture numbers an adapter depends on, from the model's HF config."""
    hf_config = model.config
    num_heads = hf_config.num_attention_heads
    return dict(model_type=hf_config.model_type, hidden_size=hf_config.hidden_size, num_attention_heads=num_heads,
                num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
                head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
                num_hidden_layers=len(decoder_layers(model)))


def describe(model: nn.Module) -> str:
    """A short summary: the patched layers, the DCA config, the trainable parameters and their share."""
    model = unwrap(model)
    state = state_of(model)
    cfg = state.config
    trainable, total = trainable_parameters(model)
    dca = sum(p.numel() for p in adapter_state_dict(model).values())
    info = state.model_info
    first, last = state.layer_ids[0], state.layer_ids[-1]
    causal = sorted(state.causal_ids)
    lines = [
        f"fastdca DCA on {info['model_type']} ({info['num_hidden_layers']} layers, hidden {info['hidden_size']}, "
        f"{info['num_attention_heads']} heads, {info['num_key_value_heads']} kv heads), "
        f"attention '{state.base_impl}' for the other layers",
        f"  adapted layers: {len(state.layer_ids)} ({first}-{last}), adapter_len M={cfg.adapter_len}, "
        f"causal_len H={cfg.causal_len}, causal layers L'={cfg.causal_layers} ({causal[0]}-{causal[-1]}), "
        f"alpha={cfg.alpha}, variance={cfg.variance}, xg_space={cfg.xg_space}, gate_fn={cfg.gate_fn}",
        f"  trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f}%); "
        f"DCA parameters: {dca:,} = {len(state.layer_ids)} x ({cfg.adapter_len} x {info['hidden_size']} prompt "
        f"+ {info['num_attention_heads']} gate)",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """While the context is open the patched `model` computes what the base model does: every layer
    attends through the base implementation, no X_G statistics are collected and no causal term is added.
    The adapter parameters are not touched (PEFT's `disable_adapter`)."""
    state = state_of(model)
    previous, state.adapters_disabled = state.adapters_disabled, True
    try:
        yield model
    finally:
        state.adapters_disabled = previous


def trainable_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter counts of `model`; a 4-bit weight counts as its unpacked elements."""
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: trainable params, all params and the trainable share."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")


def trainable_parameter_count(num_layers_adapted: int, adapter_len: int, hidden_size: int, num_heads: int) -> int:
    """DCA parameters for L adapted layers: L * (M * hidden + num_attention_heads)."""
    return num_layers_adapted * (adapter_len * hidden_size + num_heads)


def check_transformers_version():
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if not Version(TRANSFORMERS_MIN) <= v < Version(TRANSFORMERS_MAX_EXCLUSIVE):
        raise RuntimeError(f"fastdca.patch supports transformers >={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX_EXCLUSIVE}; "
                           f"found {transformers.__version__}")


def _swap_config(model, old, new):
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def decoder_layers(model):
    """The decoder layers of `model` (a causal LM, or the bare decoder), where its family's entry says."""
    path = architecture_of(model).layers
    for candidate in (path, path.split(".", 1)[-1]):
        layers = find(model, candidate)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected `.{path}`)")


def _numel(p) -> int:
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return int(math.prod(shape))
    return p.numel()
