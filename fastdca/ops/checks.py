"""The op's argument checks: wrong shapes, dtypes, devices and values raise ValueError naming the argument and
what it must be."""

from __future__ import annotations

import math

import torch

from fastdca.config import GATE_FNS

XG_MODES = ("sample", "token", None)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256
MAX_ADAPTER_LEN = 64


def check_args(q, k, v, ak, av, gate, causal_len, scale, key_padding_mask, cu_seqlens, window, softcap, gate_fn, xg):
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
        check_cu_seqlens(cu_seqlens, key_padding_mask, B, T, S, q.device)
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


def check_cu_seqlens(cu_seqlens, key_padding_mask, B, T, S, device):
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
