"""The loss hooks on the top-level model.

A forward pre-hook decides, per forward, whether X_G statistics are collected (alpha > 0 and labels
given or the model in training mode); a forward hook turns what the attention function stored into
L_causal (`fastdca.loss`), adds alpha * L_causal to the loss when labels were given, and returns the
output with `causal_loss`, `causal_term` and `ce_loss`. Nothing replaces the model's forward, so
Trainer's signature inspection, accelerate and generate see the original model. Under gradient
checkpointing the recomputation computes the same tensors but records nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Optional

import torch

from fastdca import causal_term
from fastdca.hf import peft as peft_integration
from fastdca.hf import trl as trl_integration
from fastdca.hf.attention import route
from fastdca.hf.masks import unpack_tokens, unpacked_layout
from fastdca.hf.state import STATE_ATTR
from fastdca.loss import causal_loss_of_features


# The names transformers passes an argument under, newest first: 5.25 renamed past_key_values to cache.
ARGUMENT_SPELLINGS = {"past_key_values": ("cache", "past_key_values")}


def call_arguments(state, model, args, kwargs) -> dict:
    """Every argument of this forward by name: positional ones bound to the model's signature, the **kwargs
    flattened in, and each argument of ARGUMENT_SPELLINGS under its one name here, whichever spelling the
    installed transformers uses. The only place that reads the forward's arguments."""
    try:
        bound = dict(state.forward_signature.bind_partial(model, *args, **kwargs).arguments)
    except TypeError:
        bound = dict(kwargs)
    for param in state.forward_signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(bound.get(param.name), dict):
            bound.update(bound.pop(param.name))
    for name, spellings in ARGUMENT_SPELLINGS.items():
        bound[name] = next((bound[s] for s in spellings if bound.get(s) is not None), None)
    return bound


def pre_hook(model, args, kwargs):
    state = getattr(model, STATE_ATTR)
    cfg = state.config
    route(model, state)
    arguments = call_arguments(state, model, args, kwargs)
    labels = arguments.get("labels")
    past = arguments["past_key_values"]
    # A static cache's keys are slots: the filled ones first, then empty ones the op must not see (masks.py).
    state.static_cache = past if getattr(past, "is_compileable", False) else None
    collect = cfg.alpha > 0 and (labels is not None or model.training) and not state.adapters_disabled
    state.xg_mode = cfg.variance if collect else None
    state.stats = {}
    state.recording = collect
    state.grad_enabled = torch.is_grad_enabled()
    state.linear_4bit.before_forward(builds_graph=state.grad_enabled)
    state.labels = labels
    state.num_items = arguments.get("num_items_in_batch")
    state.shift_labels = arguments.get("shift_labels")
    output_attentions = arguments.get("output_attentions")
    state.output_attentions = bool(getattr(model.config, "output_attentions", False) if output_attentions is None
                                   else output_attentions)
    if state.output_attentions and state.base_impl != "eager":
        warnings.warn(f"attention weights are returned on an eager base only; the patched model's base is "
                      f"{state.base_impl!r}, whose layers return none: call model.set_attn_implementation('eager') "
                      "first (DCA stays on)", stacklevel=2)
    # Without position_ids the model numbers the tokens 0, 1, ... itself: no restart, nothing to read.
    state.packing_possible = arguments.get("position_ids") is not None or arguments.get("cu_seq_lens_q") is not None
    if model.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        peft_integration.check_not_frozen_by_peft(model, state.dca_parameters())


def post_hook(model, args, kwargs, output):
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return None
    stats, state.stats = state.stats, {}
    if not torch.is_grad_enabled() or not model.training:
        state.padding_cache = state.packing_cache = None
    collected, state.recording = state.recording, False
    state.packing_possible = True
    labels, state.labels = state.labels, None
    if output is None or not collected or not stats:
        return None
    cfg = state.config
    layers = [stats[idx] for idx in sorted(stats)]
    # Every adapted layer of one forward saw the same rows: one padding (or packing) for all of them.
    _, real, unpack = layers[0]
    features = [layer[0] for layer in layers]
    if unpack is not None:
        layout = unpacked_layout(*unpack, features[0].weights.shape[1], features[0].weights.device)
        features = [f._replace(weights=unpack_tokens(f.weights, layout)) for f in features]
        real = layout[2]
    lc = causal_loss_of_features(features, variance=cfg.variance, real=real,
                                 distributed=cfg.variance_scope == "global")
    # The term as added to the loss: alpha * L_causal, weighted by the micro-batch's share of the label
    # tokens under Trainer's num_items_in_batch.
    term = cfg.alpha * (1.0 if labels is None else _share(state, labels)) * lc
    if isinstance(output, tuple):
        if labels is not None and len(output) > 0 and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            return (output[0] + term.to(output[0].dtype),) + output[1:]
        return None
    ce = getattr(output, "loss", None)
    if labels is not None and ce is not None:
        output.loss = ce + term.to(ce.dtype)
    # Declared fields, not extra keys: DistributedDataParallel rebuilds the output as
    # type(output)(**fields), which refuses keys its dataclass does not declare.
    fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    loss_source = fields.get("logits")
    if trl_integration.is_fused_output(output):
        # TRL's SFTTrainer takes its loss from these log-probabilities: the term rides on them.
        trl_integration.fold_causal_term(fields, cfg.alpha * lc)
        loss_source = fields["log_probs"]
        if ce is not None and not torch.compiler.is_compiling():
            trl_integration.follow_trainer(model, ce, term, lc, state.dca_parameters())
    if (torch.is_grad_enabled() and lc.requires_grad and isinstance(loss_source, torch.Tensor)
            and loss_source.requires_grad and not torch.compiler.is_compiling()):
        causal_term.watch(lc, loss_source)
    return with_dca_losses(type(output))(**fields, causal_loss=lc, causal_term=term, ce_loss=ce)


_OUTPUT_CLASSES = {}   # a transformers output class -> the same with causal_loss, causal_term and ce_loss


def with_dca_losses(output_class):
    """`output_class` (a transformers ModelOutput dataclass) with `causal_loss` (L_causal), `causal_term`
    (what was added to the loss for it, alpha * L_causal times the micro-batch's token share under
    num_items_in_batch: the term a loop that computes its own loss adds) and `ce_loss` (the model's own
    loss, before the term was added) fields. `patch` makes the class of the
    model's declared output ahead of time: creating a class inside a compiled forward breaks the graph."""
    derived = _OUTPUT_CLASSES.get(output_class)
    if derived is None:
        derived = _OUTPUT_CLASSES[output_class] = dataclasses.make_dataclass(
            output_class.__name__, [("causal_loss", Optional[torch.Tensor], None),
                                    ("causal_term", Optional[torch.Tensor], None),
                                    ("ce_loss", Optional[torch.Tensor], None)],
            bases=(output_class,), namespace={"__module__": __name__})
    return derived


def declared_output_class(model):
    """The ModelOutput dataclass `model.forward` declares it returns, or None."""
    try:
        returned = inspect.signature(type(model).forward, eval_str=True).return_annotation
    except (NameError, TypeError, ValueError):
        return None
    return returned if isinstance(returned, type) and dataclasses.is_dataclass(returned) else None


def _share(state, labels):
    """With Trainer's token-count normalisation (num_items_in_batch), the CE of a micro-batch is a sum over
    its tokens divided by the tokens of the whole accumulated batch; weighting L_causal by the micro-batch's
    share of those tokens makes the accumulated causal term the token-weighted mean, not the sum."""
    if state.num_items is None:
        return 1.0
    shifted = state.shift_labels if state.shift_labels is not None else labels[..., 1:]
    count = shifted.ne(-100).sum()
    total = state.num_items
    total = total.to(count.device) if isinstance(total, torch.Tensor) else torch.tensor(total, device=count.device)
    return (count.float() / total.float().clamp(min=1)).squeeze()
