"""The integration's public functions that put its parts together: patch and unpatch (the model, then
its save/load integrations), load_adapter (patching an unpatched model first) and from_pretrained."""

from __future__ import annotations

import os
from typing import Optional

from torch import nn

from fastdca import adapter_file
from fastdca.config import DCAConfig
from fastdca.errors import AdapterError
from fastdca.hf import hub, pretrained
from fastdca.hf.patching import model_info, patch_model, unpatch_model
from fastdca.hf.saving import check_adapter_matches, check_same_model, copy_adapter, named_as_in
from fastdca.hf.state import is_patched, state_of, unwrap


def patch(model: nn.Module, config: Optional[DCAConfig] = None, *, backend: Optional[str] = None) -> nn.Module:
    """Add DCA adapters to the top `config.adapter_layers` decoder layers of `model`, in place.

    Every base parameter is frozen (under PEFT: what PEFT made trainable stays so); each adapted attention
    module gets a `dca` submodule with float32 `prompt` (M, hidden) ~ N(0, 1) and `gate`
    (num_attention_heads,) = 0, so the patched model's logits equal the unpatched model's until training
    moves the gates. A forward with labels returns CE + alpha * L_causal and sets `causal_loss` on the
    output. `backend` ("torch", "triton", "reference", "auto") is passed to `fastdca.ops.dca_attention`;
    None = FASTDCA_BACKEND or auto. `model` may be a PeftModel.

    Args:
        model: a transformers causal LM (or its bare decoder, or a PeftModel around one) of a supported family.
        config: the DCAConfig; None = DCAConfig() (L = 20, M = 10, H = 2, alpha = 1).
        backend: the op's backend for the adapted layers, or None.
    Returns:
        `model`, patched in place: each adapted attention module has `dca.prompt` (M, hidden) and
        `dca.gate` (num_attention_heads,), float32.
    Raises:
        ValueError naming the family, the attention implementation or the config value fastdca cannot take.
    """
    config = DCAConfig() if config is None else config
    if not isinstance(config, DCAConfig):
        raise TypeError(f"config must be a fastdca.DCAConfig, got {type(config).__name__}")
    base = patch_model(model, config, backend)
    state = state_of(base)
    pretrained.install(base, state.peft_wrapper)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: remove the adapters and hooks, restore the attention implementation and the
    parameters' requires_grad flags. Returns the model."""
    base = unwrap(model)
    pretrained.remove(base, state_of(base).peft_wrapper)
    unpatch_model(base)
    return model


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load an adapter written by `save_adapter` into `model`.

    An unpatched model is patched first with the saved DCAConfig. A patched model must have the same
    DCAConfig, the same architecture numbers and exactly the saved parameters with the saved shapes (an
    adapter saved from the bare decoder, LlamaModel, loads into the causal LM and the reverse: the names
    are mapped through `base_model_prefix` as transformers maps weights).
    A mismatch, or a damaged, truncated or incomplete file, raises fastdca.AdapterError (a ValueError)
    naming the file and what is wrong, and leaves the model as it was.

    Args:
        model: a transformers model (patched or not) or a PeftModel around one.
        directory: the adapter folder (adapter.safetensors + dca_config.json).
    Returns:
        `model`, patched, with the adapter's parameters.
    Raises:
        FileNotFoundError when a file is missing; fastdca.AdapterError on any mismatch or damage.
    """
    base = unwrap(model)
    meta, tensors = adapter_file.read(directory)
    saved_config = meta["dca_config"]
    cfg_path = os.path.join(directory, adapter_file.CONFIG_FILE)
    # The files and the architecture are checked before an unpatched model is patched, and a later
    # mismatch unpatches it again: a refused adapter leaves the model as it was.
    check_same_model(state_of(base).model_info if is_patched(base) else model_info(base), meta["model"], directory)
    patched_here = not is_patched(base)
    if patched_here:
        patch(model, saved_config)
    try:
        tensors = named_as_in(base, tensors)
        check_adapter_matches(base, saved_config, tensors, directory, cfg_path)
    except AdapterError:
        if patched_here:
            unpatch(model)
        raise
    copy_adapter(base, tensors)
    return model


def from_pretrained(name_or_path, *, base_model=None, **kwargs):
    """The adapted model a patched model's `save_pretrained` (or `fastdca train`, or `save_adapter`) wrote,
    from a local folder or a Hugging Face Hub repository id, in one call: the base model it records (or
    `base_model`, a name or path) through transformers' AutoModelForCausalLM.from_pretrained(**kwargs)
    (dtype, device_map, quantization_config, attn_implementation, ...), patched with the adapter's own
    DCAConfig, with the adapter loaded and checked as `load_adapter` checks it. A whole-model folder
    (`save_pretrained(dir, full_model=True)`) loads its own base weights. `revision`, `token` and
    `cache_dir` also choose the Hub download of the adapter. A folder a patched PeftModel wrote (LoRA and
    DCA) gives the PeftModel with both adapters.

    Args:
        name_or_path: a local folder or a Hub repository id.
        base_model: the base model's name or path, instead of the one the adapter records.
        **kwargs: transformers' from_pretrained arguments for the base (and revision/token/cache_dir for
            the adapter's download).
    Returns:
        the patched model (a PeftModel for a LoRA + DCA folder), its adapter loaded.
    Raises:
        FileNotFoundError for a folder that holds no adapter; fastdca.AdapterError when the base is not
        recorded and not given, or the adapter does not match it.
    """
    directory = hub.local_folder(name_or_path, **{k: kwargs[k] for k in ("revision", "token", "cache_dir")
                                                  if k in kwargs})
    if pretrained.is_full_model_folder(directory):
        if base_model is not None:
            raise ValueError(f"{str(name_or_path)!r} holds a whole model (save_pretrained(full_model=True)), which is "
                             "its own base: drop base_model=")
        return load_adapter(pretrained.load_full_model(directory, **kwargs), directory)
    kwargs.pop("revision", None)     # the adapter's; the base's is the one the adapter records
    base = pretrained.load_base_of_adapter(directory, base_model, **kwargs)
    if pretrained.is_peft_folder(directory):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, directory)     # PEFT's adapter, then the DCA one (fastdca.hf.peft)
    return load_adapter(base, directory)
