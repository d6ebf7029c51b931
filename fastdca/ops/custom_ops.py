"""The DCA op's backends as PyTorch operators (torch.library), so that torch.compile traces them whole.

Registered, in the namespace "fastdca":

- `dca_attention(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, window, softcap, causal_len, scale, gate_fn, xg)
  -> (out, lse, extra)` and `dca_attention_backward(dout, dxg, q, k, v, ak, av, gate, out, lse,
  key_padding_mask, cu_seqlens, window, softcap, causal_len, scale, gate_fn, xg) -> (dq, dk, dv, dak, dav, dgate)`:
  the fused Triton kernels (the "triton" backend). Shapes as in `fastdca.kernels.forward.dca_forward`:
  q (B, Hq, T, D); k, v (B, Hkv, S, D); ak, av (Hkv, M, D); gate (Hq,); key_padding_mask (B, S) bool or
  None; cu_seqlens (N + 1,) int32 or None; out (B, T, Hq, D) in q's dtype; lse (B, Hq, T) float32, the
  prompt softmax's row log2-sum-exp; extra, the X_G statistics in the causal weights
  w = g * softmax(q ak^T * scale)[..., :H] (X_G = w av[:H]), by xg: "sample" -> (B, Hq * H + 1) float32, the sums
  of w over each row's real query tokens flattened over (head, adapter token), then the row's real-token count
  (`fastdca.ops.triton_backend.xg_sums_and_counts` splits it); "token" -> w (B, T, Hq, H) float32; None -> an
  empty (0,) tensor. The gradients have their inputs' shapes and dtypes. Where Triton compiles the kernels they
  are `torch.library.triton_op`s launching through `wrap_triton`: Inductor sees the kernels
  themselves, and the fake implementation is the launcher run on fake tensors. Under Triton's
  interpreter (TRITON_INTERPRET=1) the kernels are plain Python that no tracer can enter: there they
  are opaque `custom_op`s with the explicit fakes below.
- `adapter_attention(q, ak, av, gate, members, causal_len, scale, gate_fn, xg) -> (adapter_out, probs,
  stat)` and `adapter_attention_backward(dout, dxg, q, ak, av, gate, members, probs, causal_len,
  scale, gate_fn, xg) -> (dq, dak, dav, dgate)`: the adapter half of the "torch" backend, any device
  (`fastdca.ops.torch_backend.adapter_attention_forward` gives the maths and shapes; stat is an empty (0,) tensor
  for xg=None). The prompt half is scaled_dot_product_attention, already an operator the compilers know.

Each forward carries its backward through `register_autograd`. `fastdca.ops.dca_attention` calls these
operators while torch.compile traces it; eager calls go straight to the autograd.Functions of the
backends on the same maths, since on small inputs a trip through the dispatcher costs about as much
as the adapter half itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdca.ops import torch_backend
from fastdca.ops.common import compute_dtype
from fastdca.switches import triton_interpreted

NAMESPACE = "fastdca"


def _kernel_op(name, fn, fake):
    """A Triton-backed operator: triton_op where Triton compiles the kernels, and where it interprets
    them (no kernel object a tracer can record) an opaque custom_op with `fake`."""
    if triton_interpreted():
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=())


# --------------------------------------------------------------------------------------------------
# triton backend: the fused kernels


def _dca_attention_impl(q: Tensor, k: Tensor, v: Tensor, ak: Tensor, av: Tensor, gate: Tensor,
                        key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], window: Optional[int],
                        softcap: Optional[float], causal_len: int, scale: float, gate_fn: str, xg: Optional[str]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    from torch.library import wrap_triton

    from fastdca.kernels.forward import dca_forward

    out, lse, extra = dca_forward(q, k, v, ak, av, gate, causal_len=causal_len, scale=scale,
                                  key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, window=window,
                                  softcap=softcap, gate_fn=gate_fn, xg=xg, launch=wrap_triton)
    extra = out.new_empty(0) if extra is None else extra
    return out, lse, extra


def _dca_attention_fake(q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, window, softcap, causal_len, scale,
                        gate_fn, xg):
    B, Hq, T, D = q.shape
    out = q.new_empty(B, T, Hq, D)
    lse = q.new_empty(B, Hq, T, dtype=torch.float32)
    if xg == "sample":
        extra = q.new_empty(B, Hq * causal_len + 1, dtype=torch.float32)
    elif xg == "token":
        extra = q.new_empty(B, T, Hq, causal_len, dtype=torch.float32)
    else:
        extra = q.new_empty(0)
    return out, lse, extra


dca_attention = _kernel_op("dca_attention", _dca_attention_impl, _dca_attention_fake)


def _dca_attention_backward_impl(dout: Tensor, dxg: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                                 ak: Tensor, av: Tensor, gate: Tensor, out: Tensor, lse: Tensor,
                                 key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                                 window: Optional[int], softcap: Optional[float], causal_len: int, scale: float,
                                 gate_fn: str, xg: Optional[str]
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from torch.library import wrap_triton

    from fastdca.kernels.backward import dca_backward

    grads = dca_backward(dout, dxg, q, k, v, ak, av, gate, out, lse, causal_len=causal_len, scale=scale,
                         key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, window=window, softcap=softcap,
                         gate_fn=gate_fn, xg=xg, launch=wrap_triton)
    # dak and dav come out of the launcher as views of one sum; an operator's outputs may not alias
    dq, dk, dv, dak, dav, dgate = grads
    return dq, dk, dv, dak.clone(), dav.clone(), dgate


def _dca_attention_backward_fake(dout, dxg, q, k, v, ak, av, gate, out, lse, key_padding_mask, cu_seqlens,
                                 window, softcap, causal_len, scale, gate_fn, xg):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, ak, av, gate))


dca_attention_backward = _kernel_op("dca_attention_backward", _dca_attention_backward_impl,
                                    _dca_attention_backward_fake)


def _dca_attention_setup_context(ctx, inputs, output):
    q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, window, softcap, causal_len, scale, gate_fn, xg = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, ak, av, gate, out, lse, key_padding_mask, cu_seqlens)
    ctx.args = (window, softcap, causal_len, scale, gate_fn, xg)


def _dca_attention_backward(ctx, dout, dlse, dxg):
    # lse is the forward's own statistic for the backward: nothing differentiates through it.
    q, k, v, ak, av, gate, out, lse, key_padding_mask, cu_seqlens = ctx.saved_tensors
    window, softcap, causal_len, scale, gate_fn, xg = ctx.args
    grads = dca_attention_backward(dout, None if xg is None else dxg, q, k, v, ak, av, gate, out, lse,
                                   key_padding_mask, cu_seqlens, window, softcap, causal_len, scale, gate_fn, xg)
    return (*grads, None, None, None, None, None, None, None, None)


dca_attention.register_autograd(_dca_attention_backward, setup_context=_dca_attention_setup_context)


# --------------------------------------------------------------------------------------------------
# torch backend: the adapter half


@torch.library.custom_op(f"{NAMESPACE}::adapter_attention", mutates_args=())
def adapter_attention(q: Tensor, ak: Tensor, av: Tensor, gate: Tensor, members: Optional[Tensor], causal_len: int,
                      scale: float, gate_fn: str, xg: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    adapter_out, probs, stat = torch_backend.adapter_attention_forward(q, ak, av, gate, members, causal_len, scale,
                                                                       gate_fn, xg)
    return adapter_out, probs, q.new_empty(0) if stat is None else stat.contiguous()


@adapter_attention.register_fake
def _adapter_attention_fake(q, ak, av, gate, members, causal_len, scale, gate_fn, xg):
    B, Hq, T, D = q.shape
    Hkv, M = ak.shape[:2]
    ct = compute_dtype(q.dtype)
    adapter_out = q.new_empty(B, Hq, T, D)
    probs = q.new_empty(B, Hkv, M, Hq // Hkv * T, dtype=ct)
    if xg == "sample":
        stat = q.new_empty(B * members.shape[1], Hq, causal_len, dtype=ct)
    elif xg == "token":
        stat = q.new_empty(B, T, Hq, causal_len, dtype=ct)
    else:
        stat = q.new_empty(0)
    return adapter_out, probs, stat


@torch.library.custom_op(f"{NAMESPACE}::adapter_attention_backward", mutates_args=())
def adapter_attention_backward(dout: Tensor, dxg: Optional[Tensor], q: Tensor, ak: Tensor, av: Tensor,
                               gate: Tensor, members: Optional[Tensor], probs: Tensor, causal_len: int, scale: float,
                               gate_fn: str, xg: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = torch_backend.adapter_attention_backward(dout, dxg, q, ak, av, gate, members, probs, causal_len, scale,
                                                     gate_fn, xg)
    return tuple(g.contiguous() for g in grads)


@adapter_attention_backward.register_fake
def _adapter_attention_backward_fake(dout, dxg, q, ak, av, gate, members, probs, causal_len, scale, gate_fn, xg):
    return tuple(t.new_empty(t.shape) for t in (q, ak, av, gate))


def _adapter_attention_setup_context(ctx, inputs, output):
    q, ak, av, gate, members, causal_len, scale, gate_fn, xg = inputs
    _, probs, _ = output
    ctx.save_for_backward(q, ak, av, gate, members, probs)
    ctx.args = (causal_len, scale, gate_fn, xg)


def _adapter_attention_backward(ctx, dout, dprobs, dxg):
    # probs is saved for the backward; the loss never depends on it directly
    q, ak, av, gate, members, probs = ctx.saved_tensors
    causal_len, scale, gate_fn, xg = ctx.args
    grads = adapter_attention_backward(dout, None if xg is None else dxg, q, ak, av, gate, members, probs,
                                       causal_len, scale, gate_fn, xg)
    return (*grads, None, None, None, None, None)


adapter_attention.register_autograd(_adapter_attention_backward, setup_context=_adapter_attention_setup_context)
