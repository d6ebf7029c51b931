"""Inspection: under `record_adapter_attention` each adapted layer also keeps the gated adapter
probabilities and X_G per token, recomputed from the reference equations on the op's own inputs
(`fastdca inspect`, `fastdca eval --xg-stats`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from fastdca.hf.state import state_of
from fastdca.ops.common import adapter_probs, compute_dtype, gate_values, query_is_real


@dataclasses.dataclass(frozen=True)
class AdapterAttentionRecord:
    """What one adapted layer computed in a forward, from the reference equations (docs/DESIGN.md section 1),
    detached, in float32 (float64 for a float64 model):

    gates: g = tanh(gate) (gate_fn="identity": gate), (Hq,);
    probs: A = g * softmax(q ak^T * scale), the gated adapter probabilities, (B, Hq, T, M);
    xg: X_G = A[..., :H] av[:, :H] per query token, (B, T, Hq, D);
    real: (B, T) bool, True where the query token is real (not padding).
    """

    gates: torch.Tensor
    probs: torch.Tensor
    xg: torch.Tensor
    real: torch.Tensor


@contextlib.contextmanager
def record_adapter_attention(model: nn.Module, layers=None):
    """Record, while the context is open, the adapter attention of the patched `model`'s adapted layers.

    Yields a dict {decoder layer index: AdapterAttentionRecord}, filled by each forward for the layers in
    `layers` (decoder layer indices, each an adapted one; None = every adapted layer); a layer's entry is
    replaced at its next call, so after a `generate` it holds the last decoding step. The records are
    computed from the reference equations beside the op, from the very q, ak, av and gate the op receives,
    whatever backend runs the op: one extra (B, Hq, T, M) softmax per recorded layer and call. Outside
    the context the forward is unchanged.
    """
    state = state_of(model)
    layers = state.layer_ids if layers is None else list(layers)
    not_adapted = [i for i in layers if i not in state.layer_ids]
    if not_adapted:
        raise ValueError(f"layers must be adapted decoder layers ({state.layer_ids[0]}-{state.layer_ids[-1]}); "
                         f"{not_adapted} have no DCA adapter")
    if state.attention_records is not None:
        raise RuntimeError("record_adapter_attention is already active on this model")
    records = {}
    state.attention_records, state.recorded_layers = records, frozenset(layers)
    try:
        yield records
    finally:
        state.attention_records, state.recorded_layers = None, frozenset()


def adapter_attention_record(query, ak, av, gate, cfg, scaling, key_padding, S) -> AdapterAttentionRecord:
    """The reference equations on the op's own inputs: query (B, Hq, T, D), ak/av (Hkv, M, D), gate (Hq,)."""
    B, Hq, T, D = query.shape
    ct = compute_dtype(query.dtype)
    group = Hq // ak.shape[0]
    scale = 1 / math.sqrt(D) if scaling is None else scaling
    H = cfg.causal_len
    with torch.no_grad():
        g = gate_values(gate.detach().to(ct), cfg.gate_fn)
        probs = g[None, :, None, None] * adapter_probs(
            query.detach().to(ct), ak.detach().to(ct).repeat_interleave(group, dim=0), scale)
        av_heads = av.detach().to(ct).repeat_interleave(group, dim=0)
        xg = (probs[..., :H] @ av_heads[:, :H]).transpose(1, 2)
    return AdapterAttentionRecord(gates=g, probs=probs, xg=xg,
                                  real=query_is_real(key_padding, B, T, S, query.device))
