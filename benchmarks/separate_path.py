"""The "separate path" the benchmarks compare fastdca against: what PEFT's AdaptionPrompt and lit-gpt do,
SDPA over the prompt keys, then an eager attention over the repeated adapter keys, added on top."""

import math

import torch
import torch.nn.functional as F


def separate_path(q, k, v, ak, av, gate):
    """q (B, Hq, T, D), k and v (B, Hkv, T, D), ak and av (Hkv, M, D), gate (Hq,) -> (B, T, Hq, D)."""
    group = q.shape[1] // k.shape[1]
    prompt = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    ak, av = ak.repeat_interleave(group, 0), av.repeat_interleave(group, 0)
    scores = torch.matmul(q, ak.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = torch.tanh(gate)[:, None, None] * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (prompt + torch.matmul(weights, av)).transpose(1, 2)
