"""Scoring DCA adapters with lm-evaluation-harness (lm-eval 0.4.x, the optional `eval` extra).

Importing this module registers `FastDCALM`, a subclass of the harness's `HFLM`, under the model name
`fastdca`: HFLM loads the base model as it loads any Hugging Face model (dtype, device, batch size and
the rest of `--model_args` pass through), then `fastdca.load_adapter` patches it with
the adapter's own saved DCAConfig, so that the harness scores the adapter and never, silently, the base.
lm-eval 0.4 discovers no models from other packages (no entry points; only its own lazy table), so
`fastdca lm-eval ARGS...` imports this module and then runs the harness's own CLI with ARGS unchanged.
`import fastdca` never imports this module, nor lm_eval.
"""

from __future__ import annotations

import os
import sys

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:    # lm-eval is an optional extra
    raise ImportError(f"scoring with lm-evaluation-harness needs it installed: pip install \"fastdca[eval]\" "
                      f"({error})") from error

from fastdca import adapter_file
from fastdca.errors import AdapterError
from fastdca.hf.pretrained import CONFIG_KEY as SAVED_MODEL_KEY    # the key a patched model's config.json carries

__all__ = ["FastDCALM", "MODEL_NAME", "cli"]

MODEL_NAME = "fastdca"


@register_model(MODEL_NAME)
class FastDCALM(HFLM):
    """HFLM with a DCA adapter: `pretrained=BASE,adapter=ADAPTER_DIR` (the folder `fastdca train` or
    `fastdca.save_adapter` or a patched model's `save_pretrained` wrote), or `pretrained=DIR` alone where DIR
    is a patched model's `save_pretrained(dir, full_model=True)` folder (loaded by `fastdca.from_pretrained`).
    Every other argument is HFLM's.
    Anything else, a missing or wrong adapter among it, raises fastdca.AdapterError (a ValueError) in
    one line that names `adapter=` or `pretrained=`."""

    def __init__(self, pretrained, adapter=None, **kwargs) -> None:
        self.adapter = None if adapter is None else str(adapter)
        if self.adapter is not None:
            _check_adapter_folder(self.adapter)     # before the base model loads, which can take minutes
        if not isinstance(pretrained, str):         # a model object (Python API): HFLM skips _create_model
            from fastdca.hf import is_patched, load_adapter

            if self.adapter is not None:
                _load_adapter(load_adapter, pretrained, self.adapter)
            elif not is_patched(pretrained):
                raise AdapterError(f"model {MODEL_NAME}: the model passed as pretrained= has no DCA adapter; "
                                   "give adapter=ADAPTER_DIR (or score the plain model with model hf)")
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, pretrained: str, **kwargs) -> None:
        saved = getattr(self.config, SAVED_MODEL_KEY, None) is not None
        if saved and self.adapter is not None:
            raise AdapterError(f"pretrained={pretrained} is a fastdca-patched model's whole-model save_pretrained folder, which "
                               f"carries its own adapter; drop adapter={self.adapter}, or give the base model as "
                               "pretrained=")
        if not saved and self.adapter is None:
            raise AdapterError(f"model {MODEL_NAME} needs adapter=ADAPTER_DIR (the folder `fastdca train` wrote): "
                               f"pretrained={pretrained} is a plain model; score it alone with --model hf")
        if not saved:
            super()._create_model(pretrained, **kwargs)
            from fastdca.hf import load_adapter

            _load_adapter(load_adapter, self._model, self.adapter)
            return
        if not os.path.isdir(pretrained):
            raise AdapterError(f"pretrained={pretrained}: a fastdca-patched model is read from a local folder "
                               "(fastdca.from_pretrained); download it first")
        # HFLM's own loading with its arguments, through fastdca.from_pretrained (which loads the base weights
        # and then the adapter beside them) in place of AutoModelForCausalLM.from_pretrained
        auto_class = self.AUTO_MODEL_CLASS
        self.AUTO_MODEL_CLASS = _SavedPatchedModel
        try:
            super()._create_model(pretrained, **kwargs)
        finally:
            self.AUTO_MODEL_CLASS = auto_class

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["fastdca_adapter"] = self.adapter if self.adapter is not None else str(self.pretrained)
        return info


class _SavedPatchedModel:
    """Stands in for AutoModelForCausalLM while HFLM loads a patched model's whole-model save_pretrained folder."""

    @staticmethod
    def from_pretrained(directory, **kwargs):
        from fastdca.hf import from_pretrained

        try:
            return from_pretrained(directory, **kwargs)
        except (AdapterError, FileNotFoundError) as error:
            raise AdapterError(f"pretrained={directory}: {error}") from None


def _check_adapter_folder(adapter: str) -> None:
    if not adapter:
        raise AdapterError("adapter= is empty; give the adapter folder (`fastdca train`'s --output)")
    if not os.path.isdir(adapter):
        raise AdapterError(f"adapter={adapter}: no such folder")
    missing = [name for name in (adapter_file.CONFIG_FILE, adapter_file.ADAPTER_FILE)
               if not os.path.isfile(os.path.join(adapter, name))]
    if missing:
        raise AdapterError(f"adapter={adapter} is not a fastdca adapter folder: {' and '.join(missing)} missing "
                           "(give the folder `fastdca train` or fastdca.save_adapter wrote)")


def _load_adapter(load_adapter, model, adapter: str) -> None:
    try:
        load_adapter(model, adapter)     # patches the model with the adapter's saved DCAConfig, checked
    except (AdapterError, FileNotFoundError) as error:
        raise AdapterError(f"adapter={adapter}: {error}") from None


def cli(argv) -> int:
    """Run lm-eval's own command line (`lm_eval.__main__.cli_evaluate`) on `argv`, unchanged, with the
    `fastdca` model registered."""
    from lm_eval.__main__ import cli_evaluate

    previous, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = previous
    return 0
