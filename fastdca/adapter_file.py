"""The adapter folder's files, `adapter.safetensors` + `dca_config.json`: writing them together and
atomically, and reading them back checked (no pickle; every error names the file and what is wrong)."""

from __future__ import annotations

import errno
import json
import os

import torch

from fastdca.config import DCAConfig
from fastdca.errors import AdapterError
from fastdca.io import atomic_write_all


ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "dca_config.json"
FORMAT_VERSION = 1


def read_config(path) -> dict:
    """dca_config.json, checked: {"dca_config": DCAConfig, "model": dict, ...}; AdapterError otherwise."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path} is not valid JSON ({error}); the file is damaged: write it again with "
                           "fastdca.save_adapter, or use another checkpoint") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: unsupported adapter format version {meta.get('format_version')!r} "
                           f"(this fastdca reads version {FORMAT_VERSION})")
    missing = [key for key in ("dca_config", "model") if not isinstance(meta.get(key), dict)]
    if missing:
        raise AdapterError(f"{path} is incomplete: {', '.join(repr(k) for k in missing)} missing or not an object")
    try:
        meta["dca_config"] = DCAConfig.from_dict(meta["dca_config"])
    except (TypeError, ValueError) as error:
        raise AdapterError(f"{path}: its dca_config is not a valid DCAConfig: {error}") from None
    return meta


def non_finite(tensors: dict) -> list:
    """The names of the (CPU) tensors holding NaN or inf."""
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]


def read_tensors(path) -> dict:
    """adapter.safetensors as float tensors, all finite; AdapterError naming the file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path} cannot be read as safetensors ({error}); the file is truncated or damaged: "
                           "write it again with fastdca.save_adapter, or use another checkpoint") from None
    bad = non_finite(tensors)
    if bad:
        raise AdapterError(f"{path} holds non-finite values (NaN or inf) in {bad[0]}"
                           f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}")
    return tensors


def write(directory, tensors: dict, meta: dict) -> None:
    """Write `tensors` (CPU, finite) and `meta` (with "format_version" added) into `directory`: both files
    or neither, so a write that fails leaves the previous adapter whole."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True)

    def write_config(path):
        with open(path, "w") as f:
            f.write(text)

    weights_path = os.path.join(directory, ADAPTER_FILE)

    def write_weights(path):
        try:
            save_file(tensors, path, metadata={"format": "pt", "fastdca_format_version": str(FORMAT_VERSION)})
        except OSError:
            raise
        except Exception as error:      # safetensors reports I/O failures (a full disk) as its own error
            raise OSError(errno.EIO, f"writing the adapter failed ({error})", weights_path) from None

    atomic_write_all({weights_path: write_weights, os.path.join(directory, CONFIG_FILE): write_config})


def read(directory) -> tuple:
    """(the checked dca_config.json with its "dca_config" as a DCAConfig, the finite tensors) of an adapter
    folder; FileNotFoundError when a file is missing, AdapterError when one is damaged."""
    cfg_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, ADAPTER_FILE)
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no fastdca adapter at {directory!r}: {os.path.basename(path)} is missing")
    return read_config(cfg_path), read_tensors(weights_path)
