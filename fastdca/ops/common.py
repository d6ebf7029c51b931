"""What the backends and the model integration share: which window masks anything, and which tokens make up
each sample of the X_G statistics."""

from __future__ import annotations

import torch

from fastdca.reference import query_is_real, sequence_ids


def effective_window(window, S: int):
    """The window, or None where it masks nothing: no query is S or more positions past a key."""
    return None if window is None or window >= S else int(window)


def sequence_members(key_padding_mask=None, cu_seqlens=None, *, B, T, S, device) -> torch.Tensor:
    """(B, N, T) bool: query t of row b belongs to sample n. A sample is a row's real tokens (N = 1), or
    one of the N sequences packed in the single row."""
    if cu_seqlens is None:
        return query_is_real(key_padding_mask, B, T, S, device)[:, None, :]
    ids = sequence_ids(cu_seqlens, S)
    return (ids[None, :] == torch.arange(len(cu_seqlens) - 1, device=device)[:, None])[None]
