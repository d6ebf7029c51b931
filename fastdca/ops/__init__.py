"""The DCA attention op (docs/DESIGN.md section 2): `dca_attention` and its backends.

Modules: `dispatch` (dca_attention, the backend a call runs on), `checks` (the argument checks), `common` (what
the backends and the model integration share), `torch_backend`, `triton_backend`, `custom_ops` (the backends as
torch.library operators, for torch.compile; importing this package registers them), `timing` (GPU time by CUDA
events).

`dca_attention` is the one entry point. Backends:
- "triton": the fused kernels of `fastdca.kernels` (CUDA tensors, or any tensors under TRITON_INTERPRET=1);
- "torch": scaled_dot_product_attention for the prompt keys plus small matmuls for the adapter keys;
- "reference": `fastdca.reference`, the literal equations.
"auto" picks triton for fp16/bf16 CUDA tensors (and float32 where torch allows TF32) and torch otherwise;
FASTDCA_BACKEND overrides the choice.

While torch.compile traces a call, the triton backend's kernels and the torch backend's adapter half
run as the operators `fastdca.ops.custom_ops` registers (torch.ops.fastdca.*), which the compilers can
place in one graph; eager calls take the backends' autograd.Functions, on the same launchers and maths,
since a trip through the dispatcher costs more than the adapter half itself on small inputs.
"""

from fastdca.ops.checks import DTYPES, MAX_ADAPTER_LEN, MAX_HEAD_DIM, XG_MODES
from fastdca.ops.common import effective_window, sequence_members
from fastdca.ops.dispatch import BACKENDS, dca_attention, resolve_backend
from fastdca.ops.torch_backend import packed_causal_attention
from fastdca.ops import custom_ops  # noqa: F401  (registers torch.ops.fastdca.*, which the backends call compiled)

__all__ = ["dca_attention", "resolve_backend", "effective_window", "packed_causal_attention", "sequence_members",
           "BACKENDS", "XG_MODES", "DTYPES", "MAX_HEAD_DIM", "MAX_ADAPTER_LEN"]
