"""The triton backend: the fused kernels of `fastdca.kernels` with their autograd."""

from __future__ import annotations

import torch

from fastdca.ops.common import sequence_members


def triton_dca_attention(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap,
                         gate_fn, xg):
    spec = (window, softcap, causal_len, scale, gate_fn, xg)
    if cu_seqlens is not None and xg == "sample":
        # The kernels sum X_G per query block, and blocks straddle sequences: take X_G per token (one
        # more output the size of out, not kept for backward) and sum it per sequence.
        out, x_g = _fused_dca_attention(q, k, v, ak, av, gate, None, cu_seqlens, spec[:-1] + ("token",))
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        members = sequence_members(None, cu_seqlens, B=B, T=T, S=S, device=q.device)
        sums = torch.einsum("nt,thd->nhd", members[0].to(torch.float32), x_g[0].to(torch.float32))
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
    """The kernels' sample-mode statistics (B, Hq * D + 1) as (the X_G sums (B, Hq, D) float32, the
    real-token counts (B,) int64)."""
    B, Hq, _, D = q_shape
    return extra[:, :-1].view(B, Hq, D), extra[:, -1].long()


class _TritonDCAFunction(torch.autograd.Function):
    """Autograd around the fused kernels, for eager calls. Outputs (out, stat, counts): for xg="sample"
    the X_G sums over each row's real tokens (B, Hq, D) float32 and the counts (B,) int64; for "token"
    X_G (B, T, Hq, D) and None; for None, None and None. The non-tensor arguments travel as one tuple,
    spec = (window, softcap, causal_len, scale, gate_fn, xg): each argument of apply costs host time.

    Saved for backward: q, k, v, ak, av, gate, out and the row log-sum-exp (B, Hq, T) float32.
    """

    @staticmethod
    def forward(ctx, q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec):
        from fastdca.prompt_sdpa import triton_forward

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
    def backward(ctx, dout, dstat, dcounts):
        from fastdca.kernels.backward import dca_backward

        window, softcap, causal_len, scale, gate_fn, xg = ctx.spec
        key_padding_mask, cu_seqlens = ctx.masks
        grads = dca_backward(dout, dstat, *ctx.saved_tensors, causal_len=causal_len, scale=scale,
                             key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, window=window,
                             softcap=softcap, gate_fn=gate_fn, xg=xg)
        return (*grads, None, None, None)
