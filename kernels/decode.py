"""Flash-decoding (T <= 16): the split and combine kernels and their launcher, which dca_forward calls."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdca.kernels.blocks import (LOG2E, _col_sums, _finish_rows, _fwd_key_blocks, _gate, _operand, _query_real,
                                    _window_lo)
from fastdca.kernels.plumbing import (XG_CODES, forward_extra, forward_outputs, ieee, kpm_arg, launch_options, run,
                                      softcap_arg, upcast, window_arg)
from fastdca.kernels.tuning import adapter_block, sm_count


DECODE_MAX_ROWS = 64   # the query rows of one kv group (Hq / Hkv * T) the flash-decoding path takes


@triton.jit
def _group_queries(Q, pid_bk, Hkv, T, D, stride_qb, stride_qh, stride_qt, stride_qd, GROUP: tl.constexpr,
                   ROWS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program of kv head kh of row b (pid_bk = b * Hkv + kh) starts from: (b, kh, offs_d, d_ok, rows,
    row_ok, head, t, q), the GROUP * T queries of kv head kh as the rows of one (ROWS, BLOCK_D) tile q: row r is
    query t = r % T of head kh * GROUP + r // T; rows past GROUP * T are padding (row_ok False, q 0) and borrow
    the last head, so nothing they index is out of range."""
    b = (pid_bk // Hkv).to(tl.int64)
    kh = (pid_bk % Hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP * T
    head = kh * GROUP + tl.minimum(rows // T, GROUP - 1)
    t = rows % T
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return b, kh, offs_d, d_ok, rows, row_ok, head, t, _operand(q, Q, UPCAST)


@triton.jit
def _dca_decode_split_kernel(
    Q, K, V, KPM, ACC_PART, M_PART, L_PART,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb,
    Hkv, T, S, D, CHUNK, WINDOW, SOFTCAP,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Flash-decoding, first pass: one program per (key chunk, b * Hkv + kh), for T <= 16.

    The program's ROWS rows are the GROUP * T queries of kv head kh's query heads (row r: head
    kh * GROUP + r // T, query r % T), so K and V are read once for the whole group. Over the keys of
    its chunk [split * CHUNK, (split + 1) * CHUNK) (CHUNK a multiple of BLOCK_N) it runs the online
    softmax and writes the unnormalised acc = sum_j 2^(s_j - m) v_j to ACC_PART (B * Hkv, splits, ROWS,
    BLOCK_D) and the row max m and sum l to M_PART, L_PART (B * Hkv, splits, ROWS), all float32. With
    HAS_WINDOW the key blocks before the first query's window are skipped.
    """
    split = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b, kh, offs_d, d_ok, rows, row_ok, head, t, q = _group_queries(Q, pid_bk, Hkv, T, D, stride_qb, stride_qh,
                                                                   stride_qt, stride_qd, GROUP, ROWS, UPCAST, BLOCK_D)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, S)
    lo = tl.maximum(lo, _window_lo(0, WINDOW, T, S, BLOCK_N, HAS_WINDOW))
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    m_i, l_i, acc = _fwd_key_blocks(q, k_base, v_base, k_base, v_base, KPM, KPM, b, stride_mb, stride_ks, stride_kd,
                                    stride_vs, stride_vd, m_i, l_i, acc, qk_scale, t, tl.arange(0, BLOCK_N), offs_d,
                                    d_ok, lo, hi, T, S, WINDOW, SOFTCAP, K, V, True, HAS_KPM, False, UPCAST, IEEE,
                                    HAS_WINDOW, HAS_SOFTCAP, False)
    part = pid_bk.to(tl.int64) * tl.num_programs(0) + split
    tl.store(ACC_PART + (part * ROWS + rows[:, None]) * BLOCK_D + offs_d[None, :], acc)
    tl.store(M_PART + part * ROWS + rows, m_i)
    tl.store(L_PART + part * ROWS + rows, l_i)


@triton.jit
def _dca_decode_combine_kernel(
    Q, AK, AV, GATE, KPM, ACC_PART, M_PART, L_PART, OUT, LSE, XG, XG_PART,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_akh, stride_akm, stride_akd,
    stride_avh, stride_avm, stride_avd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, Hkv, T, S, M, D, H, SPLITS,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, GATE_TANH: tl.constexpr, XG_MODE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Flash-decoding, second pass: one program per b * Hkv + kh. Merges the SPLITS partial softmaxes
    of its rows (m = max m_s, l = sum l_s 2^(m_s - m), acc = sum acc_s 2^(m_s - m)), then finishes as
    the forward kernel does (lse, the adapter term, out; in token mode the causal weights w = A[:, :H] into XG
    (B, T, Hq, H) float32); in sample mode XG_PART (B, 1, Hq * H + 1) as there: at [b, 0, h * H + j] the sum
    of w[:, h, j] over row b's real queries, at [b, 0, Hq * H] (kv head 0) their number.
    """
    pid_bk = tl.program_id(0)
    b, kh, offs_d, d_ok, rows, row_ok, head, t, q = _group_queries(Q, pid_bk, Hkv, T, D, stride_qb, stride_qh,
                                                                   stride_qt, stride_qd, GROUP, ROWS, UPCAST, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for split in range(SPLITS):
        part = pid_bk.to(tl.int64) * SPLITS + split
        m_s = tl.load(M_PART + part * ROWS + rows)
        m_new = tl.maximum(m_i, m_s)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        beta = tl.exp2(m_s - m_shift)
        l_i = l_i * alpha + tl.load(L_PART + part * ROWS + rows) * beta
        acc = acc * alpha[:, None] + tl.load(ACC_PART + (part * ROWS + rows[:, None]) * BLOCK_D + offs_d[None, :]) \
            * beta[:, None]
        m_i = m_new

    g, _ = _gate(GATE, head, GATE_TANH)
    a, _ = _finish_rows(acc, m_i, l_i, q, b, head, t, row_ok, row_ok, g[:, None], AK, AV, OUT, LSE, XG, kh,
                        stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                        stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d, d_ok,
                        XG_MODE, UPCAST, IEEE)
    if XG_MODE == 1:
        real = _query_real(t, KPM, b, stride_mb, T, S, HAS_KPM) & row_ok
        row = XG_PART + b * (Hq * H + 1)
        for gi in tl.static_range(GROUP):
            in_head = real & ((rows // T) == gi)
            tl.store(row + (kh * GROUP + gi) * H + offs_a, _col_sums(a, in_head), mask=offs_a < H)
        if kh == 0:
            tl.store(row + Hq * H, tl.sum((real & (rows < T)).to(tl.float32), 0))


def decode_forward(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, window, softcap, gate_fn, xg, cfg,
                   launch):
    """Flash-decoding for T <= 16: the keys split into chunks over enough programs to fill the GPU,
    each kv head's query group as the rows of one tile, then one pass merging the chunks.

    Args:
        q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, window, softcap, gate_fn, xg, launch: as for
            dca_forward (q (B, Hq, T, D) with T <= 16 and Hq / Hkv * T <= DECODE_MAX_ROWS; no packed sequences).
        cfg: launch_config("decode", ...): BLOCK_N, BLOCK_D, num_warps, num_stages (and SPLITS, tests only).

    Returns:
        (out, lse, extra) as dca_forward returns them.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    group = Hq // Hkv
    rows = max(16, triton.next_power_of_2(group * T))
    block_n = cfg["BLOCK_N"]
    splits = cfg.get("SPLITS") or max(1, min(triton.cdiv(S, block_n),
                                             triton.cdiv(2 * sm_count(q.device), B * Hkv)))
    chunk = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, chunk)
    acc_part = q.new_empty((B * Hkv, splits, rows, cfg["BLOCK_D"]), dtype=torch.float32)
    m_part = q.new_empty((B * Hkv, splits, rows), dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    mode = XG_CODES[xg]
    out, lse, xg_out, xg_part = forward_outputs(q, mode, 1, causal_len)
    kpm, stride_mb, has_kpm = kpm_arg(key_padding_mask, q, launch)
    flags = dict(GROUP=group, HAS_KPM=has_kpm, UPCAST=upcast(q.dtype), IEEE=ieee(q.dtype), ROWS=rows,
                 BLOCK_D=cfg["BLOCK_D"])
    run(_dca_decode_split_kernel, (splits, B * Hkv), q, launch,
        q, k, v, kpm, acc_part, m_part, l_part,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(),
        stride_mb,
        Hkv, T, S, D, chunk, window_arg(window), softcap_arg(softcap),
        BLOCK_N=block_n, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, **flags,
        **launch_options(cfg))
    run(_dca_decode_combine_kernel, (B * Hkv,), q, launch,
        q, ak, av, gate.contiguous(), kpm, acc_part, m_part, l_part, out, lse, xg_out, xg_part,
        float(scale),
        *q.stride(), *ak.stride(), *av.stride(), *out.stride(),
        stride_mb,
        Hq, Hkv, T, S, M, D, causal_len, splits,
        GATE_TANH=gate_fn == "tanh", XG_MODE=mode, BLOCK_A=adapter_block(M), **flags,
        **launch_options(dict(num_warps=4 if cfg["BLOCK_D"] <= 128 else 8, num_stages=1)))
    return out, lse, forward_extra(mode, xg_out, xg_part)
