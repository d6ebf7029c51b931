"""Drop-in DCA for Hugging Face LLaMA-family causal LMs (DESIGN.md section 3).

This is the only fastdca module that knows about transformers. It imports transformers lazily, so that
`import fastdca` stays light.

How the pieces are hooked, without copying any modeling code:

- Attention: transformers' attention modules call `ALL_ATTENTION_FUNCTIONS.get_interface(
  config._attn_implementation, eager_attention_forward)` with q after RoPE and k, v after the cache
  update. `patch` registers "fastdca_sdpa" and "fastdca_eager" in the attention-function registry
  (`AttentionInterface`) and in the mask registry (`AttentionMaskInterface`, pointing at the base
  implementation's own mask builder, so layers without an adapter get exactly the mask they always
  got), and switches the model to "fastdca_<base>". The registered function runs
  `fastdca.ops.dca_attention` for attention modules that carry a `dca` submodule and hands every
  other call to the base implementation unchanged.
- Key padding: the op wants a (B, S) bool mask of real keys. It is read off the 4-D mask that
  transformers built for this very call: its last query row sits at the last key position, so under
  the causal mask it sees every real key and no padding key (bool masks: True = visible; additive
  float masks: 0 = visible). A mask of None means no padding. This stays aligned with the KV cache
  (S = past + T) without tracking the 2-D mask ourselves.
- Packed sequences: several sequences laid end to end in one row (B = 1), told apart by the
  `cu_seq_lens_q` that transformers' DataCollatorWithFlattening passes down, or by position_ids that
  restart, with no padding. Read once per forward (one host read of the boundaries), every layer then
  attends within each sequence: adapted layers through the op's `cu_seqlens`, the others through
  `fastdca.ops.packed_causal_attention` instead of the base implementation, which would attend across
  sequences. Each sequence is one sample of the causal loss.
- Causal loss: a forward pre-hook on the top-level model decides, per forward, whether X_G
  statistics are collected (alpha > 0 and labels given or the model in training mode) and starts
  recording; the attention function stores the statistics of the top L' adapted layers; a forward
  hook turns them into L_causal with `fastdca.loss`, adds alpha * L_causal to the loss when labels
  were given and sets `output.causal_loss`. Nothing replaces the model's forward, so Trainer's
  signature inspection, accelerate and generate see the original model. Under gradient
  checkpointing the recomputation in the backward computes the same tensors but records nothing.
- Generation: with gradients off, each adapter's keys and values are cached keyed on the prompt
  parameter's version counter (and the k/v projection weights' versions and the dtype), so one
  generate call computes them once; they are never written to the KV cache.
- Inspection: under `record_adapter_attention` the attention function also keeps, per adapted layer,
  the gated adapter probabilities and X_G per token, recomputed with `fastdca.reference` from the op's
  own inputs (`fastdca inspect`, `fastdca eval --xg-stats`).
- torch.compile: the hooks and the attention function trace without a graph break or a host read.
  What eager calls decide by reading tensors or by object identity is, while compiling, either kept
  general or taken outside the graph: the padding mask is passed to the op even when every key is
  real (eager calls drop it for SDPA's unmasked path), the per-forward padding cache and the
  generation cache of adapter keys and values are eager-only (their keys are tensor identities,
  storage addresses and version counters), the output class with `causal_loss` is made at patch
  time, and packed sequences (single rows only) are read in a function torch.compile leaves out.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import sys
from typing import Optional

import torch
from torch import nn

from fastdca import causal_term, pretrained, reference
from fastdca.integrations import peft as peft_integration
from fastdca.integrations import trl as trl_integration
from fastdca.errors import AdapterError
from fastdca.config import DCAConfig
from fastdca.io import atomic_write_all
from fastdca.loss import causal_loss as _causal_loss
from fastdca.loss import layer_causal_loss
from fastdca.quantized import Linear4bitGradients
from fastdca.ops import MAX_ADAPTER_LEN, MAX_HEAD_DIM, dca_attention, packed_causal_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_BASE_ATTENTION = ("sdpa", "eager")
# transformers releases whose attention-function and mask registries this module is written against
# (tested on 5.23).
TRANSFORMERS_MIN = "5.0.0"
TRANSFORMERS_MAX_EXCLUSIVE = "6.0.0"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "dca_config.json"
FORMAT_VERSION = 1
_STATE_ATTR = "_fastdca_state"
_IMPL_PREFIX = "fastdca_"


class DCAAdapter(nn.Module):
    """The adapter of one attention module: `prompt` (M, hidden) and `gate` (num_attention_heads,)."""

    def __init__(self, adapter_len: int, hidden_size: int, num_heads: int, layer_idx: int, device=None):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(adapter_len, hidden_size, dtype=torch.float32, device=device))
        self.gate = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32, device=device))
        self.layer_idx = layer_idx
        self._kv_cache = None
        self.kv_computations = 0  # how many times eager calls computed the adapter keys/values (not cache hits)

    def extra_repr(self):
        return f"layer={self.layer_idx}, adapter_len={self.prompt.shape[0]}, hidden={self.prompt.shape[1]}"

    def adapter_kv(self, attn: nn.Module, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        """ak, av (Hkv, M, D) in `dtype`: the prompt through the layer's own k_proj and v_proj."""
        # The cache is an eager-mode saving: its key reads storage addresses and version counters, which
        # a compiled graph cannot guard on, and a compiled graph recomputes the two small projections.
        # Only without gradients (a cached graph would be backpropagated twice) and only for projections whose
        # output is a function of their weights alone: a PEFT-wrapped one also depends on its adapters and
        # their switches.
        cached = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                  and _plain_projection(attn.k_proj) and _plain_projection(attn.v_proj))
        key = None
        if cached:
            key = (self.prompt._version, self.prompt.data_ptr(), dtype, self.prompt.device,
                   _version(attn.k_proj), _version(attn.v_proj))
            if self._kv_cache is not None and self._kv_cache[0] == key:
                return self._kv_cache[1]
        M = self.prompt.shape[0]
        x = self.prompt.to(dtype)[None]                                          # (1, M, hidden)
        ak = attn.k_proj(x).to(dtype).view(M, num_kv_heads, head_dim).transpose(0, 1)
        av = attn.v_proj(x).to(dtype).view(M, num_kv_heads, head_dim).transpose(0, 1)
        if torch.compiler.is_compiling():
            return ak, av
        self.kv_computations += 1
        self._kv_cache = (key, (ak, av)) if cached else None
        return ak, av


def _plain_projection(linear: nn.Module) -> bool:
    """nn.Linear or a bitsandbytes quantised Linear, with no submodules: its output depends on its weight alone."""
    return isinstance(linear, nn.Linear) and not any(True for _ in linear.children())


def _version(linear: nn.Module) -> int:
    weight = getattr(linear, "weight", None)
    return -1 if weight is None else weight._version


class _State:
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


# --------------------------------------------------------------------------------------------------
# Public API


def patch(model: nn.Module, config: Optional[DCAConfig] = None, *, backend: Optional[str] = None) -> nn.Module:
    """Add DCA adapters to the top `config.adapter_layers` decoder layers of `model`, in place.

    Every base parameter is frozen; each adapted attention module gets a `dca` submodule with float32
    `prompt` (M, hidden) ~ N(0, 1) and `gate` (num_attention_heads,) = 0, so the patched model's
    logits equal the unpatched model's until training moves the gates. A forward with labels returns
    CE + alpha * L_causal and sets `causal_loss` on the output. `backend` ("torch", "triton",
    "reference", "auto") is passed to `fastdca.ops.dca_attention`; None = FASTDCA_BACKEND or auto.
    Returns the model.
    """
    config = DCAConfig() if config is None else config
    if not isinstance(config, DCAConfig):
        raise TypeError(f"config must be a fastdca.DCAConfig, got {type(config).__name__}")
    _check_transformers_version()
    wrapper = model
    if peft_integration.is_peft_model(model):
        model = model.get_base_model()
    under_peft = peft_integration.has_tuner_layers(model)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already patched with fastdca; call fastdca.unpatch(model) before "
                           "patching it again")
    hf_config = getattr(model, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"fastdca.patch does not support model type {model_type!r}; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         "AttentionInterface, which fastdca.patch hooks into")
    layers = _decoder_layers(model)
    n_layers = len(layers)
    if config.adapter_layers > n_layers:
        raise ValueError(f"DCAConfig.adapter_layers={config.adapter_layers} is larger than the model's "
                         f"{n_layers} decoder layers")
    if config.adapter_len > MAX_ADAPTER_LEN:
        raise ValueError(f"DCAConfig.adapter_len={config.adapter_len} exceeds the op's maximum of "
                         f"{MAX_ADAPTER_LEN} adapter tokens")
    base_impl = hf_config._attn_implementation
    if base_impl not in SUPPORTED_BASE_ATTENTION:
        raise ValueError(f"fastdca.patch supports the base attention implementations "
                         f"{SUPPORTED_BASE_ATTENTION}, but the model uses {base_impl!r}; load it with "
                         "attn_implementation='sdpa' or 'eager'")

    info = _model_info(model)
    hidden, num_heads = info["hidden_size"], info["num_attention_heads"]
    num_kv_heads, head_dim = info["num_key_value_heads"], info["head_dim"]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} exceeds the op's maximum of {MAX_HEAD_DIM}")
    layer_ids = list(range(n_layers - config.adapter_layers, n_layers))
    for i in layer_ids:
        if hasattr(layers[i].self_attn, "dca"):
            raise RuntimeError(f"layer {i}'s attention already has a `dca` submodule")

    # Every check is done: from here on the model changes.
    causal_ids = layer_ids[len(layer_ids) - config.causal_layers:]
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state = _State(config, base_impl, layer_ids, causal_ids, requires_grad, backend)
    state.model_info = info
    state.linear_4bit = Linear4bitGradients(model)
    # Under PEFT the base is frozen already and what PEFT made trainable (LoRA) stays so.
    for p in model.parameters():
        p.requires_grad_(p.requires_grad and under_peft)
    for i in layer_ids:
        attn = layers[i].self_attn
        device = attn.q_proj.weight.device
        attn.dca = DCAAdapter(config.adapter_len, hidden, num_heads, i, device=device)
        attn.dca._state = state
        attn.dca._shape = (num_kv_heads, head_dim)
        state.attn_modules[i] = attn
    # Layers without an adapter still attend within each packed sequence, and need the state for it.
    state.plain_attn_modules = [layer.self_attn for i, layer in enumerate(layers) if i not in state.attn_modules]
    for attn in state.plain_attn_modules:
        setattr(attn, _STATE_ATTR, state)

    # A private copy of the HF config for the patched model: configs are often shared between model
    # instances (from_config keeps the object it is given), and switching the attention implementation
    # must not reroute another model. unpatch puts the original object back.
    state.orig_config = hf_config
    hf_config = copy.deepcopy(hf_config)
    _swap_config(model, state.orig_config, hf_config)
    name = _register(base_impl)
    _set_attn_implementation(model, name)
    state.handles.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
    state.handles.append(model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))
    state.forward_signature = inspect.signature(type(model).forward)
    output_class = _declared_output_class(model)
    if output_class is not None:
        _with_dca_losses(output_class)
    # Trainer's evaluation gathers every output key except these as "logits"; keep the scalar out. A config
    # without the attribute gets Trainer's own default for it.
    ignore = list(getattr(hf_config, "keys_to_ignore_at_inference", None) or ["cache"])
    hf_config.keys_to_ignore_at_inference = ignore + ["causal_loss"]
    pretrained.install(model, base_impl)
    state.peft_wrapper = wrapper if wrapper is not model else None
    if state.peft_wrapper is not None:
        peft_integration.install(wrapper, model)
    setattr(model, _STATE_ATTR, state)
    return wrapper


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: remove the adapters and hooks, restore the attention implementation and the
    parameters' requires_grad flags. Returns the model."""
    wrapper = model
    model = _unwrap(model)
    state = _state(model)
    for handle in state.handles:
        handle.remove()
    for attn in state.attn_modules.values():
        if hasattr(attn, "dca"):
            del attn.dca
    for attn in state.plain_attn_modules:
        delattr(attn, _STATE_ATTR)
    state.linear_4bit.restore()
    pretrained.remove(model)
    if state.peft_wrapper is not None:
        peft_integration.remove(state.peft_wrapper)
    _swap_config(model, model.config, state.orig_config)
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    delattr(model, _STATE_ATTR)
    return wrapper


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def get_config(model: nn.Module) -> DCAConfig:
    return _state(model).config


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter parameters, keyed by their names in `model` (e.g. model.layers.3.self_attn.dca.prompt; in
    the transformers model inside a PeftModel)."""
    model = _unwrap(model)
    _state(model)
    return {name: p for name, p in model.named_parameters() if _is_dca_name(name)}


def save_adapter(model: nn.Module, directory) -> None:
    """Write `adapter.safetensors` and `dca_config.json` into `directory`, each atomically."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    state = _state(model)
    tensors = {name: p.detach().to("cpu", torch.float32).contiguous()
               for name, p in adapter_state_dict(model).items()}
    bad = _non_finite(tensors)
    if bad:
        raise AdapterError(f"refusing to write a non-finite adapter to {directory}: {bad[0]}"
                           f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} hold NaN or inf")
    os.makedirs(directory, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "dca_config": state.config.to_dict(), "model": state.model_info,
            "layers": state.layer_ids}
    text = json.dumps(meta, indent=2, sort_keys=True)

    def write_config(path):
        with open(path, "w") as f:
            f.write(text)

    # both files or neither: a write that fails leaves the previous adapter whole
    atomic_write_all({
        os.path.join(directory, ADAPTER_FILE): lambda path: save_file(
            tensors, path, metadata={"format": "pt", "fastdca_format_version": str(FORMAT_VERSION)}),
        os.path.join(directory, CONFIG_FILE): write_config,
    })


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load an adapter written by `save_adapter` into `model`.

    An unpatched model is patched first with the saved DCAConfig. A patched model must have the same
    DCAConfig, the same architecture numbers and exactly the saved parameters with the saved shapes.
    A mismatch, or a damaged, truncated or incomplete file, raises fastdca.AdapterError (a ValueError)
    naming the file and what is wrong, and leaves the model as it was. Returns the model.
    """
    wrapper = model
    model = _unwrap(model)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, ADAPTER_FILE)
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no fastdca adapter at {directory!r}: {os.path.basename(path)} is missing")
    meta = _read_adapter_config(cfg_path)
    saved_config = meta["dca_config"]
    tensors = _read_adapter_tensors(weights_path)
    # The files and the architecture are checked before an unpatched model is patched, and a later
    # mismatch unpatches it again: a refused adapter leaves the model as it was.
    _check_same_model(_state(model).model_info if is_patched(model) else _model_info(model), meta["model"], directory)
    patched_here = not is_patched(model)
    if patched_here:
        patch(model, saved_config)
    try:
        _check_adapter_matches(model, saved_config, tensors, directory, cfg_path)
    except AdapterError:
        if patched_here:
            unpatch(model)
        raise
    params = adapter_state_dict(model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    return wrapper


def _check_adapter_matches(model, saved_config, tensors, directory, cfg_path) -> None:
    """The patched model's DCAConfig, parameter names and shapes against the adapter's."""
    state = _state(model)
    if state.config != saved_config:
        ours, theirs = state.config.to_dict(), saved_config.to_dict()
        diffs = ", ".join(f"{k}: model {ours[k]!r} vs adapter {theirs[k]!r}" for k in ours if ours[k] != theirs[k])
        raise AdapterError(f"the adapter in {directory!r} was trained with a different DCAConfig ({diffs}); patch "
                           "the model with the adapter's config (DCAConfig.from_dict(json.load(open("
                           f"'{cfg_path}'))['dca_config'])) or load it into an unpatched model")
    params = adapter_state_dict(model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterError(f"the adapter in {directory!r} does not match the model's adapter parameters: "
                           f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                           f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise AdapterError(f"the adapter in {directory!r} does not match the model: {name} has shape "
                               f"{tuple(tensors[name].shape)} in the adapter, {tuple(p.shape)} in the model")


def _read_adapter_config(path) -> dict:
    """dca_config.json, checked: {"dca_config": DCAConfig, "model": dict, ...}; AdapterError otherwise."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path} is not valid JSON ({error}); the file is damaged: write it again with "
                           "fastdca.save_adapter, or use another checkpoint") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: unsupported adapter format version {meta.get('format_version')!r} "
                           f"(this fastdca reads version {FORMAT_VERSION})")
    missing = [key for key in ("dca_config", "model") if not isinstance(meta.get(key), dict)]
    if missing:
        raise AdapterError(f"{path} is incomplete: {', '.join(repr(k) for k in missing)} missing or not an object")
    try:
        meta["dca_config"] = DCAConfig.from_dict(meta["dca_config"])
    except (TypeError, ValueError) as error:
        raise AdapterError(f"{path}: its dca_config is not a valid DCAConfig: {error}") from None
    return meta


def _non_finite(tensors: dict) -> list:
    """The names of the (CPU) tensors holding NaN or inf."""
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]


def _read_adapter_tensors(path) -> dict:
    """adapter.safetensors as float tensors, all finite; AdapterError naming the file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path} cannot be read as safetensors ({error}); the file is truncated or damaged: "
                           "write it again with fastdca.save_adapter, or use another checkpoint") from None
    bad = _non_finite(tensors)
    if bad:
        raise AdapterError(f"{path} holds non-finite values (NaN or inf) in {bad[0]}"
                           f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}")
    return tensors


def _model_info(model) -> dict:
    """The architecture numbers an adapter depends on, from the model's HF config."""
    hf_config = model.config
    num_heads = hf_config.num_attention_heads
    return dict(model_type=hf_config.model_type, hidden_size=hf_config.hidden_size, num_attention_heads=num_heads,
                num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
                head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
                num_hidden_layers=len(_decoder_layers(model)))


def _check_same_model(info: dict, saved_model: dict, directory) -> None:
    diffs = [f"{k}: model {info.get(k)!r} vs adapter {v!r}" for k, v in saved_model.items() if info.get(k) != v]
    if diffs:
        raise AdapterError(f"the adapter in {directory!r} was trained on a different model ({'; '.join(diffs)})")


def describe(model: nn.Module) -> str:
    """A short summary: the patched layers, the DCA config, the trainable parameters and their share."""
    model = _unwrap(model)
    state = _state(model)
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


@dataclasses.dataclass(frozen=True)
class AdapterAttentionRecord:
    """What one adapted layer computed in a forward, from the reference equations (DESIGN.md section 1),
    detached, in float32 (float64 for a float64 model):

    gates: g = tanh(gate) (gate_fn="identity": gate), (Hq,);
    probs: A = g * softmax(q ak^T * scale), the gated adapter probabilities, (B, Hq, T, M);
    xg: X_G = A[..., :H] av[:, :H] per query token, (B, T, Hq, D);
    real: (B, T) bool, True where the query token is real (not padding).
    """

    gates: torch.Tensor
    probs: torch.Tensor
    xg: torch.Tensor
    real: torch.Tensor


@contextlib.contextmanager
def record_adapter_attention(model: nn.Module, layers=None):
    """Record, while the context is open, the adapter attention of the patched `model`'s adapted layers.

    Yields a dict {decoder layer index: AdapterAttentionRecord}, filled by each forward for the layers in
    `layers` (decoder layer indices, each an adapted one; None = every adapted layer); a layer's entry is
    replaced at its next call, so after a `generate` it holds the last decoding step. The records are
    computed with `fastdca.reference` beside the op, from the very q, ak, av and gate the op receives,
    whatever backend runs the op: one extra (B, Hq, T, M) softmax per recorded layer and call. Outside
    the context the forward is unchanged.
    """
    state = _state(model)
    layers = state.layer_ids if layers is None else list(layers)
    not_adapted = [i for i in layers if i not in state.layer_ids]
    if not_adapted:
        raise ValueError(f"layers must be adapted decoder layers ({state.layer_ids[0]}-{state.layer_ids[-1]}); "
                         f"{not_adapted} have no DCA adapter")
    if state.attention_records is not None:
        raise RuntimeError("record_adapter_attention is already active on this model")
    records = {}
    state.attention_records, state.recorded_layers = records, frozenset(layers)
    try:
        yield records
    finally:
        state.attention_records, state.recorded_layers = None, frozenset()


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """While the context is open the patched `model` computes what the base model does: every layer
    attends through the base implementation, no X_G statistics are collected and no causal term is added.
    The adapter parameters are not touched (PEFT's `disable_adapter`)."""
    state = _state(model)
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


def adapted_layers(model: nn.Module) -> list:
    """The decoder layer indices that carry a DCA adapter, ascending."""
    return list(_state(model).layer_ids)


def trainable_parameter_count(num_layers_adapted: int, adapter_len: int, hidden_size: int, num_heads: int) -> int:
    """DCA parameters for L adapted layers: L * (M * hidden + num_attention_heads)."""
    return num_layers_adapted * (adapter_len * hidden_size + num_heads)


# --------------------------------------------------------------------------------------------------
# Registry integration


def _check_transformers_version():
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    if not Version(TRANSFORMERS_MIN) <= v < Version(TRANSFORMERS_MAX_EXCLUSIVE):
        raise RuntimeError(f"fastdca.patch supports transformers >={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX_EXCLUSIVE}; "
                           f"found {transformers.__version__}")


def _register(base_impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _IMPL_PREFIX + base_impl
    AttentionInterface.register(name, _make_attention_function(base_impl))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    return name


def _set_attn_implementation(model, name):
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"could not set the attention implementation of {type(model).__name__} to {name!r}")


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
        state = adapter._state if isinstance(adapter, DCAAdapter) else getattr(module, _STATE_ATTR, None)
        packing = _packing(state, query, key, attention_mask, kwargs)
        if not isinstance(adapter, DCAAdapter) or state.adapters_disabled:
            if packing is None:
                return _base_function(base_impl, module)(module, query, key, value, attention_mask,
                                                         dropout=dropout, scaling=scaling, **kwargs)
            if dropout > 0:
                raise NotImplementedError(f"fastdca's attention for packed sequences has no dropout (asked for "
                                          f"{dropout}); set the model config's attention_dropout to 0")
            out = packed_causal_attention(query, key.to(query.dtype), value.to(query.dtype), packing[0], scaling)
            return out.transpose(1, 2), None
        if dropout > 0:
            raise NotImplementedError(f"fastdca adapted layers do not implement attention dropout (layer "
                                      f"{adapter.layer_idx} was asked for {dropout}); set the model config's "
                                      "attention_dropout to 0")
        return _dca_forward(module, adapter, query, key, value, attention_mask, scaling, packing,
                            kwargs.get("sliding_window"))

    fastdca_attention_forward.__name__ = f"fastdca_{base_impl}_attention_forward"
    return fastdca_attention_forward


def _dca_forward(module, adapter, query, key, value, attention_mask, scaling, packing, window):
    state = adapter._state
    cfg = state.config
    B, Hq, T, D = query.shape
    S = key.shape[2]
    if window is not None and S > window:
        raise NotImplementedError(f"fastdca adapted layers do not implement sliding-window attention; layer "
                                  f"{adapter.layer_idx} got {S} keys with a window of {window}")
    dtype = query.dtype
    key = key.to(dtype)
    value = value.to(dtype)
    num_kv_heads, head_dim = adapter._shape
    ak, av = adapter.adapter_kv(module, num_kv_heads, head_dim, dtype)
    # Every layer of one forward gets the same mask object: derive the padding once per forward.
    key_padding = None if packing is not None else _padding(state, attention_mask, B, T, S)
    cu_seqlens = None if packing is None else packing[0]
    xg = state.xg_mode if adapter.layer_idx in state.causal_ids else None
    gate = adapter.gate.to(dtype)
    out, stats = dca_attention(query, key, value, ak, av, gate, causal_len=cfg.causal_len, scale=scaling,
                               key_padding_mask=key_padding, cu_seqlens=cu_seqlens, gate_fn=cfg.gate_fn, xg=xg,
                               backend=state.backend)
    if key_padding is not None and state.base_impl == "eager":
        out = _as_eager_where_no_key_is_visible(out, value, key_padding, T)
    if stats is not None and state.recording:
        if state.grad_enabled and not torch.is_grad_enabled():
            # Reentrant checkpointing runs the layer under no_grad and only its hidden-state output
            # gets a graph: the causal loss would silently lose its gradient.
            raise RuntimeError("the DCA causal loss needs non-reentrant gradient checkpointing: call "
                               "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                               "False}) (the default), or set DCAConfig(alpha=0)")
        real = None if key_padding is None else key_padding[:, S - T:]
        # A packed row's X_G is laid out per sample in the post-hook, outside the layer: under gradient
        # checkpointing the recomputation, which records nothing, must save the very tensors the forward did.
        unpack = packing if xg == "token" else None
        state.stats[adapter.layer_idx] = (stats, real, unpack, module.o_proj if cfg.xg_space == "hidden" else None,
                                          dtype)
    if state.attention_records is not None and adapter.layer_idx in state.recorded_layers:
        state.attention_records[adapter.layer_idx] = _adapter_attention_record(
            query, ak, av, gate, cfg, scaling, key_padding, S)
    return out, None


def _as_eager_where_no_key_is_visible(out, value, key_padding, T):
    """Eager attention gives a query that sees no real key (a left pad) the mean of v over every key: its
    scores are all the mask's finfo.min. The op gives such a row 0 from the prompt part; this adds what eager
    gives, so that the patched model equals the unpatched one at pads too (their logits enter an unmasked loss)."""
    B, Hq = out.shape[0], out.shape[2]
    S = key_padding.shape[1]
    sees_no_key = key_padding.cumsum(-1)[:, S - T:] == 0                                   # (B, T)
    mean_v = value.float().mean(dim=2).repeat_interleave(Hq // value.shape[1], dim=1)     # (B, Hq, D)
    return torch.where(sees_no_key[:, :, None, None], out + mean_v[:, None].to(out.dtype), out)


def _padding(state, attention_mask, B, T, S):
    """The key padding mask; every layer of one forward gets the same mask object, so eager calls derive it
    once (an identity-keyed cache a compiled graph cannot guard on: compiled, each layer derives it)."""
    if torch.compiler.is_compiling():
        return _key_padding_mask(attention_mask, B, T, S)
    cached = state.padding_cache
    if cached is not None and cached[0] is attention_mask and cached[1] == (B, T, S):
        return cached[2]
    key_padding = _key_padding_mask(attention_mask, B, T, S)
    state.padding_cache = (attention_mask, (B, T, S), key_padding)
    return key_padding


def _packing(state, query, key, attention_mask, kwargs):
    """(cu_seqlens (N + 1,) int32, lengths as a list) when this call's row holds N >= 2 packed
    sequences, else None. Derived once per forward: every layer gets the same position_ids object.

    Only a single row with no cache, in a forward given position_ids or cu_seq_lens_q, can hold packed
    sequences, and that is decided from shapes and arguments alone. For such a row the boundaries are
    read on the host (they decide shapes: one SDPA call and one causal-loss sample per sequence),
    which under torch.compile is a graph break, taken outside the graph; batches of two or more rows,
    forwards without position_ids, and decoding never read anything."""
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if state is None or not state.packing_possible or (cu is None and not _may_hold_restarts(position_ids, query, key)):
        return None
    if torch.compiler.is_compiling():
        return _read_packing_outside_graph(state, query, key, attention_mask, kwargs)
    return _cached_packing(state, query, key, attention_mask, kwargs)


def _may_hold_restarts(position_ids, query, key) -> bool:
    """Restarting position_ids can mean packing only for one row of T >= 2 queries and no cache."""
    B, T, S = query.shape[0], query.shape[2], key.shape[2]
    return position_ids is not None and B == 1 and T == S and T >= 2 and position_ids.shape[-1] == T


def _cached_packing(state, query, key, attention_mask, kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    source = cu if cu is not None else kwargs.get("position_ids")
    cached = state.packing_cache
    if cached is not None and cached[0] is source and cached[1] == tuple(query.shape):
        return cached[2]
    packing = _read_packing(cu, kwargs.get("cu_seq_lens_k"), kwargs.get("position_ids"), query, key, attention_mask)
    state.packing_cache = (source, tuple(query.shape), packing)
    return packing


_read_packing_outside_graph = torch.compiler.disable(_cached_packing)


def _read_packing(cu_q, cu_k, position_ids, query, key, attention_mask):
    B, T, S = query.shape[0], query.shape[2], key.shape[2]
    if cu_q is not None:
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.cpu(), cu_q.cpu()):
            raise NotImplementedError("fastdca attends packed sequences with the same boundaries for queries and "
                                      "keys; got different cu_seq_lens_q and cu_seq_lens_k")
        if B != 1 or T != S:
            raise NotImplementedError(f"fastdca reads cu_seq_lens_q for sequences packed in one row with no KV "
                                      f"cache (B = 1, T = S); got B={B}, T={T}, S={S}")
        cu = cu_q.to(device=query.device, dtype=torch.int32)
        lengths = cu.diff().tolist()
        if cu.numel() < 2 or cu[0] != 0 or cu[-1] != T or min(lengths) < 1:
            raise ValueError(f"cu_seq_lens_q must run from 0 to the row's {T} tokens in increasing steps, got "
                             f"{cu.tolist()}")
        return (cu, lengths) if len(lengths) > 1 else None
    # Restarting position_ids mean packing only for one row without padding or cache: left-padded
    # generation batches give their pads position 1, which would read as restarts.
    if not _may_hold_restarts(position_ids, query, key) or _padding_of(attention_mask, T):
        return None
    positions = position_ids.reshape(-1)
    starts = torch.ones(T, dtype=torch.bool, device=positions.device)
    starts[1:] = positions[1:] != positions[:-1] + 1
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([T], device=positions.device)]).to(torch.int32)
    if cu.numel() <= 2:
        return None
    return cu.to(query.device), cu.diff().tolist()


def _padding_of(attention_mask, S) -> bool:
    return attention_mask is not None and _key_padding_mask(attention_mask, 1, S, S) is not None


def _unpack_tokens(x_g, cu_seqlens, lengths):
    """X_G of a packed row (1, S, Hq, D) laid out as right-padded samples (N, max length, Hq, D), with the
    (N, max length) mask of real tokens: the token variance compares the t-th tokens of the samples."""
    S = x_g.shape[1]
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=x_g.device),
                                  torch.tensor(lengths, device=x_g.device), output_size=S)
    offsets = torch.arange(S, device=x_g.device) - cu_seqlens.to(torch.long)[ids]
    samples = x_g.new_zeros(len(lengths), max(lengths), *x_g.shape[2:]).index_put((ids, offsets), x_g[0])
    real = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=x_g.device)
    return samples, real.index_put((ids, offsets), torch.ones(S, dtype=torch.bool, device=x_g.device))


def _key_padding_mask(attention_mask, B, T, S):
    """(B, S) bool, True = real key, from the mask transformers passes to attention functions; None = no padding."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        row = attention_mask
    elif attention_mask.dim() == 4:
        # The last query row sits at the last key position: causally it sees every real key.
        row = attention_mask[:, 0, -1, :]
    else:
        raise ValueError(f"fastdca cannot read key padding from an attention mask of shape "
                         f"{tuple(attention_mask.shape)}")
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2 if row.is_floating_point() else row != 0
    if row.shape[-1] != S:
        raise ValueError(f"the attention mask covers {row.shape[-1]} keys but the layer has {S} (static or "
                         "sliding caches are not supported by fastdca adapted layers; use the default DynamicCache)")
    if row.shape[0] != B:
        row = row.expand(B, S)
    # An all-real mask means no padding, and eager calls drop it for SDPA's unmasked causal path. The
    # test reads the mask on the host: compiled, the mask is kept (the op gives the same answer with it).
    if not torch.compiler.is_compiling() and bool(row.all()):
        return None
    return row.contiguous()


def _adapter_attention_record(query, ak, av, gate, cfg, scaling, key_padding, S) -> AdapterAttentionRecord:
    """The reference equations on the op's own inputs: query (B, Hq, T, D), ak/av (Hkv, M, D), gate (Hq,)."""
    B, Hq, T, D = query.shape
    ct = reference.compute_dtype(query.dtype)
    group = Hq // ak.shape[0]
    scale = 1 / math.sqrt(D) if scaling is None else scaling
    H = cfg.causal_len
    with torch.no_grad():
        g = reference.gate_values(gate.detach().to(ct), cfg.gate_fn)
        probs = g[None, :, None, None] * reference.adapter_probs(
            query.detach().to(ct), ak.detach().to(ct).repeat_interleave(group, dim=0), scale)
        av_heads = av.detach().to(ct).repeat_interleave(group, dim=0)
        xg = (probs[..., :H] @ av_heads[:, :H]).transpose(1, 2)
    return AdapterAttentionRecord(gates=g, probs=probs, xg=xg,
                                  real=reference.query_is_real(key_padding, B, T, S, query.device))


# --------------------------------------------------------------------------------------------------
# Loss hooks on the top-level model


def _pre_hook(model, args, kwargs):
    state = getattr(model, _STATE_ATTR)
    cfg = state.config
    try:
        bound = state.forward_signature.bind_partial(model, *args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    labels = bound.get("labels")
    past = bound.get("past_key_values")
    if past is not None and "Static" in type(past).__name__:
        raise NotImplementedError(f"fastdca adapted layers need a DynamicCache; got {type(past).__name__}")
    collect = cfg.alpha > 0 and (labels is not None or model.training) and not state.adapters_disabled
    state.xg_mode = cfg.variance if collect else None
    state.stats = {}
    state.recording = collect
    state.grad_enabled = torch.is_grad_enabled()
    state.linear_4bit.before_forward(builds_graph=state.grad_enabled)
    state.labels = labels
    state.num_items = bound.get("num_items_in_batch", kwargs.get("num_items_in_batch"))
    state.shift_labels = kwargs.get("shift_labels")
    # Without position_ids the model numbers the tokens 0, 1, ... itself: no restart, nothing to read.
    state.packing_possible = bound.get("position_ids") is not None or kwargs.get("cu_seq_lens_q") is not None
    if model.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        peft_integration.check_not_frozen_by_peft(model, adapter_state_dict(model).values())


def _post_hook(model, args, kwargs, output):
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return None
    stats, state.stats = state.stats, {}
    if not torch.is_grad_enabled() or not model.training:
        state.padding_cache = state.packing_cache = None
    collected, state.recording = state.recording, False
    state.packing_possible = True
    labels, state.labels = state.labels, None
    if output is None or not collected or not stats:
        return None
    cfg = state.config
    losses = []
    for idx in sorted(stats):
        xg_stats, real, unpack, o_proj, dtype = stats[idx]
        if unpack is not None:
            xg_stats, real = _unpack_tokens(xg_stats, *unpack)
        project = None if o_proj is None else _projector(o_proj, dtype)
        losses.append(layer_causal_loss(xg_stats, variance=cfg.variance, real=real, project=project,
                                        distributed=cfg.variance_scope == "global"))
    lc = _causal_loss(losses)
    # The term as added to the loss: alpha * L_causal, weighted by the micro-batch's share of the label
    # tokens under Trainer's num_items_in_batch.
    term = cfg.alpha * (1.0 if labels is None else _share(state, labels)) * lc
    if isinstance(output, tuple):
        if labels is not None and len(output) > 0 and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            return (output[0] + term.to(output[0].dtype),) + output[1:]
        return None
    ce = getattr(output, "loss", None)
    if labels is not None and ce is not None:
        output.loss = ce + term.to(ce.dtype)
    # Declared fields, not extra keys: DistributedDataParallel rebuilds the output as
    # type(output)(**fields), which refuses keys its dataclass does not declare.
    fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    loss_source = fields.get("logits")
    if trl_integration.is_fused_output(output):
        # TRL's SFTTrainer takes its loss from these log-probabilities: the term rides on them.
        trl_integration.fold_causal_term(fields, cfg.alpha * lc)
        loss_source = fields["log_probs"]
        if ce is not None and not torch.compiler.is_compiling():
            trl_integration.follow_trainer(model, ce, term, lc, adapter_state_dict(model).values())
    if (torch.is_grad_enabled() and lc.requires_grad and isinstance(loss_source, torch.Tensor)
            and loss_source.requires_grad and not torch.compiler.is_compiling()):
        causal_term.watch(lc, loss_source)
    return _with_dca_losses(type(output))(**fields, causal_loss=lc, causal_term=term, ce_loss=ce)


_OUTPUT_CLASSES = {}   # a transformers output class -> the same with causal_loss and ce_loss


def _with_dca_losses(output_class):
    """`output_class` (a transformers ModelOutput dataclass) with `causal_loss` (L_causal), `causal_term`
    (what was added to the loss for it, alpha * L_causal times the micro-batch's token share under
    num_items_in_batch: the term a loop that computes its own loss adds) and `ce_loss` (the model's own
    loss, before the term was added) fields. `patch` makes the class of the
    model's declared output ahead of time: creating a class inside a compiled forward breaks the graph."""
    derived = _OUTPUT_CLASSES.get(output_class)
    if derived is None:
        derived = _OUTPUT_CLASSES[output_class] = dataclasses.make_dataclass(
            output_class.__name__, [("causal_loss", Optional[torch.Tensor], None),
                                    ("causal_term", Optional[torch.Tensor], None),
                                    ("ce_loss", Optional[torch.Tensor], None)],
            bases=(output_class,), namespace={"__module__": __name__})
    return derived


def _declared_output_class(model):
    """The ModelOutput dataclass `model.forward` declares it returns, or None."""
    try:
        returned = inspect.signature(type(model).forward, eval_str=True).return_annotation
    except (NameError, TypeError, ValueError):
        return None
    return returned if isinstance(returned, type) and dataclasses.is_dataclass(returned) else None


def _share(state, labels):
    """With Trainer's token-count normalisation (num_items_in_batch), the CE of a micro-batch is a sum over
    its tokens divided by the tokens of the whole accumulated batch; weighting L_causal by the micro-batch's
    share of those tokens makes the accumulated causal term the token-weighted mean, not the sum."""
    if state.num_items is None:
        return 1.0
    shifted = state.shift_labels if state.shift_labels is not None else labels[..., 1:]
    count = shifted.ne(-100).sum()
    total = state.num_items
    total = total.to(count.device) if isinstance(total, torch.Tensor) else torch.tensor(total, device=count.device)
    return (count.float() / total.float().clamp(min=1)).squeeze()


def _projector(o_proj, dtype):
    def project(x):
        return o_proj(x.to(dtype))  # fastdca.loss casts the result back to the statistics' dtype

    return project


# --------------------------------------------------------------------------------------------------
# Helpers


def _unwrap(model):
    """The transformers model inside a PeftModel; any other model as it is."""
    return model.get_base_model() if peft_integration.is_peft_model(model) else model


def _state(model) -> _State:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched with fastdca; call fastdca.patch(model, config) first")
    return state


def _swap_config(model, old, new):
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def _decoder_layers(model):
    for candidate in (getattr(model, "model", None), model):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected `.model.layers`)")


def _is_dca_name(name: str) -> bool:
    return ".dca." in name or name.startswith("dca.")


def _numel(p) -> int:
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return int(math.prod(shape))
    return p.numel()


__all__ = ["patch", "unpatch", "save_adapter", "load_adapter", "describe", "disable_adapter",
           "print_trainable_parameters", "trainable_parameters", "is_patched", "get_config",
           "adapter_state_dict", "adapted_layers", "record_adapter_attention", "AdapterAttentionRecord", "DCAAdapter",
           "SUPPORTED_MODEL_TYPES"]
