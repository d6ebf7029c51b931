"""The causal term's share of the adapter gradient (fastdca.grad_share) against a direct computation,
and its place in fastdca train's history."""

import math
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fastdca import DCAConfig
from fastdca.causal_term import unchecked
from fastdca.grad_share import INERT_SHARE, causal_gradient_share, warn_if_causal_term_inert
from fastdca.patch import adapter_state_dict, patch
from fastdca.tasks import LetterConcatenation
from fastdca.train import PadCollator, TrainSettings, tokenize_examples, train


def tiny(path, config, seed=0):
    model, tokenizer = LlamaForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    torch.manual_seed(seed)
    patch(model, config)
    with torch.no_grad():   # gates off zero, so the causal term has a gradient to give
        for name, p in adapter_state_dict(model).items():
            if name.endswith("gate"):
                p.uniform_(-1, 1)
    return model.train(), tokenizer


@pytest.mark.parametrize("variance,xg_space", [("sample", "head"), ("token", "hidden")])
def test_share_equals_separate_backward_passes(tiny_model_dir, variance, xg_space):
    config = DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, alpha=3.0, variance=variance, xg_space=xg_space)
    model, tokenizer = tiny(tiny_model_dir, config)
    examples = LetterConcatenation(n_train=6).examples("train")
    batch = PadCollator(tokenizer.pad_token_id)(tokenize_examples(examples, tokenizer, 256))
    params = list(adapter_state_dict(model).values())

    outputs = model(**batch)
    share = causal_gradient_share(outputs, params)

    def grads(loss):
        for p in params:
            p.grad = None
        loss.backward()
        return torch.cat([p.grad.flatten().double() for p in params])

    with unchecked():   # a CE-only backward on purpose: the guard against a dropped causal term stands aside
        ce_only = grads(model(**batch).ce_loss)
    causal_only = grads(config.alpha * model(**batch).causal_loss)
    expected = causal_only.norm().item() / ce_only.norm().item()
    assert 0 < expected < math.inf
    assert share == pytest.approx(expected, rel=1e-5)
    outputs.loss.backward()   # the caller's own backward still works on the retained graph


def test_share_is_zero_without_a_causal_term(tiny_model_dir):
    model, tokenizer = tiny(tiny_model_dir, DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, alpha=0.0))
    batch = PadCollator(tokenizer.pad_token_id)(tokenize_examples(
        LetterConcatenation(n_train=4).examples("train"), tokenizer, 256))
    assert causal_gradient_share(model(**batch), adapter_state_dict(model).values()) == 0.0


def test_train_logs_the_share_at_every_logging_step(tiny_model_dir, tmp_path):
    config = DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2)
    model, tokenizer = tiny(tiny_model_dir, config)
    settings = TrainSettings(max_steps=4, batch_size=4, learning_rate=1e-2, logging_steps=2, save_steps=50)
    history = train(model, tokenizer, LetterConcatenation(n_train=32).examples("train"), tmp_path / "run",
                    config=config, settings=settings, progress=False)
    assert [h["step"] for h in history] == [2, 4]
    assert all(h["grad_share"] is not None and 0 < h["grad_share"] < math.inf for h in history)


def test_an_inert_causal_term_is_reported():
    """The median share over the second half of the logged steps decides; alpha = 0 is never reported."""
    history = [{"grad_share": g} for g in (1e-4, 5e-2, 5e-5, 6e-5)]
    with pytest.warns(UserWarning, match=r"stayed near 5.5e-05 .*alpha=1 it barely pulled on the adapter"):
        assert warn_if_causal_term_inert(history, 1.0) == pytest.approx(5.5e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rising = [{"grad_share": g} for g in (1e-4, 2 * INERT_SHARE, 3 * INERT_SHARE)]   # small only at the start
        assert warn_if_causal_term_inert(rising, 1.0) == pytest.approx(2.5 * INERT_SHARE)
        assert warn_if_causal_term_inert([{"grad_share": 0.0}], 0.0) is None
        assert warn_if_causal_term_inert([{"grad_share": None}], 1.0) is None


def test_train_warns_when_alpha_does_nothing(tiny_model_dir, tmp_path):
    config = DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, alpha=1e-9)
    model, tokenizer = tiny(tiny_model_dir, config)
    settings = TrainSettings(max_steps=2, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=50)
    with pytest.warns(UserWarning, match="barely pulled on the adapter"):
        train(model, tokenizer, LetterConcatenation(n_train=16).examples("train"), tmp_path / "run",
              config=config, settings=settings, progress=False)
