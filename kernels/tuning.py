"""The launch configurations: block sizes, warps and stages per target, kernel and head dim (the tile tables)."""

from __future__ import annotations

import functools

import torch
import triton


def head_block(D: int) -> int:
    """D padded to a power of two >= 16 (tl.arange needs a power of two, tl.dot >= 16)."""
    return max(16, triton.next_power_of_2(D))


def adapter_block(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


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
    props = _cuda_properties(device)
    return 80 if props is None else props.major * 10 + props.minor


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device; for the interpreter, a small GPU's worth."""
    props = _cuda_properties(device)
    return 8 if props is None else props.multi_processor_count


def _cuda_properties(device):
    """torch.cuda's properties of `device`, or None where it is no CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_device_properties(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_device_properties(index: int):
    return torch.cuda.get_device_properties(index)


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


def launch_configs(D, T, dtype, device, overrides):
    """{kernel: launch_config} for every kernel, with `overrides` ({kernel: {entry: value}}, tests and
    tuning) applied. Without overrides the dicts are shared per (D, T <= 16, dtype, target): read only."""
    arch = target_arch(device)
    if overrides:
        return {name: dict(launch_config(name, D, T, dtype, arch), **overrides.get(name, {})) for name in KERNELS}
    return _table_configs(D, T <= 16, dtype, arch)


@functools.lru_cache(maxsize=256)
def _table_configs(D, decoding, dtype, arch):
    return {name: launch_config(name, D, 16 if decoding else 17, dtype, arch) for name in KERNELS}
