"""What the backends, the causal loss and the model integration share (docs/DESIGN.md section 1): the compute
dtype, the gate, the adapter softmax, which window masks anything, which prompt keys a query sees, and which
tokens make up each sample of the X_G statistics. `fastdca.reference` writes its equations with them too."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes and statistics run in float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gate_values(gate: torch.Tensor, gate_fn: str) -> torch.Tensor:
    """g = tanh(gate), or gate itself with gate_fn="identity"."""
    return torch.tanh(gate) if gate_fn == "tanh" else gate


def adapter_probs(q: torch.Tensor, ak: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q ak^T * scale) (B, Hq, T, M) with q (B, Hq, T, D), ak (Hq, M, D) (repeated for GQA)."""
    return torch.softmax(q @ ak.transpose(-1, -2) * scale, dim=-1)


def effective_window(window, S: int):
    """The window, or None where it masks nothing: no query is S or more positions past a key."""
    return None if window is None or window >= S else int(window)


def sequence_ids(cu_seqlens: torch.Tensor, S: int) -> torch.Tensor:
    """(S,) int64: the index n of the packed sequence each position t belongs to,
    cu_seqlens[n] <= t < cu_seqlens[n + 1]."""
    positions = torch.arange(S, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def query_is_real(key_padding_mask, batch: int, T: int, S: int, device) -> torch.Tensor:
    """(B, T) bool: query i sits at key position S - T + i and is real where that key is."""
    if key_padding_mask is None:
        return torch.ones(batch, T, dtype=torch.bool, device=device)
    return key_padding_mask[:, S - T:]


def causal_visible(T: int, S: int, device, window=None) -> torch.Tensor:
    """(T, S) bool: query i, at position S - T + i, sees key j when j <= S - T + i and, with a sliding
    window, S - T + i - window < j."""
    query_pos = torch.arange(S - T, S, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    visible = key_pos <= query_pos
    return visible if window is None else visible & (key_pos > query_pos - window)


def packed_visible(cu_seqlens: torch.Tensor, S: int, window=None) -> torch.Tensor:
    """(S, S) bool for sequences packed in one row (T = S): query i sees key j when both lie in the same
    sequence and j is causally visible to i (within `window` keys back when given)."""
    ids = sequence_ids(cu_seqlens, S)
    return (ids[:, None] == ids[None, :]) & causal_visible(S, S, cu_seqlens.device, window)


def prompt_visible(T: int, S: int, device, key_padding_mask=None, cu_seqlens=None, window=None) -> torch.Tensor:
    """(B or 1, 1, T, S) bool: query i sees prompt key j when j is causally visible to it (within `window` keys back
    when given), real (key_padding_mask (B, S)) and, for sequences packed in one row (cu_seqlens), in its own
    sequence."""
    visible = causal_visible(T, S, device, window)[None, None]                   # (1, 1, T, S)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    if cu_seqlens is not None:
        ids = sequence_ids(cu_seqlens, S)
        visible = visible & (ids[S - T:, None] == ids[None, :])[None, None]
    return visible


def sequence_members(key_padding_mask=None, cu_seqlens=None, *, B, T, S, device) -> torch.Tensor:
    """(B, N, T) bool: query t of row b belongs to sample n. A sample is a row's real tokens (N = 1), or
    one of the N sequences packed in the single row."""
    if cu_seqlens is None:
        return query_is_real(key_padding_mask, B, T, S, device)[:, None, :]
    ids = sequence_ids(cu_seqlens, S)
    return (ids[None, :] == torch.arange(len(cu_seqlens) - 1, device=device)[:, None])[None]
