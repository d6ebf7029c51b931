"""A loop that computes its own loss from the logits gets the causal term from outputs.causal_term, and
one that leaves it out is stopped at its first backward."""

import importlib

import pytest
import torch
import torch.nn.functional as F
import transformers

import fastdca
from fastdca import DCAConfig

patch_mod = importlib.import_module("fastdca.patch")  # the module; `fastdca.patch` is the function


def _model(alpha, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config)
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=alpha))
    with torch.no_grad():
        for name, p in patch_mod.adapter_state_dict(model).items():
            if name.endswith("gate"):
                p.uniform_(-1, 1)
    return model.train()


def _batch(seed):
    ids = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def _ce(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _grads(model):
    return {n: p.grad.clone() for n, p in patch_mod.adapter_state_dict(model).items()}


def test_own_loss_plus_causal_term_equals_the_model_loss():
    seed = torch.seed() % 2**31
    print("seed", seed)
    ids, mask = _batch(seed)
    model = _model(2.0)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    expected = _grads(model)
    model.zero_grad()
    out = model(ids, attention_mask=mask)               # no labels: the loop computes the loss itself
    loss = _ce(out.logits, ids) + out.causal_term
    assert out.causal_term.item() == pytest.approx(2.0 * out.causal_loss.item(), rel=1e-6) and out.causal_term > 0
    loss.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)


def test_a_backward_without_the_causal_term_raises():
    ids, mask = _batch(0)
    model = _model(1.0)
    out = model(ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="causal term did not reach this backward"):
        _ce(out.logits, ids).backward()


def test_without_a_causal_term_nothing_is_watched():
    ids, mask = _batch(0)
    _ce(_model(0.0)(ids, attention_mask=mask).logits, ids).backward()   # alpha = 0: LLaMA-Adapter, as asked
    model = _model(1.0).eval()
    _ce(model(ids, attention_mask=mask).logits, ids).backward()          # eval mode, no labels: nothing collected
