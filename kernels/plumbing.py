"""What the launchers share: the X_G statistics' mode codes, dtype handling, the kernels' arguments for masks and packed
sequences, output allocation, and the launch itself on the tensors' device."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from fastdca.kernels import tuning
from fastdca.kernels.blocks import LOG2E
from fastdca.kernels.tuning import head_block
from fastdca.switches import triton_interpreted

XG_NONE, XG_SAMPLE, XG_TOKEN = 0, 1, 2
XG_CODES = {None: XG_NONE, "sample": XG_SAMPLE, "token": XG_TOKEN}


def launch_options(cfg: dict) -> dict:
    if triton_interpreted():
        return {}
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def block_args(cfg: dict, *names) -> dict:
    return {n: cfg[n] for n in names}


def run(kernel, grid, q, launch, *args, **kwargs):
    """Launch `kernel` over `grid` with `args` and `kwargs`, on the device of q's tensors, through `launch`: a
    wrapper (torch.library.wrap_triton, for the custom ops torch.compile traces) or None, the kernel itself."""
    with _on_device(q):
        (launch or _direct)(kernel)[grid](*args, **kwargs)


def _on_device(q):
    """Launch on the tensors' device: Triton takes the device and stream from the current CUDA device."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _direct(kernel):
    """What launching without a wrapper launches: the kernel itself."""
    return kernel


def upcast(dtype: torch.dtype) -> bool:
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


def ieee(dtype: torch.dtype) -> bool:
    """float32 inputs get exact float32 dots unless torch allows TF32 for matmuls (off by default)."""
    return dtype == torch.float32 and not tf32_allowed()


def check_dtype(q):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must have dtype float16, bfloat16 or float32 for the triton kernels (float64: use the "
                         f"torch or reference backend), got {q.dtype}")


_PLACEHOLDERS = {}   # (device, dtype) -> a one-element tensor for a pointer argument a launch does not read


def placeholder(q, dtype, launch):
    """A tensor for an unread pointer argument: one per device and dtype for direct launches; a fresh
    one when the launch is traced (torch.compile's fake tensors cannot mix with a real one)."""
    if launch is not None:
        return torch.empty(1, dtype=dtype, device=q.device)
    key = (q.device, dtype)
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = torch.empty(1, dtype=dtype, device=q.device)
    return t


def kpm_arg(key_padding_mask, q, launch):
    """(KPM, its row stride, HAS_KPM): the bool mask as it is (Triton loads bool as bytes) where its keys
    are contiguous."""
    if key_padding_mask is None:
        return placeholder(q, torch.bool, launch), 0, False
    kpm = key_padding_mask if key_padding_mask.stride(-1) == 1 else key_padding_mask.contiguous()
    return kpm, kpm.stride(0), True


def seq_arg(cu_seqlens, q, edge: str, launch):
    """(SEQ_START or SEQ_END (S,) int32, HAS_SEQ) for packed sequences; a placeholder without."""
    if cu_seqlens is None:
        return placeholder(q, torch.int32, launch), False
    S = q.shape[2]
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), torch.arange(S, device=q.device, dtype=torch.int32),
                             right=True)
    return cu_seqlens[ids + (edge == "end")].contiguous(), True


def forward_outputs(q, mode, n_mblocks, causal_len):
    """The forward kernels' outputs for q (B, Hq, T, D) and H = causal_len: out (B, T, Hq, D) in q's dtype, lse
    (B, Hq, T) float32, the causal weights w (B, T, Hq, H) float32 (token mode, else out stands in) and the
    per-block sums of w and counts of real rows (B, n_mblocks, Hq * H + 1) float32 (sample mode, else lse stands
    in)."""
    B, Hq, T, D = q.shape
    out = q.new_empty((B, T, Hq, D))
    lse = q.new_empty((B, Hq, T), dtype=torch.float32)
    xg_out = q.new_empty((B, T, Hq, causal_len), dtype=torch.float32) if mode == XG_TOKEN else out
    xg_part = q.new_empty((B, n_mblocks, Hq * causal_len + 1), dtype=torch.float32) if mode == XG_SAMPLE else lse
    return out, lse, xg_out, xg_part


def forward_extra(mode, xg_out, xg_part):
    """The forward's `extra` from the kernels' outputs: the per-block sums of the causal weights and counts
    summed over the blocks, (B, Hq * H + 1) (a fixed-shape sum: deterministic), the weights themselves, or
    None."""
    if mode == XG_SAMPLE:
        return xg_part.sum(dim=1)
    return xg_out if mode == XG_TOKEN else None


def window_arg(window) -> int:
    """The kernels' WINDOW argument: the window, or 0 where HAS_WINDOW is off and it is not read."""
    return 0 if window is None else int(window)


def softcap_arg(softcap) -> float:
    """The kernels' SOFTCAP argument: the cap in the log2 units the kernels score in, or 1.0 unread."""
    return 1.0 if softcap is None else float(softcap) * LOG2E.value


def tma_reads(q, tensors) -> bool:
    """Whether the kernels can read `tensors` through tensor descriptors: a Hopper or newer GPU (or the
    interpreter), fp16/bf16, head dims up to 128, and each tensor laid out as TMA needs (unit stride along
    D, 16-byte aligned base and strides). Sets Triton's allocator on CUDA."""
    if q.dtype == torch.float32 or head_block(q.shape[-1]) > 128:
        return False
    if not (triton_interpreted() or tuning.target_arch(q.device) >= 90):
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
