"""PEFT tuners (LoRA and the rest) on the same model as DCA: recognising them, and refusing the order
of wrapping that silently freezes DCA.

Supported order: wrap with PEFT first, then `fastdca.patch(peft_model)` (or its `get_base_model()`):
the patch leaves trainable what PEFT made trainable and adds the DCA parameters. The other order,
`fastdca.patch` then `get_peft_model`, leaves the DCA parameters frozen by PEFT, which trains only its
own: the first training forward refuses it.
"""

from __future__ import annotations

import sys

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
