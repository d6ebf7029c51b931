"""A patched model's adapter to and from its files (`fastdca.adapter_file`): what is written, and the
checks that an adapter belongs to the model it is loaded into."""

from __future__ import annotations

import os

import torch
from torch import nn

from fastdca import adapter_file
from fastdca.errors import AdapterError
from fastdca.hf.state import adapter_state_dict, state_of, unwrap


def save_adapter(model: nn.Module, directory, *, base_model=None) -> None:
    """Write `adapter.safetensors` and `dca_config.json` into `directory`, together and atomically.

    dca_config.json records the base model, `base_model` or the model's `config._name_or_path` (a local
    folder as an absolute path) and the revision it was loaded at where transformers recorded one, so that
    `fastdca.from_pretrained(directory)` can load it. A model sharded with FSDP2 (DTensor parameters):
    every rank calls it, the parameters are gathered (a collective), and rank 0 alone writes the whole,
    unsharded adapter."""
    model = unwrap(model)
    state = state_of(model)
    params = adapter_state_dict(model)
    tensors = {name: _whole(p).to("cpu", torch.float32).contiguous() for name, p in params.items()}
    if any(_is_sharded(p) for p in params.values()) and torch.distributed.get_rank() != 0:
        return
    bad = adapter_file.non_finite(tensors)
    if bad:
        raise AdapterError(f"refusing to write a non-finite adapter to {directory}: {bad[0]}"
                           f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} hold NaN or inf")
    adapter_file.write(directory, tensors, {"dca_config": state.config.to_dict(), "model": state.model_info,
                                            "layers": state.layer_ids, "base_model": base_model_record(model, base_model)})


def base_model_record(model, base_model=None) -> dict:
    """{"name_or_path", "revision", "attn_implementation"} of the base model an adapter belongs to (None where
    unknown): the attention implementation it was patched on, which loading it again takes by default
    (transformers 5.0 ignores a config.json's own, and Gemma 2's SDPA path cannot soft-cap)."""
    config = model.config
    name = base_model if base_model is not None else (getattr(config, "_name_or_path", "") or None)
    if name is not None and base_model is None and os.path.isdir(name):
        name = os.path.abspath(name)
    revision = getattr(config, "_commit_hash", None) if base_model is None else None
    return {"name_or_path": None if name is None else str(name), "revision": revision,
            "attn_implementation": state_of(model).base_impl}


def check_adapter_matches(model, saved_config, tensors, directory, cfg_path) -> None:
    """The patched model's DCAConfig, parameter names and shapes against the adapter's."""
    state = state_of(model)
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


def named_as_in(model, tensors: dict) -> dict:
    """The adapter's tensors under `model`'s own parameter names: saved from the bare decoder (LlamaModel,
    `layers.3.self_attn.dca.prompt`) for the causal LM (`model.layers.3...`) or the reverse, the model's
    `base_model_prefix` is added or taken away, as transformers does for weights. Any other mismatch is left
    for `check_adapter_matches` to name."""
    prefix = getattr(model, "base_model_prefix", "")
    names = set(adapter_state_dict(model))
    if not prefix or set(tensors) == names:
        return tensors
    head = prefix + "."
    if all(n.startswith(head) for n in names) and not any(n.startswith(head) for n in tensors):
        return {head + n: t for n, t in tensors.items()}
    if all(n.startswith(head) for n in tensors) and not any(n.startswith(head) for n in names):
        return {n[len(head):]: t for n, t in tensors.items()}
    return tensors


def check_same_model(info: dict, saved_model: dict, directory) -> None:
    diffs = [f"{k}: model {info.get(k)!r} vs adapter {v!r}" for k, v in saved_model.items() if info.get(k) != v]
    if diffs:
        raise AdapterError(f"the adapter in {directory!r} was trained on a different model ({'; '.join(diffs)})")


def copy_adapter(model: nn.Module, tensors: dict) -> None:
    """Copy checked adapter tensors into the patched model's DCA parameters (each rank's shard of them
    where FSDP2 sharded them: every rank reads the same file)."""
    with torch.no_grad():
        for name, p in adapter_state_dict(model).items():
            value = tensors[name].to(p.device, p.dtype)
            if _is_sharded(p):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)


def _is_sharded(p) -> bool:
    """A DTensor parameter (FSDP2's fully_shard)."""
    return hasattr(p, "device_mesh") and hasattr(p, "full_tensor")


def _whole(p):
    return (p.full_tensor() if _is_sharded(p) else p).detach()
