"""The backward: the adapter kernel (delta and the whole adapter backward), the dk/dv kernel and the dq kernel,
and their launcher."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdca import switches
from fastdca.kernels import tuning
from fastdca.kernels.blocks import (_adapter_probs, _dot, _gate, _key_end, _key_ok, _key_range, _kv_descriptors,
                                    _load_tile, _open_tile, _operand, _query_real, _tanh, _visible)
from fastdca.kernels.forward import key_span
from fastdca.kernels.plumbing import (XG_CODES, XG_NONE, XG_TOKEN, block_args, check_dtype, ieee, kpm_arg,
                                      launch_options, run, seq_arg, softcap_arg, tma_reads, upcast, window_arg)
from fastdca.kernels.tuning import adapter_block, head_block, launch_configs


@triton.jit
def _dkdv_query_blocks(k, v, q_base, do_base, q_desc, do_desc, b, h, lse_base, delta_base, dq_base, dk, dv, qk_scale,
                       sm_scale, stride_qt, stride_qd, stride_ot, stride_od, offs_n, offs_m0, offs_d, d_ok, key_ok,
                       key_end, lo, hi, T, S, D, WINDOW, SOFTCAP, Q, DOUT, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                       HAS_SEQ: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr):
    """dk, dv contributions of query head h's blocks starting in [lo, hi): returns (dk, dv). With
    packed sequences key j is seen only by the queries before key_end[j], the end of its sequence. With
    ATOMIC_DQ each block's dq share, dS k * scale, is also added to the float32 dq buffer at dq_base
    ((T, D) contiguous) with atomics: the separate dq kernel and its recomputation of P and dP are not run.
    With TMA the q and dout blocks come through the tensor descriptors q_desc ((B, Hq, T, D)) and do_desc
    ((B, T, Hq, D)) at [b, h] (rows past T and columns past D read as 0) instead of q_base, do_base and
    strides."""
    BLOCK_M: tl.constexpr = offs_m0.shape[0]
    BLOCK_D: tl.constexpr = offs_d.shape[0]
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < T
        md_mask = m_ok[:, None] & d_ok[None, :]
        if TMA:
            q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_desc.load([b, start_m, h, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=md_mask,
                         other=0.0)
        q = _operand(q, Q, UPCAST)
        do = _operand(do, DOUT, UPCAST)
        # rows past T get lse = +inf, so their probabilities are 0 without a mask
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale                                       # (BLOCK_N, BLOCK_M)
        if HAS_SOFTCAP:
            tanh_t = _tanh(st / SOFTCAP)
            st = SOFTCAP * tanh_t
        pt = tl.exp2(st - lse[None, :])
        if CAUSAL:
            pt = tl.where((offs_n[:, None] <= (S - T + offs_m)[None, :]) & key_ok[:, None], pt, 0.0)
        elif HAS_KPM:
            pt = tl.where(key_ok[:, None], pt, 0.0)
        if HAS_SEQ:
            pt = tl.where(offs_m[None, :] < key_end[:, None], pt, 0.0)
        if HAS_WINDOW:
            pt = tl.where(offs_n[:, None] > (S - T + offs_m)[None, :] - WINDOW, pt, 0.0)
        dv += _dot(_operand(pt, DOUT, UPCAST), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tanh_t * tanh_t)      # through the cap: d(c tanh(s / c)) / ds
        dst_op = _operand(dst, Q, UPCAST)
        dk += _dot(dst_op, q, IEEE)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(dst_op), k, IEEE) * sm_scale                            # (BLOCK_M, BLOCK_D)
            tl.atomic_add(dq_base + offs_m[:, None] * D + offs_d[None, :], dq, mask=md_mask)
    return dk, dv


@triton.jit
def _dq_key_blocks(q, do, lse, delta, dq, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                   stride_kd, stride_vs, stride_vd, qk_scale, offs_m, offs_n0, offs_d, d_ok, lo, hi, T, S, WINDOW,
                   SOFTCAP, K, V, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQ: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   TMA: tl.constexpr):
    """The unscaled dS k sum over the key blocks starting in [lo, hi), added to dq. With TMA the K and V
    blocks come through the tensor descriptors k_desc, v_desc as in the forward."""
    BLOCK_N: tl.constexpr = offs_n0.shape[0]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        nd_mask = (offs_n < S)[:, None] & d_ok[None, :]
        # not loaded a block ahead as in the forward: that costs the sm_90 D=128 tile 144 spilled bytes
        key_ok = _key_ok(KPM, b, stride_mb, offs_n, S, HAS_KPM)
        if TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        k = _operand(k, K, UPCAST)
        v = _operand(v, V, UPCAST)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        if HAS_SOFTCAP:
            tanh_s = _tanh(s / SOFTCAP)
            s = SOFTCAP * tanh_s
        p = tl.exp2(s - lse[:, None])
        if CAUSAL or HAS_KPM or HAS_SEQ or HAS_WINDOW:
            key_end = _key_end(SEQ_END, offs_n, S, HAS_SEQ)
            p = tl.where(_visible(offs_m, offs_n, key_ok, key_end, T, S, WINDOW, HAS_KPM, HAS_SEQ, CAUSAL,
                                  HAS_WINDOW), p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq += _dot(_operand(ds, K, UPCAST), k, IEEE)
    return dq


@triton.jit
def _dca_bwd_adapter_kernel(
    Q, AK, AV, GATE, KPM, OUT, DOUT, DXG,
    DELTA, DQ_ACC, ADAPTER_PART, DGATE_PART,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_akh, stride_akm, stride_akd,
    stride_avh, stride_avm, stride_avd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb, stride_dxb,
    Hq, T, S, M, D, H,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, GATE_TANH: tl.constexpr, XG_MODE: tl.constexpr,
    HAS_DXG: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Backward preprocessing and the adapter backward for one (query block, b * Hq + h) program.

    Shapes: Q (B, Hq, T, D); OUT, DOUT (B, T, Hq, D); DXG, the gradient of the causal weights w = A[:, :H]
    (the X_G statistics; X_G = w av[:H]): dw (B, T, Hq, H) float32 contiguous in token mode, in sample mode
    the gradient of w's sums over real tokens, dsum[b, h, j] (float32) at DXG + b * stride_dxb + h * H + j.
    Writes DELTA (B, Hq, T) float32, DQ_ACC (B, Hq, T, D) float32 (the adapter part of dq), and partials
    indexed by (b * Hq + h, query block): ADAPTER_PART (2, B * Hq, blocks, M, D) float32 (dak's, then
    dav's), DGATE_PART (B * Hq, blocks) float32.

        delta = rowsum(dout * (out - A av))  = rowsum(dout * P v): only the prompt softmax's share
        dA    = dout av^T  (+ dw[t, j], token mode; + real[t] * dsum[j], sample mode; j < H)
        dgate = g'(gate) * sum(dA * Pa);  dPa = g * dA;  dsa = Pa * (dPa - rowsum(Pa * dPa))
        dq   += dsa ak * scale;  dak += dsa^T q * scale
        dav  += A^T dout  (w does not depend on av)
    """
    pid_m, pid_bh, b, h, kh, offs_m, offs_d, d_ok, m_ok, md_mask, qk_scale, q = _open_tile(
        Q, Hq, T, D, sm_scale, stride_qb, stride_qh, stride_qt, stride_qd, GROUP, False, UPCAST, BLOCK_M, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
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
    a_op = _operand(a, AV, UPCAST)
    adapter_out = _dot(a_op, av, IEEE)
    delta = tl.sum(do.to(tl.float32) * (o - adapter_out), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=m_ok)

    da = _dot(do, tl.trans(av), IEEE)
    dav = _dot(tl.trans(a_op), do, IEEE)
    if HAS_DXG:
        causal_col = offs_a < H
        if XG_MODE == 2:
            w_rows = ((b * T + offs_m) * Hq + h) * H
            da += tl.load(DXG + w_rows[:, None] + offs_a[None, :], mask=m_ok[:, None] & causal_col[None, :],
                          other=0.0)
        if XG_MODE == 1:
            real = _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM)
            dsum = tl.load(DXG + b * stride_dxb + h * H + offs_a, mask=causal_col, other=0.0)      # (BLOCK_A,)
            da += tl.where(real[:, None], dsum[None, :], 0.0)

    dgate = tl.sum(tl.sum(da * pa, 1), 0) * dg_dgate
    dpa = da * g
    dsa = pa * (dpa - tl.sum(pa * dpa, 1)[:, None])
    dsa_op = _operand(dsa, AK, UPCAST)
    dq = _dot(dsa_op, ak, IEEE) * sm_scale
    dak = _dot(tl.trans(dsa_op), q, IEEE) * sm_scale

    tl.store(DQ_ACC + pid_bh.to(tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=md_mask)
    part = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m
    ad_offs = part * M * D + offs_a[:, None] * D + offs_d[None, :]
    ad_mask = (offs_a[:, None] < M) & d_ok[None, :]
    tl.store(ADAPTER_PART + ad_offs, dak, mask=ad_mask)
    tl.store(ADAPTER_PART + tl.num_programs(1).to(tl.int64) * tl.num_programs(0) * M * D + ad_offs, dav, mask=ad_mask)
    tl.store(DGATE_PART + part, dgate)


@triton.jit
def _dca_bwd_dkdv_kernel(
    Q, K, V, KPM, SPAN, SEQ_END, DOUT, LSE, DELTA, DK, DV, DQ_ACC,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, Hkv, T, S, D, WINDOW, SOFTCAP,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQ: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv for one (key block, b * Hkv + kh) program; DK, DV (B, Hkv, S, D) contiguous; SPAN as in the
    forward (a key block wholly outside its row's real keys gets dk = dv = 0 without a loop); SEQ_END (S,)
    int32, the end of each position's packed sequence (HAS_SEQ: B = 1, T = S); DQ_ACC (B, Hq, T, D) float32,
    holding the adapter's dq term (read and added to with ATOMIC_DQ only). With TMA, Q and DOUT (unit
    stride along D, the other strides and the bases 16-byte aligned) are read through tensor descriptors.

    With P^T recomputed from the saved lse, for each query head h of the kv group and each query block:
        dv += P^T dout;  dP^T = v dout^T;  dS^T = P^T * (dP^T - delta);  dk += dS^T q * scale
    and with ATOMIC_DQ also DQ_ACC[h, block] += dS k * scale (float32 atomics: 5 matmuls and 1 exp a tile in
    all, against 7 and 2 with the dq kernel; the order of the additions, hence dq's rounding, varies).
    Summing the group's heads here, in a fixed order, is the GQA reduction of dk and dv (no atomics).
    """
    pid_n, pid_bkh, b, _, kh, offs_n, offs_d, d_ok, n_ok, nd_mask, qk_scale, k = _open_tile(
        K, Hkv, S, D, sm_scale, stride_kb, stride_kh, stride_ks, stride_kd, 1, False, UPCAST, BLOCK_N, BLOCK_D)
    v = _load_tile(V, b * stride_vb + kh * stride_vh, offs_n, offs_d, stride_vs, stride_vd, nd_mask, UPCAST)
    offs_m0 = tl.arange(0, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    key_ok = n_ok & _key_ok(KPM, b, stride_mb, offs_n, S, HAS_KPM)

    # query t sees key j iff j <= S - T + t: query blocks before `lo` see none of this key block, those
    # in [lo, full_lo) straddle the diagonal, those from full_lo on see all of it
    lo = (tl.maximum(pid_n * BLOCK_N - (S - T), 0) // BLOCK_M) * BLOCK_M
    full_lo = tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - (S - T), 0), BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(tl.minimum(full_lo, T), lo)
    # with packed sequences no query at or past the end of the block's last key's sequence sees it
    if HAS_SEQ:
        key_end = tl.load(SEQ_END + offs_n, mask=n_ok, other=0)
        hi = tl.max(key_end, 0)
        full_lo = tl.minimum(full_lo, hi)
    else:
        key_end = offs_n
        hi = T
    # with a sliding window no query at or past position (last key of the block) + WINDOW sees it
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 + WINDOW - (S - T), 0))
    if HAS_KPM:
        padded = (pid_n * BLOCK_N + BLOCK_N <= tl.load(SPAN + 2 * b)) | (pid_n * BLOCK_N >= tl.load(SPAN + 2 * b + 1))
        hi = tl.where(padded, lo, hi)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(full_lo, hi)
    if TMA:
        n_b = tl.num_programs(1) // Hkv
        q_desc = tl.make_tensor_descriptor(Q, shape=[n_b, Hq, T, D], strides=[stride_qb, stride_qh, stride_qt, 1],
                                           block_shape=[1, 1, BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DOUT, shape=[n_b, T, Hq, D], strides=[stride_ob, stride_ot, stride_oh, 1],
                                            block_shape=[1, BLOCK_M, 1, BLOCK_D])
    else:
        q_desc = Q
        do_desc = DOUT
    for gi in range(GROUP):
        h = (kh * GROUP + gi).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOUT + b * stride_ob + h * stride_oh
        row_base = (b * Hq + h) * T
        dq_base = DQ_ACC + row_base * D
        dk, dv = _dkdv_query_blocks(k, v, q_base, do_base, q_desc, do_desc, b.to(tl.int32), h.to(tl.int32),
                                    LSE + row_base, DELTA + row_base, dq_base, dk, dv, qk_scale, sm_scale, stride_qt,
                                    stride_qd, stride_ot, stride_od, offs_n, offs_m0, offs_d, d_ok, key_ok, key_end,
                                    lo, full_lo, T, S, D, WINDOW, SOFTCAP, Q, DOUT, True, HAS_KPM, HAS_SEQ, UPCAST,
                                    IEEE, HAS_WINDOW, HAS_SOFTCAP, ATOMIC_DQ, TMA)
        dk, dv = _dkdv_query_blocks(k, v, q_base, do_base, q_desc, do_desc, b.to(tl.int32), h.to(tl.int32),
                                    LSE + row_base, DELTA + row_base, dq_base, dk, dv, qk_scale, sm_scale, stride_qt,
                                    stride_qd, stride_ot, stride_od, offs_n, offs_m0, offs_d, d_ok, key_ok, key_end,
                                    full_lo, hi, T, S, D, WINDOW, SOFTCAP, Q, DOUT, False, HAS_KPM, HAS_SEQ, UPCAST,
                                    IEEE, HAS_WINDOW, HAS_SOFTCAP, ATOMIC_DQ, TMA)

    dk = dk * sm_scale
    out_offs = pid_bkh.to(tl.int64) * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _dca_bwd_dq_kernel(
    Q, K, V, KPM, SPAN, SEQ_START, SEQ_END, DOUT, LSE, DELTA, DQ_ACC, DQ,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, T, S, D, WINDOW, SOFTCAP,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQ: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for one (query block, b * Hq + h) program; DQ (B, Hq, T, D) contiguous in the input dtype;
    SPAN, SEQ_START, SEQ_END as in the forward. With TMA, K and V are read through tensor descriptors as in the
    forward.

        dP = dout v^T;  dS = P * (dP - delta);  dq = DQ_ACC (adapter term) + dS k * scale
    """
    pid_m, pid_bh, b, h, kh, offs_m, offs_d, d_ok, m_ok, md_mask, qk_scale, q = _open_tile(
        Q, Hq, T, D, sm_scale, stride_qb, stride_qh, stride_qt, stride_qd, GROUP, True, UPCAST, BLOCK_M, BLOCK_D)
    do = _load_tile(DOUT, b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ot, stride_od, md_mask, UPCAST)
    offs_n0 = tl.arange(0, BLOCK_N)

    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    k_desc, v_desc = _kv_descriptors(k_base, v_base, stride_ks, stride_vs, S, D, BLOCK_N, BLOCK_D, TMA)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_hi, hi = _key_range(pid_m, SEQ_START, SPAN, b, WINDOW, T, S, BLOCK_M, BLOCK_N, HAS_SEQ, HAS_WINDOW,
                                 HAS_KPM)
    dq = _dq_key_blocks(q, do, lse, delta, dq, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                        stride_kd, stride_vs, stride_vd, qk_scale, offs_m, offs_n0, offs_d, d_ok, lo, full_hi, T, S,
                        WINDOW, SOFTCAP, K, V, False, HAS_KPM, HAS_SEQ, UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)
    dq = _dq_key_blocks(q, do, lse, delta, dq, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                        stride_kd, stride_vs, stride_vd, qk_scale, offs_m, offs_n0, offs_d, d_ok, full_hi, hi, T, S,
                        WINDOW, SOFTCAP, K, V, True, HAS_KPM, HAS_SEQ, UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)

    acc_offs = pid_bh.to(tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :]
    dq = dq * sm_scale + tl.load(DQ_ACC + acc_offs, mask=md_mask, other=0.0)
    tl.store(DQ + acc_offs, dq.to(DQ.dtype.element_ty), mask=md_mask)


def dca_backward(dout, dxg, q, k, v, ak, av, gate, out, lse, *, causal_len, scale, key_padding_mask=None,
                 cu_seqlens=None, window=None, softcap=None, gate_fn="tanh", xg="sample", configs=None,
                 launch=None):
    """Run the backward: the adapter kernel, then the dk/dv and the dq kernel (with FASTDCA_ATOMIC_DQ, dq in the
    dk/dv kernel).

    Args:
        dout: (B, T, Hq, D), the gradient of out, or None (no gradient reaches out: dk, dv and dav are then None,
            as the causal weights do not depend on k, v or av).
        dxg: the gradient of the X_G statistics, or None: in token mode that of the causal weights w, (B, T, Hq,
            H); in sample mode that of their sums, (B, Hq, H), or of forward's whole `extra` (B, Hq * H + 1), whose
            count column is not read. Any strides and floating dtype (read as float32).
        q, k, v, ak, av, gate: the forward's inputs (shapes as for dca_forward).
        out: (B, T, Hq, D) and lse: (B, Hq, T) float32, the forward's outputs.
        causal_len, scale, key_padding_mask, cu_seqlens, window, softcap, gate_fn, xg, configs, launch: as for
            dca_forward.

    Returns:
        (dq, dk, dv, dak, dav, dgate), each with its input's shape and dtype (dk, dv, dav None without dout). The
        per-block partials of dak, dav and dgate are summed over batch, query blocks and the query heads of
        each kv group with torch sums of fixed shape: deterministic.
    """
    check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    H = causal_len
    group = Hq // Hkv
    cfgs = launch_configs(D, T, q.dtype, q.device, configs)
    atomic = _atomic_dq(D)
    dout = dout.contiguous() if dout is not None and dout.stride() != out.stride() else dout
    tma = dout is not None and _tma_backward(q, k, v, dout)
    acfg, qcfg = cfgs["bwd_adapter"], cfgs["bwd_dq"]
    kcfg = cfgs["bwd_dkdv" + "_atomic" * atomic + "_tma" * tma]
    if softcap is not None and not configs:
        # the cap's derivative is one more score tile live through two dots: half the key tile of the
        # dq loop (sm_90) or of the dk/dv loop (sm_80) keeps them from spilling (compile report, +softcap)
        if tuning.target_arch(q.device) >= 90:
            qcfg = dict(qcfg, BLOCK_N=max(16, qcfg["BLOCK_N"] // 2))
        else:
            kcfg = dict(kcfg, BLOCK_N=max(16, kcfg["BLOCK_N"] // 2))
    n_mblocks = triton.cdiv(T, acfg["BLOCK_M"])
    mode = XG_CODES[xg]
    dots = dict(UPCAST=upcast(q.dtype), IEEE=ieee(q.dtype))
    kpm, stride_mb, has_kpm = kpm_arg(key_padding_mask, q, launch)

    prompt_grads = dout is not None
    if dout is None:
        # only the causal weights carry a gradient: k, v and av get none, q only the adapter term
        dout = torch.zeros_like(out)
    has_dxg = dxg is not None and mode != XG_NONE and H > 0
    dxg_arg, stride_dxb = lse, 0
    if has_dxg and mode == XG_TOKEN:
        dxg_arg = dxg.to(torch.float32).contiguous()
    elif has_dxg:
        # (B, Hq, H) or the whole extra (B, Hq * H + 1): rows of (head, adapter token) at unit stride
        dxg_arg = dxg.to(torch.float32).reshape(B, -1)
        dxg_arg = dxg_arg if dxg_arg.stride(-1) == 1 else dxg_arg.contiguous()
        stride_dxb = dxg_arg.stride(0)

    delta = q.new_empty((B, Hq, T), dtype=torch.float32)
    dq_acc = q.new_empty((B, Hq, T, D), dtype=torch.float32)
    # partials of dak and dav (one buffer) and of dgate per (b * Hq + h, query block), summed below with
    # fixed-shape torch sums over batch, the query heads of each kv group and the query blocks:
    # deterministic, no atomics
    adapter_part = q.new_empty((2, B * Hq, n_mblocks, M, D), dtype=torch.float32)
    dgate_part = q.new_empty((B * Hq, n_mblocks), dtype=torch.float32)
    gate = gate.contiguous()
    run(_dca_bwd_adapter_kernel, (n_mblocks, B * Hq), q, launch,
        q, ak, av, gate, kpm, out, dout, dxg_arg,
        delta, dq_acc, adapter_part, dgate_part,
        float(scale),
        *q.stride(), *ak.stride(), *av.stride(), *out.stride(),
        stride_mb, stride_dxb,
        Hq, T, S, M, D, H,
        GROUP=group, HAS_KPM=has_kpm, GATE_TANH=gate_fn == "tanh", XG_MODE=mode, HAS_DXG=has_dxg,
        BLOCK_A=adapter_block(M), **dots, **block_args(acfg, "BLOCK_M", "BLOCK_D"), **launch_options(acfg))
    dak_dav = adapter_part.view(2, B, Hkv, group, n_mblocks, M, D).sum(dim=(1, 3, 4))
    dgate = dgate_part.view(B, Hq, n_mblocks).sum(dim=(0, 2))
    adapter_grads = (dak_dav[0].to(ak.dtype), dak_dav[1].to(av.dtype), dgate.to(gate.dtype))
    if not prompt_grads:
        # w depends on neither k, v nor av
        return (dq_acc.to(q.dtype), None, None, adapter_grads[0], None, adapter_grads[2])

    span = key_span(kpm, stride_mb, has_kpm, q, launch)
    seq_start, has_seq = seq_arg(cu_seqlens, q, "start", launch)
    seq_end, _ = seq_arg(cu_seqlens, q, "end", launch)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    run(_dca_bwd_dkdv_kernel, (triton.cdiv(S, kcfg["BLOCK_N"]), B * Hkv), q, launch,
        q, k, v, kpm, span, seq_end, dout, lse, delta, dk, dv, dq_acc,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_mb,
        Hq, Hkv, T, S, D, window_arg(window), softcap_arg(softcap),
        GROUP=group, HAS_KPM=has_kpm, HAS_SEQ=has_seq, **dots, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, ATOMIC_DQ=atomic, TMA=tma,
        **block_args(kcfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **launch_options(kcfg))
    if atomic:
        return (dq_acc.to(q.dtype), dk, dv, *adapter_grads)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    run(_dca_bwd_dq_kernel, (triton.cdiv(T, qcfg["BLOCK_M"]), B * Hq), q, launch,
        q, k, v, kpm, span, seq_start, seq_end, dout, lse, delta, dq_acc, dq,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_mb,
        Hq, T, S, D, window_arg(window), softcap_arg(softcap),
        GROUP=group, HAS_KPM=has_kpm, HAS_SEQ=has_seq, **dots, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, TMA=tma,
        **block_args(qcfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **launch_options(qcfg))
    return (dq, dk, dv, *adapter_grads)


def _tma_backward(q, k, v, dout) -> bool:
    """Whether this backward's loops read through tensor descriptors (the dk/dv kernel's q and dout, the dq
    kernel's K and V): FASTDCA_TMA_BWD=1 and what tma_reads asks of the four."""
    return switches.TMA_BWD.on() and tma_reads(q, (q, k, v, dout))


def _atomic_dq(D) -> bool:
    """Whether this backward accumulates dq with atomics inside the dk/dv kernel (one kernel fewer, 5 matmuls and
    1 exp per tile instead of 7 and 2) rather than in the deterministic dq kernel: FASTDCA_ATOMIC_DQ=1, never
    while torch.use_deterministic_algorithms is on (atomics add in a varying order), head dims up to 128 (D = 256
    keeps the dq kernel)."""
    return switches.ATOMIC_DQ.on() and not torch.are_deterministic_algorithms_enabled() and head_block(D) <= 128
