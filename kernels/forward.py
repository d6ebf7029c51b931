"""The forward kernel and its launcher, and the key-span kernel every launcher with a padding mask runs first."""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from fastdca import switches
from fastdca.kernels.blocks import (_finish_rows, _fwd_key_blocks, _gate, _key_range, _kv_descriptors, _open_tile,
                                    _operand, _query_real, _store_xg_block_sums)
from fastdca.kernels.decode import DECODE_MAX_ROWS, decode_forward
from fastdca.kernels.plumbing import (XG_CODES, block_args, check_dtype, forward_extra, forward_outputs, ieee, kpm_arg,
                                      launch_options, placeholder, run, seq_arg, softcap_arg, tma_reads, upcast,
                                      window_arg)
from fastdca.kernels.tuning import adapter_block, launch_configs


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
    OUT (B, T, Hq, D) in the input dtype; LSE (B, Hq, T) float32; XG (B, T, Hq, H) float32 contiguous
    (token mode only): the causal weights w = A[:, :H], A = g * softmax(q ak^T * scale); XG_PART (B,
    cdiv(T, BLOCK_M), Hq * H + 1) float32 (sample mode only): at [b, block, h * H + j] the sum of w[:, h, j]
    over the block's real query rows, at [b, block, Hq * H] (written by head 0) the number of those rows.

    out = softmax(q k^T * scale) v + g * softmax(q ak^T * scale) av, online softmax over key blocks;
    with HAS_WINDOW the query at position p sees only keys after p - WINDOW, and the key blocks before
    the block's first row's window are skipped. With TMA, K and V (unit stride along D, the other
    strides and the bases 16-byte aligned) are read through tensor descriptors, and so are Q and OUT.
    """
    pid_m, pid_bh, b, h, kh, offs_m, offs_d, d_ok, m_ok, _, qk_scale, q = _open_tile(
        Q, Hq, T, D, sm_scale, stride_qb, stride_qh, stride_qt, stride_qd, GROUP, True, UPCAST, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, BLOCK_A)
    if TMA:
        # q read through a descriptor instead (the pointer load above is then dead code, which the compiler drops)
        n_b = tl.num_programs(1) // Hq
        q_desc = tl.make_tensor_descriptor(Q, shape=[n_b, Hq, T, D], strides=[stride_qb, stride_qh, stride_qt, 1],
                                           block_shape=[1, 1, BLOCK_M, BLOCK_D])
        q = _operand(q_desc.load([b.to(tl.int32), h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D), Q, UPCAST)
        out_desc = tl.make_tensor_descriptor(OUT, shape=[n_b, T, Hq, D], strides=[stride_ob, stride_ot, stride_oh, 1],
                                             block_shape=[1, BLOCK_M, 1, BLOCK_D])
    else:
        out_desc = OUT
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    k_desc, v_desc = _kv_descriptors(k_base, v_base, stride_ks, stride_vs, S, D, BLOCK_N, BLOCK_D, TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the key blocks wholly visible first, without the causal mask; then those straddling the diagonal
    lo, full_hi, hi = _key_range(pid_m, SEQ_START, SPAN, b, WINDOW, T, S, BLOCK_M, BLOCK_N, HAS_SEQ, HAS_WINDOW,
                                 HAS_KPM)
    m_i, l_i, acc = _fwd_key_blocks(q, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                                    stride_kd, stride_vs, stride_vd, m_i, l_i, acc, qk_scale, offs_m, offs_n0,
                                    offs_d, d_ok, lo, full_hi, T, S, WINDOW, SOFTCAP, K, V, False, HAS_KPM, HAS_SEQ,
                                    UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)
    m_i, l_i, acc = _fwd_key_blocks(q, k_base, v_base, k_desc, v_desc, KPM, SEQ_END, b, stride_mb, stride_ks,
                                    stride_kd, stride_vs, stride_vd, m_i, l_i, acc, qk_scale, offs_m, offs_n0,
                                    offs_d, d_ok, full_hi, hi, T, S, WINDOW, SOFTCAP, K, V, True, HAS_KPM, HAS_SEQ,
                                    UPCAST, IEEE, HAS_WINDOW, HAS_SOFTCAP, TMA)

    g, _ = _gate(GATE, h, GATE_TANH)
    real = _query_real(offs_m, KPM, b, stride_mb, T, S, HAS_KPM)     # read in sample mode only
    _, w_sums = _finish_rows(acc, m_i, l_i, q, b, h, offs_m, m_ok, real, g, AK, AV, out_desc, LSE, XG, kh,
                             stride_akh, stride_akm, stride_akd, stride_avh, stride_avm, stride_avd,
                             stride_ob, stride_ot, stride_oh, stride_od, Hq, T, M, D, H, qk_scale, offs_a, offs_d,
                             d_ok, XG_MODE, UPCAST, IEEE, TMA)
    if XG_MODE == 1:
        _store_xg_block_sums(XG_PART, w_sums, real, offs_a, b, h, pid_m, Hq, H)


def dca_forward(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask=None, cu_seqlens=None,
                window=None, softcap=None, gate_fn="tanh", xg="sample", configs=None, launch=None):
    """Run the forward: the fused forward kernel, or for T <= 16 (decoding) the flash-decoding kernels.

    Args:
        q: (B, Hq, T, D) fp16, bf16 or float32, the queries (the last T of the S positions).
        k, v: (B, Hkv, S, D), Hq % Hkv == 0.
        ak, av: (Hkv, M, D) adapter keys and values.
        gate: (Hq,).
        causal_len: H, the adapter tokens whose weights are the X_G statistics (0 <= H <= M).
        scale: the softmax scale.
        key_padding_mask: (B, S) bool, True = real key, or None.
        cu_seqlens: (N + 1,) int32 boundaries of N sequences packed in one row (B = 1, T = S), or None; with it
            xg="sample" sums per row, not per sequence (fastdca.ops asks for xg="token").
        window: the query at position p sees the keys after p - window; None: no window.
        softcap: the prompt scores become softcap * tanh(s / softcap); None: no cap.
        gate_fn: "tanh" or "identity".
        xg: "sample", "token" or None (see Returns).
        configs: {kernel: {entry: value}} overriding launch_config entries per kernel (tests, tuning).
        launch: wraps each kernel before its launch (torch.library.wrap_triton, for fastdca.ops.custom_ops);
            None launches the kernels directly.

    Returns:
        (out, lse, extra): out (B, T, Hq, D) in q's dtype; lse (B, Hq, T) float32, the prompt softmax's row
        log2-sum-exp (+inf for a row with no visible key); extra, the X_G statistics, by xg: "token" -> the
        causal weights w = g * softmax(q ak^T * scale)[..., :H] (B, T, Hq, H) float32 (from which the loss forms
        X_G = w av[:H]); "sample" -> (B, Hq * H + 1) float32, the sums of w over each row's real query tokens
        flattened over (head, adapter token), then the row's real-token count; None -> None.
    """
    check_dtype(q)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    cfgs = launch_configs(D, T, q.dtype, q.device, configs)
    group = Hq // Hkv
    if T <= 16 and group * T <= DECODE_MAX_ROWS and cu_seqlens is None:
        return decode_forward(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, window, softcap, gate_fn,
                              xg, cfgs["decode"], launch)
    tma = _tma_forward(q, k, v, scale)
    cfg = cfgs["fwd_tma" if tma else "fwd"]
    n_mblocks = triton.cdiv(T, cfg["BLOCK_M"])
    mode = XG_CODES[xg]
    out, lse, xg_out, xg_part = forward_outputs(q, mode, n_mblocks, causal_len)
    kpm, stride_mb, has_kpm = kpm_arg(key_padding_mask, q, launch)
    span = key_span(kpm, stride_mb, has_kpm, q, launch)
    seq_start, has_seq = seq_arg(cu_seqlens, q, "start", launch)
    seq_end, _ = seq_arg(cu_seqlens, q, "end", launch)
    run(_dca_fwd_kernel, (n_mblocks, B * Hq), q, launch,
        q, k, v, ak, av, gate.contiguous(), kpm, span, seq_start, seq_end, out, lse, xg_out, xg_part,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(), *ak.stride(), *av.stride(), *out.stride(),
        stride_mb,
        Hq, T, S, M, D, causal_len, window_arg(window), softcap_arg(softcap),
        GROUP=group, HAS_KPM=has_kpm, HAS_SEQ=has_seq, GATE_TANH=gate_fn == "tanh", XG_MODE=mode,
        UPCAST=upcast(q.dtype), IEEE=ieee(q.dtype), HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, TMA=tma, BLOCK_A=adapter_block(M),
        **block_args(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"), **launch_options(cfg))
    return out, lse, forward_extra(mode, xg_out, xg_part)


def _tma_forward(q, k, v, scale) -> bool:
    """Whether this forward reads q, K and V (and writes out) through tensor descriptors: FASTDCA_TMA_FWD=1, a
    positive scale (which the loop folds into the exponent), what tma_reads asks of q, K and V, and rows of
    16-byte multiples for out (B, T, Hq, D), which dca_forward makes contiguous."""
    row_bytes = q.shape[-1] * q.element_size()
    return switches.TMA_FWD.on() and scale > 0 and row_bytes % 16 == 0 and tma_reads(q, (q, k, v))


_SPANS = []   # the last two (weak reference to a key padding mask, its version, its SPAN) of direct launches


def key_span(kpm, stride_mb, has_kpm, q, launch):
    """SPAN (B, 2) int32, each row's first real key and last real key + 1 (one small kernel), for the kernels'
    bounds; a placeholder without a padding mask. Every layer of a forward, and its backward, gets the same
    mask object: direct launches reuse the span of an unchanged mask (identity and version) instead of
    launching again."""
    if not has_kpm:
        return placeholder(q, torch.int32, launch)
    if launch is None:
        for ref, version, span in _SPANS:
            if ref() is kpm and version == kpm._version:
                return span
    span = _compute_key_span(kpm, stride_mb, q, launch)
    if launch is None:
        _SPANS[:] = _SPANS[-1:] + [(weakref.ref(kpm), kpm._version, span)]
    return span


def _compute_key_span(kpm, stride_mb, q, launch):
    B, S = kpm.shape
    span = torch.empty((B, 2), dtype=torch.int32, device=q.device)
    run(_dca_key_span_kernel, (B,), q, launch, kpm, span, stride_mb, S,
        BLOCK=min(1024, triton.next_power_of_2(max(S, 16))), **launch_options(dict(num_warps=4, num_stages=1)))
    return span
