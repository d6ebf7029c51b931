"""Triton kernels of fastdca (installed as `fastdca.kernels`): kernels and their launch functions only.

Autograd lives in `fastdca.ops`; this package never imports torch.autograd or model code.
"""
