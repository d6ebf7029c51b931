"""TRL's SFTTrainer, whose loss is not the model's: it calls `model(..., fused_lm_head=True)` and takes
-sum(log_probs) / N over the label tokens from the per-token log-probabilities of its fused LM head.

The causal term rides on those log-probabilities: subtracting c = alpha * L_causal from each label
token's log-probability adds c * (label tokens / N) to SFTTrainer's loss, which is alpha * L_causal
(N = the micro-batch's label tokens), or its token share of it under gradient accumulation
(N = num_items_in_batch): exactly the term the model adds to its own loss under transformers' Trainer.
The trainer is found on the call stack at each fused forward; its loss_type is checked (DFT weights each
token by its probability, which the causal term cannot ride on) and the causal loss and the gradient
share are added to its logged metrics.
"""

from __future__ import annotations

import sys
import types
import weakref

import torch

from fastdca.grad_share import causal_gradient_share, measurement_due

_SEEN = weakref.WeakKeyDictionary()   # trainer -> {"share_step": the step whose share was measured}


def is_fused_output(output) -> bool:
    """Whether `output` is TRL's FusedCausalLMOutput (a fused-LM-head forward)."""
    return (type(output).__name__ == "FusedCausalLMOutput" and type(output).__module__.startswith("trl")
            and getattr(output, "log_probs", None) is not None and getattr(output, "label_mask", None) is not None)


def fold_causal_term(fields: dict, per_token_term: torch.Tensor) -> None:
    """Subtract `per_token_term` (alpha * L_causal, a scalar) from the log-probability of every label token."""
    log_probs = fields["log_probs"]
    fields["log_probs"] = log_probs - per_token_term.to(log_probs.dtype) * fields["label_mask"].to(log_probs.dtype)


def follow_trainer(model, ce: torch.Tensor, term: torch.Tensor, causal_loss: torch.Tensor, params) -> None:
    """At a fused forward run by an SFTTrainer: refuse a loss the term cannot ride on, log the causal loss
    and, at logging steps, the causal term's share of the adapter gradient (fastdca.grad_share)."""
    trainer = _calling_sft_trainer()
    if trainer is None:
        return
    loss_type = getattr(trainer.args, "loss_type", "nll")
    if loss_type != "nll":
        raise ValueError(f"fastdca cannot carry the DCA causal term under SFTConfig(loss_type={loss_type!r}), which "
                         "weights each token's loss by its probability; use loss_type='nll' (the default) or "
                         "DCAConfig(alpha=0)")
    seen = _SEEN.setdefault(trainer, {"share_step": None})
    mode = "train" if model.training else "eval"
    metrics = trainer._metrics[mode]
    metrics["causal_loss"].append(float(causal_loss.detach()))
    if mode != "train" or not causal_loss.requires_grad:
        return
    step = trainer.state.global_step + 1
    if measurement_due(trainer.args, step, seen["share_step"]):
        seen["share_step"] = step
        outputs = types.SimpleNamespace(loss=ce + term.to(ce.dtype), ce_loss=ce, causal_loss=causal_loss)
        share = causal_gradient_share(outputs, params)
        if share is not None:
            metrics["grad_share"].append(share)


def _calling_sft_trainer():
    trl = sys.modules.get("trl")
    if trl is None:
        return None
    sft_trainer = getattr(trl, "SFTTrainer", None)
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if sft_trainer is not None and isinstance(candidate, sft_trainer):
            return candidate
        frame = frame.f_back
    return None
