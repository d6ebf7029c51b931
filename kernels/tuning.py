"""The launch configurations: block sizes, warps and stages per target, kernel and head dim (the tile tables)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton


def head_block(D: int) -> int:
    """D padded to a power of two >= 16 (tl.arange needs a power of two, tl.dot >= 16)."""
    return max(16, triton.next_power_of_2(D))


def adapter_block(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


class LaunchConfig(NamedTuple):
    """One kernel's tile and Triton's launch options for it."""

    block_m: int      # query rows a program (or, in the dk/dv kernel, a loop step) takes
    block_n: int      # keys a loop step (or, in the dk/dv kernel, a program) takes; 0: no key loop
    num_warps: int
    num_stages: int   # Triton's software pipelining of the loop's loads


def _by_target(*rows) -> dict:
    """{target: {kernel: {padded D: LaunchConfig}}} from rows (kernel, target, D = 64, D = 128, D = 256)."""
    tables = {}
    for kernel, target, *configs in rows:
        tables.setdefault(target, {})[kernel] = dict(zip((64, 128, 256), configs))
    return tables


# The tables: why each entry is what it is, with the measurements behind it, is in BENCHMARKS.md ("The tile
# tables"); `python -m fastdca.kernels.report` holds the fp16/bf16 entries to no spills and no duplicated work.
# fp16/bf16, per kernel and target (sm_80 also stands for every other CUDA target) and padded head dim:
#   kernel         target  D = 64                       D = 128                      D = 256
_LAUNCH = _by_target(
    ("fwd",         90, LaunchConfig(64, 64, 4, 3),  LaunchConfig(64, 64, 4, 3),  LaunchConfig(32, 32, 8, 2)),
    ("fwd",         80, LaunchConfig(64, 64, 4, 3),  LaunchConfig(128, 32, 8, 3), LaunchConfig(32, 32, 8, 2)),
    ("bwd_adapter", 90, LaunchConfig(64, 0, 4, 1),   LaunchConfig(64, 0, 4, 1),   LaunchConfig(32, 0, 8, 1)),
    ("bwd_adapter", 80, LaunchConfig(32, 0, 2, 1),   LaunchConfig(32, 0, 2, 1),   LaunchConfig(32, 0, 8, 1)),
    ("bwd_dkdv",    90, LaunchConfig(32, 64, 4, 3),  LaunchConfig(32, 64, 4, 1),  LaunchConfig(32, 32, 8, 2)),
    ("bwd_dkdv",    80, LaunchConfig(32, 64, 4, 2),  LaunchConfig(32, 64, 4, 1),  LaunchConfig(32, 32, 8, 2)),
    ("bwd_dq",      90, LaunchConfig(64, 32, 4, 3),  LaunchConfig(64, 64, 4, 2),  LaunchConfig(32, 32, 8, 1)),
    ("bwd_dq",      80, LaunchConfig(64, 32, 4, 2),  LaunchConfig(64, 32, 4, 2),  LaunchConfig(32, 32, 8, 2)),
    ("merge",       90, LaunchConfig(64, 0, 4, 1),   LaunchConfig(64, 0, 4, 1),   LaunchConfig(32, 0, 8, 1)),
    ("merge",       80, LaunchConfig(32, 0, 2, 1),   LaunchConfig(32, 0, 2, 1),   LaunchConfig(32, 0, 8, 1)),
)
# bwd_dkdv with FASTDCA_ATOMIC_DQ (D = 256 keeps the dq kernel); untimed
_ATOMIC_DKDV = {
    90: {64: LaunchConfig(32, 64, 4, 3), 128: LaunchConfig(32, 32, 4, 2), 256: LaunchConfig(32, 32, 8, 2)},
    80: {64: LaunchConfig(32, 32, 4, 2), 128: LaunchConfig(32, 16, 4, 2), 256: LaunchConfig(32, 32, 8, 2)},
}
# the forward with FASTDCA_TMA_FWD (sm_90, padded D <= 128); untimed
_TMA_FWD = {64: LaunchConfig(128, 64, 8, 3), 128: LaunchConfig(128, 64, 8, 3)}
# bwd_dkdv with FASTDCA_TMA_BWD, without and with FASTDCA_ATOMIC_DQ (sm_90, padded D <= 128); untimed
_TMA_DKDV = {"bwd_dkdv_tma": {64: LaunchConfig(64, 128, 8, 2), 128: LaunchConfig(32, 128, 8, 2)},
             "bwd_dkdv_atomic_tma": {64: LaunchConfig(32, 128, 8, 2), 128: LaunchConfig(32, 32, 4, 2)}}
# T <= 16 (decoding): the flash-decoding split pass (its block_n, warps, stages), and the forward and adapter
# backward where they still run (a query group wider than DECODE_MAX_ROWS rows; the backward)
_DECODE = {64: LaunchConfig(16, 64, 4, 3), 128: LaunchConfig(16, 64, 4, 3), 256: LaunchConfig(16, 64, 4, 1)}
# float32 inputs (exact fp32 dots, no tensor cores): the correctness path, not a fast one
_FP32 = {64: LaunchConfig(16, 32, 4, 2), 128: LaunchConfig(16, 32, 4, 2), 256: LaunchConfig(16, 16, 4, 2)}


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
    """The keyword arguments of one kernel's launch from the tables above: BLOCK_M, BLOCK_N, BLOCK_D, num_warps
    and num_stages; "decode" is the flash-decoding split pass (its combine pass runs one warp group per kv head),
    which takes no BLOCK_M."""
    block_d = head_block(D)
    d = max(64, block_d)
    if kernel == "decode":
        config = LaunchConfig(*(_FP32 if dtype == torch.float32 else _DECODE)[d])
        return dict(BLOCK_N=config.block_n, BLOCK_D=block_d, num_warps=config.num_warps,
                    num_stages=config.num_stages)
    if dtype == torch.float32:
        entry = _FP32[d]
    elif kernel in _TMA_DKDV and d in _TMA_DKDV[kernel]:
        entry = _TMA_DKDV[kernel][d]
    elif kernel.startswith("bwd_dkdv_atomic"):
        entry = _ATOMIC_DKDV[90 if arch == 90 else 80][d]
    elif kernel == "fwd_tma" and T > 16 and d in _TMA_FWD:
        entry = _TMA_FWD[d]
    else:
        kernel = {"fwd_tma": "fwd", "bwd_dkdv_tma": "bwd_dkdv"}.get(kernel, kernel)
        decoding = T <= 16 and kernel in ("fwd", "bwd_adapter")
        entry = _DECODE[d] if decoding else _LAUNCH[90 if arch == 90 else 80][kernel][d]
    config = LaunchConfig(*entry)      # benchmarks/tile_registers.py sets plain tuples
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, num_warps=config.num_warps,
                num_stages=config.num_stages)


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
