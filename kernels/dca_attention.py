"""Fused DCA attention kernels (docs/DESIGN.md sections 1 and 2) and their launch functions.

Notation (per batch b and query head h, kv head kh = h // GROUP):
    s   = q k^T * scale      (T, S) prompt scores, bottom-right causal + key padding mask; or, for
                             sequences packed in one row (T = S), causal within each sequence:
                             query i sees key j iff start(i) <= j <= i, start(i) the first position
                             of i's sequence; with a sliding window W (HAS_WINDOW) also only
                             j > S - T + i - W, and key blocks wholly outside every row's window
                             are skipped; with a soft-cap c (HAS_SOFTCAP) s = c tanh(q k^T * scale / c)
    P   = softmax(s)         rows with no visible key are 0
    sa  = q ak^T * scale     (T, M) adapter scores, no mask
    Pa  = softmax(sa),  A = g * Pa,  g = tanh(gate[h]) or gate[h]
    out = P v + A av
    X_G = A[:, :H] av[:H]

Neither s, P nor A is ever written to global memory. Softmaxes run in base 2 (exp2 of s * log2(e)),
so the saved row statistic `lse` is log2 of the prompt softmax denominator in those units, +inf for a
row with no visible key (then exp2(s - lse) is 0 without a special case in the backward).

Six kernels:
    _dca_fwd_kernel       out, lse, X_G (token mode) or per-block column sums of A[:, :H] (sample mode)
    _dca_decode_split_kernel, _dca_decode_combine_kernel
                          the same for T <= 16 (decoding), flash-decoding style: the keys split over
                          programs that each take a kv head's whole query group, then merged
    _dca_bwd_adapter_kernel   delta = rowsum(dout * P v), the whole adapter backward: dq's adapter
                          term and per-block partial sums of dak, dav, dgate
    _dca_bwd_dkdv_kernel  dk, dv with one key block resident, looping over the query heads of its
                          kv group and over query blocks
    _dca_bwd_dq_kernel    dq with one query block resident, added to the adapter term
Partial sums are reduced with torch sums of fixed shape: deterministic, no atomics.

bf16: the launchers set UPCAST under the interpreter (TRITON_INTERPRET=1), which widens every dot
operand to float32 after rounding it to bf16 (the interpreter mis-computes bf16 dots and arithmetic), so
the interpreter multiplies the same rounded P, A and dS a GPU does. Compiled for a GPU, bf16 tiles feed
tl.dot directly; all accumulation is float32 either way.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import triton
import triton.language as tl

from fastdca import switches
from fastdca.switches import triton_interpreted

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
    """A tile as a tl.dot operand, rounded to the dtype of the tensor REF points into, as the compiled
    kernel feeds the tensor cores. Under UPCAST (bf16 under the interpreter, whose bf16 dots are wrong)
    it is then widened back to float32: the same rounded values, multiplied exactly."""
    y = x.to(REF.dtype.element_ty)
    if UPCAST:
        y = y.to(tl.float32)
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
def _key_ok(KPM, b, stride_mb, offs_n, S, HAS_KPM: tl.constexpr):
    """(BLOCK_N,) key j is kept by the padding mask (all True without one; keys >= S are masked by the
    causal test where it runs)."""
    if HAS_KPM:
        ok = tl.load(KPM + b * stride_mb + offs_n, mask=offs_n < S, other=0) != 0
    else:
        ok = offs_n >= 0
    return ok


@triton.jit
def _visible(offs_m, offs_n, key_ok, key_end, T, S, WINDOW, HAS_KPM: tl.constexpr, HAS_SEQ: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: query i (absolute position S - T + i) sees key j <= that position that
    the padding mask keeps (key_ok) and, with packed sequences (T = S), that belongs to i's sequence:
    for j <= i that is i < key_end[j], the end of j's sequence (a key-side test, so that no per-row
    vector stays live through the key loop); out-of-range rows and columns are invisible. Without
    CAUSAL the block is known to lie wholly below the diagonal, so only the padding and sequence masks
    are applied. With a sliding window, key j must also lie after S - T + i - WINDOW."""
    if CAUSAL:
        vis = (offs_n[None, :] <= (S - T + offs_m)[:, None]) & (offs_n[None, :] < S) & (offs_m[:, None] < T)
        if HAS_KPM:
            vis = vis & key_ok[None, :]
    else:
        vis = key_ok[None, :] & (offs_m[:, None] >= 0)
    if HAS_SEQ:
        vis = vis & (offs_m[:, None] < key_end[None, :])
    if HAS_WINDOW:
        vis = vis & (offs_n[None, :] > (S - T + offs_m)[:, None] - WINDOW)
    return vis


@triton.jit
def _tanh(x):
    """tanh through one exp2 (the softmax's unit): 1 - 2 / (e^(2x) + 1), exactly +-1 where e^(2x) over- or
    underflows."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _window_lo(m0, WINDOW, T, S, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The first key block query rows from m0 on can see through a sliding window (0 without one)."""
    if HAS_WINDOW:
        lo = tl.maximum(S - T + m0 - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    else:
        lo = 0
    return lo


@triton.jit
def _from_first_real_key(SPAN, b, lo, full_hi, hi, BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr):
    """(lo, full_hi) moved up to the key block of row b's first real key, SPAN[b, 0] (full_hi kept within
    [lo, hi]): a left-padded row skips its wholly padded leading key blocks instead of loading and masking
    them (the mask still decides after). hi is not clamped to the last real key: that bound raised the
    sm_90 forward's registers from 179 to 243 on Triton 3.6, and right padding's trailing keys are skipped
    where they cost most, in the dk/dv kernel."""
    if HAS_KPM:
        lo = tl.maximum(lo, tl.load(SPAN + 2 * b) // BLOCK_N * BLOCK_N)
        full_hi = tl.minimum(tl.maximum(full_hi, lo), hi)
    return lo, full_hi


@triton.jit
def _dca_key_span_kernel(KPM, SPAN, stride_mb, S, BLOCK: tl.constexpr):
    """SPAN (B, 2) int32: for row b of KPM (B, S) bool, (its first real key, its last real key + 1); (S, 0)
    for a row without one."""
    b = tl.program_id(0).to(tl.int64)
    first = S
    last = 0
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        real = tl.load(KPM + b * stride_mb + offs, mask=offs < S, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(real, offs, S), 0))
        last = tl.maximum(last, tl.max(tl.where(real, offs + 1, 0), 0))
    tl.store(SPAN + 2 * b, first)
    tl.store(SPAN + 2 * b + 1, last)


@triton.jit
def _key_end(SEQ_END, offs_n, S, HAS_SEQ: tl.constexpr):
    """(BLOCK_N,) the end of each key's packed sequence (placeholder without packing)."""
    if HAS_SEQ:
        end = tl.load(SEQ_END + offs_n, mask=offs_n < S, other=0)
    else:
        end = offs_n
    return end


@triton.jit
def _first_key_block(SEQ_START, m0, BLOCK_N: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The first key block any query row from m0 on can see: the block holding the start of row m0's
    sequence (sequence starts never decrease), or 0 without packed sequences."""
    if HAS_SEQ:
        lo = tl.load(SEQ_START + m0) // BLOCK_N * BLOCK_N
    else:
        lo = 0
    return lo


@triton.jit
def _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM: tl.constexpr):
    """(BLOCK_M,) query t is real iff it is in range and key_padding_mask[b, S - T + t]."""
    real = offs_m < T
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_mb + S - T + offs_m, mask=real, other=0)
        real = real & (kp != 0)
    return real


@triton.jit
def _causal_bounds(pid_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T, S):
    """(full_hi, hi) for query block pid_m: key blocks starting below full_hi are visible to every row
    of the block by causality (full_hi a multiple of BLOCK_N); those in [full_hi, hi) straddle the
    diagonal; keys from hi on are above it for every row."""
    hi = tl.minimum(S, S - T + (pid_m + 1) * BLOCK_M)
    full_hi = tl.maximum(tl.minimum((S - T + pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N, hi), 0)
    return full_hi, hi


@triton.jit
def _kv_descriptors(k_base, v_base, stride_ks, stride_vs, S, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    TMA: tl.constexpr):
    """With TMA, tensor descriptors for one kv head's K and V ((S, D), unit stride along D; blocks of
    (BLOCK_N, BLOCK_D), rows past S and columns past D read as 0); without, the base pointers unchanged."""
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[S, D], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[S, D], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base
    return k_desc, v_desc


@triton.jit
def _fwd_key_blocks(q, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks, stride_kd,
                    stride_vs, stride_vd, m_i, l_i, acc, qk_scale, offs_m, offs_n0, offs_d, d_ok, lo, hi, T, S,
                    WINDOW, SOFTCAP, K, V,
                    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQ: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TMA: tl.constexpr):
    """The online softmax over the key blocks starting in [lo, hi): returns the updated (m_i, l_i, acc).
    With HAS_SOFTCAP the scores (log2 units) become SOFTCAP * tanh(s / SOFTCAP), SOFTCAP the cap in
    log2 units. With TMA the K and V blocks come through the tensor descriptors k_desc, v_desc ((S, D)
    of this kv head, rows past S and columns past D read as 0) instead of k_base, v_base and strides,
    and (without a softcap) the scores stay unscaled until the exponent, where the scale, qk_scale > 0,
    enters one fused multiply-add: exp2(s * qk_scale - m), m kept in scaled units."""
    BLOCK_N: tl.constexpr = offs_n0.shape[0]
    FOLD_SCALE: tl.constexpr = TMA and not HAS_SOFTCAP
    # the padding mask is loaded one key block ahead: Triton pipelines only the loads that feed dots
    key_ok = _key_ok(KPM, b, stride_mb, lo + offs_n0, S, HAS_KPM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < S
        if TMA:
            kt = tl.trans(k_desc.load([start_n, 0]))
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, _operand(kt, K, UPCAST), IEEE)
        if not FOLD_SCALE:
            s = s * qk_scale
        if HAS_SOFTCAP:
            s = SOFTCAP * _tanh(s / SOFTCAP)
        if CAUSAL or HAS_KPM or HAS_SEQ or HAS_WINDOW:
            key_end = _key_end(SEQ_END, offs_n, S, HAS_SEQ)
            s = tl.where(_visible(offs_m, offs_n, key_ok, key_end, T, S, WINDOW, HAS_KPM, HAS_SEQ, CAUSAL,
                                  HAS_WINDOW), s, float("-inf"))
        key_ok = _key_ok(KPM, b, stride_mb, offs_n + BLOCK_N, S, HAS_KPM)
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; shift by 0 there so that
        # exp2(-inf - -inf) never produces NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        if FOLD_SCALE:
            p = tl.exp2(s * qk_scale - m_shift[:, None])
        else:
            p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            vt = v_desc.load([start_n, 0])
        else:
            vt = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        vt = _operand(vt, V, UPCAST)
        acc = acc * alpha[:, None] + _dot(_operand(p, V, UPCAST), vt, IEEE)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _finish_rows(acc, m_i, l_i, q, b, head, t, row_ok, g, AK, AV, OUT, LSE, XG, kh,
                 stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                 stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d, d_ok,
                 XG_MODE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, OUT_TMA: tl.constexpr = False):
    """The forward's epilogue for rows (query head `head`, query `t`, all of kv head kh, gate value g:
    a scalar or a (rows, 1) column) whose online softmax over the prompt keys ended at (m_i, l_i, acc):
    normalise, store lse, add the adapter term A av, store out (and X_G in token mode). With OUT_TMA, OUT
    is a tensor descriptor of out (B, T, Hq, D) and the rows are one head's consecutive queries from t[0]:
    out is stored through it (rows past T and columns past D are not written). Returns (A, (rows,
    BLOCK_A) float32, and the (BLOCK_A, BLOCK_D) adapter-value tile as a dot operand)."""
    has_key = l_i > 0.0
    l_div = tl.where(has_key, l_i, 1.0)
    acc = acc / l_div[:, None]
    lse = tl.where(has_key, m_i + tl.log2(l_div), float("inf"))
    tl.store(LSE + (b * Hq + head) * T + t, lse, mask=row_ok)      # head: a scalar or per row

    # adapter keys after the prompt loop, so their tiles are not live during it
    pa, ak = _adapter_probs(q, AK, kh, stride_akh, stride_akm, stride_akd, offs_a, offs_d, M, D,
                            qk_scale, UPCAST, IEEE)
    a = pa * g
    av = tl.load(AV + kh * stride_avh + offs_a[:, None] * stride_avm + offs_d[None, :] * stride_avd,
                 mask=(offs_a[:, None] < M) & d_ok[None, :], other=0.0)
    av = _operand(av, AV, UPCAST)
    acc += _dot(_operand(a, AV, UPCAST), av, IEEE)

    o_rows = b * stride_ob + t * stride_ot + head * stride_oh
    o_offs = o_rows[:, None] + offs_d[None, :] * stride_od
    o_mask = row_ok[:, None] & d_ok[None, :]
    if OUT_TMA:
        BLOCK_M: tl.constexpr = acc.shape[0]
        BLOCK_D: tl.constexpr = acc.shape[1]
        OUT.store([b.to(tl.int32), tl.min(t, 0), head, 0],
                  acc.to(OUT.dtype).reshape(1, BLOCK_M, 1, BLOCK_D))
    else:
        tl.store(OUT + o_offs, acc.to(OUT.dtype.element_ty), mask=o_mask)
    if XG_MODE == 2:
        a_causal = tl.where(offs_a[None, :] < H, a, 0.0)
        xg = _dot(_operand(a_causal, AV, UPCAST), av, IEEE)
        tl.store(XG + o_offs, xg.to(XG.dtype.element_ty), mask=o_mask)
    return a, av


@triton.jit
def _xg_sums(a, av, real, H, offs_a):
    """(BLOCK_D,) float32: the sum over the rows that are `real` of X_G = A[:, :H] av[:H], as the column
    sums of A[:, :H] times av[:H] (X_G itself is never formed)."""
    colsum = tl.sum(tl.where(real[:, None] & (offs_a[None, :] < H), a, 0.0), 0)
    return tl.sum(colsum[:, None] * av.to(tl.float32), 0)


# --------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _dca_fwd_kernel(
    Q, K, V, AK, AV, GATE, KPM, SPAN, SEQ_START, SEQ_END, OUT, LSE, XG, XG_PART,
    sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_akh, stride_akm, stride_akd,
    stride_avh, stride_avm, stride_avd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_mb,
    Hq, T, S, M, D, H, WINDOW, SOFTCAP,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEQ: tl.constexpr, GATE_TANH: tl.constexpr,
    XG_MODE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Forward for one (query block, b * Hq + h) program.

    Shapes: Q (B, Hq, T, D); K, V (B, Hkv, S, D); AK, AV (Hkv, M, D); GATE (Hq,); KPM (B, S) int8; SPAN
    (B, 2) int32, each row's first real key and last real key + 1 (_dca_key_span_kernel; read with
    HAS_KPM); SEQ_START, SEQ_END (S,) int32, the start and end of each position's packed sequence
    (HAS_SEQ: B = 1, T = S);
    OUT and XG (B, T, Hq, D) in the input dtype (XG only when XG_MODE is token); LSE (B, Hq, T) float32;
    XG_PART (B, cdiv(T, BLOCK_M), Hq * D + 1) float32 (sample mode only): at [b, block, h * D + d] the sum
    of X_G[:, h, d] over the block's real query rows, at [b, block, Hq * D] (written by head 0) the
    number of those rows.

    out = softmax(q k^T * scale) v + g * softmax(q ak^T * scale) av, online softmax over key blocks;
    with HAS_WINDOW the query at position p sees only keys after p - WINDOW, and the key blocks before
    the block's first row's window are skipped. With TMA, K and V (unit stride along D, the other
    strides and the bases 16-byte aligned) are read through tensor descriptors, and so are Q and OUT.
    """
    # the longest causal rows first, so the last wave of programs is the shortest
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
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

    if TMA:
        n_b = tl.num_programs(1) // Hq
        q_desc = tl.make_tensor_descriptor(Q, shape=[n_b, Hq, T, D], strides=[stride_qb, stride_qh, stride_qt, 1],
                                           block_shape=[1, 1, BLOCK_M, BLOCK_D])
        q = q_desc.load([b.to(tl.int32), h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
        out_desc = tl.make_tensor_descriptor(OUT, shape=[n_b, T, Hq, D], strides=[stride_ob, stride_ot, stride_oh, 1],
                                             block_shape=[1, BLOCK_M, 1, BLOCK_D])
    else:
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        out_desc = OUT
    q = _operand(q, Q, UPCAST)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    k_desc, v_desc = _kv_descriptors(k_base, v_base, stride_ks, stride_vs, S, D, BLOCK_N, BLOCK_D, TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key blocks wholly at or below the block's first query position need no causal mask; the ones
    # up to the last query row's position straddle the diagonal; later ones are never visible.
    # With packed sequences, key blocks before the first row's sequence are never visible.
    full_hi, hi = _causal_bounds(pid_m, BLOCK_M, BLOCK_N, T, S)
    lo = tl.maximum(_first_key_block(SEQ_START, pid_m * BLOCK_M, BLOCK_N, HAS_SEQ),
                    _window_lo(pid_m * BLOCK_M, WINDOW, T, S, BLOCK_N, HAS_WINDOW))
    full_hi = tl.maximum(full_hi, lo)
    lo, full_hi = _from_first_real_key(SPAN, b, lo, full_hi, hi, BLOCK_N, HAS_KPM)
    m_i, l_i, acc = _fwd_key_blocks(q, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                                    stride_kd, stride_vs, stride_vd, m_i, l_i, acc, qk_scale, offs_m, offs_n0,
                                    offs_d, d_ok, lo, full_hi, T, S, WINDOW, SOFTCAP, K, V, False, HAS_KPM, HAS_SEQ,
                                    UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)
    m_i, l_i, acc = _fwd_key_blocks(q, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                                    stride_kd, stride_vs, stride_vd, m_i, l_i, acc, qk_scale, offs_m, offs_n0,
                                    offs_d, d_ok, full_hi, hi, T, S, WINDOW, SOFTCAP, K, V, True, HAS_KPM, HAS_SEQ,
                                    UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)

    g, _ = _gate(GATE, h, GATE_TANH)
    a, av = _finish_rows(acc, m_i, l_i, q, b, h, offs_m, m_ok, g, AK, AV, out_desc, LSE, XG, kh,
                         stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                         stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d, d_ok,
                         XG_MODE, UPCAST, IEEE, TMA)
    if XG_MODE == 1:
        _store_xg_block_sums(XG_PART, a, av, offs_m, offs_a, offs_d, d_ok, KPM, b, h, pid_m, stride_mb, Hq, T, S,
                             D, H, HAS_KPM)


@triton.jit
def _store_xg_block_sums(XG_PART, a, av, offs_m, offs_a, offs_d, d_ok, KPM, b, h, pid_m, stride_mb, Hq, T, S, D,
                         H, HAS_KPM: tl.constexpr):
    """Sample mode: XG_PART[b, pid_m, h * D + d] = the sum of X_G[:, h, d] over query block pid_m's real rows,
    and (head 0) XG_PART[b, pid_m, Hq * D] = the number of those rows."""
    real = _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM)
    row = XG_PART + (b * tl.num_programs(0) + pid_m) * (Hq * D + 1)
    tl.store(row + h * D + offs_d, _xg_sums(a, av, real, H, offs_a), mask=d_ok)
    if h == 0:
        tl.store(row + Hq * D, tl.sum(real.to(tl.float32), 0))


@triton.jit
def _query_tile(Q, pid_m, pid_bh, Hq, T, D, stride_qb, stride_qh, stride_qt, stride_qd, GROUP: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a (query block pid_m, b * Hq + h) program of the adapter kernels starts from: (b, h, kh, offs_m,
    offs_d, d_ok, m_ok, q), q the block's (BLOCK_M, BLOCK_D) tile of Q (B, Hq, T, D) as a dot operand."""
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    kh = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    return b, h, kh, offs_m, offs_d, d_ok, m_ok, _operand(q, Q, UPCAST)


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
    (B, Hq, T) float32, its row log-sum-exp (natural log); the rest as in _dca_fwd_kernel.

        out = PO + g * softmax(q ak^T * scale) av;   LSE = PLSE * log2(e)
    A row whose causal keys are all padding (none at or before its position) gets LSE = +inf and a prompt
    part of 0 whatever PO holds there, as in the fused forward.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, kh, offs_m, offs_d, d_ok, m_ok, q = _query_tile(Q, pid_m, pid_bh, Hq, T, D, stride_qb, stride_qh, stride_qt,
                                                          stride_qd, GROUP, UPCAST, BLOCK_M, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
    qk_scale = sm_scale * 1.4426950408889634
    md_mask = m_ok[:, None] & d_ok[None, :]
    po = tl.load(PO + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pt + offs_d[None, :] * stride_pd,
                 mask=md_mask, other=0.0).to(tl.float32)
    plse = tl.load(PLSE + b * stride_lb + h * stride_lh + offs_m * stride_lt, mask=m_ok, other=0.0)
    if HAS_KPM:
        has_key = (S - T + offs_m) >= tl.load(SPAN + 2 * b)
    else:
        has_key = offs_m >= 0
    acc = tl.where(has_key[:, None], po, 0.0)
    m_i = tl.where(has_key, plse * 1.4426950408889634, 0.0)
    l_i = tl.where(has_key, 1.0, 0.0)

    g, _ = _gate(GATE, h, GATE_TANH)
    a, av = _finish_rows(acc, m_i, l_i, q, b, h, offs_m, m_ok, g, AK, AV, OUT, LSE, XG, kh,
                         stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                         stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d, d_ok,
                         XG_MODE, UPCAST, IEEE)
    if XG_MODE == 1:
        _store_xg_block_sums(XG_PART, a, av, offs_m, offs_a, offs_d, d_ok, KPM, b, h, pid_m, stride_mb, Hq, T, S,
                             D, H, HAS_KPM)


@triton.jit
def _group_queries(Q, b, kh, stride_qb, stride_qh, stride_qt, stride_qd, offs_d, d_ok, T,
                   GROUP: tl.constexpr, ROWS: tl.constexpr, UPCAST: tl.constexpr):
    """The GROUP * T queries of kv head kh as the rows of one (ROWS, BLOCK_D) tile: row r is query
    r % T of head kh * GROUP + r // T; rows past GROUP * T are padding (row_ok False, q 0) and borrow
    the last head, so nothing they index is out of range. Returns (rows, row_ok, head, t, q)."""
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP * T
    head = kh * GROUP + tl.minimum(rows // T, GROUP - 1)
    t = rows % T
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return rows, row_ok, head, t, _operand(q, Q, UPCAST)


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
    b = (pid_bk // Hkv).to(tl.int64)
    kh = (pid_bk % Hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qk_scale = sm_scale * 1.4426950408889634
    rows, row_ok, head, t, q = _group_queries(Q, b, kh, stride_qb, stride_qh, stride_qt, stride_qd, offs_d, d_ok,
                                              T, GROUP, ROWS, UPCAST)

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
    the forward kernel does (lse, the adapter term, out, X_G); XG_PART (B, 1, Hq * D + 1) as there.
    """
    pid_bk = tl.program_id(0)
    b = (pid_bk // Hkv).to(tl.int64)
    kh = (pid_bk % Hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
    d_ok = offs_d < D
    qk_scale = sm_scale * 1.4426950408889634
    rows, row_ok, head, t, q = _group_queries(Q, b, kh, stride_qb, stride_qh, stride_qt, stride_qd, offs_d, d_ok,
                                              T, GROUP, ROWS, UPCAST)

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
    a, av = _finish_rows(acc, m_i, l_i, q, b, head, t, row_ok, g[:, None], AK, AV, OUT, LSE, XG, kh,
                         stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                         stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d, d_ok,
                         XG_MODE, UPCAST, IEEE)
    if XG_MODE == 1:
        real = _query_real(t, KPM, b, stride_mb, T, S, HAS_KPM) & row_ok
        row = XG_PART + b * (Hq * D + 1)
        for gi in tl.static_range(GROUP):
            in_head = real & ((rows // T) == gi)
            tl.store(row + (kh * GROUP + gi) * D + offs_d, _xg_sums(a, av, in_head, H, offs_a), mask=d_ok)
        if kh == 0:
            tl.store(row + Hq * D, tl.sum((real & (rows < T)).to(tl.float32), 0))


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


# --------------------------------------------------------------------------------------------------
# backward


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

    Shapes: Q (B, Hq, T, D); OUT, DOUT (B, T, Hq, D); DXG, the gradient of X_G: (B, T, Hq, D) in token
    mode, in sample mode the gradient of the sums over real tokens, dsum[b, h, d] at
    DXG + b * stride_dxb + h * D + d. Writes DELTA (B, Hq, T) float32, DQ_ACC (B, Hq, T, D) float32 (the
    adapter part of dq), and partials indexed by (b * Hq + h, query block): ADAPTER_PART (2, B * Hq,
    blocks, M, D) float32 (dak's, then dav's), DGATE_PART (B * Hq, blocks) float32.

        delta = rowsum(dout * (out - A av))  = rowsum(dout * P v): only the prompt softmax's share
        dA    = dout av^T  (+ dX_G av[:H]^T, token mode; + real[t] * (av[j] . dsum), sample mode; j < H)
        dgate = g'(gate) * sum(dA * Pa);  dPa = g * dA;  dsa = Pa * (dPa - rowsum(Pa * dPa))
        dq   += dsa ak * scale;  dak += dsa^T q * scale
        dav  += A^T dout  (+ A[:, :H]^T dX_G, token mode; + (sum of A[:, j] over real t) dsum, sample mode)
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, kh, offs_m, offs_d, d_ok, m_ok, q = _query_tile(Q, pid_m, pid_bh, Hq, T, D, stride_qb, stride_qh, stride_qt,
                                                          stride_qd, GROUP, UPCAST, BLOCK_M, BLOCK_D)
    offs_a = tl.arange(0, BLOCK_A)
    qk_scale = sm_scale * 1.4426950408889634
    md_mask = m_ok[:, None] & d_ok[None, :]
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

    av_t = tl.trans(av)
    da = _dot(do, av_t, IEEE)
    dav = _dot(tl.trans(a_op), do, IEEE)
    causal_col = offs_a[None, :] < H
    if HAS_DXG:
        if XG_MODE == 2:
            dxg = tl.load(DXG + o_offs, mask=md_mask, other=0.0)
            dxg = _operand(dxg, DXG, UPCAST)
            da += tl.where(causal_col, _dot(dxg, av_t, IEEE), 0.0)
            a_causal = _operand(tl.where(causal_col, a, 0.0), AV, UPCAST)
            dav += _dot(tl.trans(a_causal), dxg, IEEE)
        if XG_MODE == 1:
            real = _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM)
            dsum = tl.load(DXG + b * stride_dxb + h * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            dcol = tl.sum(av.to(tl.float32) * dsum[None, :], 1)                    # (BLOCK_A,): av[j] . dsum
            da += tl.where(real[:, None] & causal_col, dcol[None, :], 0.0)
            colsum = tl.sum(tl.where(real[:, None] & causal_col, a, 0.0), 0)
            dav += colsum[:, None] * dsum[None, :]

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
    # the longest causal rows first, so the last wave of programs is the shortest
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
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
    k_desc, v_desc = _kv_descriptors(k_base, v_base, stride_ks, stride_vs, S, D, BLOCK_N, BLOCK_D, TMA)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi, hi = _causal_bounds(pid_m, BLOCK_M, BLOCK_N, T, S)
    lo = tl.maximum(_first_key_block(SEQ_START, pid_m * BLOCK_M, BLOCK_N, HAS_SEQ),
                    _window_lo(pid_m * BLOCK_M, WINDOW, T, S, BLOCK_N, HAS_WINDOW))
    full_hi = tl.maximum(full_hi, lo)
    lo, full_hi = _from_first_real_key(SPAN, b, lo, full_hi, hi, BLOCK_N, HAS_KPM)
    dq = _dq_key_blocks(q, do, lse, delta, dq, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                        stride_kd, stride_vs, stride_vd, qk_scale, offs_m, offs_n0, offs_d, d_ok, lo, full_hi, T, S,
                        WINDOW, SOFTCAP, K, V, False, HAS_KPM, HAS_SEQ, UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)
    dq = _dq_key_blocks(q, do, lse, delta, dq, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                        stride_kd, stride_vs, stride_vd, qk_scale, offs_m, offs_n0, offs_d, d_ok, full_hi, hi, T, S,
                        WINDOW, SOFTCAP, K, V, True, HAS_KPM, HAS_SEQ, UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)

    acc_offs = pid_bh.to(tl.int64) * T * D + offs_m[:, None] * D + offs_d[None, :]
    dq = dq * sm_scale + tl.load(DQ_ACC + acc_offs, mask=md_mask, other=0.0)
    tl.store(DQ + acc_offs, dq.to(DQ.dtype.element_ty), mask=md_mask)


# --------------------------------------------------------------------------------------------------
# launch configuration


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def head_block(D: int) -> int:
    """D padded to a power of two >= 16 (tl.arange needs a power of two, tl.dot >= 16)."""
    return max(16, _next_power_of_2(D))


def adapter_block(M: int) -> int:
    return max(16, _next_power_of_2(M))


# (BLOCK_M, BLOCK_N, warps, stages) per target, kernel and padded head dim, fp16/bf16. The tile a
# program keeps resident (BLOCK_M rows; BLOCK_N in bwd_dkdv) has at least 16 rows per warp: the dot
# layouts Triton picks for chained dots split the warps along those rows, and with fewer rows than
# that (64-row tiles on 8 warps) warps, or on sm_90 whole warpgroups, compute the same scores twice.
# D <= 128 entries compile with 0 spill bytes, within shared memory and with no duplicated tensor-core
# work on Triton 3.6 (what torch 2.11 pins) and on the Triton the project installs (python -m
# fastdca.kernels.report measures all three, CI runs it on both); among those, the sm_90 entries are
# the fastest of `python benchmarks/tune_kernels.py` on an H100 (BENCHMARKS.md): within 4% of the
# fastest candidate for each kernel, which spilled on one of the two Tritons. At D = 256 no tile with
# 16 rows per warp fits the registers: those entries keep 8 warps on 32 rows, trading duplicated
# score work for no spills (listed by the report, not held to the no-duplication rule).
#   padded D:            64                   128                  256
_LAUNCH = {
    90: dict(
        fwd=        {64: (64, 64, 4, 3),   128: (64, 64, 4, 3),   256: (32, 32, 8, 2)},
        bwd_adapter={64: (64, 0, 4, 1),    128: (64, 0, 4, 1),    256: (32, 0, 8, 1)},
        bwd_dkdv=   {64: (32, 64, 4, 3),   128: (32, 64, 4, 1),   256: (32, 32, 8, 2)},
        bwd_dq=     {64: (64, 32, 4, 3),   128: (64, 64, 4, 2),   256: (32, 32, 8, 1)},
        merge=      {64: (64, 0, 4, 1),    128: (64, 0, 4, 1),    256: (32, 0, 8, 1)},
    ),
    # sm_80, and the default for every other CUDA target
    80: dict(
        fwd=        {64: (64, 64, 4, 3),   128: (128, 32, 8, 3),  256: (32, 32, 8, 2)},
        bwd_adapter={64: (32, 0, 2, 1),    128: (32, 0, 2, 1),    256: (32, 0, 8, 1)},
        bwd_dkdv=   {64: (32, 64, 4, 2),   128: (32, 64, 4, 1),   256: (32, 32, 8, 2)},
        bwd_dq=     {64: (64, 32, 4, 2),   128: (64, 32, 4, 2),   256: (32, 32, 8, 2)},
        merge=      {64: (32, 0, 2, 1),    128: (32, 0, 2, 1),    256: (32, 0, 8, 1)},
    ),
}
# bwd_dkdv with FASTDCA_ATOMIC_DQ (the dq tile and its atomics are live in the loop too): the largest
# tiles of the compile report with 0 spill bytes on Triton 3.9 (D = 256 keeps the dq kernel). Untimed:
# the first GPU run decides (`fastdca check`, `python benchmarks/tune_kernels.py`).
_ATOMIC_DKDV = {
    90: {64: (32, 64, 4, 3), 128: (32, 32, 4, 2), 256: (32, 32, 8, 2)},
    80: {64: (32, 32, 4, 2), 128: (32, 16, 4, 2), 256: (32, 32, 8, 2)},
}
# The forward with FASTDCA_TMA_FWD (q, K, V and out through tensor descriptors, the scale folded into the
# exponent; sm_90, padded D <= 128): 128 x 64 on 8 warps, 3 stages, compiles without spills on Triton 3.6 and
# 3.9 (benchmarks/tile_registers.py; 64 x 128 on 4 warps stays at 250+ registers on 3.6). Untimed: the
# first GPU run decides (`fastdca check` runs it beside the default).
_TMA_FWD = {64: (128, 64, 8, 3), 128: (128, 64, 8, 3)}
# bwd_dkdv with FASTDCA_TMA_BWD (the loop's q and dout blocks through tensor descriptors; sm_90, padded
# D <= 128), without and with FASTDCA_ATOMIC_DQ: the loads are pipelined (2 stages; the strided loop spills
# with more than 1 at D = 128), and the freed registers take a 128-key tile where both Tritons compile it
# without spills (benchmarks/tile_registers.py; with atomic dq at D = 128 only the 32 x 32 tile fits).
# Untimed: the first GPU run decides (`fastdca check` runs it beside the default).
_TMA_DKDV = {"bwd_dkdv_tma": {64: (64, 128, 8, 2), 128: (32, 128, 8, 2)},
             "bwd_dkdv_atomic_tma": {64: (32, 128, 8, 2), 128: (32, 32, 4, 2)}}
# T <= 16 (decoding), per padded D: the flash-decoding split pass (BLOCK_N, warps, stages), and the
# forward and adapter backward where they still run (a query group wider than DECODE_MAX_ROWS rows;
# the backward): 16-row query blocks, tl.dot's minimum. Decoding is bound by reading K and V, and
# four warps keep more loads in flight than one.
_DECODE = {64: (16, 64, 4, 3), 128: (16, 64, 4, 3), 256: (16, 64, 4, 1)}
# float32 inputs (exact fp32 dots, no tensor cores) are a correctness path, not a fast one: small
# tiles keep spilling small (0 at D=64; the forward and adapter-backward spill 240-530 bytes at D=128).
_FP32 = {64: (16, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 2)}


def target_arch(device) -> int:
    """The compute capability the kernels are tuned for on `device` (80 for anything but CUDA devices:
    the interpreter, and the compile report's recorded launches)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 80
    return _cuda_arch(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def launch_config(kernel: str, D: int, T: int, dtype, arch: int) -> dict:
    """Block sizes, warps and stages of one kernel's launch (the tables above); "decode" is the
    flash-decoding split pass (its combine pass runs one warp group per kv head)."""
    block_d = head_block(D)
    if kernel == "decode":
        _, block_n, warps, stages = (_FP32 if dtype == torch.float32 else _DECODE)[max(64, block_d)]
        return dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    if dtype == torch.float32:
        block_m, block_n, warps, stages = _FP32[max(64, block_d)]
    elif kernel in _TMA_DKDV and max(64, block_d) in _TMA_DKDV[kernel]:
        block_m, block_n, warps, stages = _TMA_DKDV[kernel][max(64, block_d)]
    elif kernel.startswith("bwd_dkdv_atomic"):
        block_m, block_n, warps, stages = _ATOMIC_DKDV[90 if arch == 90 else 80][max(64, block_d)]
    elif kernel == "fwd_tma" and T > 16 and max(64, block_d) in _TMA_FWD:
        block_m, block_n, warps, stages = _TMA_FWD[max(64, block_d)]
    else:
        kernel = {"fwd_tma": "fwd", "bwd_dkdv_tma": "bwd_dkdv"}.get(kernel, kernel)
        block_m, block_n, warps, stages = _LAUNCH[90 if arch == 90 else 80][kernel][max(64, block_d)]
        if T <= 16 and kernel in ("fwd", "bwd_adapter"):
            block_m, block_n, warps, stages = _DECODE[max(64, block_d)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


KERNELS = ("fwd", "fwd_tma", "decode", "merge", "bwd_adapter", "bwd_dkdv", "bwd_dkdv_atomic", "bwd_dkdv_tma",
           "bwd_dkdv_atomic_tma", "bwd_dq")


def _configs(D, T, dtype, device, overrides):
    """{kernel: launch_config} for every kernel, with `overrides` ({kernel: {entry: value}}, tests and
    tuning) applied. Without overrides the dicts are shared per (D, T <= 16, dtype, target): read only."""
    arch = target_arch(device)
    if overrides:
        return {name: dict(launch_config(name, D, T, dtype, arch), **overrides.get(name, {})) for name in KERNELS}
    return _table_configs(D, T <= 16, dtype, arch)


@functools.lru_cache(maxsize=256)
def _table_configs(D, decoding, dtype, arch):
    return {name: launch_config(name, D, 16 if decoding else 17, dtype, arch) for name in KERNELS}


def _launch_opts(cfg: dict) -> dict:
    if triton_interpreted():
        return {}
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _blocks(cfg: dict, *names) -> dict:
    return {n: cfg[n] for n in names}


def _on_device(q):
    """Launch on the tensors' device: Triton takes the device and stream from the current CUDA device."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreted()


def tf32_allowed() -> bool:
    """Whether torch allows TF32 for float32 CUDA matmuls, read without raising under either API:
    the legacy `allow_tf32` read raises once `fp32_precision` has been set, and the new setting
    "none" defers to torch.backends.fp32_precision."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def _ieee(dtype: torch.dtype) -> bool:
    """float32 inputs get exact float32 dots unless torch allows TF32 for matmuls (off by default)."""
    return dtype == torch.float32 and not tf32_allowed()


_PLACEHOLDERS = {}   # (device, dtype) -> a one-element tensor for a pointer argument a launch does not read


def _placeholder(q, dtype, launch):
    """A tensor for an unread pointer argument: one per device and dtype for direct launches; a fresh
    one when the launch is traced (torch.compile's fake tensors cannot mix with a real one)."""
    if launch is not _direct:
        return torch.empty(1, dtype=dtype, device=q.device)
    key = (q.device, dtype)
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.empty(1, dtype=dtype, device=q.device)
    return t


def _kpm_arg(key_padding_mask, q, launch):
    """(KPM, its row stride, HAS_KPM): the bool mask as it is (Triton loads bool as bytes) where its keys
    are contiguous."""
    if key_padding_mask is None:
        return _placeholder(q, torch.bool, launch), 0, False
    kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    return kpm, kpm.stride(0), True


_SPANS = []   # the last two (weak reference to a key padding mask, its version, its SPAN) of direct launches


def _key_span(kpm, stride_mb, has_kpm, q, launch):
    """SPAN (B, 2) int32, each row's first real key and last real key + 1 (one small kernel), for the kernels'
    bounds; a placeholder without a padding mask. Every layer of a forward, and its backward, gets the same
    mask object: direct launches reuse the span of an unchanged mask (identity and version) instead of
    launching again."""
    if not has_kpm:
        return _placeholder(q, torch.int32, launch)
    if launch is _direct:
        for ref, version, span in _SPANS:
            if ref() is kpm and version == kpm._version:
                return span
    span = _compute_key_span(kpm, stride_mb, q, launch)
    if launch is _direct:
        _SPANS[:] = _SPANS[-1:] + [(weakref.ref(kpm), kpm._version, span)]
    return span


def _compute_key_span(kpm, stride_mb, q, launch):
    B, S = kpm.shape
    span = torch.empty((B, 2), dtype=torch.int32, device=q.device)
    with _on_device(q):
        launch(_dca_key_span_kernel)[(B,)](kpm, span, stride_mb, S, BLOCK=min(1024, _next_power_of_2(max(S, 16))),
                                       **_launch_opts(dict(num_warps=4, num_stages=1)))
    return span


def _seq_arg(cu_seqlens, q, edge: str, launch):
    """(SEQ_START or SEQ_END (S,) int32, HAS_SEQ) for packed sequences; a placeholder without."""
    if cu_seqlens is None:
        return _placeholder(q, torch.int32, launch), False
    S = q.shape[2]
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(S, device=q.device, dtype=torch.int32),
                             right=True)
    return cu_seqlens[ids + (edge == "end")].contiguous(), True


def _direct(kernel):
    return kernel


def _check_dtype(q):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must have dtype float16, bfloat16 or float32 for the triton kernels (float64: use the "
                         f"torch or reference backend), got {q.dtype}")


# --------------------------------------------------------------------------------------------------
# launchers


def dca_forward(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask=None, cu_seqlens=None,
                window=None, softcap=None, gate_fn="tanh", xg="sample", configs=None, launch=None):
    """Run the forward kernel.

    q (B, Hq, T, D); k, v (B, Hkv, S, D); ak, av (Hkv, M, D); gate (Hq,); key_padding_mask (B, S) bool
    or None; cu_seqlens (N + 1,) int32 boundaries of sequences packed in one row (B = 1, T = S) or None
    (with it, xg="sample" sums per row, not per sequence: fastdca.ops asks for xg="token"); window: the
    query at position p sees the keys after p - window (None: no window); softcap: the prompt scores
    become softcap * tanh(s / softcap) (None: no cap). Returns (out (B, T, Hq, D) input dtype, lse
    (B, Hq, T) float32, extra) with extra, for xg="sample", (B, Hq * D + 1) float32: the sum of X_G over
    each row's real query tokens, flattened over (head, dim), then the row's real-token count; for
    xg="token" X_G (B, T, Hq, D) in the input dtype; for xg=None, None. `configs` overrides
    launch_config entries per kernel. `launch` wraps each kernel before its launch
    (torch.library.wrap_triton, for fastdca.custom_ops); None launches the kernels directly.
    """
    launch = launch or _direct
    _check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    cfgs = _configs(D, T, q.dtype, q.device, configs)
    group = Hq // Hkv
    if T <= 16 and group * T <= DECODE_MAX_ROWS and cu_seqlens is None:
        return _decode_forward(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, window, softcap, gate_fn,
                               xg, cfgs["decode"], launch)
    tma = _tma_forward(q, k, v, scale)
    cfg = cfgs["fwd_tma" if tma else "fwd"]
    n_mblocks = _cdiv(T, cfg["BLOCK_M"])
    mode = XG_CODES[xg]
    out, lse, xg_out, xg_part = _forward_outputs(q, mode, n_mblocks)
    kpm, stride_mb, has_kpm = _kpm_arg(key_padding_mask, q, launch)
    span = _key_span(kpm, stride_mb, has_kpm, q, launch)
    seq_start, has_seq = _seq_arg(cu_seqlens, q, "start", launch)
    seq_end, _ = _seq_arg(cu_seqlens, q, "end", launch)
    with _on_device(q):
        launch(_dca_fwd_kernel)[(n_mblocks, B * Hq)](
            q, k, v, ak, av, gate.contiguous(), kpm, span, seq_start, seq_end, out, lse, xg_out, xg_part,
            float(scale),
            *q.stride(), *k.stride(), *v.stride(), *ak.stride(), *av.stride(), *out.stride(),
            stride_mb,
            Hq, T, S, M, D, causal_len, _window_arg(window), _softcap_arg(softcap),
            GROUP=group, HAS_KPM=has_kpm, HAS_SEQ=has_seq, GATE_TANH=gate_fn == "tanh", XG_MODE=mode,
            UPCAST=_upcast(q.dtype), IEEE=_ieee(q.dtype), HAS_WINDOW=window is not None,
            HAS_SOFTCAP=softcap is not None, TMA=tma, BLOCK_A=adapter_block(M),
            **_blocks(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **_launch_opts(cfg),
        )
    return out, lse, _extra(mode, xg_out, xg_part)


def _tma_forward(q, k, v, scale) -> bool:
    """Whether this forward reads q, K and V (and writes out) through tensor descriptors: FASTDCA_TMA_FWD=1, a
    positive scale (which the loop folds into the exponent), what _tma_reads asks of q, K and V, and rows of
    16-byte multiples for out (B, T, Hq, D), which dca_forward makes contiguous."""
    row_bytes = q.shape[-1] * q.element_size()
    return switches.TMA_FWD.on() and scale > 0 and row_bytes % 16 == 0 and _tma_reads(q, (q, k, v))


def _tma_backward(q, k, v, dout) -> bool:
    """Whether this backward's loops read through tensor descriptors (the dk/dv kernel's q and dout, the dq
    kernel's K and V): FASTDCA_TMA_BWD=1 and what _tma_reads asks of the four."""
    return switches.TMA_BWD.on() and _tma_reads(q, (q, k, v, dout))


def _atomic_dq(D) -> bool:
    """Whether this backward accumulates dq with atomics inside the dk/dv kernel (one kernel fewer, 5 matmuls and
    1 exp per tile instead of 7 and 2) rather than in the deterministic dq kernel: FASTDCA_ATOMIC_DQ=1, never
    while torch.use_deterministic_algorithms is on (atomics add in a varying order), head dims up to 128 (D = 256
    keeps the dq kernel)."""
    return switches.ATOMIC_DQ.on() and not torch.are_deterministic_algorithms_enabled() and head_block(D) <= 128


def _tma_reads(q, tensors) -> bool:
    """Whether the kernels can read `tensors` through tensor descriptors: a Hopper or newer GPU (or the
    interpreter), fp16/bf16, head dims up to 128, and each tensor laid out as TMA needs (unit stride along
    D, 16-byte aligned base and strides). Sets Triton's allocator on CUDA."""
    if q.dtype == torch.float32 or head_block(q.shape[-1]) > 128:
        return False
    if not (triton_interpreted() or target_arch(q.device) >= 90):
        return False
    if not all(_tma_layout(t) for t in tensors):
        return False
    if q.is_cuda:
        _set_tma_allocator()
    return True


def _tma_layout(t) -> bool:
    size = t.element_size()
    return t.stride(-1) == 1 and all((stride * size) % 16 == 0 for stride in t.stride()[:-1]) \
        and (t.storage_offset() * size) % 16 == 0


@functools.cache
def _set_tma_allocator():
    """Descriptors made inside a kernel (tl.make_tensor_descriptor) need a little global scratch memory,
    which Triton asks an allocator for: torch's caching allocator."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def dca_merge_forward(q, prompt_out, prompt_lse, ak, av, gate, *, causal_len, scale, key_padding_mask=None,
                      gate_fn="tanh", xg="sample", configs=None, launch=None):
    """The forward given its prompt half: prompt_out (B, Hq, T, D), softmax(q k^T * scale + mask) v over
    T = S causal keys (with key_padding_mask (B, S) bool or None), and prompt_lse (B, Hq, T) float32, its
    row log-sum-exp in natural log, any strides (from torch's fused attention). Adds the adapter term and
    returns what dca_forward returns, whose backward (dca_backward) it feeds unchanged: out (B, T, Hq, D),
    lse (B, Hq, T) float32 in log2 units (+inf for rows with no real key at or before them), extra."""
    launch = launch or _direct
    _check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, M = ak.shape[0], ak.shape[1]
    cfg = _configs(D, T, q.dtype, q.device, configs)["merge"]
    n_mblocks = _cdiv(T, cfg["BLOCK_M"])
    mode = XG_CODES[xg]
    out, lse, xg_out, xg_part = _forward_outputs(q, mode, n_mblocks)
    kpm, stride_mb, has_kpm = _kpm_arg(key_padding_mask, q, launch)
    # a query sees a real key iff it is at or past its row's first one
    span = _key_span(kpm, stride_mb, has_kpm, q, launch)
    with _on_device(q):
        launch(_dca_merge_kernel)[(n_mblocks, B * Hq)](
            q, prompt_out, prompt_lse, ak, av, gate.contiguous(), kpm, span, out, lse, xg_out, xg_part,
            float(scale),
            *q.stride(), *prompt_out.stride(), *prompt_lse.stride(), *ak.stride(), *av.stride(), *out.stride(),
            stride_mb,
            Hq, T, T, M, D, causal_len,
            GROUP=Hq // Hkv, HAS_KPM=has_kpm, GATE_TANH=gate_fn == "tanh", XG_MODE=mode, UPCAST=_upcast(q.dtype),
            IEEE=_ieee(q.dtype), BLOCK_A=adapter_block(M), **_blocks(cfg, "BLOCK_M", "BLOCK_D"), **_launch_opts(cfg),
        )
    return out, lse, _extra(mode, xg_out, xg_part)


def _forward_outputs(q, mode, n_mblocks):
    """The forward kernels' outputs for q (B, Hq, T, D): out (B, T, Hq, D) in q's dtype, lse (B, Hq, T)
    float32, X_G (like out; token mode, else out stands in) and the per-block X_G sums (B, n_mblocks,
    Hq * D + 1) float32 (sample mode, else lse stands in)."""
    B, Hq, T, D = q.shape
    out = q.new_empty((B, T, Hq, D))
    lse = q.new_empty((B, Hq, T), dtype=torch.float32)
    xg_out = torch.empty_like(out) if mode == XG_TOKEN else out
    xg_part = q.new_empty((B, n_mblocks, Hq * D + 1), dtype=torch.float32) if mode == XG_SAMPLE else lse
    return out, lse, xg_out, xg_part


def _extra(mode, xg_out, xg_part):
    """The forward's `extra` from the kernels' outputs: the per-block X_G sums and counts summed over
    the blocks (a fixed-shape sum: deterministic), X_G itself, or None."""
    if mode == XG_SAMPLE:
        return xg_part.sum(dim=1)
    return xg_out if mode == XG_TOKEN else None


DECODE_MAX_ROWS = 64   # the query rows of one kv group (Hq / Hkv * T) the flash-decoding path takes


def _window_arg(window) -> int:
    """The kernels' WINDOW argument: the window, or 0 where HAS_WINDOW is off and it is not read."""
    return 0 if window is None else int(window)


def _softcap_arg(softcap) -> float:
    """The kernels' SOFTCAP argument: the cap in the log2 units the kernels score in, or 1.0 unread."""
    return 1.0 if softcap is None else float(softcap) * 1.4426950408889634


def _decode_forward(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, window, softcap, gate_fn, xg, cfg,
                    launch):
    """Flash-decoding for T <= 16: the keys split into chunks over enough programs to fill the GPU,
    each kv head's query group as the rows of one tile, then one pass merging the chunks. Returns what
    dca_forward returns."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    group = Hq // Hkv
    rows = max(16, _next_power_of_2(group * T))
    block_n = cfg["BLOCK_N"]
    splits = cfg.get("SPLITS") or max(1, min(_cdiv(S, block_n), _cdiv(2 * _sm_count(q.device), B * Hkv)))
    chunk = _cdiv(_cdiv(S, splits), block_n) * block_n
    splits = _cdiv(S, chunk)
    acc_part = q.new_empty((B * Hkv, splits, rows, cfg["BLOCK_D"]), dtype=torch.float32)
    m_part = q.new_empty((B * Hkv, splits, rows), dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    mode = XG_CODES[xg]
    out, lse, xg_out, xg_part = _forward_outputs(q, mode, 1)
    kpm, stride_mb, has_kpm = _kpm_arg(key_padding_mask, q, launch)
    flags = dict(GROUP=group, HAS_KPM=has_kpm, UPCAST=_upcast(q.dtype), IEEE=_ieee(q.dtype), ROWS=rows,
                 BLOCK_D=cfg["BLOCK_D"])
    with _on_device(q):
        launch(_dca_decode_split_kernel)[(splits, B * Hkv)](
            q, k, v, kpm, acc_part, m_part, l_part,
            float(scale),
            *q.stride(), *k.stride(), *v.stride(),
            stride_mb,
            Hkv, T, S, D, chunk, _window_arg(window), _softcap_arg(softcap),
            BLOCK_N=block_n, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, **flags,
            **_launch_opts(cfg),
        )
        launch(_dca_decode_combine_kernel)[(B * Hkv,)](
            q, ak, av, gate.contiguous(), kpm, acc_part, m_part, l_part, out, lse, xg_out, xg_part,
            float(scale),
            *q.stride(), *ak.stride(), *av.stride(), *out.stride(),
            stride_mb,
            Hq, Hkv, T, S, M, D, causal_len, splits,
            GATE_TANH=gate_fn == "tanh", XG_MODE=mode, BLOCK_A=adapter_block(M), **flags,
            **_launch_opts(dict(num_warps=4 if cfg["BLOCK_D"] <= 128 else 8, num_stages=1)),
        )
    return out, lse, _extra(mode, xg_out, xg_part)


def _sm_count(device) -> int:
    """Multiprocessors of a CUDA device; for the interpreter, a small GPU's worth."""
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dca_backward(dout, dxg, q, k, v, ak, av, gate, out, lse, *, causal_len, scale, key_padding_mask=None,
                 cu_seqlens=None, window=None, softcap=None, gate_fn="tanh", xg="sample", configs=None,
                 launch=None):
    """Run the three backward kernels; returns (dq, dk, dv, dak, dav, dgate) in the input dtype.

    dout (B, T, Hq, D) or None (no gradient reaches out: dk and dv are then None); dxg: the gradient of
    X_G or None: in token mode (B, T, Hq, D); in sample mode that of the X_G sums, (B, Hq, D), or of
    forward's whole `extra` (B, Hq * D + 1), whose count column is not read. The per-block partials of
    dak, dav and dgate are summed over batch, query blocks and the query heads of each kv group with
    torch sums of fixed shape: deterministic. `launch` as for dca_forward.
    """
    launch = launch or _direct
    _check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    H = causal_len
    group = Hq // Hkv
    cfgs = _configs(D, T, q.dtype, q.device, configs)
    atomic = _atomic_dq(D)
    dout = dout.contiguous() if dout is not None and dout.stride() != out.stride() else dout
    tma = dout is not None and _tma_backward(q, k, v, dout)
    acfg, qcfg = cfgs["bwd_adapter"], cfgs["bwd_dq"]
    kcfg = cfgs["bwd_dkdv" + "_atomic" * atomic + "_tma" * tma]
    if softcap is not None and not configs:
        # the cap's derivative is one more score tile live through two dots: half the key tile of the
        # dq loop (sm_90) or of the dk/dv loop (sm_80) keeps them from spilling (compile report, +softcap)
        if target_arch(q.device) >= 90:
            qcfg = dict(qcfg, BLOCK_N=max(16, qcfg["BLOCK_N"] // 2))
        else:
            kcfg = dict(kcfg, BLOCK_N=max(16, kcfg["BLOCK_N"] // 2))
    n_mblocks = _cdiv(T, acfg["BLOCK_M"])
    mode = XG_CODES[xg]
    upcast, ieee = _upcast(q.dtype), _ieee(q.dtype)
    kpm, stride_mb, has_kpm = _kpm_arg(key_padding_mask, q, launch)

    prompt_grads = dout is not None
    if dout is None:
        # only the X_G statistics carry a gradient: k and v get none, q only the adapter term
        dout = torch.zeros_like(out)
    has_dxg = dxg is not None and mode != XG_NONE and not (mode == XG_SAMPLE and H == 0)
    dxg_arg, stride_dxb = out, 0
    if has_dxg and mode == XG_TOKEN:
        dxg_arg = dxg.contiguous() if dxg.stride() != out.stride() else dxg
    elif has_dxg:
        packed = dxg.stride(-1) == 1 and (dxg.dim() == 2 or dxg.stride(1) == D)
        dxg_arg = dxg if packed else dxg.contiguous()
        stride_dxb = dxg_arg.stride(0)

    delta = q.new_empty((B, Hq, T), dtype=torch.float32)
    dq_acc = q.new_empty((B, Hq, T, D), dtype=torch.float32)
    # partials of dak and dav (one buffer) and of dgate per (b * Hq + h, query block), summed below with
    # fixed-shape torch sums over batch, the query heads of each kv group and the query blocks:
    # deterministic, no atomics
    adapter_part = q.new_empty((2, B * Hq, n_mblocks, M, D), dtype=torch.float32)
    dgate_part = q.new_empty((B * Hq, n_mblocks), dtype=torch.float32)
    gate = gate.contiguous()
    with _on_device(q):
        launch(_dca_bwd_adapter_kernel)[(n_mblocks, B * Hq)](
            q, ak, av, gate, kpm, out, dout, dxg_arg,
            delta, dq_acc, adapter_part, dgate_part,
            float(scale),
            *q.stride(), *ak.stride(), *av.stride(), *out.stride(),
            stride_mb, stride_dxb,
            Hq, T, S, M, D, H,
            GROUP=group, HAS_KPM=has_kpm, GATE_TANH=gate_fn == "tanh", XG_MODE=mode, HAS_DXG=has_dxg,
            UPCAST=upcast, IEEE=ieee, BLOCK_A=adapter_block(M), **_blocks(acfg, "BLOCK_M", "BLOCK_D"),
            **_launch_opts(acfg),
        )

    dak_dav = adapter_part.view(2, B, Hkv, group, n_mblocks, M, D).sum(dim=(1, 3, 4))
    dgate = dgate_part.view(B, Hq, n_mblocks).sum(dim=(0, 2))
    adapter_grads = (dak_dav[0].to(ak.dtype), dak_dav[1].to(av.dtype), dgate.to(gate.dtype))
    if not prompt_grads:
        return (dq_acc.to(q.dtype), None, None, *adapter_grads)

    span = _key_span(kpm, stride_mb, has_kpm, q, launch)
    seq_start, has_seq = _seq_arg(cu_seqlens, q, "start", launch)
    seq_end, _ = _seq_arg(cu_seqlens, q, "end", launch)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    with _on_device(q):
        launch(_dca_bwd_dkdv_kernel)[(_cdiv(S, kcfg["BLOCK_N"]), B * Hkv)](
            q, k, v, kpm, span, seq_end, dout, lse, delta, dk, dv, dq_acc,
            float(scale),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            stride_mb,
            Hq, Hkv, T, S, D, _window_arg(window), _softcap_arg(softcap),
            GROUP=group, HAS_KPM=has_kpm, HAS_SEQ=has_seq, UPCAST=upcast, IEEE=ieee, HAS_WINDOW=window is not None,
            HAS_SOFTCAP=softcap is not None, ATOMIC_DQ=atomic, TMA=tma,
            **_blocks(kcfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **_launch_opts(kcfg),
        )
    if atomic:
        return (dq_acc.to(q.dtype), dk, dv, *adapter_grads)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    with _on_device(q):
        launch(_dca_bwd_dq_kernel)[(_cdiv(T, qcfg["BLOCK_M"]), B * Hq)](
            q, k, v, kpm, span, seq_start, seq_end, dout, lse, delta, dq_acc, dq,
            float(scale),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            stride_mb,
            Hq, T, S, D, _window_arg(window), _softcap_arg(softcap),
            GROUP=group, HAS_KPM=has_kpm, HAS_SEQ=has_seq, UPCAST=upcast, IEEE=ieee, HAS_WINDOW=window is not None,
            HAS_SOFTCAP=softcap is not None, TMA=tma,
            **_blocks(qcfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **_launch_opts(qcfg),
        )
    return (dq, dk, dv, *adapter_grads)
