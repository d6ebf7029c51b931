"""The torch backend, any device: scaled_dot_product_attention for the prompt keys, small matmuls (with their
own autograd) for the adapter keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdca.ops.checks import check_cu_seqlens
from fastdca.ops.common import (causal_visible, compute_dtype, effective_window, gate_values, packed_visible,
                                prompt_visible, sequence_members)


def torch_dca_attention(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap,
                        gate_fn, xg):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    if softcap is not None:
        prompt_out = _softcapped_prompt_attention(q, k, v, scale, softcap, key_padding_mask, cu_seqlens, window)
    elif cu_seqlens is None:
        prompt_out = _prompt_attention(q, k, v, scale, key_padding_mask, window)  # (B, Hq, T, D)
    else:
        prompt_out = _packed_prompt_attention(q, k, v, scale, cu_seqlens, window)
    members = sequence_members(key_padding_mask, cu_seqlens, B=B, T=T, S=S, device=q.device) if xg == "sample" else None
    adapter_out, causal_stat = _adapter_attention(q, ak, av, gate, members, causal_len, scale, gate_fn, xg)
    out = (prompt_out + adapter_out).transpose(1, 2)
    if xg is None:
        return out, None
    if xg == "token":
        return out, causal_stat
    return out, (causal_stat, members.sum(dim=-1).reshape(-1))


def adapter_attention_forward(q, ak, av, gate, members, causal_len, scale, gate_fn, xg):
    """A = g * softmax(q ak^T * scale) over the M adapter keys, its output A av and its X_G statistic, the
    causal weights w = A[..., :H]: the torch backend's adapter half, forward.

    Inputs q (B, Hq, T, D), ak and av (Hkv, M, D), gate (Hq,), members (B, N, T) bool (which tokens
    of a row make up each of its N samples; read for xg="sample" only, else None). Returns (A av (B, Hq,
    T, D) in q's dtype, the adapter probabilities softmax(q ak^T * scale) (B, Hkv, M, Hq/Hkv * T) in the
    compute dtype (what the backward needs), stat), stat by xg, in the compute dtype: "sample" -> the sums of w
    over each sample's tokens, (B * N, Hq, H); "token" -> w (B, T, Hq, H); None -> None. Scores and softmax run in float32 (float64 for float64
    inputs). The probabilities are M/D of q's size in fp32, and cheaper to keep than to recompute.

    The probabilities are kept M-major, (B, Hkv, M, Hq/Hkv * T): the query heads of a kv group are
    folded into columns (no repeated ak), and a softmax or sum over a short leading dim is several
    times faster on CPUs than over a trailing dim of 10.
    """
    B, Hq, T, D = q.shape
    Hkv = ak.shape[0]
    ct = compute_dtype(q.dtype)
    q_cols = q.reshape(B, Hkv, -1, D).to(ct)                                    # (B, Hkv, G*T, D)
    # q ak^T, then transposed: the small (M-wide) scores are copied, never q.
    scores = torch.matmul(q_cols, ak.to(ct).transpose(-1, -2)).transpose(-1, -2).contiguous()
    probs = torch.softmax(scores * scale, dim=-2)
    gates = _grouped_gates(gate, gate_fn, Hkv, T, ct)                            # (1, Hkv, 1, G*T)
    weights = probs * gates                                                      # (B, Hkv, M, G*T)
    avf = av.to(ct)
    adapter_out = torch.matmul(weights.transpose(-1, -2), avf).view(B, Hq, T, D).to(q.dtype)
    causal = weights[:, :, :causal_len].view(B, Hkv, causal_len, Hq // Hkv, T)   # (B, Hkv, H, G, T)
    if xg == "sample":
        stat = torch.einsum("bkjgt,bnt->bnkgj", causal, members.to(ct)).reshape(B * members.shape[1], Hq, causal_len)
    elif xg == "token":
        stat = causal.permute(0, 4, 1, 3, 2).reshape(B, T, Hq, causal_len)
    else:
        stat = None
    return adapter_out, probs, stat


def adapter_attention_backward(dout, dxg, q, ak, av, gate, members, probs, causal_len, scale, gate_fn, xg):
    """The backward of adapter_attention_forward: (dq, dak, dav, dgate) in the inputs' dtypes, from the
    gradients of A av (B, Hq, T, D) and of the statistic (None: no gradient reaches it), which flows into A[..., :H]
    alone (w does not depend on av)."""
    B, Hq, T, D = q.shape
    Hkv = ak.shape[0]
    ct = probs.dtype
    gates = _grouped_gates(gate, gate_fn, Hkv, T, ct)
    weights = probs * gates
    avf = av.to(ct)
    dout = dout.reshape(B, Hkv, -1, D).to(ct)                                   # (B, Hkv, G*T, D)
    dweights = torch.matmul(dout, avf.transpose(-1, -2)).transpose(-1, -2).contiguous()   # (B, Hkv, M, G*T)
    dav = torch.matmul(weights, dout).sum(0)                                    # (Hkv, M, D)
    if xg == "sample" and dxg is not None:
        dxg = dxg.to(ct).view(B, members.shape[1], Hkv, Hq // Hkv, causal_len)
        dcausal = torch.einsum("bnkgj,bnt->bkjgt", dxg, members.to(ct))
        dweights[:, :, :causal_len] += dcausal.reshape(B, Hkv, causal_len, Hq // Hkv * T)
    elif xg == "token" and dxg is not None:
        dcausal = dxg.to(ct).view(B, T, Hkv, Hq // Hkv, causal_len).permute(0, 2, 4, 3, 1)
        dweights[:, :, :causal_len] += dcausal.reshape(B, Hkv, causal_len, Hq // Hkv * T)
    dg = (dweights * probs).sum(-2).view(B, Hkv, -1, T).sum((0, 3)).reshape(Hq)
    dgate = dg * (1 - torch.tanh(gate.to(ct)).square()) if gate_fn == "tanh" else dg
    dprobs = dweights * gates
    dscores = probs * (dprobs - (dprobs * probs).sum(-2, keepdim=True)) * scale
    dq = torch.matmul(dscores.transpose(-1, -2), ak.to(ct)).view(B, Hq, T, D)
    dak = torch.matmul(dscores, q.reshape(B, Hkv, -1, D).to(ct)).sum(0)
    return dq.to(q.dtype), dak.to(ak.dtype), dav.to(av.dtype), dgate.to(gate.dtype)


def _adapter_attention(q, ak, av, gate, members, causal_len, scale, gate_fn, xg):
    """(A av, stat) of adapter_attention_forward, differentiable: through the registered operator while
    torch.compile traces (one node it can place in its graph), else through the autograd.Function."""
    if torch.compiler.is_compiling():
        adapter_out, _, stat = torch.ops.fastdca.adapter_attention(q, ak, av, gate, members, causal_len, scale,
                                                                   gate_fn, xg)
        return adapter_out, None if xg is None else stat
    return _AdapterAttention.apply(q, ak, av, gate, members, causal_len, scale, gate_fn, xg)


class _AdapterAttention(torch.autograd.Function):
    """Autograd around adapter_attention_forward/backward for eager calls. Outputs (A av, stat).
    Saved for backward: q (which SDPA saves too, so no new storage), ak, av, gate, members and the
    adapter probabilities."""

    @staticmethod
    def forward(ctx, q, ak, av, gate, members, causal_len, scale, gate_fn, xg):
        adapter_out, probs, stat = adapter_attention_forward(q, ak, av, gate, members, causal_len, scale, gate_fn, xg)
        ctx.save_for_backward(q, ak, av, gate, members, probs)
        ctx.args = (causal_len, scale, gate_fn, xg)
        return adapter_out, stat

    @staticmethod
    def backward(ctx, dout, dxg):
        return (*adapter_attention_backward(dout, dxg, *ctx.saved_tensors, *ctx.args), None, None, None, None, None)


def _grouped_gates(gate, gate_fn, Hkv, T, dtype):
    """g per column of the M-major (B, Hkv, M, G*T) layout: (1, Hkv, 1, G*T)."""
    g = gate_values(gate.to(dtype), gate_fn).view(Hkv, -1, 1)
    return g.expand(Hkv, g.shape[1], T).reshape(1, Hkv, 1, -1)


def _prompt_attention(q, k, v, scale, key_padding_mask, window=None):
    """softmax(q k^T * scale + mask) v through SDPA, bottom-right causal (within `window` keys back when
    given), rows with no key give 0."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None and T == S and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    visible = prompt_visible(T, S, q.device, key_padding_mask, window=window)    # (B or 1, 1, T, S)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    # A padded slot's k and v never count, but a NaN there would: 0 weight times NaN is NaN in SDPA's
    # matmuls (the fused kernels and the reference select instead of multiplying).
    real = key_padding_mask[:, None, :, None]
    k, v = k.masked_fill(~real, 0), v.masked_fill(~real, 0)
    has_key = visible.any(-1, keepdim=True)
    # A row with no visible key would be 0/0 = NaN, and its NaN would reach dk and dv in the
    # backward even if zeroed afterwards; let it see key 0 and zero its output instead.
    visible = visible | (~has_key & (torch.arange(S, device=q.device) == 0))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    return out * has_key.to(out.dtype)


def _softcapped_prompt_attention(q, k, v, scale, softcap, key_padding_mask, cu_seqlens, window):
    """The prompt part with soft-capped scores, which SDPA cannot apply: the (T, S) scores are materialised,
    as transformers' eager attention does for Gemma 2; softmax in float32, rows with no key give 0."""
    group = q.shape[1] // k.shape[1]
    scores = q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2) * scale
    scores = softcap * torch.tanh(scores / softcap)
    visible = prompt_visible(q.shape[2], k.shape[2], q.device, key_padding_mask, cu_seqlens, window)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return (probs @ v.float().repeat_interleave(group, 1)).to(q.dtype)


def packed_causal_attention(q, k, v, cu_seqlens, scale=None, window=None, softcap=None):
    """softmax(q k^T * scale + mask) v, (1, Hq, S, D), for sequences packed in one row, causal within each
    sequence (within `window` keys back, and scores soft-capped, when given): q (1, Hq, S, D), k and v (1, Hkv, S, D),
    cu_seqlens (N + 1,) int32 (as for dca_attention). The attention of the layers without an adapter
    when fastdca.patch reads packed sequences."""
    if q.dim() != 4 or q.shape[0] != 1 or k.shape[2] != q.shape[2]:
        raise ValueError(f"packed_causal_attention needs q (1, Hq, S, D) and k, v (1, Hkv, S, D), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    check_cu_seqlens(cu_seqlens, None, 1, q.shape[2], q.shape[2], q.device)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    window = effective_window(window, q.shape[2])
    if softcap is not None:
        return _softcapped_prompt_attention(q, k, v, scale, softcap, None, cu_seqlens, window)
    return _packed_prompt_attention(q, k, v, scale, cu_seqlens, window)


def _packed_prompt_attention(q, k, v, scale, cu_seqlens, window=None):
    """softmax(q k^T * scale + mask) v for sequences packed in one row, causal within each sequence:
    one SDPA call per sequence. On the CPU that is 4x faster than one call with a block-diagonal
    (S, S) mask, which computes every cross-sequence score only to mask it, and 1.7x faster than the
    padded batch (8 word-problem-like lengths, fwd+bwd, BENCHMARKS.md). Reads the lengths on the host;
    under torch.compile, where that read would break the graph, one call with the block-diagonal mask."""
    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():
        visible = packed_visible(cu_seqlens, q.shape[2], window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    lengths = cu_seqlens.diff().tolist()
    pieces = []
    for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2)):
        n = qs.shape[2]
        if window is None or window >= n:
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa))
        else:
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_visible(
                n, n, q.device, window), scale=scale, enable_gqa=gqa))
    return torch.cat(pieces, dim=2)
