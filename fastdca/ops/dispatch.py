"""`dca_attention`, the op's one entry point: its arguments checked, then the backend the call runs on."""

from __future__ import annotations

import math

import torch

from fastdca.ops.checks import check_args
from fastdca.ops.common import effective_window
from fastdca.ops.torch_backend import torch_dca_attention
from fastdca.ops.triton_backend import triton_dca_attention
from fastdca.switches import BACKEND, triton_interpreted

BACKENDS = ("auto", "triton", "torch", "reference")


def dca_attention(q, k, v, ak, av, gate, *, causal_len, scale=None, key_padding_mask=None,
                  cu_seqlens=None, window=None, softcap=None, gate_fn="tanh", xg="sample", backend=None):
    """Attention over the prompt keys plus a gated, separately normalised attention over M adapter keys.

    out = softmax(q k^T * scale + causal/padding mask) v + g * softmax(q ak^T * scale) av,
    g = tanh(gate) (or gate with gate_fn="identity"), X_G = the adapter term restricted to the first
    `causal_len` adapter keys (docs/DESIGN.md section 1), returned as its causal weights.

    Args:
        q: (B, Hq, T, D) queries after RoPE.
        k, v: (B, Hkv, S, D) keys and values after RoPE and the cache update; Hq % Hkv == 0.
        ak, av: (Hkv, M, D) adapter keys and values (no RoPE).
        gate: (Hq,) per-head gate.
        causal_len: H, 0 <= H <= M.
        scale: softmax scale, 1/sqrt(D) by default.
        key_padding_mask: (B, S) bool, True where the key is a real token, or None.
        cu_seqlens: packed sequences instead of padding: (N + 1,) int32 boundaries of the N sequences
            laid end to end in one row (B = 1, T = S; cu_seqlens[0] = 0, cu_seqlens[-1] = S, increasing).
            A query sees the earlier keys of its own sequence and every adapter key; each sequence is
            one sample of the X_G statistics.
        window: sliding-window attention over the prompt keys: the query at position p sees only the keys
            at positions p - window < j <= p (transformers' sliding_window); None = no window. The
            adapter keys are never windowed.
        softcap: soft-capping of the prompt scores, s -> softcap * tanh(s / softcap) before the mask
            (Gemma 2's attn_logit_softcapping); None = none. The adapter scores are not capped.
        gate_fn: "tanh" or "identity".
        xg: "sample", "token" or None (see Returns).
        backend: "auto", "triton", "torch" or "reference"; default FASTDCA_BACKEND or "auto".

    Returns:
        (out, xg_stats): out (B, T, Hq, D) in the inputs' dtype. xg_stats, the X_G statistics, are the causal
        weights w = g * softmax(q ak^T * scale)[..., :H] (X_G = w av[:H], `fastdca.reference.x_g`), in the compute
        dtype (float32, float64 for float64 inputs): for xg="sample", (the sum of w over each sample's real
        query tokens (B, Hq, H); real-token count (B,)), with packed sequences one sample per sequence:
        ((N, Hq, H), (N,)); for xg="token", w (B, T, Hq, H); for xg=None, None. Differentiable in q, k, v, ak,
        av, gate (w does not depend on k, v or av).
    """
    check_args(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap, gate_fn, xg)
    window = effective_window(window, k.shape[2])
    name = resolve_backend(backend, q)
    args = (q, k, v, ak, av, gate)
    kwargs = dict(causal_len=causal_len, scale=1 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                  key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, gate_fn=gate_fn, xg=xg)
    if name == "reference":
        from fastdca import reference     # the equations themselves, imported only where a call asks for them

        return reference.dca_attention(*args, window=window, softcap=softcap, **kwargs)
    if name == "torch":
        return torch_dca_attention(*args, window=window, softcap=softcap, **kwargs)
    return triton_dca_attention(*args, window=window, softcap=softcap, **kwargs)


def resolve_backend(backend, q) -> str:
    """The backend a call runs on: the argument, else FASTDCA_BACKEND, else auto."""
    name = backend if backend is not None else BACKEND.read()
    if name not in BACKENDS:
        source = "backend" if backend is not None else "FASTDCA_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if q.is_cuda and _kernels_fast_for(q.dtype) and triton_available() else "torch"
    if name == "triton" and not (q.is_cuda or triton_interpreted()):
        raise ValueError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            f"to run the kernels on the CPU; got tensors on {q.device}"
        )
    return name


def _kernels_fast_for(dtype) -> bool:
    """fp16/bf16 run on the kernels' tensor-core path; float32 too where torch allows TF32. Exact
    float32 (the default) would take the kernels' FMA correctness path, which SDPA's float32 path
    outruns, and float64 is the reference's precision: both go to the torch backend."""
    if dtype in (torch.float16, torch.bfloat16):
        return True
    if dtype == torch.float32:
        from fastdca.kernels.plumbing import tf32_allowed

        return tf32_allowed()
    return False


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
