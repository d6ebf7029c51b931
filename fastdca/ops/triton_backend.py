"""The triton backend: the fused kernels of `fastdca.kernels` with their autograd.

The forward runs in one of two ways (FASTDCA_SDPA_FWD). Fused, the default: the prompt attention and the adapter
term in one Triton kernel. Through SDPA: the prompt attention, softmax(q k^T * scale + mask) v with its row
log-sum-exp, from the kernel scaled_dot_product_attention itself runs for the call (flash, cuDNN or
memory-efficient attention on CUDA, flash on the CPU), and the adapter term, gate and X_G statistics added by one
Triton kernel (`fastdca.kernels.merge.dca_merge_forward`). The backward is the fused one either way: it takes the prompt
output as out - A av, so nothing more is kept for it. Not the default until a GPU run has measured it (`fastdca
check` times it beside the fused forward). FASTDCA_SDPA_FWD=auto times both forwards once per shape and takes the
faster.
"""

from __future__ import annotations

import time

import torch

from fastdca.ops.common import causal_visible, sequence_members
from fastdca.switches import SDPA_FWD
from fastdca.ops.timing import cuda_time_ms


def triton_dca_attention(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap,
                         gate_fn, xg):
    spec = (window, softcap, causal_len, scale, gate_fn, xg)
    if cu_seqlens is not None and xg == "sample":
        # The kernels sum the causal weights w per query block, and blocks straddle sequences: take w per token
        # ((1, S, Hq, H) float32, not kept for backward) and sum it per sequence.
        out, weights = _fused_dca_attention(q, k, v, ak, av, gate, None, cu_seqlens, spec[:-1] + ("token",))
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        members = sequence_members(None, cu_seqlens, B=B, T=T, S=S, device=q.device)
        sums = torch.einsum("nt,thj->nhj", members[0].to(torch.float32), weights[0])       # (N, Hq, H)
        return out, (sums, members.sum(dim=-1).reshape(-1))
    return _fused_dca_attention(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec)


def _fused_dca_attention(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec):
    """(out, xg_stats) of the fused kernels, differentiable: through the registered operator while
    torch.compile traces (Inductor then sees the kernels themselves), else through the autograd.Function.
    spec = (window, softcap, causal_len, scale, gate_fn, xg)."""
    xg = spec[-1]
    if torch.compiler.is_compiling():
        out, _, extra = torch.ops.fastdca.dca_attention(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, *spec)
        if xg == "sample":
            return out, xg_sums_and_counts(extra, q.shape)
        return out, extra if xg == "token" else None
    out, stat, counts = _TritonDCAFunction.apply(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec)
    return out, (stat, counts) if xg == "sample" else stat


def xg_sums_and_counts(extra, q_shape):
    """The kernels' sample-mode statistics (B, Hq * H + 1) float32 as (the sums of the causal weights w over
    each row's real tokens (B, Hq, H) float32, the real-token counts (B,) int64); H is read off the width."""
    B, Hq = q_shape[:2]
    H = (extra.shape[1] - 1) // Hq
    return extra[:, :-1].view(B, Hq, H), extra[:, -1].long()


class _TritonDCAFunction(torch.autograd.Function):
    """Autograd around the fused kernels, for eager calls. Outputs (out, stat, counts), stat the X_G
    statistics, in the causal weights w = g * softmax(q ak^T * scale)[..., :H] (X_G = w av[:H]): for
    xg="sample" the sums of w over each row's real tokens (B, Hq, H) float32 and the counts (B,) int64; for
    "token" w (B, T, Hq, H) float32 and None; for None, None and None. The gradient of stat reaches q, ak and
    gate (w does not depend on k, v or av). The non-tensor arguments travel as one tuple,
    spec = (window, softcap, causal_len, scale, gate_fn, xg): each argument of apply costs host time.

    Saved for backward: q, k, v, ak, av, gate, out and the row log-sum-exp (B, Hq, T) float32.
    """

    @staticmethod
    def forward(ctx, q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec):
        window, softcap, causal_len, scale, gate_fn, xg = spec
        out, lse, extra = triton_forward(q, k, v, ak, av, gate, causal_len=causal_len, scale=scale,
                                         key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, window=window,
                                         softcap=softcap, gate_fn=gate_fn, xg=xg)
        counts = None
        if xg == "sample":
            extra, counts = xg_sums_and_counts(extra, q.shape)
            ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(q, k, v, ak, av, gate, out, lse)
        ctx.masks = (key_padding_mask, cu_seqlens)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return out, extra, counts

    @staticmethod
    def backward(ctx, dout, dxg, dcounts):
        from fastdca.kernels.backward import dca_backward

        window, softcap, causal_len, scale, gate_fn, xg = ctx.spec
        key_padding_mask, cu_seqlens = ctx.masks
        grads = dca_backward(dout, dxg, *ctx.saved_tensors, causal_len=causal_len, scale=scale,
                             key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, window=window,
                             softcap=softcap, gate_fn=gate_fn, xg=xg)
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------------------
# the forward: fused, or through SDPA


# torch.nn.attention.SDPBackend's values, as torch._fused_sdp_choice returns them
_FLASH, _EFFICIENT, _CUDNN = 1, 2, 3
_MODES = {"0": "off", "1": "on", "auto": "auto"}
# the forward auto chose per shape: {(device, dtype, B, Hq, Hkv, T, D, M, padded, xg): "sdpa" | "fused"}
MEASURED: dict = {}


def sdpa_forward_mode() -> str:
    """"off" (FASTDCA_SDPA_FWD unset or 0: the fused forward, the default until a GPU run has measured the
    alternative), "on" (1) or "auto" (auto: whichever of the two was faster the first time a shape came)."""
    value = SDPA_FWD.read()
    if value not in _MODES:
        raise ValueError(f"FASTDCA_SDPA_FWD must be 0, 1 or auto, got {value!r}")
    return _MODES[value]


def triton_forward(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap,
                   gate_fn, xg):
    """(out, lse, extra) as `fastdca.kernels.forward.dca_forward` returns them: through torch's fused attention
    and the merge kernel where FASTDCA_SDPA_FWD asks for it (1, or auto where that was measured faster for
    the shape) and the call is one torch's kernels express (T = S > 16 causal keys, with or without a padding
    mask; no packing, window or softcap) and SDPA would run a fused kernel on it, else through the fused
    forward."""
    from fastdca.kernels.forward import dca_forward
    from fastdca.kernels.merge import dca_merge_forward

    kw = dict(causal_len=causal_len, scale=scale, key_padding_mask=key_padding_mask, gate_fn=gate_fn, xg=xg)
    mode = sdpa_forward_mode()

    def fused():
        return dca_forward(q, k, v, ak, av, gate, cu_seqlens=cu_seqlens, window=window, softcap=softcap, **kw)

    T, S = q.shape[2], k.shape[2]
    if mode == "off" or cu_seqlens is not None or window is not None or softcap is not None or not T == S > 16:
        return fused()

    def merged():
        prompt = prompt_attention_lse(q, k, v, scale, key_padding_mask)
        return None if prompt is None else dca_merge_forward(q, *prompt, ak, av, gate, **kw)

    if mode == "auto" and _auto_choice(q, k, ak, key_padding_mask, xg, fused, merged) == "fused":
        return fused()
    return merged() or fused()


def _auto_choice(q, k, ak, key_padding_mask, xg, fused, merged) -> str:
    """"sdpa" or "fused" for this call's shape: measured the first time (each forward timed over a few calls
    after one warm-up, on the call's own tensors), then remembered in MEASURED. Under
    torch.use_deterministic_algorithms the fused forward, whose choice does not depend on a timing."""
    if torch.are_deterministic_algorithms_enabled():
        return "fused"
    B, Hq, T, D = q.shape
    key = (q.device, q.dtype, B, Hq, k.shape[1], T, D, ak.shape[1], key_padding_mask is not None, xg)
    if key not in MEASURED:
        if merged() is None:            # SDPA would take its math path here
            MEASURED[key] = "fused"
        else:
            with torch.no_grad():
                faster = _seconds(merged, q.is_cuda) < _seconds(fused, q.is_cuda)
            MEASURED[key] = "sdpa" if faster else "fused"
    return MEASURED[key]


def _seconds(fn, cuda: bool, calls=3) -> float:
    """Time per call of fn after one warm-up call: CUDA events for CUDA tensors, the host clock elsewhere."""
    if cuda:
        return cuda_time_ms(fn, warmup=1, repeat=1, calls=calls) / 1e3
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


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
