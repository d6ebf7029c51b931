"""How much the causal term moves the adapter: its share of the gradient on the DCA parameters.

    share = ||d(loss - CE)/d theta|| / ||d CE/d theta||,   theta = every DCA prompt and gate

where loss - CE is the causal term exactly as the model added it (alpha * L_causal, times the
micro-batch's share of the label tokens under gradient accumulation). A share of 1e-4 means alpha does
practically nothing; near 1, the causal term steers the adapter as much as the data does.
"""

from __future__ import annotations

import math

import torch


def causal_gradient_share(outputs, params) -> float | None:
    """The share for one forward pass whose graph is still alive (two extra backward passes, through the
    retained graph; the caller's own backward is unaffected). `outputs` is a patched model's output with
    labels given. 0.0 when no causal term was added (alpha = 0); None without a CE loss."""
    total = getattr(outputs, "loss", None)
    if total is None or not total.requires_grad:
        return None
    ce = getattr(outputs, "ce_loss", None)
    if getattr(outputs, "causal_loss", None) is None or ce is None:
        return 0.0
    params = list(params)
    causal_grads = torch.autograd.grad(total - ce, params, retain_graph=True, allow_unused=True)
    ce_grads = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    ce_norm = _norm(ce_grads)
    return _norm(causal_grads) / ce_norm if ce_norm > 0 else math.inf


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
