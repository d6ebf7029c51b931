"""Fused DCA attention kernels (DESIGN.md sections 1 and 2) and their launch functions.

Notation (per batch b and query head h, kv head kh = h // GROUP):
    s   = q k^T * scale      (T, S) prompt scores, bottom-right causal + key padding mask
    P   = softmax(s)         rows with no visible key are 0
    sa  = q ak^T * scale     (T, M) adapter scores, no mask
    Pa  = softmax(sa),  A = g * Pa,  g = tanh(gate[h]) or gate[h]
    out = P v + A av
    X_G = A[:, :H] av[:H]

Neither s, P nor A is ever written to global memory. Softmaxes run in base 2 (exp2 of s * log2(e)),
so the saved row statistic `lse` is log2 of the prompt softmax denominator in those units, +inf for a
row with no visible key (then exp2(s - lse) is 0 without a special case in the backward).

Four kernels:
    _dca_fwd_kernel       out, lse, X_G (token mode) or per-block column sums of A[:, :H] (sample mode)
    _dca_bwd_adapter_kernel   delta = rowsum(dout * P v), the whole adapter backward: dq's adapter
                          term and per-block partial sums of dak, dav, dgate
    _dca_bwd_dkdv_kernel  dk, dv with one key block resident, looping over the query heads of its
                          kv group and over query blocks
    _dca_bwd_dq_kernel    dq with one query block resident, added to the adapter term
Partial sums are reduced with torch sums of fixed shape: deterministic, no atomics.

bf16: the launchers set UPCAST under the interpreter (TRITON_INTERPRET=1), which casts every tile to
float32 right after loading, because the interpreter mis-computes bf16 dots and arithmetic. Compiled for
a GPU, bf16 tiles feed tl.dot directly; all accumulation is float32 either way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

XG_NONE, XG_SAMPLE, XG_TOKEN = 0, 1, 2
XG_CODES = {None: XG_NONE, "sample": XG_SAMPLE, "token": XG_TOKEN}


# --------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32; IEEE keeps float32 operands exact (no TF32) on the GPU."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _operand(x, REF, UPCAST: tl.constexpr):
    """A tile as a tl.dot operand: float32 under UPCAST, else the dtype of the tensor REF points into."""
    if UPCAST:
        y = x.to(tl.float32)
    else:
        y = x.to(REF.dtype.element_ty)
    return y


@triton.jit
def _gate(GATE, h, GATE_TANH: tl.constexpr):
    """(g, dg/dgate) for head h; tanh through the sigmoid, since tl has no tanh."""
    x = tl.load(GATE + h).to(tl.float32)
    if GATE_TANH:
        g = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        dg = 1.0 - g * g
    else:
        g = x
        dg = x * 0.0 + 1.0
    return g, dg


@triton.jit
def _adapter_probs(q, AK, kh, stride_akh, stride_akm, stride_akd, offs_a, offs_d, M, D, qk_scale,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Pa = softmax(q ak^T * scale) over the M real adapter keys, (BLOCK_M, BLOCK_A) float32.

    Returns (Pa, ak) with ak the (BLOCK_A, BLOCK_D) adapter-key tile as a dot operand. Columns >= M
    (padding up to 16, tl.dot's minimum) get probability 0.
    """
    a_ok = offs_a < M
    ak = tl.load(AK + kh * stride_akh + offs_a[:, None] * stride_akm + offs_d[None, :] * stride_akd,
                 mask=a_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    ak = _operand(ak, AK, UPCAST)
    sa = _dot(q, tl.trans(ak), IEEE) * qk_scale
    sa = tl.where(a_ok[None, :], sa, float("-inf"))
    ea = tl.exp2(sa - tl.max(sa, 1)[:, None])
    return ea / tl.sum(ea, 1)[:, None], ak


@triton.jit
def _visible(offs_m, offs_n, KPM, b, stride_mb, T, S, HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: query i (absolute position S - T + i) sees key j <= that position that
    the padding mask keeps. Out-of-range rows and columns are invisible."""
    vis = (offs_n[None, :] <= (S - T + offs_m)[:, None]) & (offs_n[None, :] < S) & (offs_m[:, None] < T)
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_mb + offs_n, mask=offs_n < S, other=0)
        vis = vis & (kp[None, :] != 0)
    return vis


@triton.jit
def _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM: tl.constexpr):
    """(BLOCK_M,) query t is real iff it is in range and key_padding_mask[b, S - T + t]."""
    real = offs_m < T
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_mb + S - T + offs_m, mask=real, other=0)
        real = real & (kp != 0)
    return real


# --------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _dca_fwd_kernel(
    Q, K, V, AK, AV, GATE, KPM, OUT, LSE, XG, COLSUM,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_akh, stride_akm, stride_akd,
    stride_avh, stride_avm, stride_avd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, T, S, M, D, H,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, GATE_TANH: tl.constexpr, XG_MODE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Forward for one (query block, b * Hq + h) program.

    Shapes: Q (B, Hq, T, D); K, V (B, Hkv, S, D); AK, AV (Hkv, M, D); GATE (Hq,); KPM (B, S) int8;
    OUT and XG (B, T, Hq, D) in the input dtype (XG only when XG_MODE is token); LSE (B, Hq, T) float32;
    COLSUM (B * Hq, cdiv(T, BLOCK_M), BLOCK_A) float32: this block's sum over its real query rows of
    A[:, j] for j < H, else 0 (sample mode only).

    out = softmax(q k^T * scale) v + g * softmax(q ak^T * scale) av, online softmax over key blocks.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kh = (h // GROUP).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
    d_ok = offs_d < D
    m_ok = offs_m < T
    # scores in log2 units, so the softmax is exp2 (one MUFU op on the GPU)
    qk_scale = sm_scale * 1.4426950408889634

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q = _operand(q, Q, UPCAST)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # key blocks past the last query row's position are fully above the causal diagonal
    hi = tl.minimum(S, S - T + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < S
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, _operand(kt, K, UPCAST), IEEE) * qk_scale
        vis = _visible(offs_m, offs_n, KPM, b, stride_mb, T, S, HAS_KPM)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; shift by 0 there so that
        # exp2(-inf - -inf) never produces NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        vt = _operand(vt, V, UPCAST)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
        m_i = m_new

    has_key = l_i > 0.0
    l_div = tl.where(has_key, l_i, 1.0)
    acc = acc / l_div[:, None]
    lse = tl.where(has_key, m_i + tl.log2(l_div), float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)

    # adapter keys after the prompt loop, so their tiles are not live during it
    pa, ak = _adapter_probs(q, AK, kh, stride_akh, stride_akm, stride_akd, offs_a, offs_d, M, D,
                            qk_scale, UPCAST, IEEE)
    g, dg = _gate(GATE, h, GATE_TANH)
    a = pa * g
    av = tl.load(AV + kh * stride_avh + offs_a[:, None] * stride_avm + offs_d[None, :] * stride_avd,
                 mask=(offs_a[:, None] < M) & d_ok[None, :], other=0.0)
    av = _operand(av, AV, UPCAST)
    acc += _dot(a.to(av.dtype), av, IEEE)

    o_offs = b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
    o_mask = m_ok[:, None] & d_ok[None, :]
    tl.store(OUT + o_offs, acc.to(OUT.dtype.element_ty), mask=o_mask)

    if XG_MODE == 2:
        a_causal = tl.where(offs_a[None, :] < H, a, 0.0)
        xg = _dot(a_causal.to(av.dtype), av, IEEE)
        tl.store(XG + o_offs, xg.to(XG.dtype.element_ty), mask=o_mask)
    if XG_MODE == 1:
        real = _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM)
        a_causal = tl.where(real[:, None] & (offs_a[None, :] < H), a, 0.0)
        n_mblocks = tl.num_programs(0)
        tl.store(COLSUM + (pid_bh.to(tl.int64) * n_mblocks + pid_m) * BLOCK_A + offs_a, tl.sum(a_causal, 0))


# --------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dca_bwd_adapter_kernel(
    Q, AK, AV, GATE, KPM, OUT, DOUT, DXG, DCOL,
    DELTA, DQ_ACC, DAK_PART, DAV_PART, DGATE_PART,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_akh, stride_akm, stride_akd,
    stride_avh, stride_avm, stride_avd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, T, S, M, D, H,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, GATE_TANH: tl.constexpr, XG_MODE: tl.constexpr,
    HAS_DXG: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Backward preprocessing and the adapter backward for one (query block, b * Hq + h) program.

    Shapes: Q (B, Hq, T, D); OUT, DOUT and DXG (B, T, Hq, D) (DXG in token mode); DCOL (B * Hq, H)
    float32, the gradient of the column sums (sample mode). Writes DELTA (B, Hq, T) float32,
    DQ_ACC (B, Hq, T, D) float32 (the adapter part of dq), and partials indexed by
    (b * Hq + h, query block): DAK_PART, DAV_PART (.., BLOCK_A, BLOCK_D) float32, DGATE_PART (..) float32.

        delta = rowsum(dout * (out - A av))  = rowsum(dout * P v): only the prompt softmax's share
        dA    = dout av^T  (+ dX_G av[:H]^T, token mode; + dcol[j] * real[t], sample mode; j < H)
        dgate = g'(gate) * sum(dA * Pa);  dPa = g * dA;  dsa = Pa * (dPa - rowsum(Pa * dPa))
        dq   += dsa ak * scale;  dak += dsa^T q * scale;  dav += A^T dout (+ A[:, :H]^T dX_G)
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kh = (h // GROUP).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
    d_ok = offs_d < D
    m_ok = offs_m < T
    qk_scale = sm_scale * 1.4426950408889634
    md_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)
    q = _operand(q, Q, UPCAST)
    o_offs = b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
    do = tl.load(DOUT + o_offs, mask=md_mask, other=0.0)
    do = _operand(do, DOUT, UPCAST)
    o = tl.load(OUT + o_offs, mask=md_mask, other=0.0).to(tl.float32)

    pa, ak = _adapter_probs(q, AK, kh, stride_akh, stride_akm, stride_akd, offs_a, offs_d, M, D,
                            qk_scale, UPCAST, IEEE)
    g, dg_dgate = _gate(GATE, h, GATE_TANH)
    a = pa * g
    av = tl.load(AV + kh * stride_avh + offs_a[:, None] * stride_avm + offs_d[None, :] * stride_avd,
                 mask=(offs_a[:, None] < M) & d_ok[None, :], other=0.0)
    av = _operand(av, AV, UPCAST)

    # the same rounding of A as the forward, so out - A av is the prompt part up to out's rounding
    a_op = a.to(av.dtype)
    adapter_out = _dot(a_op, av, IEEE)
    delta = tl.sum(do.to(tl.float32) * (o - adapter_out), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=m_ok)

    av_t = tl.trans(av)
    da = _dot(do, av_t, IEEE)
    dav = _dot(tl.trans(a_op), do, IEEE)
    causal_col = offs_a[None, :] < H
    if HAS_DXG:
        if XG_MODE == 2:
            dxg = tl.load(DXG + o_offs, mask=md_mask, other=0.0)
            dxg = _operand(dxg, DXG, UPCAST)
            da += tl.where(causal_col, _dot(dxg, av_t, IEEE), 0.0)
            a_causal = tl.where(causal_col, a, 0.0).to(av.dtype)
            dav += _dot(tl.trans(a_causal), dxg, IEEE)
        if XG_MODE == 1:
            real = _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM)
            dcol = tl.load(DCOL + pid_bh.to(tl.int64) * H + offs_a, mask=offs_a < H, other=0.0)
            da += tl.where(real[:, None], dcol[None, :], 0.0)

    dgate = tl.sum(tl.sum(da * pa, 1), 0) * dg_dgate
    dpa = da * g
    dsa = pa * (dpa - tl.sum(pa * dpa, 1)[:, None])
    dsa_op = dsa.to(ak.dtype)
    dq = _dot(dsa_op, ak, IEEE) * sm_scale
    dak = _dot(tl.trans(dsa_op), q, IEEE) * sm_scale

    tl.store(DQ_ACC + pid_bh.to(tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=md_mask)
    part = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m
    ad_offs = part * BLOCK_A * BLOCK_D + offs_a[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(DAK_PART + ad_offs, dak)
    tl.store(DAV_PART + ad_offs, dav)
    tl.store(DGATE_PART + part, dgate)


@triton.jit
def _dca_bwd_dkdv_kernel(
    Q, K, V, KPM, DOUT, LSE, DELTA, DK, DV,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, Hkv, T, S, D,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv for one (key block, b * Hkv + kh) program; DK, DV (B, Hkv, S, D) contiguous.

    With P^T recomputed from the saved lse, for each query head h of the kv group and each query block:
        dv += P^T dout;  dP^T = v dout^T;  dS^T = P^T * (dP^T - delta);  dk += dS^T q * scale
    Summing the group's heads here, in a fixed order, is the GQA reduction (no atomics).
    """
    pid_n = tl.program_id(0)
    pid_bkh = tl.program_id(1)
    b = (pid_bkh // Hkv).to(tl.int64)
    kh = (pid_bkh % Hkv).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < S
    nd_mask = n_ok[:, None] & d_ok[None, :]
    qk_scale = sm_scale * 1.4426950408889634

    k = tl.load(K + b * stride_kb + kh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)
    k = _operand(k, K, UPCAST)
    v = tl.load(V + b * stride_vb + kh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)
    v = _operand(v, V, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # query t sees key j iff j <= S - T + t: query blocks before `lo` see none of this key block
    lo = (tl.maximum(pid_n * BLOCK_N - (S - T), 0) // BLOCK_M) * BLOCK_M
    for gi in range(GROUP):
        h = (kh * GROUP + gi).to(tl.int64)
        bh = b * Hq + h
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < T
            md_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                        mask=md_mask, other=0.0)
            q = _operand(q, Q, UPCAST)
            do = tl.load(DOUT + b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh
                         + offs_d[None, :] * stride_od, mask=md_mask, other=0.0)
            do = _operand(do, DOUT, UPCAST)
            lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)

            st = _dot(k, tl.trans(q), IEEE) * qk_scale                                   # (BLOCK_N, BLOCK_M)
            vis = tl.trans(_visible(offs_m, offs_n, KPM, b, stride_mb, T, S, HAS_KPM))
            pt = tl.where(vis, tl.exp2(st - lse[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, IEEE)
            dpt = _dot(v, tl.trans(do), IEEE)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, IEEE)

    dk = dk * sm_scale
    out_offs = pid_bkh.to(tl.int64) * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _dca_bwd_dq_kernel(
    Q, K, V, KPM, DOUT, LSE, DELTA, DQ_ACC, DQ,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, T, S, D,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for one (query block, b * Hq + h) program; DQ (B, Hq, T, D) contiguous in the input dtype.

        dP = dout v^T;  dS = P * (dP - delta);  dq = DQ_ACC (adapter term) + dS k * scale
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kh = (h // GROUP).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < T
    md_mask = m_ok[:, None] & d_ok[None, :]
    qk_scale = sm_scale * 1.4426950408889634

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)
    q = _operand(q, Q, UPCAST)
    do = tl.load(DOUT + b * stride_ob + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
                 mask=md_mask, other=0.0)
    do = _operand(do, DOUT, UPCAST)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(S, S - T + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        nd_mask = (offs_n < S)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
        k = _operand(k, K, UPCAST)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        v = _operand(v, V, UPCAST)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        vis = _visible(offs_m, offs_n, KPM, b, stride_mb, T, S, HAS_KPM)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)

    acc_offs = pid_bh.to(tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :]
    dq = dq * sm_scale + tl.load(DQ_ACC + acc_offs, mask=md_mask, other=0.0)
    tl.store(DQ + acc_offs, dq.to(DQ.dtype.element_ty), mask=md_mask)


# --------------------------------------------------------------------------------------------------
# launch configuration


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def head_block(D: int) -> int:
    """D padded to a power of two >= 16 (tl.arange needs a power of two, tl.dot >= 16)."""
    return max(16, triton.next_power_of_2(D))


def adapter_block(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


# Block sizes, warps and stages per kernel and padded head dim. Chosen so that every fp16/bf16 kernel
# compiles with 0 spill bytes on sm_80 and sm_90 (python -m fastdca.kernels.report checks this);
# sm_80's mma layout needs more registers than sm_90's, which is why D=128 runs 8 warps.
#   padded D:        64              128             256
_FWD = {64: (64, 64, 4), 128: (64, 64, 8), 256: (32, 32, 8)}     # (BLOCK_M, BLOCK_N, warps)
_DKDV = {64: (32, 64, 4), 128: (32, 64, 8), 256: (32, 32, 8)}
_DQ = {64: (64, 32, 4), 128: (64, 64, 8), 256: (32, 32, 8)}
_DECODE_ROWS = 16   # T <= 16 (decoding): 16-row query blocks, tl.dot's minimum, 4 warps
# float32 inputs (exact fp32 dots, no tensor cores) are a correctness path, not a fast one: small
# tiles keep spilling small (0 at D=64; the forward and adapter-backward spill 240-530 bytes at D=128).
_FP32 = {64: (16, 32, 4), 128: (16, 32, 4), 256: (16, 16, 4)}


def _config(table, D: int, T: int, dtype=None) -> dict:
    block_d = head_block(D)
    block_m, block_n, warps = (_FP32 if dtype == torch.float32 else table)[max(64, block_d)]
    if T <= _DECODE_ROWS:
        block_m, warps = _DECODE_ROWS, 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=2)


def forward_config(D: int, T: int, dtype=None) -> dict:
    """Forward kernel; its BLOCK_M also tiles the adapter-backward kernel."""
    return _config(_FWD, D, T, dtype)


def dkdv_config(D: int, T: int, dtype=None) -> dict:
    return _config(_DKDV, D, T, dtype)


def dq_config(D: int, T: int, dtype=None) -> dict:
    return _config(_DQ, D, T, dtype)


def _launch_opts(cfg: dict) -> dict:
    if interpreted():
        return {}
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _blocks(cfg: dict, *names) -> dict:
    return {n: cfg[n] for n in names}


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreted()


def _ieee(dtype: torch.dtype) -> bool:
    """float32 inputs get exact float32 dots unless torch allows TF32 for matmuls (off by default)."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _kpm_arg(key_padding_mask, q):
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.int8, device=q.device), 0, False
    kpm = key_padding_mask.to(torch.int8).contiguous()
    return kpm, kpm.stride(0), True


def _check_dtype(q):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must have dtype float16, bfloat16 or float32 for the triton kernels (float64: use the "
                         f"torch or reference backend), got {q.dtype}")


# --------------------------------------------------------------------------------------------------
# launchers


def dca_forward(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask=None, gate_fn="tanh",
                xg="sample", config=None):
    """Run the forward kernel.

    q (B, Hq, T, D); k, v (B, Hkv, S, D); ak, av (Hkv, M, D); gate (Hq,); key_padding_mask (B, S) bool
    or None. Returns (out (B, T, Hq, D) input dtype, lse (B, Hq, T) float32, extra) with extra the column
    sums of A[..., :H] over real query tokens (B, Hq, H) float32 for xg="sample", X_G (B, T, Hq, D)
    input dtype for xg="token", None for xg=None. `config` overrides entries of forward_config (tests).
    """
    _check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    H = causal_len
    cfg = dict(forward_config(D, T, q.dtype), **(config or {}))
    block_a = adapter_block(M)
    n_mblocks = triton.cdiv(T, cfg["BLOCK_M"])
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    mode = XG_CODES[xg]
    xg_out = torch.empty_like(out) if mode == XG_TOKEN else out
    colsum = torch.empty(B * Hq, n_mblocks, block_a, dtype=torch.float32, device=q.device) \
        if mode == XG_SAMPLE else lse
    kpm, stride_mb, has_kpm = _kpm_arg(key_padding_mask, q)
    gate = gate.contiguous()
    _dca_fwd_kernel[(n_mblocks, B * Hq)](
        q, k, v, ak, av, gate, kpm, out, lse, xg_out, colsum,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(), *ak.stride(), *av.stride(), *out.stride(),
        stride_mb,
        Hq, T, S, M, D, H,
        GROUP=Hq // Hkv, HAS_KPM=has_kpm, GATE_TANH=gate_fn == "tanh", XG_MODE=mode,
        UPCAST=_upcast(q.dtype), IEEE=_ieee(q.dtype), BLOCK_A=block_a,
        **_blocks(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **_launch_opts(cfg),
    )
    if mode == XG_SAMPLE:
        extra = colsum.sum(dim=1)[:, :H].reshape(B, Hq, H)
    elif mode == XG_TOKEN:
        extra = xg_out
    else:
        extra = None
    return out, lse, extra


def dca_backward(dout, dxg, q, k, v, ak, av, gate, out, lse, *, causal_len, scale, key_padding_mask=None,
                 gate_fn="tanh", xg="sample", config=None):
    """Run the three backward kernels; returns (dq, dk, dv, dak, dav, dgate) in the input dtype.

    dout (B, T, Hq, D) or None (no gradient reaches out: dk and dv are then None); dxg: the gradient of forward's `extra` ((B, Hq, H)
    column sums in sample mode, (B, T, Hq, D) in token mode) or None. The per-block partials of dak,
    dav and dgate are summed over batch, query blocks and the query heads of each kv group with torch
    sums of fixed shape: deterministic.
    """
    _check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    H = causal_len
    group = Hq // Hkv
    cfg = dict(forward_config(D, T, q.dtype), **(config or {}))
    kcfg = dict(dkdv_config(D, T, q.dtype), **(config or {}))
    qcfg = dict(dq_config(D, T, q.dtype), **(config or {}))
    block_a = adapter_block(M)
    block_d = cfg["BLOCK_D"]
    n_mblocks = triton.cdiv(T, cfg["BLOCK_M"])
    dev = q.device
    mode = XG_CODES[xg]
    upcast, ieee = _upcast(q.dtype), _ieee(q.dtype)
    kpm, stride_mb, has_kpm = _kpm_arg(key_padding_mask, q)

    prompt_grads = dout is not None
    if dout is None:
        # only the X_G statistics carry a gradient: k and v get none, q only the adapter term
        dout = torch.zeros_like(out)
    dout = dout.contiguous() if dout.stride() != out.stride() else dout
    has_dxg = dxg is not None and mode != XG_NONE and not (mode == XG_SAMPLE and H == 0)
    if has_dxg and mode == XG_TOKEN:
        dxg_t = dxg.contiguous() if dxg.stride() != out.stride() else dxg
        dcol = lse
    elif has_dxg:
        dxg_t = out
        dcol = dxg.to(torch.float32).reshape(B * Hq, H).contiguous()
    else:
        dxg_t, dcol = out, lse

    delta = torch.empty(B, Hq, T, dtype=torch.float32, device=dev)
    dq_acc = torch.empty(B, Hq, T, D, dtype=torch.float32, device=dev)
    dak_part = torch.empty(B * Hq, n_mblocks, block_a, block_d, dtype=torch.float32, device=dev)
    dav_part = torch.empty_like(dak_part)
    dgate_part = torch.empty(B * Hq, n_mblocks, dtype=torch.float32, device=dev)
    # partials of dak, dav, dgate per (b * Hq + h, query block), summed below with fixed-shape torch
    # sums over batch, the query heads of each kv group and the query blocks: deterministic, no atomics
    gate = gate.contiguous()
    _dca_bwd_adapter_kernel[(n_mblocks, B * Hq)](
        q, ak, av, gate, kpm, out, dout, dxg_t, dcol,
        delta, dq_acc, dak_part, dav_part, dgate_part,
        float(scale),
        *q.stride(), *ak.stride(), *av.stride(), *out.stride(),
        stride_mb,
        Hq, T, S, M, D, H,
        GROUP=group, HAS_KPM=has_kpm, GATE_TANH=gate_fn == "tanh", XG_MODE=mode, HAS_DXG=has_dxg,
        UPCAST=upcast, IEEE=ieee, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=block_d, BLOCK_A=block_a, **_launch_opts(cfg),
    )

    dak = dak_part.view(B, Hkv, group, n_mblocks, block_a, block_d).sum(dim=(0, 2, 3))[:, :M, :D]
    dav = dav_part.view(B, Hkv, group, n_mblocks, block_a, block_d).sum(dim=(0, 2, 3))[:, :M, :D]
    dgate = dgate_part.view(B, Hq, n_mblocks).sum(dim=(0, 2))
    adapter_grads = (dak.to(ak.dtype), dav.to(av.dtype), dgate.to(gate.dtype))
    if not prompt_grads:
        return (dq_acc.to(q.dtype), None, None, *adapter_grads)

    dk = torch.empty(B, Hkv, S, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, Hkv, S, D, dtype=v.dtype, device=dev)
    _dca_bwd_dkdv_kernel[(triton.cdiv(S, kcfg["BLOCK_N"]), B * Hkv)](
        q, k, v, kpm, dout, lse, delta, dk, dv,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_mb,
        Hq, Hkv, T, S, D,
        GROUP=group, HAS_KPM=has_kpm, UPCAST=upcast, IEEE=ieee,
        **_blocks(kcfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **_launch_opts(kcfg),
    )

    dq = torch.empty(B, Hq, T, D, dtype=q.dtype, device=dev)
    _dca_bwd_dq_kernel[(triton.cdiv(T, qcfg["BLOCK_M"]), B * Hq)](
        q, k, v, kpm, dout, lse, delta, dq_acc, dq,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_mb,
        Hq, T, S, D,
        GROUP=group, HAS_KPM=has_kpm, UPCAST=upcast, IEEE=ieee,
        **_blocks(qcfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **_launch_opts(qcfg),
    )
    return (dq, dk, dv, *adapter_grads)
