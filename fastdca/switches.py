"""Every environment switch fastdca reads, in one registry: its name, default and meaning, one way to read it
(`Switch.read`, or `Switch.on` for the on/off ones) and one context manager to set it (`Switch.set`).

The switches are read where they act, at each call, so that setting one between calls takes effect:

    FASTDCA_BACKEND    the op's backend (fastdca.ops.dispatch)
    FASTDCA_SDPA_FWD   the triton backend's forward: fused, or the prompt half through SDPA (fastdca.ops.triton_backend)
    FASTDCA_ATOMIC_DQ  the backward's dq accumulated with atomics in the dk/dv kernel (fastdca.kernels.backward)
    FASTDCA_TMA_FWD    the forward reads through tensor descriptors (fastdca.kernels.forward)
    FASTDCA_TMA_BWD    the backward's loops read through tensor descriptors (fastdca.kernels.backward)

The kernel variants stay off by default until a GPU run has checked them (`fastdca check` runs each beside the
default). This module is a leaf: the kernels read it as the op does, so no import runs upward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Switch:
    """One environment variable fastdca reads."""

    name: str       # the environment variable
    default: str    # its value when unset
    meaning: str

    def read(self) -> str:
        """The variable's value, or the default where it is unset."""
        return os.environ.get(self.name, self.default)

    def on(self) -> bool:
        """For an on/off switch: whether it is set to "1"."""
        return self.read() == "1"

    @contextlib.contextmanager
    def set(self, value):
        """The variable set to `value` while the block runs (True and False as "1" and "0"), then restored."""
        saved = os.environ.get(self.name)
        os.environ[self.name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(self.name)
            else:
                os.environ[self.name] = saved


BACKEND = Switch("FASTDCA_BACKEND", "auto",
                 "the backend of fastdca.ops.dca_attention where a call names none: auto, triton, torch or reference")
SDPA_FWD = Switch("FASTDCA_SDPA_FWD", "0",
                  "the triton backend's forward: 0 fused (one Triton kernel), 1 the prompt half through torch's fused "
                  "attention and the adapter term by the merge kernel, auto whichever was faster the first time a "
                  "shape came")
ATOMIC_DQ = Switch("FASTDCA_ATOMIC_DQ", "0",
                   "1: the backward accumulates dq with atomics inside the dk/dv kernel (no dq kernel; never under "
                   "torch.use_deterministic_algorithms; head dims up to 128)")
TMA_FWD = Switch("FASTDCA_TMA_FWD", "0",
                 "1: the forward reads q, K and V and writes out through tensor descriptors (Hopper and newer)")
TMA_BWD = Switch("FASTDCA_TMA_BWD", "0",
                 "1: the backward's loops read through tensor descriptors, the dk/dv kernel its q and dout blocks, "
                 "the dq kernel its K and V blocks (Hopper and newer)")

SWITCHES = (BACKEND, SDPA_FWD, ATOMIC_DQ, TMA_FWD, TMA_BWD)


def triton_interpreted() -> bool:
    """Whether Triton runs the kernels under its interpreter: TRITON_INTERPRET=1 (Triton's own variable, which it
    reads when the kernels are defined: set it before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
