"""The DCA attention op: argument checks, backend dispatch, and the torch and triton backends.

`dca_attention` is the one entry point. Backends:
- "triton": the fused kernels of `fastdca.kernels` (CUDA tensors, or any tensors under TRITON_INTERPRET=1);
- "torch": scaled_dot_product_attention for the prompt keys plus small matmuls for the adapter keys;
- "reference": `fastdca.reference`, the literal equations.
"auto" picks triton for fp16/bf16 CUDA tensors (and float32 where torch allows TF32) and torch otherwise;
FASTDCA_BACKEND overrides the choice.

While torch.compile traces a call, the triton backend's kernels and the torch backend's adapter half
run as the operators `fastdca.custom_ops` registers (torch.ops.fastdca.*), which the compilers can
place in one graph; eager calls take the autograd.Functions below, on the same launchers and maths,
since a trip through the dispatcher costs more than the adapter half itself on small inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdca import reference
from fastdca.config import GATE_FNS
from fastdca.reference import compute_dtype, gate_values, query_is_real, sequence_ids
from fastdca.switches import BACKEND, triton_interpreted

BACKENDS = ("auto", "triton", "torch", "reference")
XG_MODES = ("sample", "token", None)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256
MAX_ADAPTER_LEN = 64


def dca_attention(q, k, v, ak, av, gate, *, causal_len, scale=None, key_padding_mask=None,
                  cu_seqlens=None, window=None, softcap=None, gate_fn="tanh", xg="sample", backend=None):
    """Attention over the prompt keys plus a gated, separately normalised attention over M adapter keys.

    out = softmax(q k^T * scale + causal/padding mask) v + g * softmax(q ak^T * scale) av,
    g = tanh(gate) (or gate with gate_fn="identity"), X_G = the adapter term restricted to the first
    `causal_len` adapter keys (docs/DESIGN.md section 1).

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
        (out, xg_stats): out (B, T, Hq, D) in the inputs' dtype. xg_stats is, for xg="sample",
        (sum of X_G over each sample's real query tokens, float32 (B, Hq, D); real-token count (B,)),
        with packed sequences one sample per sequence: ((N, Hq, D), (N,));
        for xg="token", X_G (B, T, Hq, D); for xg=None, None. Differentiable in q, k, v, ak, av, gate.
    """
    _check_args(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap, gate_fn, xg)
    window = effective_window(window, k.shape[2])
    name = resolve_backend(backend, q)
    args = (q, k, v, ak, av, gate)
    kwargs = dict(causal_len=causal_len, scale=1 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                  key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, gate_fn=gate_fn, xg=xg)
    if name == "reference":
        return reference.dca_attention(*args, window=window, softcap=softcap, **kwargs)
    if name == "torch":
        return _torch_dca_attention(*args, window=window, softcap=softcap, **kwargs)
    return _triton_dca_attention(*args, window=window, softcap=softcap, **kwargs)


def effective_window(window, S: int):
    """The window, or None where it masks nothing: no query is S or more positions past a key."""
    return None if window is None or window >= S else int(window)


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


# --------------------------------------------------------------------------------------------------
# Argument checks


def _check_args(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap, gate_fn,
                xg):
    tensors = dict(q=q, k=k, v=v, ak=ak, av=av, gate=gate)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, ndim, layout in (("q", 4, "(B, Hq, T, D)"), ("k", 4, "(B, Hkv, S, D)"),
                               ("v", 4, "(B, Hkv, S, D)"), ("ak", 3, "(Hkv, M, D)"),
                               ("av", 3, "(Hkv, M, D)"), ("gate", 1, "(Hq,)")):
        if tensors[name].dim() != ndim:
            raise ValueError(f"{name} must have shape {layout}, got shape {tuple(tensors[name].shape)}")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = ak.shape[1]
    if B < 1 or Hq < 1 or T < 1 or D < 1:
        raise ValueError(f"q must have B, Hq, T and D >= 1, got shape {tuple(q.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q head dim D must be at most {MAX_HEAD_DIM}, got {D}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"k must have Hkv heads dividing Hq={Hq} (grouped-query attention), got Hkv={Hkv}")
    if S < T:
        raise ValueError(f"k must have S >= T={T} keys (the queries are the last T of them), got S={S}")
    expected = dict(k=(B, Hkv, S, D), v=(B, Hkv, S, D), ak=(Hkv, M, D), av=(Hkv, M, D), gate=(Hq,))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensors[name].shape)}")
    if not 1 <= M <= MAX_ADAPTER_LEN:
        raise ValueError(f"ak must have 1 <= M <= {MAX_ADAPTER_LEN} adapter tokens, got M={M}")
    if isinstance(causal_len, bool) or not isinstance(causal_len, int) or not 0 <= causal_len <= M:
        raise ValueError(f"causal_len must be an integer in [0, M={M}], got {causal_len!r}")
    if q.dtype not in DTYPES:
        raise ValueError(f"q must have dtype in {DTYPES}, got {q.dtype}")
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor of shape (B, S) (True = real token)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape {(B, S)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on the device of q ({q.device}), got {key_padding_mask.device}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, key_padding_mask, B, T, S, q.device)
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0
                                  and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap > 0
                                    and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if gate_fn not in GATE_FNS:
        raise ValueError(f"gate_fn must be one of {GATE_FNS}, got {gate_fn!r}")
    if xg not in XG_MODES:
        raise ValueError(f"xg must be one of {XG_MODES}, got {xg!r}")


def _check_cu_seqlens(cu_seqlens, key_padding_mask, B, T, S, device):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be an int32 tensor of shape (N + 1,), the boundaries of N packed sequences")
    if len(cu_seqlens) < 2:
        raise ValueError(f"cu_seqlens must hold at least one sequence (N + 1 >= 2 boundaries), got {len(cu_seqlens)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the device of q ({device}), got {cu_seqlens.device}")
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask and cu_seqlens are alternatives: packed sequences have no padding")
    if B != 1 or T != S:
        raise ValueError(f"cu_seqlens needs the sequences packed in one row of queries and keys (B = 1, T = S), "
                         f"got B={B}, T={T}, S={S}")
    valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == S) & (cu_seqlens[1:] > cu_seqlens[:-1]).all()
    message = f"cu_seqlens must start at 0, end at S={S} and increase strictly (every sequence non-empty)"
    if cu_seqlens.is_cuda or torch.compiler.is_compiling():
        # reading the values here would stall the GPU every call, and break a compiled graph
        torch._assert_async(valid, message)
    elif not bool(valid):
        raise ValueError(f"{message}, got {cu_seqlens.tolist()}")


def sequence_members(key_padding_mask=None, cu_seqlens=None, *, B, T, S, device) -> torch.Tensor:
    """(B, N, T) bool: query t of row b belongs to sample n. A sample is a row's real tokens (N = 1), or
    one of the N sequences packed in the single row."""
    if cu_seqlens is None:
        return query_is_real(key_padding_mask, B, T, S, device)[:, None, :]
    ids = sequence_ids(cu_seqlens, S)
    return (ids[None, :] == torch.arange(len(cu_seqlens) - 1, device=device)[:, None])[None]


# --------------------------------------------------------------------------------------------------
# torch backend


def _torch_dca_attention(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap,
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
    return out, _xg_sample_stats(causal_stat, av, members)


def _xg_sample_stats(column_sums, av, members):
    """(sum of X_G over each sample's tokens (samples, Hq, D), token count (samples,)) from the column
    sums over each sample's tokens of A[..., :H], (samples, Hkv, Hq/Hkv, H) in the compute dtype:
    sum_t X_G[t, h] = (sum_t A[h, t, :H]) @ av[h // group, :H], so X_G itself is never built."""
    samples, Hkv, group, causal_len = column_sums.shape
    causal_values = av[:, :causal_len].to(column_sums.dtype)                     # (Hkv, H, D)
    sums = torch.einsum("nkgj,kjd->nkgd", column_sums, causal_values).reshape(samples, Hkv * group, -1)
    return sums, members.sum(dim=-1).reshape(samples)


def adapter_attention_forward(q, ak, av, gate, members, causal_len, scale, gate_fn, xg):
    """A = g * softmax(q ak^T * scale) over the M adapter keys, its output A av and its X_G statistic:
    the torch backend's adapter half, forward.

    Inputs q (B, Hq, T, D), ak and av (Hkv, M, D), gate (Hq,), members (B, N, T) bool (which tokens
    of a row make up each of its N samples; read for xg="sample" only, else None). Returns (A av (B, Hq, T, D) in q's dtype, the adapter
    probabilities softmax(q ak^T * scale) (B, Hkv, M, Hq/Hkv * T) in the compute dtype (what the
    backward needs), stat), stat by xg: "sample" -> the column sums over each sample's tokens of
    A[..., :H], (B * N, Hkv, Hq/Hkv, H) in the compute dtype; "token" -> X_G = A[..., :H] av[:H],
    (B, T, Hq, D) in q's dtype; None -> None. Scores and softmax run in float32 (float64 for float64
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
    causal = weights[:, :, :causal_len]                                          # (B, Hkv, H, G*T)
    if xg == "sample":
        per_token = causal.view(B, Hkv, causal_len, Hq // Hkv, T)
        stat = torch.einsum("bkjgt,bnt->bnkgj", per_token, members.to(ct))
        stat = stat.reshape(B * members.shape[1], Hkv, Hq // Hkv, causal_len)  # (B * N, Hkv, G, H)
    elif xg == "token":
        stat = torch.matmul(causal.transpose(-1, -2), avf[:, :causal_len])
        stat = stat.view(B, Hq, T, D).transpose(1, 2).to(q.dtype)
    else:
        stat = None
    return adapter_out, probs, stat


def adapter_attention_backward(d_out, d_stat, q, ak, av, gate, members, probs, causal_len, scale, gate_fn, xg):
    """The backward of adapter_attention_forward: (dq, dak, dav, dgate) in the inputs' dtypes, from the
    gradients of A av (B, Hq, T, D) and of the statistic (None: no gradient reaches it)."""
    B, Hq, T, D = q.shape
    Hkv = ak.shape[0]
    ct = probs.dtype
    gates = _grouped_gates(gate, gate_fn, Hkv, T, ct)
    weights = probs * gates
    avf = av.to(ct)
    d_out = d_out.reshape(B, Hkv, -1, D).to(ct)                                 # (B, Hkv, G*T, D)
    d_weights = torch.matmul(d_out, avf.transpose(-1, -2)).transpose(-1, -2).contiguous()  # (B, Hkv, M, G*T)
    d_av = torch.matmul(weights, d_out).sum(0)                                  # (Hkv, M, D)
    if xg == "sample" and d_stat is not None:
        d_stat = d_stat.to(ct).view(B, members.shape[1], Hkv, Hq // Hkv, causal_len)
        d_causal = torch.einsum("bnkgj,bnt->bkjgt", d_stat, members.to(ct))
        d_weights[:, :, :causal_len] += d_causal.reshape(B, Hkv, causal_len, Hq // Hkv * T)
    elif xg == "token" and d_stat is not None:
        d_xg = d_stat.transpose(1, 2).reshape(B, Hkv, -1, D).to(ct)
        d_weights[:, :, :causal_len] += torch.matmul(d_xg, avf[:, :causal_len].transpose(-1, -2)).transpose(-1, -2)
        d_av[:, :causal_len] += torch.matmul(weights[:, :, :causal_len], d_xg).sum(0)
    d_g = (d_weights * probs).sum(-2).view(B, Hkv, -1, T).sum((0, 3)).reshape(Hq)
    d_gate = d_g * (1 - torch.tanh(gate.to(ct)).square()) if gate_fn == "tanh" else d_g
    d_probs = d_weights * gates
    d_scores = probs * (d_probs - (d_probs * probs).sum(-2, keepdim=True)) * scale
    d_q = torch.matmul(d_scores.transpose(-1, -2), ak.to(ct)).view(B, Hq, T, D)
    d_ak = torch.matmul(d_scores, q.reshape(B, Hkv, -1, D).to(ct)).sum(0)
    return d_q.to(q.dtype), d_ak.to(ak.dtype), d_av.to(av.dtype), d_gate.to(gate.dtype)


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
    def backward(ctx, d_out, d_stat):
        return (*adapter_attention_backward(d_out, d_stat, *ctx.saved_tensors, *ctx.args), None, None, None, None, None)


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
    visible = reference.causal_visible(T, S, q.device, window)[None, None]      # (1, 1, T, S)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    visible = visible & key_padding_mask[:, None, None, :]                       # (B, 1, T, S)
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
    probs = reference.prompt_probs(q.float(), k.float().repeat_interleave(group, 1), scale, key_padding_mask,
                                   cu_seqlens, window, softcap)
    return (probs @ v.float().repeat_interleave(group, 1)).to(q.dtype)


def packed_causal_attention(q, k, v, cu_seqlens, scale=None, window=None, softcap=None):
    """softmax(q k^T * scale + mask) v, (1, Hq, S, D), for sequences packed in one row, causal within each
    sequence (within `window` keys back, and scores soft-capped, when given): q (1, Hq, S, D), k and v (1, Hkv, S, D),
    cu_seqlens (N + 1,) int32 (as for dca_attention). The attention of the layers without an adapter
    when fastdca.patch reads packed sequences."""
    if q.dim() != 4 or q.shape[0] != 1 or k.shape[2] != q.shape[2]:
        raise ValueError(f"packed_causal_attention needs q (1, Hq, S, D) and k, v (1, Hkv, S, D), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    _check_cu_seqlens(cu_seqlens, None, 1, q.shape[2], q.shape[2], q.device)
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
        visible = reference.packed_visible(cu_seqlens, q.shape[2], window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
    lengths = cu_seqlens.diff().tolist()
    pieces = []
    for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2)):
        n = qs.shape[2]
        if window is None or window >= n:
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa))
        else:
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=reference.causal_visible(
                n, n, q.device, window), scale=scale, enable_gqa=gqa))
    return torch.cat(pieces, dim=2)


# --------------------------------------------------------------------------------------------------
# triton backend


def _triton_dca_attention(q, k, v, ak, av, gate, *, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap,
                          gate_fn, xg):
    spec = (window, softcap, causal_len, scale, gate_fn, xg)
    if cu_seqlens is not None and xg == "sample":
        # The kernels sum X_G per query block, and blocks straddle sequences: take X_G per token (one
        # more output the size of out, not kept for backward) and sum it per sequence.
        out, x_g = _fused_dca_attention(q, k, v, ak, av, gate, None, cu_seqlens, spec[:-1] + ("token",))
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        members = sequence_members(None, cu_seqlens, B=B, T=T, S=S, device=q.device)
        sums = torch.einsum("nt,thd->nhd", members[0].to(torch.float32), x_g[0].to(torch.float32))
        return out, (sums, members.sum(dim=-1).reshape(-1))
    return _fused_dca_attention(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec)


def _fused_dca_attention(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec):
    """(out, xg_stats) of the fused kernels, differentiable: through the registered operator while
    torch.compile traces (Inductor then sees the kernels themselves), else through the autograd.Function.
    spec = (window, softcap, causal_len, scale, gate_fn, xg)."""
    xg = spec[-1]
    if torch.compiler.is_compiling():
        out, _, extra = torch.ops.fastdca.dca_attention(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, *spec)
        if xg == "sample":
            return out, xg_sums_and_counts(extra, q.shape)
        return out, extra if xg == "token" else None
    out, stat, counts = _TritonDCAFunction.apply(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec)
    return out, (stat, counts) if xg == "sample" else stat


def xg_sums_and_counts(extra, q_shape):
    """The kernels' sample-mode statistics (B, Hq * D + 1) as (the X_G sums (B, Hq, D) float32, the
    real-token counts (B,) int64)."""
    B, Hq, _, D = q_shape
    return extra[:, :-1].view(B, Hq, D), extra[:, -1].long()


class _TritonDCAFunction(torch.autograd.Function):
    """Autograd around the fused kernels, for eager calls. Outputs (out, stat, counts): for xg="sample"
    the X_G sums over each row's real tokens (B, Hq, D) float32 and the counts (B,) int64; for "token"
    X_G (B, T, Hq, D) and None; for None, None and None. The non-tensor arguments travel as one tuple,
    spec = (window, softcap, causal_len, scale, gate_fn, xg): each argument of apply costs host time.

    Saved for backward: q, k, v, ak, av, gate, out and the row log-sum-exp (B, Hq, T) float32.
    """

    @staticmethod
    def forward(ctx, q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, spec):
        from fastdca.prompt_sdpa import triton_forward

        window, softcap, causal_len, scale, gate_fn, xg = spec
        out, lse, extra = triton_forward(q, k, v, ak, av, gate, causal_len=causal_len, scale=scale,
                                         key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, window=window,
                                         softcap=softcap, gate_fn=gate_fn, xg=xg)
        counts = None
        if xg == "sample":
            extra, counts = xg_sums_and_counts(extra, q.shape)
            ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(q, k, v, ak, av, gate, out, lse)
        ctx.masks = (key_padding_mask, cu_seqlens)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return out, extra, counts

    @staticmethod
    def backward(ctx, dout, dstat, dcounts):
        from fastdca.kernels.backward import dca_backward

        window, softcap, causal_len, scale, gate_fn, xg = ctx.spec
        key_padding_mask, cu_seqlens = ctx.masks
        grads = dca_backward(dout, dstat, *ctx.saved_tensors, causal_len=causal_len, scale=scale,
                             key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, window=window,
                             softcap=softcap, gate_fn=gate_fn, xg=xg)
        return (*grads, None, None, None)
