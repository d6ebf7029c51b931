import os

import torch

# No GPU: the Triton kernels run under Triton's interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
