"""The attention function fastdca registers in transformers' AttentionInterface.

`patch` registers "fastdca_sdpa" and "fastdca_eager" (and, in AttentionMaskInterface, the base
implementation's own mask builder under the same name, so layers without an adapter get exactly the mask
they always got). A patched model keeps its attention routed here whatever implementation is set on it
afterwards (`set_attn_implementation`, or `config._attn_implementation` written directly, as transformers'
own tests do): `route` moves DCA onto the newly chosen base, or refuses one fastdca cannot run on.
The function runs `fastdca.ops.dca_attention` for attention modules that carry a `dca`
submodule and hands every other call to the base implementation unchanged, except rows of packed
sequences, which every layer attends per sequence. The top L' adapted layers store their X_G statistics
on the model's state for the loss hooks.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fastdca.hf.adapter import DCAAdapter
from fastdca.hf.masks import key_padding_of_call, packing_of_call, static_cache_keys
from fastdca.hf.records import adapter_attention_record
from fastdca.hf.state import STATE_ATTR
from fastdca.loss import causal_basis, layer_features
from fastdca.ops import dca_attention, effective_window, packed_causal_attention


SUPPORTED_BASE_ATTENTION = ("sdpa", "eager")
IMPL_PREFIX = "fastdca_"


def register(base_impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = IMPL_PREFIX + base_impl
    AttentionInterface.register(name, _make_attention_function(base_impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    return name


def base_implementation(name) -> str:
    """The base implementation behind attention implementation `name` ("sdpa" for "sdpa" or "fastdca_sdpa");
    ValueError naming any other, which fastdca's adapted layers cannot run on."""
    base = name.removeprefix(IMPL_PREFIX) if isinstance(name, str) else name
    if base not in SUPPORTED_BASE_ATTENTION:
        raise ValueError(f"fastdca's adapted layers run on the attention implementations {SUPPORTED_BASE_ATTENTION}, "
                         f"not {name!r}: use 'sdpa' or 'eager' with a patched model")
    return base


def set_attn_implementation(model, name):
    type(model).set_attn_implementation(model, name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"could not set the attention implementation of {type(model).__name__} to {name!r}")


def route(model, state) -> None:
    """Keep the patched `model` on fastdca's attention: an implementation set on its config since the last
    forward (a plain "eager" or "sdpa") becomes DCA on that base; any other raises naming it."""
    current = model.config._attn_implementation
    if current == IMPL_PREFIX + state.base_impl:
        return
    base = base_implementation(current)
    name = register(base)
    model.config._attn_implementation = name
    state.base_impl = base


def switch_attn_implementation(model, attn_implementation, *args, **kwargs):
    """A patched model's `set_attn_implementation`: "eager" or "sdpa" (or their fastdca names) keep DCA on
    that base; any other implementation raises naming it, before anything changes."""
    from fastdca.hf.state import state_of

    requested = attn_implementation.get("", model.config._attn_implementation) if isinstance(
        attn_implementation, dict) else attn_implementation
    base = base_implementation(requested)
    type(model).set_attn_implementation(model, base, *args, **kwargs)
    route(model, state_of(model))


def _base_function(base_impl: str, module: nn.Module):
    if base_impl == "eager":
        # Each modeling file has its own eager_attention_forward (the default LlamaAttention passes).
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base_impl]


def _make_attention_function(base_impl: str):
    def fastdca_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        adapter = getattr(module, "dca", None)
        state = adapter._state if isinstance(adapter, DCAAdapter) else getattr(module, STATE_ATTR, None)
        packing = packing_of_call(state, query, key, attention_mask, kwargs)
        if not isinstance(adapter, DCAAdapter) or state.adapters_disabled:
            if packing is None:
                return _base_function(base_impl, module)(module, query, key, value, attention_mask,
                                                         dropout=dropout, scaling=scaling, **kwargs)
            if dropout > 0:
                raise NotImplementedError(f"fastdca's attention for packed sequences has no dropout (asked for "
                                          f"{dropout}); set the model config's attention_dropout to 0")
            out = packed_causal_attention(query, key.to(query.dtype), value.to(query.dtype), packing[0], scaling,
                                          kwargs.get("sliding_window"), kwargs.get("softcap"))
            return out.transpose(1, 2), None
        if dropout > 0:
            raise NotImplementedError(f"fastdca adapted layers do not implement attention dropout (layer "
                                      f"{adapter.layer_idx} was asked for {dropout}); set the model config's "
                                      "attention_dropout to 0")
        if not getattr(module, "is_causal", True):
            raise NotImplementedError(f"fastdca adapted layers implement causal attention; layer {adapter.layer_idx} "
                                      "is bidirectional (use_bidirectional_attention)")
        weights = _prompt_attention_weights(module, state, query, key, value, attention_mask, scaling, kwargs)
        out = _dca_forward(module, adapter, query, key, value, attention_mask, scaling, packing,
                           kwargs.get("sliding_window"), kwargs.get("softcap"))
        return out, weights

    fastdca_attention_forward.__name__ = f"fastdca_{base_impl}_attention_forward"
    return fastdca_attention_forward


def _dca_forward(module, adapter, query, key, value, attention_mask, scaling, packing, window, softcap):
    state = adapter._state
    cfg = state.config
    B, Hq, T, D = query.shape
    S = key.shape[2]
    window = effective_window(window, S)
    dtype = query.dtype
    key = key.to(dtype)
    value = value.to(dtype)
    num_kv_heads, head_dim = adapter._shape
    ak, av = adapter.adapter_kv(module, num_kv_heads, head_dim, dtype)
    # Every layer of one type gets the same mask object in a forward: derive the padding once per mask.
    key_padding = (None if packing is not None
                   else key_padding_of_call(state, attention_mask, B, T, S, windowed=window is not None))
    if state.static_cache is not None:
        filled = state.static_cache.layers[module.layer_idx].get_seq_length()
        key, value, key_padding = static_cache_keys(key, value, key_padding, filled)
    cu_seqlens = None if packing is None else packing[0]
    xg = state.xg_mode if adapter.layer_idx in state.causal_ids else None
    gate = adapter.gate.to(dtype)
    out, stats = dca_attention(query, key, value, ak, av, gate, causal_len=cfg.causal_len, scale=scaling,
                               key_padding_mask=key_padding, cu_seqlens=cu_seqlens, window=window,
                               softcap=softcap, gate_fn=cfg.gate_fn, xg=xg, backend=state.backend)
    if key_padding is not None and state.base_impl == "eager":
        out = _as_eager_where_no_key_is_visible(out, value, key_padding, T)
    if xg is not None and stats is not None:
        # What the variance is taken over is formed here, inside the layer's forward, where a sharded
        # o_proj (FSDP) has its weights gathered; also when nothing is recorded, so that a gradient
        # checkpoint's recomputation saves the very tensors the forward did. A packed row's tokens are
        # laid out per sample in the post-hook, outside the layer, for the same reason.
        project = _projector(module.o_proj, dtype) if cfg.xg_space == "hidden" else None
        features = layer_features(stats, causal_basis(av, Hq, cfg.causal_len, project), variance=xg)
        if state.recording:
            if state.grad_enabled and not torch.is_grad_enabled():
                # Reentrant checkpointing runs the layer under no_grad and only its hidden-state output
                # gets a graph: the causal loss would silently lose its gradient.
                raise RuntimeError("the DCA causal loss needs non-reentrant gradient checkpointing: call "
                                   "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                                   "False}) (the default), or set DCAConfig(alpha=0)")
            real = None if key_padding is None else key_padding[:, S - T:]
            state.stats[adapter.layer_idx] = (features, real, packing if xg == "token" else None)
    if state.attention_records is not None and adapter.layer_idx in state.recorded_layers:
        state.attention_records[adapter.layer_idx] = adapter_attention_record(
            query, ak, av, gate, cfg, scaling, key_padding, S)
    return out


def _prompt_attention_weights(module, state, query, key, value, attention_mask, scaling, kwargs):
    """What an adapted layer returns as its attention weights when the forward asks for them: on an eager
    base, the prompt part's probabilities softmax(q k^T * scale + mask) (B, Hq, T, S), exactly as the
    base's eager attention returns them (the adapter's weights are recorded by `record_adapter_attention`);
    on an SDPA base None, as SDPA itself returns."""
    if not state.output_attentions or state.base_impl != "eager":
        return None
    return _base_function("eager", module)(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                           **kwargs)[1]


def _projector(o_proj, dtype):
    def project(x):
        return o_proj(x.to(dtype))  # fastdca.loss casts the result back to the statistics' dtype

    return project


def _as_eager_where_no_key_is_visible(out, value, key_padding, T):
    """Eager attention gives a query that sees no real key (a left pad) the mean of v over every key: its
    scores are all the mask's finfo.min. The op gives such a row 0 from the prompt part; this adds what eager
    gives, so that the patched model equals the unpatched one at pads too (their logits enter an unmasked loss)."""
    Hq = out.shape[2]
    S = key_padding.shape[1]
    sees_no_key = key_padding.cumsum(-1)[:, S - T:] == 0                                   # (B, T)
    mean_v = value.float().mean(dim=2).repeat_interleave(Hq // value.shape[1], dim=1)     # (B, Hq, D)
    return torch.where(sees_no_key[:, :, None, None], out + mean_v[:, None].to(out.dtype), out)
