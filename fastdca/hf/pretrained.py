"""Saving the Hugging Face way: `save_pretrained` of a patched model, and of a patched PeftModel.

A patched transformers model writes what transformers writes (config.json and the weights, the DCA
tensors among them, so Trainer and SFTTrainer checkpoints resume with the adapter) plus the adapter
folder's files. Its config.json names the attention implementation "fastdca_from_pretrained", which no
registry holds: a plain `from_pretrained` of the folder refuses it instead of silently returning the base
model, and `fastdca.from_pretrained(dir)` loads it back. A patched PeftModel writes PEFT's adapter and
the DCA adapter into one folder, and its `load_adapter` (what Trainer's resume calls) reads both.
"""

from __future__ import annotations

import functools
import json
import os

from fastdca import adapter_file
from fastdca.errors import AdapterError
from fastdca.hf.saving import save_adapter
from fastdca.hf.state import state_of
from fastdca.io import atomic_write_text

MARKER_IMPL = "fastdca_from_pretrained"
CONFIG_KEY = "fastdca"
DCA_TENSOR_PATTERN = r"\.dca\.(prompt|gate)$"
_ABSENT = object()


def install(model, peft_wrapper, load_adapter) -> None:
    """Give the patched `model` (and the PeftModel around it, if one was patched) their save_pretrained,
    and the PeftModel its load_adapter, as instance attributes that `remove` takes away. `load_adapter`
    is fastdca's."""
    model.save_pretrained = functools.partial(_save_pretrained, model)
    if peft_wrapper is None:
        return
    save, load = type(peft_wrapper).save_pretrained, type(peft_wrapper).load_adapter

    @functools.wraps(save)
    def save_peft_and_dca_adapter(save_directory, *args, **kwargs):
        result = save(peft_wrapper, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_adapter(model, save_directory)
        return result

    @functools.wraps(load)
    def load_peft_and_dca_adapter(model_id, *args, **kwargs):
        result = load(peft_wrapper, model_id, *args, **kwargs)
        if os.path.isfile(os.path.join(str(model_id), adapter_file.CONFIG_FILE)):
            load_adapter(model, model_id)
        return result

    peft_wrapper.save_pretrained = save_peft_and_dca_adapter
    peft_wrapper.load_adapter = load_peft_and_dca_adapter


def remove(model, peft_wrapper) -> None:
    model.__dict__.pop("save_pretrained", None)
    if peft_wrapper is not None:
        peft_wrapper.__dict__.pop("save_pretrained", None)
        peft_wrapper.__dict__.pop("load_adapter", None)


def base_attn_implementation(directory) -> str:
    """The base attention implementation a patched model's save_pretrained recorded in `directory`."""
    path = os.path.join(str(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model at {str(directory)!r}: config.json is missing")
    with open(path) as f:
        entry = json.load(f).get(CONFIG_KEY)
    if not isinstance(entry, dict) or "base_attn_implementation" not in entry:
        raise AdapterError(f"{path} was not written by a fastdca-patched model's save_pretrained; load a plain model "
                           "with transformers, or an adapter folder with fastdca.load_adapter(model, directory)")
    return entry["base_attn_implementation"]


def load_base(directory, **kwargs):
    """The base model of a patched model's save_pretrained folder, through transformers' from_pretrained of
    the class AutoModelForCausalLM picks, told that the DCA tensors in its weights are expected there (the
    adapter loads them next): its load report lists nothing as unexpected."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        directory, **{k: kwargs[k] for k in ("revision", "trust_remote_code", "cache_dir", "token") if k in kwargs})
    model_class = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    own = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected", _ABSENT)
    model_class._keys_to_ignore_on_load_unexpected = list(model_class._keys_to_ignore_on_load_unexpected or []) + [
        DCA_TENSOR_PATTERN]
    try:
        return model_class.from_pretrained(directory, config=config, **kwargs)
    finally:
        if own is _ABSENT:
            del model_class._keys_to_ignore_on_load_unexpected
        else:
            model_class._keys_to_ignore_on_load_unexpected = own


def _save_pretrained(model, save_directory, *args, **kwargs):
    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return result
    save_adapter(model, save_directory)
    path = os.path.join(save_directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["attn_implementation"] = MARKER_IMPL
    config[CONFIG_KEY] = {"base_attn_implementation": state_of(model).base_impl,
                          "note": "a fastdca DCA model: load it with fastdca.from_pretrained(directory)"}
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return result
