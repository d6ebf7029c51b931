"""The model card (README.md) of a folder a patched model's save_pretrained writes: the Hub's metadata
(`base_model`, `library_name: fastdca`, tags) and what the adapter is and how to load it, as PEFT writes one
for every adapter it saves. A README.md that fastdca did not write is left as it is."""

from __future__ import annotations

import json
import os

from fastdca.hf.state import adapter_state_dict, state_of
from fastdca.io import atomic_write_text

CARD_FILE = "README.md"
LIBRARY_LINE = "library_name: fastdca"


def write(directory, model, *, full_model: bool) -> None:
    path = os.path.join(str(directory), CARD_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            if LIBRARY_LINE not in f.read():
                return
    with open(os.path.join(str(directory), "dca_config.json")) as f:
        record = json.load(f)
    atomic_write_text(path, text(model, record, full_model=full_model))


def text(model, record: dict, *, full_model: bool) -> str:
    state = state_of(model)
    base = (record.get("base_model") or {}).get("name_or_path")
    revision = (record.get("base_model") or {}).get("revision")
    on_hub = bool(base) and _is_hub_id(base)
    params = sum(p.numel() for p in adapter_state_dict(model).values())
    info = state.model_info
    meta = [LIBRARY_LINE]
    if on_hub:
        meta.insert(0, f"base_model: {base}")
    tags = ["fastdca", "dca", "llama-adapter", "causal-regularization"] + ([f"base_model:adapter:{base}"] if on_hub else [])
    meta += ["tags:"] + [f"- {t}" for t in tags]
    what = "the whole model (base weights included) and its DCA adapter" if full_model else "a DCA adapter"
    where = f"`{base}`" + (f" (revision `{revision}`)" if revision else "") if base else "an unrecorded base model"
    return "\n".join([
        "---", *meta, "---", "",
        f"# DCA adapter for {base or 'a ' + info['model_type'] + ' model'}", "",
        f"This folder holds {what}, written by [fastdca](https://pypi.org/project/fastdca/): Deconfounded Causal "
        f"Adaptation (LLaMA-Adapter prompts in the top {len(state.layer_ids)} of {info['num_hidden_layers']} layers, "
        f"with a causal loss that keeps their first {state.config.causal_len} tokens invariant across samples), "
        f"{params:,} trainable parameters, on {where}.", "",
        "## Load it", "",
        "```python",
        "import fastdca",
        "",
        "model = fastdca.from_pretrained(\"THIS_FOLDER_OR_REPO\")   # loads the base model, patches it, loads the adapter",
        "# or, into a base model you have loaded: fastdca.load_adapter(model, \"THIS_FOLDER\")",
        "```",
        "",
        "A plain `transformers` or `peft` load of this folder does not give the adapted model.", "",
        "## DCAConfig", "",
        "```json",
        json.dumps(record["dca_config"], indent=2, sort_keys=True),
        "```", ""])


def _is_hub_id(name: str) -> bool:
    """A Hub repository id ("org/name"), not a local path."""
    return name.count("/") == 1 and not os.path.isabs(name) and not name.startswith(".") and not os.path.exists(name)
