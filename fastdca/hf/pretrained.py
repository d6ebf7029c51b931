"""Saving, sharing and loading the Hugging Face way: `save_pretrained` and `push_to_hub` of a patched model
(and of a patched PeftModel), and `fastdca.from_pretrained`'s loading.

A patched model's `save_pretrained(dir)` writes the adapter, as every PEFT method does: the adapter folder's
files (its dca_config.json records the base model's name or path and revision), a model card (README.md)
and an index that lets transformers' Trainer and TRL's SFTTrainer resume from such a checkpoint (it maps
the DCA tensors to adapter.safetensors; the frozen base is the patched model's `_keys_to_ignore_on_save`,
so the resume reports nothing missing). `full_model=True` writes the whole model as transformers does,
plus the adapter; its config.json names the attention implementation "fastdca_from_pretrained", which no
registry holds, so a plain `from_pretrained` of it refuses instead of silently returning the base model.
`push_to_hub` (or `save_pretrained(..., push_to_hub=True)`) uploads exactly the folder save_pretrained
writes. A patched PeftModel writes PEFT's adapter and the DCA adapter into one folder.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

from fastdca import adapter_file
from fastdca.errors import AdapterError
from fastdca.hf import hub, model_card
from fastdca.hf.saving import save_adapter
from fastdca.hf.state import adapter_state_dict, state_of
from fastdca.io import atomic_write_text

MARKER_IMPL = "fastdca_from_pretrained"
CONFIG_KEY = "fastdca"
DCA_TENSOR_PATTERN = r"\.dca\.(prompt|gate)$"
TRAINER_INDEX_FILE = "model.safetensors.index.json"    # transformers' SAFE_WEIGHTS_INDEX_NAME
PEFT_CONFIG_FILE = "adapter_config.json"
_ABSENT = object()


def install(model, peft_wrapper) -> None:
    """Give the patched `model` (and the PeftModel around it, if one was patched) their save_pretrained,
    `model` its push_to_hub and the frozen base as `_keys_to_ignore_on_save`: instance attributes that
    `remove` takes away. (PEFT's loading reads the DCA adapter too: `fastdca.hf.peft`.)"""
    model.save_pretrained = functools.partial(_save_pretrained, model)
    model.push_to_hub = functools.partial(_push_to_hub, model, model.save_pretrained)
    state = state_of(model)
    state.keys_to_ignore_on_save = model.__dict__.get("_keys_to_ignore_on_save", _ABSENT)
    dca = set(adapter_state_dict(model))
    model._keys_to_ignore_on_save = {name for name in model.state_dict() if name not in dca}
    if peft_wrapper is None:
        return
    save = type(peft_wrapper).save_pretrained

    @functools.wraps(save)
    def save_peft_and_dca_adapter(save_directory, *args, **kwargs):
        result = save(peft_wrapper, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_adapter(model, save_directory)
        return result

    peft_wrapper.save_pretrained = save_peft_and_dca_adapter


def remove(model, peft_wrapper) -> None:
    model.__dict__.pop("save_pretrained", None)
    model.__dict__.pop("push_to_hub", None)
    _restore_keys_to_ignore_on_save(model, state_of(model).keys_to_ignore_on_save)
    if peft_wrapper is not None:
        peft_wrapper.__dict__.pop("save_pretrained", None)


def is_full_model_folder(directory) -> bool:
    """Whether `directory` holds a patched model's whole-model save_pretrained (config.json with fastdca's key)."""
    path = os.path.join(str(directory), "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return isinstance(json.load(f).get(CONFIG_KEY), dict)


def is_peft_folder(directory) -> bool:
    """Whether `directory` holds a PEFT adapter too (a patched PeftModel's save_pretrained)."""
    return os.path.isfile(os.path.join(str(directory), PEFT_CONFIG_FILE))


def base_attn_implementation(directory) -> str:
    """The base attention implementation a patched model's whole-model save_pretrained recorded in `directory`."""
    path = os.path.join(str(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model at {str(directory)!r}: config.json is missing")
    with open(path) as f:
        entry = json.load(f).get(CONFIG_KEY)
    if not isinstance(entry, dict) or "base_attn_implementation" not in entry:
        raise AdapterError(f"{path} was not written by a fastdca-patched model's save_pretrained; load a plain model "
                           "with transformers, or an adapter folder with fastdca.load_adapter(model, directory)")
    return entry["base_attn_implementation"]


def load_full_model(directory, **kwargs):
    """The base model of a patched model's whole-model save_pretrained folder, through transformers'
    from_pretrained of the class AutoModelForCausalLM picks, told that the DCA tensors in its weights are
    expected there (the adapter loads them next): its load report lists nothing as unexpected."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    kwargs.setdefault("attn_implementation", base_attn_implementation(directory))
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


def load_base_of_adapter(directory, base_model=None, **kwargs):
    """The base model an adapter folder records (dca_config.json's "base_model"), or `base_model`, through
    AutoModelForCausalLM.from_pretrained(**kwargs), with the attention implementation it was patched on
    unless kwargs say otherwise; the recorded revision unless `base_model` overrides it."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(str(directory), adapter_file.CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fastdca adapter or model at {str(directory)!r}: neither {adapter_file.CONFIG_FILE} "
                                "(an adapter folder) nor a config.json written by a patched model's save_pretrained")
    recorded = adapter_file.read_config(path).get("base_model") or {}
    if recorded.get("attn_implementation"):
        kwargs.setdefault("attn_implementation", recorded["attn_implementation"])
    if base_model is None:
        base_model = recorded.get("name_or_path")
        if recorded.get("revision") and "revision" not in kwargs:
            kwargs["revision"] = recorded["revision"]
    if not base_model:
        raise AdapterError(f"{path} does not record its base model (written by an older fastdca, or from a model "
                           "built in memory): pass base_model='NAME_OR_PATH'")
    return AutoModelForCausalLM.from_pretrained(base_model, **kwargs)


def _save_pretrained(model, save_directory, *, full_model: bool = False, base_model=None, push_to_hub: bool = False,
                     is_main_process: bool = True, state_dict=None, **kwargs):
    """A patched model's save_pretrained: the adapter (default) or, with `full_model=True`, the whole model
    too. `base_model` names the base in the adapter's record and model card (default: the model's
    `config._name_or_path`). With `push_to_hub=True` the folder is uploaded afterwards (`repo_id`,
    `token`, `private`, `commit_message`, `revision` and `create_pr` as transformers takes them)."""
    upload = {k: kwargs.pop(k) for k in hub.UPLOAD_ARGUMENTS if k in kwargs}
    os.makedirs(save_directory, exist_ok=True)
    if is_main_process:
        if full_model:
            _save_full_model(model, save_directory, state_dict=state_dict, **kwargs)
        save_adapter(model, save_directory, base_model=base_model)
        if not full_model:
            _write_trainer_index(model, save_directory)
        model_card.write(save_directory, model, full_model=full_model)
    if push_to_hub and is_main_process:
        repo_id = upload.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
        return hub.upload_folder(save_directory, repo_id, **upload)
    return None


def _push_to_hub(model, save_pretrained, repo_id, *, full_model: bool = False, base_model=None, **kwargs):
    """A patched model's push_to_hub: what save_pretrained writes, written to a temporary folder and
    uploaded as it is (never the base model alone)."""
    upload = {k: kwargs.pop(k) for k in hub.UPLOAD_ARGUMENTS if k in kwargs}
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(folder, full_model=full_model, base_model=base_model, **kwargs)
        return hub.upload_folder(folder, repo_id, **upload)


def _save_full_model(model, save_directory, **kwargs):
    ours = model._keys_to_ignore_on_save
    _restore_keys_to_ignore_on_save(model, state_of(model).keys_to_ignore_on_save)
    try:
        type(model).save_pretrained(model, save_directory, **kwargs)
    finally:
        model._keys_to_ignore_on_save = ours
    path = os.path.join(save_directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["attn_implementation"] = MARKER_IMPL
    config[CONFIG_KEY] = {"base_attn_implementation": state_of(model).base_impl,
                          "note": "a fastdca DCA model: load it with fastdca.from_pretrained(directory)"}
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_trainer_index(model, save_directory):
    """The index transformers' Trainer reads to resume from a sharded checkpoint: the DCA tensors, all in
    adapter.safetensors. Nothing else is there: transformers' from_pretrained finds no config.json."""
    index = {"metadata": {"fastdca": "a DCA adapter, not a whole model: load it with "
                                    "fastdca.from_pretrained(directory)"},
             "weight_map": {name: adapter_file.ADAPTER_FILE for name in sorted(adapter_state_dict(model))}}
    atomic_write_text(os.path.join(save_directory, TRAINER_INDEX_FILE), json.dumps(index, indent=2) + "\n")


def _restore_keys_to_ignore_on_save(model, original):
    if original is _ABSENT:
        model.__dict__.pop("_keys_to_ignore_on_save", None)
    else:
        model._keys_to_ignore_on_save = original
