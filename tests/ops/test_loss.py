"""The causal loss against torch.var on the full X_G of the reference."""

import warnings

import pytest
import torch

import fastdca.loss as loss_module
from fastdca.loss import causal_loss, layer_causal_loss
from fastdca.ops import dca_attention

from backend_check import make_inputs


def reference_x_g(inputs, mask, causal_len):
    _, x_g = dca_attention(**inputs, causal_len=causal_len, key_padding_mask=mask, xg="token", backend="reference")
    return x_g                                                                    # (B, T, Hq, D)


def sample_variance_by_definition(x_g, real, project=None):
    B, T = real.shape
    means = torch.stack([x_g[b][real[b]].mean(0).reshape(-1) for b in range(B) if real[b].any()])
    if project is not None:
        means = project(means)
    return torch.var(means, dim=0, correction=1).mean()


def token_variance_by_definition(x_g, real, project=None):
    B, T = real.shape
    flat = x_g.reshape(B, T, -1)
    if project is not None:
        flat = project(flat)
    per_position = [torch.var(flat[real[:, t], t], dim=0, correction=1).mean()
                    for t in range(T) if real[:, t].sum() >= 2]
    return torch.stack(per_position).mean()


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("space", ["head", "hidden"])
@pytest.mark.parametrize("variance", ["sample", "token"])
def test_layer_loss_and_gradients_match_torch_var(variance, space, padding):
    B, Hq, Hkv, T, D, M, H = 4, 4, 2, 9, 16, 6, 2
    inputs, mask = make_inputs(B, Hq, Hkv, T, T, D, M, padding, torch.float64)
    real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    # with a bias, so that projecting sums instead of means would show
    project = torch.nn.Linear(Hq * D, 24, bias=True, dtype=torch.float64) if space == "hidden" else None
    leaves = {n: t.clone().requires_grad_(n in ("q", "ak", "av", "gate")) for n, t in inputs.items()}
    wrt = [t for t in leaves.values() if t.requires_grad]  # X_G does not depend on k and v

    _, stats = dca_attention(**leaves, causal_len=H, key_padding_mask=mask, xg=variance, backend="torch")
    actual = layer_causal_loss(stats, variance=variance, real=mask, project=project)
    actual_grads = torch.autograd.grad(actual, wrt)

    x_g = reference_x_g(leaves, mask, H)
    by_definition = (sample_variance_by_definition if variance == "sample" else token_variance_by_definition)
    expected = by_definition(x_g, real, project)
    expected_grads = torch.autograd.grad(expected, wrt)

    assert actual.dtype == torch.float64 and actual.item() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0)
    for name, a, e in zip(("q", "ak", "av", "gate"), actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


def test_identical_samples_of_different_lengths_have_zero_variance_after_a_biased_projection():
    x = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    counts = torch.tensor([2, 5, 7])
    sums = x[0, 0] * counts[:, None, None]                                       # the same mean X_G
    project = torch.nn.Linear(6, 4, bias=True, dtype=torch.float64)
    assert layer_causal_loss((sums, counts), project=project).item() == pytest.approx(0, abs=1e-15)


def test_fp32_statistics_give_fp32_loss_close_to_float64():
    inputs, mask = make_inputs(4, 2, 2, 12, 12, 32, 10, "left", torch.float32)
    _, stats = dca_attention(**inputs, causal_len=2, key_padding_mask=mask, backend="torch")
    actual = layer_causal_loss(stats)
    inputs64 = {n: t.double() for n, t in inputs.items()}
    expected = sample_variance_by_definition(reference_x_g(inputs64, mask, 2), mask)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=0)


def test_single_sample_gives_zero_and_warns_once(monkeypatch):
    monkeypatch.setattr(loss_module, "_warned_single_sample", False)
    inputs, _ = make_inputs(1, 2, 2, 5, 5, 8, 4, None, torch.float64)
    _, stats = dca_attention(**inputs, causal_len=2, backend="torch")
    with pytest.warns(UserWarning, match="at least two samples"):
        assert layer_causal_loss(stats).item() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer_causal_loss(stats).item() == 0
        _, x_g = dca_attention(**inputs, causal_len=2, xg="token", backend="torch")
        assert layer_causal_loss(x_g, variance="token").item() == 0


def test_sample_without_real_tokens_is_left_out():
    sums = torch.randn(3, 2, 4, dtype=torch.float64)
    counts = torch.tensor([2, 0, 5])
    expected = torch.var(torch.stack([sums[0] / 2, sums[2] / 5]), dim=0).mean()
    torch.testing.assert_close(layer_causal_loss((sums, counts)), expected)


@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("space", ["head", "hidden"])
@pytest.mark.parametrize("variance", ["sample", "token"])
def test_causal_loss_is_the_mean_over_layers_by_definition(variance, space, padding):
    """Three layers of one forward (the same rows, each its own adapter and o_proj): causal_loss, one
    variance over the layers side by side, equals the mean over layers of each layer's loss by definition,
    with its gradients."""
    B, Hq, Hkv, T, D, M, H = 4, 4, 2, 7, 8, 5, 2
    seed = torch.seed()
    print(f"seed {seed}")
    layers, expected = [], []
    for _ in range(3):
        inputs, mask = make_inputs(B, Hq, Hkv, T, T, D, M, padding, torch.float64)
        if layers:
            mask = layers[0][1]        # one forward: every layer sees the same padding
        real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
        project = torch.nn.Linear(Hq * D, 12, bias=True, dtype=torch.float64) if space == "hidden" else None
        leaves = {n: t.clone().requires_grad_(n in ("ak", "av", "gate")) for n, t in inputs.items()}
        _, stats = dca_attention(**leaves, causal_len=H, key_padding_mask=mask, xg=variance, backend="torch")
        layers.append((stats, mask, project, leaves))
        by_definition = (sample_variance_by_definition if variance == "sample" else token_variance_by_definition)
        expected.append(by_definition(reference_x_g(leaves, mask, H), real, project))
    actual = causal_loss([stats for stats, *_ in layers], variance=variance, real=layers[0][1],
                         projections=[project for _, _, project, _ in layers])
    expected = torch.stack(expected).mean()
    wrt = [leaf for *_, leaves in layers for name, leaf in leaves.items() if leaf.requires_grad]
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0)
    for a, e in zip(torch.autograd.grad(actual, wrt), torch.autograd.grad(expected, wrt)):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12)


def test_causal_loss_of_layers_of_different_widths_is_still_the_mean_over_layers():
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 1, 4])
    layers = [(torch.randn(3, Hq, 4, generator=g, dtype=torch.float64), counts) for Hq in (2, 2, 5)]
    expected = torch.stack([layer_causal_loss(stats) for stats in layers]).mean()
    torch.testing.assert_close(causal_loss(layers), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="layer_stats"):
        causal_loss([])


def test_unknown_variance_is_refused():
    with pytest.raises(ValueError, match="variance must be 'sample' or 'token'"):
        layer_causal_loss((torch.zeros(2, 1, 1), torch.ones(2)), variance="batch")
