"""The triton backend's forward with its prompt half through torch's own fused attention (FASTDCA_SDPA_FWD=1).

The fused forward computes the prompt attention and the adapter term in one Triton kernel. The alternative
takes the prompt attention, softmax(q k^T * scale + mask) v with its row log-sum-exp, from the kernel
scaled_dot_product_attention itself runs for the call (flash, cuDNN or memory-efficient attention on CUDA,
flash on the CPU), and adds the adapter term, gate and X_G in one Triton kernel
(`kernels.dca_attention.dca_merge_forward`). The backward is the fused one either way: it takes the prompt
output as out - A av, so nothing more is kept for it. Not the default until a GPU run has measured it
(`fastdca check` times it beside the fused forward).
"""

from __future__ import annotations

import os

import torch

from fastdca.reference import causal_visible

# torch.nn.attention.SDPBackend's values, as torch._fused_sdp_choice returns them
_FLASH, _EFFICIENT, _CUDNN = 1, 2, 3


def sdpa_forward_enabled() -> bool:
    """Whether the triton backend's forward takes its prompt half from torch's fused attention. Off unless
    FASTDCA_SDPA_FWD=1: not the default until a GPU run has measured it."""
    return os.environ.get("FASTDCA_SDPA_FWD") == "1"


def sdpa_forward(on: bool):
    """FASTDCA_SDPA_FWD set to `on` while the block runs (read at each forward)."""
    from fastdca.kernels.dca_attention import switch

    return switch("FASTDCA_SDPA_FWD", on)


def triton_forward(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap,
                   gate_fn, xg):
    """(out, lse, extra) as `kernels.dca_attention.dca_forward` returns them: through torch's fused attention
    and the merge kernel where FASTDCA_SDPA_FWD=1 and the call is one torch's kernels express (T = S > 16
    causal keys, with or without a padding mask; no packing, window or softcap) and SDPA would run a fused
    kernel on it, else through the fused forward."""
    from fastdca.kernels.dca_attention import dca_forward, dca_merge_forward

    kw = dict(causal_len=causal_len, scale=scale, key_padding_mask=key_padding_mask, gate_fn=gate_fn, xg=xg)
    T, S = q.shape[2], k.shape[2]
    if sdpa_forward_enabled() and cu_seqlens is None and window is None and softcap is None and T == S > 16:
        prompt = prompt_attention_lse(q, k, v, scale, key_padding_mask)
        if prompt is not None:
            return dca_merge_forward(q, *prompt, ak, av, gate, **kw)
    return dca_forward(q, k, v, ak, av, gate, cu_seqlens=cu_seqlens, window=window, softcap=softcap, **kw)


def prompt_attention_lse(q, k, v, scale, key_padding_mask):
    """(softmax(q k^T * scale + mask) v (B, Hq, T, D), its row log-sum-exp (B, Hq, T) float32, natural log)
    for T = S causal keys (and real keys only, with key_padding_mask (B, S) bool), from the fused kernel SDPA
    picks for these tensors; None where it would pick none (its math path). Rows with no visible key hold
    whatever the kernel leaves there; the merge kernel replaces them. Grouped-query k and v go in as they
    are, as SDPA passes them (enable_gqa)."""
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None:
        bias, causal = None, True
    else:
        visible = causal_visible(q.shape[2], k.shape[2], q.device)[None, None] & key_padding_mask[:, None, None, :]
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        causal = False
    choice = int(torch._fused_sdp_choice(q, k, v, bias, 0.0, causal, scale=scale, enable_gqa=gqa))
    aten = torch.ops.aten
    if q.device.type == "cpu":
        if choice != _FLASH:
            return None
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                    scale=scale)
    elif choice == _FLASH:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    elif choice == _CUDNN:
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, causal, False, scale=scale)[:2]
    elif choice == _EFFICIENT:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
    else:
        return None
    if lse.dim() == 4:          # cuDNN's (B, Hq, T, 1)
        lse = lse[..., 0]
    return out, lse[..., :q.shape[2]]    # memory-efficient attention pads T to a multiple of 32
