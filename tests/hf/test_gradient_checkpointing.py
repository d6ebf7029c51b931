"""Gradient checkpointing in every layout: padded and packed rows x variance sample/token x xg_space
head/hidden x reentrant/non-reentrant, against the same step without checkpointing."""

import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

import fastdca
from fastdca.train import PadCollator

LENGTHS = (9, 3, 14, 1, 6)


def _model(variance, xg_space, alpha, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, causal_layers=2,
                                           variance=variance, xg_space=xg_space, alpha=alpha), backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()          # non-zero gates: the adapter term and X_G count
    return model.train()


def _batch(layout, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    if layout == "packed":
        return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows)
    if layout == "packed-positions":
        # only restarting position_ids: under checkpointing transformers materialises their (T, T) mask,
        # which must still read as packing (it once read as padding and attended across sequences)
        return DataCollatorWithFlattening(return_flash_attn_kwargs=False)(rows)
    return PadCollator(pad_token_id=0)(rows)


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("xg_space", ["head", "hidden"])
@pytest.mark.parametrize("variance", ["sample", "token"])
@pytest.mark.parametrize("layout", ["padded", "packed", "packed-positions"])
def test_checkpointing_gives_the_same_loss_and_gradients(layout, variance, xg_space, reentrant):
    seed = torch.seed() % 2**31
    print("seed", seed)
    batch = _batch(layout, seed)
    # Reentrant checkpointing runs each layer under no_grad: it can carry alpha = 0 exactly, and refuses
    # alpha > 0 before any gradient is lost (tested below); non-reentrant carries the causal term.
    model = _model(variance, xg_space, alpha=0.0 if reentrant else 1.0)
    loss, grads = _step(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    loss_gc, grads_gc = _step(model, batch)
    # float32: the recomputation repeats the same ops on the same inputs, so they agree to rounding
    torch.testing.assert_close(loss_gc, loss, rtol=1e-6, atol=0)
    assert set(grads_gc) == set(grads) and len(grads) == 4
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-6 * grads[name].abs().max().item())


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_reentrant_checkpointing_with_a_causal_term_is_refused(layout):
    model = _model("token", "hidden", alpha=1.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="non-reentrant gradient checkpointing"):
        model(**_batch(layout, 0))
