"""The adapter of one attention module, DCAAdapter: its prompt and gate, and the adapter keys and values
the prompt becomes through the layer's own projections (cached without gradients, as in generate)."""

from __future__ import annotations

import torch
from torch import nn


class DCAAdapter(nn.Module):
    """The adapter of one attention module: `prompt` (M, hidden) and `gate` (num_attention_heads,)."""

    def __init__(self, adapter_len: int, hidden_size: int, num_heads: int, layer_idx: int, device=None):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(adapter_len, hidden_size, dtype=torch.float32, device=device))
        self.gate = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32, device=device))
        self.layer_idx = layer_idx
        self._kv_cache = None
        self.kv_computations = 0  # how many times eager calls computed the adapter keys/values (not cache hits)

    def extra_repr(self):
        return f"layer={self.layer_idx}, adapter_len={self.prompt.shape[0]}, hidden={self.prompt.shape[1]}"

    def adapter_kv(self, attn: nn.Module, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        """ak, av (Hkv, M, D) in `dtype`: the prompt through the layer's own projections, as the family's
        architecture entry says (fastdca.hf.architectures)."""
        # The cache is an eager-mode saving: its key reads storage addresses and version counters, which
        # a compiled graph cannot guard on, and a compiled graph recomputes the small projections. Only
        # without gradients (a cached graph would be backpropagated twice) and only for modules whose output
        # is a function of their own parameters alone: a PEFT-wrapped one also depends on its adapters.
        key = None
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            key = _cache_key(self.prompt, dtype, self._architecture.kv_modules(attn))
            if key is not None and self._kv_cache is not None and self._kv_cache[0] == key:
                return self._kv_cache[1]
        ak, av = self._architecture.adapter_kv(attn, self.prompt.to(dtype), num_kv_heads, head_dim)
        if torch.compiler.is_compiling():
            return ak, av
        self.kv_computations += 1
        self._kv_cache = (key, (ak, av)) if key is not None else None
        return ak, av


def _cache_key(prompt, dtype, modules):
    """What the adapter keys and values depend on: the prompt's and every parameter's storage and version,
    and the dtype; None when a module has submodules (a PEFT wrapper), whose switches no key can see."""
    if any(True for m in modules for _ in m.children()):
        return None
    params = [prompt] + [p for m in modules for p in m.parameters()]
    return (dtype, prompt.device) + tuple((p.data_ptr(), p._version) for p in params)
