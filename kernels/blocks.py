"""The @triton.jit building blocks the kernels share (notation: the package docstring).

Private to the kernels package: the kernel modules import them by name.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): the kernels score in log2 units, so the softmax is exp2


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
    return 1.0 - 2.0 / (tl.exp2(x * (2 * LOG2E)) + 1.0)


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
def _key_range(pid_m, SEQ_START, SPAN, b, WINDOW, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_SEQ: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr):
    """(lo, full_hi, hi): the key blocks query block pid_m visits. Key blocks starting in [lo, full_hi) lie
    wholly at or below the block's first query position and need no causal mask (full_hi a multiple of
    BLOCK_N); those in [full_hi, hi) straddle the diagonal; keys from hi on are above it for every row. Key
    blocks before the first row's packed sequence, before its sliding window or before its row's first real key
    are never visible: lo starts after them."""
    hi = tl.minimum(S, S - T + (pid_m + 1) * BLOCK_M)
    full_hi = tl.maximum(tl.minimum((S - T + pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N, hi), 0)
    lo = tl.maximum(_first_key_block(SEQ_START, pid_m * BLOCK_M, BLOCK_N, HAS_SEQ),
                    _window_lo(pid_m * BLOCK_M, WINDOW, T, S, BLOCK_N, HAS_WINDOW))
    full_hi = tl.maximum(full_hi, lo)
    lo, full_hi = _from_first_real_key(SPAN, b, lo, full_hi, hi, BLOCK_N, HAS_KPM)
    return lo, full_hi, hi


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
def _finish_rows(acc, m_i, l_i, q, b, head, t, row_ok, real, g, AK, AV, OUT, LSE, XG, kh,
                 stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                 stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d, d_ok,
                 XG_MODE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, OUT_TMA: tl.constexpr = False):
    """The forward's epilogue for rows (query head `head`, query `t`, all of kv head kh, gate value g:
    a scalar or a (rows, 1) column) whose online softmax over the prompt keys ended at (m_i, l_i, acc):
    normalise, store lse, add the adapter term A av, store out and, in token mode, the causal weights
    w = A[:, :H] into XG (B, T, Hq, H) float32 contiguous. With OUT_TMA, OUT is a tensor descriptor of
    out (B, T, Hq, D) and the rows are one head's consecutive queries from t[0]: out is stored through
    it (rows past T and columns past D are not written).

    Returns (A, (rows, BLOCK_A) float32; its column sums over the rows where `real` (rows,), (BLOCK_A,)
    float32, whose first H entries are the sums of w over those rows). The sums are formed before A av, so that
    A need not stay live past it where the caller keeps only them."""
    has_key = l_i > 0.0
    l_div = tl.where(has_key, l_i, 1.0)
    acc = acc / l_div[:, None]
    lse = tl.where(has_key, m_i + tl.log2(l_div), float("inf"))
    tl.store(LSE + (b * Hq + head) * T + t, lse, mask=row_ok)      # head: a scalar or per row

    # adapter keys after the prompt loop, so their tiles are not live during it
    pa, ak = _adapter_probs(q, AK, kh, stride_akh, stride_akm, stride_akd, offs_a, offs_d, M, D,
                            qk_scale, UPCAST, IEEE)
    a = pa * g
    w_sums = _col_sums(a, real)
    av = tl.load(AV + kh * stride_avh + offs_a[:, None] * stride_avm + offs_d[None, :] * stride_avd,
                 mask=(offs_a[:, None] < M) & d_ok[None, :], other=0.0)
    av = _operand(av, AV, UPCAST)
    acc += _dot(_operand(a, AV, UPCAST), av, IEEE)

    if OUT_TMA:
        BLOCK_M: tl.constexpr = acc.shape[0]
        BLOCK_D: tl.constexpr = acc.shape[1]
        OUT.store([b.to(tl.int32), tl.min(t, 0), head, 0],
                  acc.to(OUT.dtype).reshape(1, BLOCK_M, 1, BLOCK_D))
    else:
        o_rows = b * stride_ob + t * stride_ot + head * stride_oh
        tl.store(OUT + o_rows[:, None] + offs_d[None, :] * stride_od, acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    if XG_MODE == 2:
        w_rows = ((b * T + t) * Hq + head) * H
        tl.store(XG + w_rows[:, None] + offs_a[None, :], a, mask=row_ok[:, None] & (offs_a[None, :] < H))
    return a, w_sums


@triton.jit
def _col_sums(a, rows):
    """(BLOCK_A,) float32: the column sums of A (rows, BLOCK_A) over the `rows` (a (rows,) mask); the first H
    are the sums of the causal weights w = A[:, :H] over them."""
    return tl.sum(tl.where(rows[:, None], a, 0.0), 0)


@triton.jit
def _store_xg_block_sums(XG_PART, w_sums, real, offs_a, b, h, pid_m, Hq, H):
    """Sample mode: XG_PART[b, pid_m, h * H + j] = w_sums[j] (j < H), the sum of w[:, h, j] = A[:, j] over query
    block pid_m's real rows, and (head 0) XG_PART[b, pid_m, Hq * H] = the number of those rows (`real`)."""
    row = XG_PART + (b * tl.num_programs(0) + pid_m) * (Hq * H + 1)
    tl.store(row + h * H + offs_a, w_sums, mask=offs_a < H)
    if h == 0:
        tl.store(row + Hq * H, tl.sum(real.to(tl.float32), 0))


@triton.jit
def _open_tile(X, HEADS, LENGTH, D, sm_scale, stride_xb, stride_xh, stride_xr, stride_xd, GROUP: tl.constexpr,
               LONGEST_FIRST: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program over (a block of BLOCK rows of an axis of LENGTH, b * HEADS + head) starts from: (pid,
    pid_bh, b, head, kh, offs, offs_d, d_ok, ok, mask, qk_scale, x). pid is the block, the last first with
    LONGEST_FIRST (causal query blocks: the last wave of programs is then the shortest); kh = head // GROUP the kv
    head (GROUP = 1 where the heads are kv heads); offs the block's row offsets; ok (BLOCK,) and mask (BLOCK,
    BLOCK_D) the rows < LENGTH and columns < D; qk_scale the softmax scale in the log2 units the kernels score
    in; x the block's (BLOCK, BLOCK_D) tile of X (B, HEADS, LENGTH, D) at (b, head) as a dot operand (queries
    for the adapter, merge and dq kernels; keys for the dk/dv kernel)."""
    if LONGEST_FIRST:
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    head = pid_bh % HEADS
    kh = (head // GROUP).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ok = offs < LENGTH
    mask = ok[:, None] & d_ok[None, :]
    x = _load_tile(X, b * stride_xb + head * stride_xh, offs, offs_d, stride_xr, stride_xd, mask, UPCAST)
    return pid, pid_bh, b, head, kh, offs, offs_d, d_ok, ok, mask, sm_scale * LOG2E, x


@triton.jit
def _load_tile(X, base, offs, offs_d, stride_r, stride_d, mask, UPCAST: tl.constexpr):
    """The (rows, BLOCK_D) tile of X at offset base + offs * stride_r + offs_d * stride_d (0 where not `mask`) as
    a dot operand."""
    x = tl.load(X + base + offs[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    return _operand(x, X, UPCAST)
