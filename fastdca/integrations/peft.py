"""PEFT tuners (LoRA and the rest) on the same model as DCA.

Supported order: wrap with PEFT first, then `fastdca.patch(peft_model)` (or its `get_base_model()`).
The patch then leaves trainable what PEFT made trainable (the base stays frozen: PEFT froze it) and adds
the DCA parameters; the adapter keys and values go through the layer's own projections, LoRA included.
`save_pretrained` of the PeftModel writes PEFT's adapter and the DCA adapter into one folder, and its
`load_adapter` (what Trainer's resume calls) reads both back.

The other order, `fastdca.patch` then `get_peft_model`, leaves the DCA parameters frozen by PEFT, which
trains only its own: the first training forward refuses it (`check_not_frozen_by_peft`).
"""

from __future__ import annotations

import functools
import os
import sys

from torch import nn


def is_peft_model(model) -> bool:
    """A PeftModel (the wrapper get_peft_model returns)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def has_tuner_layers(model: nn.Module) -> bool:
    """Whether PEFT injected tuner layers (LoRA, ...) into `model`."""
    peft = sys.modules.get("peft")
    if peft is None:
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


def install(peft_model, base_model) -> None:
    """Make `peft_model.save_pretrained` also write the DCA adapter and its `load_adapter` also read it."""
    from fastdca.patch import load_adapter, save_adapter

    save, load = type(peft_model).save_pretrained, type(peft_model).load_adapter

    @functools.wraps(save)
    def save_pretrained(save_directory, *args, **kwargs):
        result = save(peft_model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_adapter(base_model, save_directory)
        return result

    @functools.wraps(load)
    def load_peft_and_dca_adapter(model_id, *args, **kwargs):
        result = load(peft_model, model_id, *args, **kwargs)
        if os.path.isfile(os.path.join(str(model_id), "dca_config.json")):
            load_adapter(base_model, model_id)
        return result

    peft_model.save_pretrained = save_pretrained
    peft_model.load_adapter = load_peft_and_dca_adapter
    peft_model._fastdca_installed = True


def remove(peft_model) -> None:
    if peft_model.__dict__.pop("_fastdca_installed", False):
        del peft_model.save_pretrained
        del peft_model.load_adapter
