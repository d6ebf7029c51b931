"""The forward's adapter half given its prompt half (FASTDCA_SDPA_FWD): the merge kernel and its launcher."""

from __future__ import annotations

import triton
import triton.language as tl

from fastdca.kernels.blocks import LOG2E, _finish_rows, _gate, _open_tile, _query_real, _store_xg_block_sums
from fastdca.kernels.forward import key_span
from fastdca.kernels.plumbing import (XG_CODES, block_args, check_dtype, forward_extra, forward_outputs, ieee, kpm_arg,
                                      launch_options, run, upcast)
from fastdca.kernels.tuning import adapter_block, launch_configs


@triton.jit
def _dca_merge_kernel(
    Q, PO, PLSE, AK, AV, GATE, KPM, SPAN, OUT, LSE, XG, XG_PART,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_pb, stride_ph, stride_pt, stride_pd,
    stride_lb, stride_lh, stride_lt,
    stride_akh, stride_akm, stride_akd,
    stride_avh, stride_avm, stride_avd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, T, S, M, D, H,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, GATE_TANH: tl.constexpr, XG_MODE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """The forward's adapter half for one (query block, b * Hq + h) program, given the prompt half computed
    elsewhere (FASTDCA_SDPA_FWD: torch's own fused attention).

    Shapes: Q (B, Hq, T, D); PO (B, Hq, T, D), the prompt attention softmax(q k^T * scale + mask) v; PLSE
    (B, Hq, T) float32, its row log-sum-exp (natural log); the rest (XG, the causal weights w = A[:, :H] in
    token mode, and XG_PART, their per-block sums in sample mode, included) as in _dca_fwd_kernel.

        out = PO + g * softmax(q ak^T * scale) av;   LSE = PLSE * log2(e)
    A row whose causal keys are all padding (none at or before its position) gets LSE = +inf and a prompt
    part of 0 whatever PO holds there, as in the fused forward.
    """
    pid_m, pid_bh, b, h, kh, offs_m, offs_d, d_ok, m_ok, md_mask, qk_scale, q = _open_tile(
        Q, Hq, T, D, sm_scale, stride_qb, stride_qh, stride_qt, stride_qd, GROUP, False, UPCAST, BLOCK_M, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
    po = tl.load(PO + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pt + offs_d[None, :] * stride_pd,
                 mask=md_mask, other=0.0).to(tl.float32)
    plse = tl.load(PLSE + b * stride_lb + h * stride_lh + offs_m * stride_lt, mask=m_ok, other=0.0)
    if HAS_KPM:
        has_key = (S - T + offs_m) >= tl.load(SPAN + 2 * b)
    else:
        has_key = offs_m >= 0
    acc = tl.where(has_key[:, None], po, 0.0)
    m_i = tl.where(has_key, plse * LOG2E, 0.0)
    l_i = tl.where(has_key, 1.0, 0.0)

    g, _ = _gate(GATE, h, GATE_TANH)
    real = _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM)     # read in sample mode only
    _, w_sums = _finish_rows(acc, m_i, l_i, q, b, h, offs_m, m_ok, real, g, AK, AV, OUT, LSE, XG, kh,
                             stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                             stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d,
                             d_ok, XG_MODE, UPCAST, IEEE)
    if XG_MODE == 1:
        _store_xg_block_sums(XG_PART, w_sums, real, offs_a, b, h, pid_m, Hq, H)


def dca_merge_forward(q, prompt_out, prompt_lse, ak, av, gate, *, causal_len, scale, key_padding_mask=None,
                      gate_fn="tanh", xg="sample", configs=None, launch=None):
    """The forward given its prompt half (computed by torch's fused attention): adds the adapter term and gate,
    and writes the X_G statistics (the causal weights w = A[:, :H], or their sums), with the merge kernel.

    Args:
        q: (B, Hq, T, D) fp16, bf16 or float32.
        prompt_out: (B, Hq, T, D), softmax(q k^T * scale + mask) v over T = S causal keys, any strides.
        prompt_lse: (B, Hq, T) float32, its row log-sum-exp in natural log, any strides.
        ak, av, gate, causal_len, scale, gate_fn, xg, configs, launch: as for dca_forward.
        key_padding_mask: (B, S) bool (S = T), True = real key, or None: the mask prompt_out was computed with.

    Returns:
        (out, lse, extra) as dca_forward returns them, which its backward (dca_backward) takes unchanged: lse
        in log2 units, +inf for the rows with no real key at or before them (their prompt part is 0 whatever
        prompt_out holds there).
    """
    check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, M = ak.shape[0], ak.shape[1]
    cfg = launch_configs(D, T, q.dtype, q.device, configs)["merge"]
    n_mblocks = triton.cdiv(T, cfg["BLOCK_M"])
    mode = XG_CODES[xg]
    out, lse, xg_out, xg_part = forward_outputs(q, mode, n_mblocks, causal_len)
    kpm, stride_mb, has_kpm = kpm_arg(key_padding_mask, q, launch)
    # a query sees a real key iff it is at or past its row's first one
    span = key_span(kpm, stride_mb, has_kpm, q, launch)
    run(_dca_merge_kernel, (n_mblocks, B * Hq), q, launch,
        q, prompt_out, prompt_lse, ak, av, gate.contiguous(), kpm, span, out, lse, xg_out, xg_part,
        float(scale),
        *q.stride(), *prompt_out.stride(), *prompt_lse.stride(), *ak.stride(), *av.stride(), *out.stride(),
        stride_mb,
        Hq, T, T, M, D, causal_len,
        GROUP=Hq // Hkv, HAS_KPM=has_kpm, GATE_TANH=gate_fn == "tanh", XG_MODE=mode, UPCAST=upcast(q.dtype),
        IEEE=ieee(q.dtype), BLOCK_A=adapter_block(M), **block_args(cfg, "BLOCK_M", "BLOCK_D"), **launch_options(cfg))
    return out, lse, forward_extra(mode, xg_out, xg_part)
