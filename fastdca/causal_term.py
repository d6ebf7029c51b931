"""The causal term where the loss is not the model's own: `outputs.causal_term`, and the check that it
reached the backward.

A patched model adds alpha * L_causal to `outputs.loss`. A loop that computes its loss from the logits
(TRL, a custom loop, label smoothing) never sees that sum, and DCA would silently train LLaMA-Adapter.
So every training forward that collects X_G statistics watches its output: a backward pass that goes
through the logits (or TRL's per-token log-probabilities) but not through the causal term raises at its
end, before the optimiser steps, naming the fix: add `outputs.causal_term` to the loss.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()

MISSING_TERM = (
    "the DCA causal term did not reach this backward pass: the loss was computed from the model's logits, "
    "not taken from outputs.loss, so alpha * L_causal was dropped and training would be LLaMA-Adapter's. Add "
    "the forward's `outputs.causal_term` to your loss (loss = my_loss(outputs.logits, labels) + "
    "outputs.causal_term), use outputs.loss, or set DCAConfig(alpha=0) to train without the causal loss")


@contextlib.contextmanager
def unchecked():
    """Backward passes inside the context may leave the causal term out (gradient-share measurements)."""
    previous = getattr(_local, "unchecked", False)
    _local.unchecked = True
    try:
        yield
    finally:
        _local.unchecked = previous


def watch(term: torch.Tensor, loss_source: torch.Tensor) -> None:
    """Make every backward pass through `loss_source` (the logits) that does not also go through `term`
    raise RuntimeError(MISSING_TERM) when it ends. Eager mode only; both must require grad."""
    reached = {"task": None}

    def on_term(grad):
        reached["task"] = torch._C._current_graph_task_id()

    def on_loss_source(grad):
        task = torch._C._current_graph_task_id()

        def check():
            if reached["task"] != task and not getattr(_local, "unchecked", False):
                raise RuntimeError(MISSING_TERM)

        torch.autograd.Variable._execution_engine.queue_callback(check)

    term.register_hook(on_term)
    loss_source.register_hook(on_loss_source)
