"""The DCA attention equations of docs/DESIGN.md section 1, written out literally.

Every score matrix is materialised, nothing is fused: this is the definition the fast backends are
tested against, not a path to train with. Pass float64 inputs to get a float64 answer. The definitions the
backends share with it (the compute dtype, the gate, the adapter softmax, who sees whom) are in fastdca.ops.common.
"""

from __future__ import annotations

import math

import torch

from fastdca.ops.common import adapter_probs, compute_dtype, gate_values, prompt_visible, query_is_real, sequence_ids


def prompt_probs(q: torch.Tensor, k: torch.Tensor, scale: float, key_padding_mask=None,
                 cu_seqlens=None, window=None, softcap=None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) (B, Hq, T, S) with q (B, Hq, T, D), k (B, Hq, S, D) (kv heads already
    repeated for grouped-query attention), bottom-right causal, within `window` keys back when given, and
    with packed sequences (cu_seqlens) each query sees only keys of its own sequence; with `softcap` the
    scores are softcap * tanh(scores / softcap); a row with no visible key is all 0."""
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = prompt_visible(T, S, q.device, key_padding_mask, cu_seqlens, window)    # (B or 1, 1, T, S)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.where(visible.any(-1, keepdim=True), probs, torch.zeros_like(probs))


def dca_attention(q, k, v, ak, av, gate, *, causal_len, scale=None, key_padding_mask=None,
                  cu_seqlens=None, window=None, softcap=None, gate_fn="tanh", xg="sample"):
    """out = softmax(q k^T * scale + mask) v + g * softmax(q ak^T * scale) av, plus the X_G statistics.

    q (B, Hq, T, D); k, v (B, Hkv, S, D); ak, av (Hkv, M, D); gate (Hq,); key_padding_mask (B, S) bool;
    or, for N sequences packed in one row (B = 1, T = S), cu_seqlens (N + 1,) int32, their boundaries;
    window: the query at position p sees the prompt keys p - window < j <= p (None: every earlier key);
    softcap: the prompt scores become softcap * tanh(scores / softcap) (the adapter scores never do).
    Returns out (B, T, Hq, D) in q's dtype and, by `xg`, the X_G statistics: the causal weights
    w = g * softmax(q ak^T * scale)[..., :H], from which X_G = w av[:H] (see `x_g`), in the compute dtype:
    "sample" -> (the sum of w over each sample's real tokens (B, Hq, H), real-token count (B,)), a sample
    being a row, or a sequence when packed ((N, Hq, H), (N,)); "token" -> w (B, T, Hq, H); None -> None.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    ct = compute_dtype(q.dtype)
    scale = 1 / math.sqrt(D) if scale is None else scale

    # Grouped-query attention: query head h reads kv head h // group.
    qf = q.to(ct)
    kf = k.to(ct).repeat_interleave(group, dim=1)
    vf = v.to(ct).repeat_interleave(group, dim=1)
    if key_padding_mask is not None:
        vf = vf.masked_fill(~key_padding_mask[:, None, :, None], 0)    # a padded key's value is never read
    akf = ak.to(ct).repeat_interleave(group, dim=0)
    avf = av.to(ct).repeat_interleave(group, dim=0)

    probs = prompt_probs(qf, kf, scale, key_padding_mask, cu_seqlens, window, softcap)  # (B, Hq, T, S)
    g = gate_values(gate.to(ct), gate_fn)
    gated_probs = g[None, :, None, None] * adapter_probs(qf, akf, scale)          # (B, Hq, T, M)

    out = probs @ vf + gated_probs @ avf                                         # (B, Hq, T, D)
    out = out.transpose(1, 2).to(q.dtype)

    if xg is None:
        return out, None
    weights = gated_probs[..., :causal_len].transpose(1, 2)                     # (B, T, Hq, H)
    if xg == "token":
        return out, weights
    if cu_seqlens is not None:
        members = sequence_ids(cu_seqlens, S)[None, :] == torch.arange(len(cu_seqlens) - 1, device=q.device)[:, None]
        sums = torch.einsum("nt,thj->nhj", members.to(ct), weights[0])             # (N, Hq, H)
        return out, (sums, members.sum(dim=1))
    real = query_is_real(key_padding_mask, B, T, S, q.device)
    sums = (weights * real[:, :, None, None].to(ct)).sum(dim=1)                  # (B, Hq, H)
    return out, (sums, real.sum(dim=1))


def x_g(weights, av):
    """X_G = w av[:H] per head: weights (..., Hq, H), the causal weights `dca_attention` returns (per token or
    summed per sample), av (Hkv, M, D) -> (..., Hq, D) (each query head reads kv head h // (Hq / Hkv))."""
    Hq, H = weights.shape[-2:]
    values = av[:, :H].to(weights.dtype).repeat_interleave(Hq // av.shape[0], dim=0)   # (Hq, H, D)
    return torch.einsum("...hj,hjd->...hd", weights, values)
