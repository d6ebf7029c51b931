"""Saving and loading a patched model the Hugging Face way.

`model.save_pretrained(dir)` of a patched model writes what transformers writes (config.json and the
weights, the DCA tensors among them, so Trainer and SFTTrainer checkpoints resume with the adapter) plus
the adapter as `fastdca.save_adapter` writes it (adapter.safetensors + dca_config.json). Its config.json
names the attention implementation "fastdca_from_pretrained", which no registry holds: a plain
`from_pretrained` of the folder refuses it instead of silently returning the base model, and
`fastdca.from_pretrained(dir)` loads the base weights and the adapter back.
"""

from __future__ import annotations

import functools
import json
import os

from fastdca.errors import AdapterError
from fastdca.io import atomic_write_text

MARKER_IMPL = "fastdca_from_pretrained"
CONFIG_KEY = "fastdca"


def install(model, base_impl: str) -> None:
    """Give the patched `model` its save_pretrained (an instance attribute; `remove` takes it away)."""
    model.save_pretrained = functools.partial(_save_pretrained, model, base_impl)


def remove(model) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), functools.partial):
        del model.save_pretrained


def _save_pretrained(model, base_impl, save_directory, *args, **kwargs):
    from fastdca.patch import save_adapter

    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return result
    save_adapter(model, save_directory)
    path = os.path.join(save_directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["attn_implementation"] = MARKER_IMPL
    config[CONFIG_KEY] = {"base_attn_implementation": base_impl,
                          "note": "a fastdca DCA model: load it with fastdca.from_pretrained(directory)"}
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return result


def from_pretrained(directory, **kwargs):
    """The patched model that `model.save_pretrained(directory)` saved: the base weights through
    transformers' AutoModelForCausalLM.from_pretrained(directory, **kwargs), then the DCA adapter from
    the same folder (fastdca.load_adapter checks its config, model and shapes)."""
    from transformers import AutoModelForCausalLM

    from fastdca.patch import load_adapter

    path = os.path.join(str(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model at {str(directory)!r}: config.json is missing")
    with open(path) as f:
        entry = json.load(f).get(CONFIG_KEY)
    if not isinstance(entry, dict) or "base_attn_implementation" not in entry:
        raise AdapterError(f"{path} was not written by a fastdca-patched model's save_pretrained; load a plain model "
                           "with transformers, or an adapter folder with fastdca.load_adapter(model, directory)")
    kwargs.setdefault("attn_implementation", entry["base_attn_implementation"])
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    return load_adapter(model, directory)
