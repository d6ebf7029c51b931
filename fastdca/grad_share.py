"""How much the causal term moves the adapter: its share of the gradient on the DCA parameters.

    share = ||d(loss - CE)/d theta|| / ||d CE/d theta||,   theta = every DCA prompt and gate

where loss - CE is the causal term exactly as the model added it (alpha * L_causal, times the
micro-batch's share of the label tokens under gradient accumulation). A share of 1e-4 means alpha does
practically nothing; near 1, the causal term steers the adapter as much as the data does.
"""

from __future__ import annotations

import math
import statistics
import warnings

import torch

from fastdca.causal_term import unchecked

# In the Letter Concatenation study (RESULTS.md), settings whose share ended below this left the
# held-out Var(X_G) where LLaMA-Adapter (alpha = 0) leaves it; from about 2e-2 up it fell measurably.
# (A share can also end low because X_G was already shrunk to nothing, as on Math401 with L' = 1.)
INERT_SHARE = 1e-2


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
    with unchecked():   # the CE's backward leaves the causal term out on purpose
        causal_grads = torch.autograd.grad(total - ce, params, retain_graph=True, allow_unused=True)
        ce_grads = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    ce_norm = _norm(ce_grads)
    return _norm(causal_grads) / ce_norm if ce_norm > 0 else math.inf


def measurement_due(args, step: int, measured_step) -> bool:
    """Whether a Trainer (TrainingArguments `args`) should measure the share now: on the first micro-batch
    of each step that will be logged, `step` counting from 1. Not under several processes, whose gradient
    synchronisation an extra backward would disturb."""
    return step % args.logging_steps == 0 and measured_step != step and args.world_size <= 1


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))


def warn_if_causal_term_inert(history, alpha: float) -> float | None:
    """Warns when alpha > 0 but the causal term's gradient share, the median over the second half of the
    logged steps of `history` (fastdca.train's loss history), stayed below INERT_SHARE: training was
    LLaMA-Adapter's in all but name. Returns that median; None when alpha = 0 or nothing was measured."""
    shares = [h["grad_share"] for h in history if h.get("grad_share") is not None]
    if alpha <= 0 or not shares:
        return None
    median = statistics.median(shares[len(shares) // 2:])
    if median < INERT_SHARE:
        warnings.warn(f"the causal term's share of the adapter gradient stayed near {median:.1e} (below "
                      f"{INERT_SHARE:g}): at alpha={alpha:g} it barely pulled on the adapter. Unless "
                      "`fastdca eval --xg-stats` shows X_G's held-out variance fell anyway, raise alpha or use "
                      "variance='token', xg_space='hidden' (README: Which causal loss).", stacklevel=2)
    return median
