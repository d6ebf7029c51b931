"""What the adapter depends on in each model family's attention, written as data: one entry a family.

DCA's equations (docs/DESIGN.md section 1) add, to each adapted layer's attention, M adapter keys and
values made from the learned prompt. In every family here they are the family's own keys and values of
the prompt without position: the prompt goes through the layer's projections exactly as hidden states
do (separate k_proj/v_proj, or the key and value slices of a fused qkv_proj), then through the family's
key norm if it has one (per head or over the whole key width), and never through RoPE. The query, the
scale (the module's own `scaling`: Granite's attention_multiplier, Gemma's query_pre_attn_scalar) and
the prompt-key part of the scores are the family's, as transformers computes them (its sliding window,
Gemma 2's soft-cap, both passed to the attention function with each call); the adapter keys are never
masked by the causal mask or a window, and their scores are not capped: they are their own softmax.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One family's attention as the adapter sees it.

    projection: "separate" (k_proj, v_proj) or "fused_qkv" (qkv_proj, q then k then v along its output);
    key_norm: None, "head" (attn.k_norm over each head's D values: Qwen3, Gemma 3, Cohere) or "width"
        (attn.k_norm over all Hkv * D key values before the split into heads: OLMo 2), applied where the
        module has a k_norm;
    adapter_keys: what the adapter keys and values are, for the README's supported-models table (Supported models).
    """

    model_type: str
    projection: str = "separate"
    key_norm: Optional[str] = None
    adapter_keys: str = "k_proj(prompt), v_proj(prompt)"
    layers: str = "model.layers"          # the decoder layers, from the causal LM
    attention: str = "self_attn"          # the attention module, in a decoder layer

    def kv_modules(self, attn: nn.Module) -> list:
        """The modules of `attn` the adapter keys and values are computed with."""
        projections = [attn.qkv_proj] if self.projection == "fused_qkv" else [attn.k_proj, attn.v_proj]
        norm = getattr(attn, "k_norm", None) if self.key_norm else None
        return projections + ([norm] if norm is not None else [])

    def adapter_kv(self, attn: nn.Module, prompt: torch.Tensor, num_kv_heads: int, head_dim: int):
        """ak, av (Hkv, M, D) in prompt's dtype, from `prompt` (M, hidden) through `attn`'s projections."""
        M = prompt.shape[0]
        x = prompt[None]                                                         # (1, M, hidden)
        if self.projection == "fused_qkv":
            qkv = attn.qkv_proj(x)
            width = num_kv_heads * head_dim
            k, v = qkv[..., -2 * width:-width], qkv[..., -width:]
        else:
            k, v = attn.k_proj(x), attn.v_proj(x)
        norm = getattr(attn, "k_norm", None) if self.key_norm else None   # Cohere has one only with use_qk_norm
        if norm is not None and self.key_norm == "width":
            k = norm(k)
        k = k.to(prompt.dtype).view(M, num_kv_heads, head_dim)
        if norm is not None and self.key_norm == "head":
            k = norm(k).to(prompt.dtype)
        return k.transpose(0, 1), v.to(prompt.dtype).view(M, num_kv_heads, head_dim).transpose(0, 1)


_ARCHITECTURES = (
    Architecture("llama"),
    Architecture("mistral"),
    Architecture("qwen2"),
    Architecture("qwen3", key_norm="head", adapter_keys="k_norm(k_proj(prompt)) per head, v_proj(prompt)"),
    Architecture("qwen3_moe", key_norm="head", adapter_keys="k_norm(k_proj(prompt)) per head, v_proj(prompt)"),
    Architecture("olmo2", key_norm="width", adapter_keys="k_norm(k_proj(prompt)) over the key width, v_proj(prompt)"),
    Architecture("granite"),
    Architecture("phi3", projection="fused_qkv", adapter_keys="the k and v slices of qkv_proj(prompt)"),
    Architecture("smollm3"),
    Architecture("cohere", key_norm="head", adapter_keys="k_proj(prompt) (k_norm per head when use_qk_norm), "
                                                         "v_proj(prompt)"),
    Architecture("gemma2", adapter_keys="k_proj(prompt), v_proj(prompt); its soft-cap on the prompt scores only"),
    Architecture("gemma3_text", key_norm="head", adapter_keys="k_norm(k_proj(prompt)) per head, v_proj(prompt)"),
)
ARCHITECTURES = {a.model_type: a for a in _ARCHITECTURES}
SUPPORTED_MODEL_TYPES = tuple(a.model_type for a in _ARCHITECTURES)


def architecture_of(model: nn.Module) -> Architecture:
    """The entry for `model`'s family; ValueError naming the family and the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ValueError(f"fastdca.patch does not support model type {model_type!r}; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return arch


def find(module: nn.Module, path: str):
    """The attribute at dotted `path` below `module`, or None."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module
