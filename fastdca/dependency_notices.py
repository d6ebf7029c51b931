"""Keeps dependencies' start-up noise out of the user's run, and says in plain words what it meant.

bitsandbytes, when imported on a CPU with AVX512-BF16, logs "Failed to load CPU gemm_4bit_forward from
kernels-community ..." if its optional fast CPU kernel (fetched from the Hugging Face Hub through the
`kernels` package) is not there. That reads like an error and is not one; it only matters, for speed,
when a 4-bit model runs on the CPU. `install()` (run when fastdca is imported) drops the record;
`explain_cpu_4bit()` says once what it means when such a model is loaded.
"""

from __future__ import annotations

import logging
import warnings

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_state = {"seen": False, "explained": False}


class _DropMissingCpuKernel(logging.Filter):
    def filter(self, record):
        if "gemm_4bit_forward" in record.getMessage():
            _state["seen"] = True
            return False
        return True


def install() -> None:
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMissingCpuKernel) for f in logger.filters):
        logger.addFilter(_DropMissingCpuKernel())


def explain_cpu_4bit() -> None:
    """Called when a 4-bit model is loaded onto the CPU: one plain warning if the fast kernel is missing."""
    if _state["seen"] and not _state["explained"]:
        _state["explained"] = True
        warnings.warn("bitsandbytes' optional fast CPU kernel for 4-bit layers is not available (it comes from the "
                      "Hugging Face Hub through the `kernels` package); 4-bit layers on the CPU run on its slower "
                      "PyTorch fallback: correct, but slower", stacklevel=3)
