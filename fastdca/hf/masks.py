"""What a call's attention mask and arguments say about its rows.

Key padding: the op wants a (B, S) bool mask of real keys. It is read off the 4-D mask transformers built
for this very call: its last query row sits at the last key position, so under the causal mask it sees
every real key and no padding key (bool masks: True = visible; additive float masks: 0 = visible). A mask
of None means no padding. This stays aligned with the KV cache (S = past + T); a static cache's slots are rolled so that it is
(`static_cache_keys`).

Packed sequences: several sequences end to end in one row (B = 1), told apart by the `cu_seq_lens_q`
that DataCollatorWithFlattening passes down, or by position_ids that restart, with no padding. Read once
per forward (one host read of the boundaries); each sequence is one sample of the causal loss.
"""

from __future__ import annotations

import torch

from fastdca.ops.common import packed_visible


def key_padding_of_call(state, attention_mask, B, T, S, windowed=False):
    """The key padding mask; every layer of one type gets the same mask object in a forward, so eager calls
    derive it once per mask (a cache keyed on identity, which a compiled graph cannot guard on: compiled,
    each layer derives it). Models with sliding and full layers pass two masks: two entries."""
    if torch.compiler.is_compiling():
        return key_padding_mask(attention_mask, B, T, S, windowed)
    cache = state.padding_cache or []
    for mask, shape, key_padding in cache:
        if mask is attention_mask and shape == (B, T, S, windowed):
            return key_padding
    key_padding = key_padding_mask(attention_mask, B, T, S, windowed)
    state.padding_cache = cache[-1:] + [(attention_mask, (B, T, S, windowed), key_padding)]
    return key_padding


def static_cache_keys(key, value, key_padding, filled):
    """A static cache's keys and values (B, Hkv, S, D) hold the `filled` tokens seen so far in their first
    slots and empty slots after them (a full sliding-window layer: every slot, in order). The op places the
    last query at the last key: this rolls the filled slots to the end and marks the empty ones as padding,
    (key, value, key padding (B, S)). `filled` may be a tensor on the device (no host read)."""
    B, Hkv, S, D = key.shape
    if isinstance(filled, int) and filled >= S:
        return key, value, key_padding
    slots = torch.arange(S, device=key.device)
    shift = S - torch.as_tensor(filled, device=key.device).clamp(max=S)
    source = (slots - shift) % S
    real = (slots >= shift).expand(B, S)
    if key_padding is not None:
        real = real & key_padding.gather(1, source.expand(B, S))
    index = source.view(1, 1, S, 1).expand(B, Hkv, S, D)
    return key.gather(2, index), value.gather(2, index), real


def packing_of_call(state, query, key, attention_mask, kwargs):
    """(cu_seqlens (N + 1,) int32, lengths as a list) when this call's row holds N >= 2 packed
    sequences, else None. Derived once per forward: every layer gets the same position_ids object.

    Only a single row with no cache, in a forward given position_ids or cu_seq_lens_q, can hold packed
    sequences, and that is decided from shapes and arguments alone. For such a row the boundaries are
    read on the host (they decide shapes: one SDPA call and one causal-loss sample per sequence),
    which under torch.compile is a graph break, taken outside the graph; batches of two or more rows,
    forwards without position_ids, and decoding never read anything."""
    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if state is None or not state.packing_possible or (cu is None and not _may_hold_restarts(position_ids, query, key)):
        return None
    if torch.compiler.is_compiling():
        return _read_packing_outside_graph(state, query, key, attention_mask, kwargs)
    return _cached_packing(state, query, key, attention_mask, kwargs)


def _may_hold_restarts(position_ids, query, key) -> bool:
    """Restarting position_ids can mean packing only for one row of T >= 2 queries and no cache."""
    B, T, S = query.shape[0], query.shape[2], key.shape[2]
    return position_ids is not None and B == 1 and T == S and T >= 2 and position_ids.shape[-1] == T


def _cached_packing(state, query, key, attention_mask, kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    source = cu if cu is not None else kwargs.get("position_ids")
    cached = state.packing_cache
    if cached is not None and cached[0] is source and cached[1] == tuple(query.shape):
        return cached[2]
    packing = _read_packing(cu, kwargs.get("cu_seq_lens_k"), kwargs.get("position_ids"), query, key, attention_mask)
    state.packing_cache = (source, tuple(query.shape), packing)
    return packing


_read_packing_outside_graph = torch.compiler.disable(_cached_packing)


def _read_packing(cu_q, cu_k, position_ids, query, key, attention_mask):
    B, T, S = query.shape[0], query.shape[2], key.shape[2]
    if cu_q is not None:
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.cpu(), cu_q.cpu()):
            raise NotImplementedError("fastdca attends packed sequences with the same boundaries for queries and "
                                      "keys; got different cu_seq_lens_q and cu_seq_lens_k")
        if B != 1 or T != S:
            raise NotImplementedError(f"fastdca reads cu_seq_lens_q for sequences packed in one row with no KV "
                                      f"cache (B = 1, T = S); got B={B}, T={T}, S={S}")
        cu = cu_q.to(device=query.device, dtype=torch.int32)
        lengths = cu.diff().tolist()
        if cu.numel() < 2 or cu[0] != 0 or cu[-1] != T or min(lengths) < 1:
            raise ValueError(f"cu_seq_lens_q must run from 0 to the row's {T} tokens in increasing steps, got "
                             f"{cu.tolist()}")
        return (cu, lengths) if len(lengths) > 1 else None
    # Restarting position_ids mean packing only for one row without padding or cache: left-padded
    # generation batches give their pads position 1, which would read as restarts.
    if not _may_hold_restarts(position_ids, query, key):
        return None
    positions = position_ids.reshape(-1)
    starts = torch.ones(T, dtype=torch.bool, device=positions.device)
    starts[1:] = positions[1:] != positions[:-1] + 1
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([T], device=positions.device)]).to(torch.int32)
    if cu.numel() <= 2 or not _mask_allows_packing(attention_mask, cu, T):
        return None
    return cu.to(query.device), cu.diff().tolist()


def _mask_allows_packing(attention_mask, cu, T) -> bool:
    """Whether restarting position_ids with this mask are packed sequences: no mask; or the (1, 1, T, T)
    mask transformers builds from the restarts itself (causal within each sequence; it does so when it
    materialises the mask, e.g. under gradient checkpointing); or a mask without padding. A padded mask
    with restarts is a left-padded batch, not packing."""
    if attention_mask is None:
        return True
    if attention_mask.dim() == 4 and attention_mask.shape[-2:] == (T, T):
        if torch.equal(_visible(attention_mask[0, 0]), packed_visible(cu.to(attention_mask.device), T)):
            return True
    return key_padding_mask(attention_mask, 1, T, T) is None


def unpacked_layout(cu_seqlens, lengths, S, device):
    """Where each token of a packed row goes when its N sequences are laid out as right-padded samples:
    (sample index (S,), position in the sample (S,), the (N, max length) mask of real tokens). Computed
    once per forward; `unpack_tokens` applies it to each layer's causal weights."""
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device),
                                  output_size=S)
    offsets = torch.arange(S, device=device) - cu_seqlens.to(device=device, dtype=torch.long)[ids]
    real = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=device)
    return ids, offsets, real.index_put((ids, offsets), torch.ones(S, dtype=torch.bool, device=device))


def unpack_tokens(tokens, layout):
    """A packed row's per-token tensor (1, S, ...) (the causal weights) laid out as right-padded samples
    (N, max length, ...), by the layout of `unpacked_layout`: the token variance compares the t-th tokens of
    the samples."""
    ids, offsets, real = layout
    return tokens.new_zeros(*real.shape, *tokens.shape[2:]).index_put((ids, offsets), tokens[0])


def key_padding_mask(attention_mask, B, T, S, windowed=False):
    """(B, S) bool, True = real key, from the mask transformers passes to attention functions; None = no padding.

    Causal masks: the last query row sits at the last key position and sees every real key. A sliding-window
    mask's last row sees only the last window keys, so there a key is real when any query row sees it: a
    real key is seen at least by its own position, and a key no query of the call can see is outside every
    query's window, where calling it padding changes nothing."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        row = attention_mask
    elif attention_mask.dim() == 4 and windowed:
        row = _visible(attention_mask[:, 0]).any(dim=-2)
    elif attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :]
    else:
        raise ValueError(f"fastdca cannot read key padding from an attention mask of shape "
                         f"{tuple(attention_mask.shape)}")
    row = _visible(row)
    if row.shape[-1] != S:
        raise ValueError(f"the attention mask covers {row.shape[-1]} keys but the layer has {S} (static or "
                         "sliding caches are not supported by fastdca adapted layers; use the default DynamicCache)")
    if row.shape[0] != B:
        row = row.expand(B, S)
    # An all-real mask means no padding, and CPU calls drop it for SDPA's unmasked causal path. The test
    # reads the mask on the host: on a GPU that would stall every forward, and compiled it would break the
    # graph, so there the mask is kept (the op gives the same answer with it).
    if not row.is_cuda and not torch.compiler.is_compiling() and bool(row.all()):
        return None
    return row.contiguous()


def _visible(mask):
    """A mask as bool, True = visible: bool masks as they are, additive float masks 0 = visible."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask != 0
