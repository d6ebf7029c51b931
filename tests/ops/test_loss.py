"""The causal loss from the causal weights w against today's definition: X_G per token from the reference
equations (X_G = w av[:H]), projected, then torch.var, in float64, value and gradients."""

import warnings

import pytest
import torch

import fastdca.loss as loss_module
from fastdca import reference
from fastdca.loss import causal_loss, layer_causal_loss
from fastdca.ops import dca_attention

from backend_check import fresh_seed, make_inputs

NAMES = ("q", "k", "v", "ak", "av", "gate")


def reference_x_g(inputs, mask, causal_len, cu_seqlens=None):
    """X_G (B, T, Hq, D) per token by the reference equations."""
    _, weights = dca_attention(**inputs, causal_len=causal_len, key_padding_mask=mask, cu_seqlens=cu_seqlens,
                               xg="token", backend="reference")
    return reference.x_g(weights, inputs["av"])


def sample_variance_by_definition(x_g, members, project=None):
    """members (N, T) bool: the tokens of row 0 (packed) or of each row that make up each sample."""
    if members.shape[0] == x_g.shape[0]:
        means = [x_g[b][members[b]].mean(0).reshape(-1) for b in range(x_g.shape[0]) if members[b].any()]
    else:
        means = [x_g[0][m].mean(0).reshape(-1) for m in members if m.any()]
    means = torch.stack(means)
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


def gradients(loss, tensors):
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


# a packed row's tokens are laid out per sample by the patched model for the token variance
# (tests/hf/test_packing.py); the op's per-sequence sums serve the sample variance
LAYOUTS = [(variance, padding) for variance in ("sample", "token") for padding in (None, "left", "right")] \
    + [("sample", (3, 1, 5, 4))]


@pytest.mark.parametrize("variance,padding", LAYOUTS)
@pytest.mark.parametrize("space", ["head", "hidden"])
def test_layer_loss_and_gradients_equal_the_definition_on_x_g(variance, space, padding):
    """The loss from w and the Gram matrix equals the variance of X_G (projected by an o_proj with a bias)
    taken by its definition, to float64 round-off, with its gradients in q, k, v, ak, av, gate and the
    projection's weights; grouped-query heads, padding of both sides and packed sequences."""
    packed = isinstance(padding, tuple)
    B, Hq, Hkv, T, D, M, H = (1, 4, 2, 13, 16, 6, 2) if packed else (4, 4, 2, 9, 16, 6, 2)
    inputs, mask = make_inputs(B, Hq, Hkv, T, T, D, M, padding, torch.float64)
    cu = mask if packed else None
    mask = None if packed else mask
    real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    # with a bias, so that projecting sums instead of means would show
    project = torch.nn.Linear(Hq * D, 24, bias=True, dtype=torch.float64) if space == "hidden" else None
    leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
    wrt = [leaves[n] for n in NAMES] + ([] if project is None else list(project.parameters()))

    _, stats = dca_attention(**leaves, causal_len=H, key_padding_mask=mask, cu_seqlens=cu, xg=variance,
                             backend="torch")
    actual = layer_causal_loss(stats, leaves["av"], variance=variance, real=mask, project=project)

    x_g = reference_x_g(leaves, mask, H, cu)
    if variance == "sample":
        members = (torch.stack([(torch.arange(T) >= a) & (torch.arange(T) < b) for a, b in zip(cu[:-1], cu[1:])])
                   if packed else real)
        expected = sample_variance_by_definition(x_g, members, project)
    else:
        expected = token_variance_by_definition(x_g, real, project)

    assert actual.dtype == torch.float64 and actual.item() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    names = list(NAMES) + (["weight", "bias"] if project is not None else [])
    for name, a, e in zip(names, gradients(actual, wrt), gradients(expected, wrt)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-15, msg=lambda m, name=name: f"d{name}: {m}")


def test_lora_with_dropout_on_o_proj_sees_one_draw_for_every_token():
    """A LoRA o_proj is a fixed linear map in eval mode: the loss equals the definition. In training its dropout
    draws one mask for the basis rows, shared by every token, so the loss changes with the draw and its
    gradient reaches the LoRA weights."""
    peft = pytest.importorskip("peft")
    B, Hq, Hkv, T, D, M, H = 4, 4, 2, 9, 8, 6, 2
    inputs, mask = make_inputs(B, Hq, Hkv, T, T, D, M, "left", torch.float64)
    holder = torch.nn.Module()
    holder.o_proj = torch.nn.Linear(Hq * D, 12, bias=False, dtype=torch.float64)
    lora = peft.get_peft_model(holder, peft.LoraConfig(target_modules=["o_proj"], r=4, lora_dropout=0.5,
                                                       init_lora_weights=False)).double()
    o_proj = lora.base_model.model.o_proj
    _, weights = dca_attention(**inputs, causal_len=H, key_padding_mask=mask, xg="token", backend="torch")

    lora.eval()
    actual = layer_causal_loss(weights, inputs["av"], variance="token", real=mask, project=o_proj)
    expected = token_variance_by_definition(reference_x_g(inputs, mask, H), mask, o_proj)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)

    lora.train()
    draws = [layer_causal_loss(weights, inputs["av"], variance="token", real=mask, project=o_proj)
             for _ in range(4)]
    assert len({round(d.item(), 12) for d in draws}) > 1
    lora_b = next(p for n, p in lora.named_parameters() if "lora_B" in n)
    (grad,) = torch.autograd.grad(draws[0], [lora_b])
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_identical_samples_of_different_lengths_have_zero_variance_after_a_biased_projection():
    w = torch.rand(1, 1, 2, 3, dtype=torch.float64)
    counts = torch.tensor([2, 5, 7])
    sums = w[0, 0] * counts[:, None, None]                                       # the same mean w
    av = torch.randn(1, 4, 5, dtype=torch.float64)
    project = torch.nn.Linear(10, 4, bias=True, dtype=torch.float64)
    assert layer_causal_loss((sums, counts), av, project=project).item() == pytest.approx(0, abs=1e-15)


def test_fp32_statistics_give_fp32_loss_close_to_float64():
    inputs, mask = make_inputs(4, 2, 2, 12, 12, 32, 10, "left", torch.float32)
    _, stats = dca_attention(**inputs, causal_len=2, key_padding_mask=mask, backend="torch")
    actual = layer_causal_loss(stats, inputs["av"])
    inputs64 = {n: t.double() for n, t in inputs.items()}
    expected = sample_variance_by_definition(reference_x_g(inputs64, mask, 2), mask)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=0)


def test_single_sample_gives_zero_and_warns_once(monkeypatch):
    monkeypatch.setattr(loss_module, "_warned_single_sample", False)
    inputs, _ = make_inputs(1, 2, 2, 5, 5, 8, 4, None, torch.float64)
    _, stats = dca_attention(**inputs, causal_len=2, backend="torch")
    with pytest.warns(UserWarning, match="at least two samples"):
        assert layer_causal_loss(stats, inputs["av"]).item() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer_causal_loss(stats, inputs["av"]).item() == 0
        _, weights = dca_attention(**inputs, causal_len=2, xg="token", backend="torch")
        assert layer_causal_loss(weights, inputs["av"], variance="token").item() == 0


def test_sample_without_real_tokens_is_left_out():
    sums = torch.rand(3, 2, 4, dtype=torch.float64)
    counts = torch.tensor([2, 0, 5])
    av = torch.randn(1, 4, 3, dtype=torch.float64)
    x_g = reference.x_g(torch.stack([sums[0] / 2, sums[2] / 5]), av)                # (2, Hq, D)
    expected = torch.var(x_g.reshape(2, -1), dim=0).mean()
    torch.testing.assert_close(layer_causal_loss((sums, counts), av), expected)


@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("space", ["head", "hidden"])
@pytest.mark.parametrize("variance", ["sample", "token"])
def test_causal_loss_is_the_mean_over_layers_by_definition(variance, space, padding):
    """Three layers of one forward (the same rows, each its own adapter and o_proj): causal_loss, one
    variance over the layers side by side, equals the mean over layers of each layer's loss by definition,
    with its gradients."""
    B, Hq, Hkv, T, D, M, H = 4, 4, 2, 7, 8, 5, 2
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
    actual = causal_loss([stats for stats, *_ in layers], [leaves["av"] for *_, leaves in layers],
                         variance=variance, real=layers[0][1], projections=[project for _, _, project, _ in layers])
    expected = torch.stack(expected).mean()
    wrt = [leaf for *_, leaves in layers for name, leaf in leaves.items() if leaf.requires_grad]
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0)
    for a, e in zip(torch.autograd.grad(actual, wrt), torch.autograd.grad(expected, wrt)):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12)


def test_causal_loss_of_layers_of_different_widths_is_still_the_mean_over_layers():
    seed = fresh_seed()
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([3, 1, 4])
    layers = [(torch.rand(3, Hq, 2, generator=g, dtype=torch.float64), counts) for Hq in (2, 2, 5)]
    avs = [torch.randn(1, 4, 3, generator=g, dtype=torch.float64) for _ in layers]
    expected = torch.stack([layer_causal_loss(stats, av) for stats, av in zip(layers, avs)]).mean()
    torch.testing.assert_close(causal_loss(layers, avs), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="layer_stats"):
        causal_loss([], [])


def test_unknown_variance_is_refused():
    with pytest.raises(ValueError, match="variance must be 'sample' or 'token'"):
        layer_causal_loss((torch.zeros(2, 1, 1), torch.ones(2)), torch.zeros(1, 1, 1), variance="batch")
