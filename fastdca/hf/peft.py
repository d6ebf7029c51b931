"""PEFT tuners (LoRA and the rest) on the same model as DCA: recognising them, and refusing the order
of wrapping that silently freezes DCA.

Supported order: wrap with PEFT first, then `fastdca.patch(peft_model)` (or its `get_base_model()`):
the patch leaves trainable what PEFT made trainable and adds the DCA parameters. The other order,
`fastdca.patch` then `get_peft_model`, leaves the DCA parameters frozen by PEFT, which trains only its
own: the first training forward refuses it.

A folder holding PEFT's adapter and a DCA adapter loads both through PEFT's and transformers' own loading
once fastdca is imported (`load_dca_with_peft_adapters`, below): never PEFT's adapter alone.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
import warnings

from torch import nn


def is_peft_model(model) -> bool:
    """A PeftModel (the wrapper get_peft_model returns)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def has_tuner_layers(model: nn.Module) -> bool:
    """Whether PEFT injected tuner layers (LoRA, ...) into `model`."""
    if sys.modules.get("peft") is None:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def check_not_frozen_by_peft(model: nn.Module, dca_params) -> None:
    """Refuse a training forward whose DCA parameters were all frozen by PEFT's get_peft_model."""
    if any(p.requires_grad for p in dca_params) or not has_tuner_layers(model):
        return
    raise RuntimeError("PEFT froze fastdca's DCA parameters (get_peft_model after fastdca.patch trains only PEFT's own "
                       "adapters, and DCA would silently stop learning): wrap with PEFT first and patch the PeftModel, "
                       "fastdca.patch(get_peft_model(model, peft_config), dca_config), which trains both")


# --------------------------------------------------------------------------------------------------
# Folders that carry PEFT's adapter and a DCA adapter together (a patched PeftModel's save_pretrained)
# load both through every PEFT loading path once fastdca is imported: PeftModel.from_pretrained,
# AutoPeftModelForCausalLM, PeftModel.load_adapter (Trainer's resume), and transformers' own
# load_adapter / from_pretrained of an adapter folder. Each ends in one of the two load_adapter methods
# wrapped here, as soon as its module is imported (now, or whenever the user imports it).

_LOADERS = {"peft.peft_model": ("PeftModel", "model_id"),
            "transformers.integrations.peft": ("PeftAdapterMixin", "peft_model_id")}


def load_dca_with_peft_adapters() -> None:
    """Wrap PEFT's and transformers' load_adapter so that a folder holding a DCA adapter beside PEFT's
    loads it too; a module not imported yet is wrapped when it is."""
    for module_name in _LOADERS:
        module = sys.modules.get(module_name)
        if module is not None:
            _wrap_loader(module)
        elif not any(isinstance(f, _AfterImport) and f.name == module_name for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(module_name, _wrap_loader))


def _wrap_loader(module) -> None:
    class_name, id_argument = _LOADERS[module.__name__]
    cls = getattr(module, class_name)
    load = cls.load_adapter
    if getattr(load, "_loads_dca", False):
        return

    @functools.wraps(load)
    def load_adapter(self, *args, **kwargs):
        result = load(self, *args, **kwargs)
        model_id = args[0] if args else kwargs.get(id_argument)
        folder = _dca_folder(model_id, kwargs.get("subfolder"), kwargs.get("revision"), kwargs.get("token"))
        if folder is not None:
            from fastdca.hf.api import load_adapter as load_dca

            load_dca(self, folder)
        return result

    load_adapter._loads_dca = True
    cls.load_adapter = load_adapter


def _dca_folder(model_id, subfolder=None, revision=None, token=None):
    """The local folder of `model_id` (a path or a Hub id) that holds a DCA adapter, or None."""
    from fastdca import adapter_file

    if model_id is None or not isinstance(model_id, (str, os.PathLike)):
        return None
    local = os.path.join(str(model_id), subfolder or "")
    if os.path.isdir(str(model_id)):
        return local if os.path.isfile(os.path.join(local, adapter_file.CONFIG_FILE)) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config = hf_hub_download(str(model_id), adapter_file.CONFIG_FILE, subfolder=subfolder, revision=revision,
                                 token=token)
        hf_hub_download(str(model_id), adapter_file.ADAPTER_FILE, subfolder=subfolder, revision=revision, token=token)
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        warnings.warn(f"could not check whether {model_id} also carries a fastdca DCA adapter (offline, and not in the "
                      "cache): if it does, load it with fastdca.from_pretrained while online")
        return None
    return os.path.dirname(config)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` right after module `name` is first imported (its spec found by the other finders)."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call_back(module):
            exec_module(module)
            self.callback(module)

        spec.loader.exec_module = exec_then_call_back
        return spec
