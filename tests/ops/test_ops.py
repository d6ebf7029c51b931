"""dca_attention's torch backend against the literal equations of fastdca.reference in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

import backend_check
from backend_check import DEVICE, check_against_reference, make_inputs
from fastdca import reference
from fastdca.ops import dca_attention

# (B, Hq, Hkv, T, S, D, M, H, padding)
SHAPES = [
    pytest.param((2, 4, 4, 20, 20, 64, 10, 2, None), id="mha"),
    pytest.param((2, 4, 2, 33, 33, 80, 10, 1, None), id="gqa-d80-T33"),
    pytest.param((2, 6, 2, 17, 17, 128, 1, 1, "right"), id="gqa-d128-M1-H=M-right"),
    pytest.param((3, 4, 1, 1, 37, 64, 10, 0, "left"), id="decode-T1-S37-H0-left"),
    pytest.param((2, 4, 2, 5, 23, 64, 10, 10, "left"), id="cache-T5-S23-H=M-left"),
    pytest.param((2, 2, 2, 19, 19, 64, 10, 2, "right"), id="right-padding"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("xg", ["sample", "token", None])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_reference(shape, xg, dtype):
    check_against_reference("torch", shape, xg, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["dq", "dk", "dgate"])
def test_check_rejects_a_gradient_off_by_one_percent(monkeypatch, name, dtype):
    """The allowances for delta's rounding and float32 sums do not hide a real error: 1% of the largest
    entry (twice the tolerance in bf16). Not less in float32: where the gate sum cancels, its float32
    rounding alone can exceed 1e-5 of the result, and the allowance is sized for that."""
    real_run = backend_check.run
    error = max(0.01, 2 * backend_check.GRAD_TOLERANCE[dtype])

    def off(backend, *args, **kwargs):
        results, stats = real_run(backend, *args, **kwargs)
        if backend == "torch":
            results[name] = results[name] + error * results[name].abs().max()
        return results, stats

    monkeypatch.setattr(backend_check, "run", off)
    monkeypatch.setattr(backend_check, "WORST", {})  # keep these errors out of the printed worst errors
    with pytest.raises(AssertionError, match=f"^{name}: relative error"):
        check_against_reference("torch", SHAPES[3].values[0], "sample", dtype)


def test_reference_padding_row_without_keys_is_zero_not_nan():
    inputs, _ = make_inputs(1, 2, 2, 4, 4, 16, 3, None, torch.float64)
    mask = torch.tensor([[False, False, True, True]], device=DEVICE)
    inputs["gate"] = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    for backend in ("reference", "torch"):
        out, _ = dca_attention(**inputs, causal_len=1, key_padding_mask=mask, backend=backend)
        assert torch.isfinite(out).all()
        assert out[0, :2].abs().max() == 0, backend


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_zero_gate_is_exactly_causal_attention(backend):
    inputs, _ = make_inputs(2, 4, 2, 13, 13, 32, 10, None, torch.float64)
    inputs["gate"] = torch.zeros(4, dtype=torch.float64, device=DEVICE)
    out, _ = dca_attention(**inputs, causal_len=2, backend=backend)
    plain = F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True, enable_gqa=True)
    if backend == "torch":
        assert torch.equal(out, plain.transpose(1, 2))
    else:
        torch.testing.assert_close(out, plain.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_identity_gate_and_custom_scale():
    inputs, mask = make_inputs(2, 2, 2, 9, 9, 16, 4, "left", torch.float64)
    kwargs = dict(causal_len=2, key_padding_mask=mask, gate_fn="identity", scale=0.3)
    out, stats = dca_attention(**inputs, **kwargs, backend="torch")
    ref_out, ref_stats = dca_attention(**inputs, **kwargs, backend="reference")
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[0], ref_stats[0], rtol=1e-12, atol=1e-12)
    # identity gate means g = gate: doubling the gate doubles the adapter term
    inputs2 = dict(inputs, gate=2 * inputs["gate"])
    out2, _ = dca_attention(**inputs2, **kwargs, backend="reference")
    inputs0 = dict(inputs, gate=torch.zeros_like(inputs["gate"]))
    out0, _ = dca_attention(**inputs0, **kwargs, backend="reference")
    torch.testing.assert_close(out2 - out0, 2 * (out - out0), rtol=1e-10, atol=1e-10)


def test_reference_sample_stats_are_sums_of_token_weights():
    inputs, mask = make_inputs(3, 4, 2, 11, 11, 16, 5, "right", torch.float64)
    _, (sums, counts) = dca_attention(**inputs, causal_len=3, key_padding_mask=mask, backend="reference")
    _, weights = dca_attention(**inputs, causal_len=3, key_padding_mask=mask, xg="token", backend="reference")
    torch.testing.assert_close(sums, (weights * mask[:, :, None, None]).sum(1), rtol=1e-12, atol=1e-12)
    assert counts.tolist() == mask.sum(1).tolist()


def test_reference_weights_are_the_gated_adapter_softmax_and_give_x_g_by_its_definition():
    # w = g * softmax(q ak^T * scale)[..., :H] and X_G = w av[:H], written out head by head
    inputs, _ = make_inputs(2, 4, 2, 7, 7, 8, 5, None, torch.float64)
    H = 3
    _, weights = dca_attention(**inputs, causal_len=H, xg="token", backend="reference")
    q, ak, av, gate = (inputs[n].cpu() for n in ("q", "ak", "av", "gate"))
    for h in range(4):
        scores = q[:, h] @ ak[h // 2].T / math.sqrt(8)                            # (B, T, M)
        w = torch.tanh(gate[h]) * torch.softmax(scores, dim=-1)[..., :H]
        torch.testing.assert_close(weights[:, :, h].cpu(), w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(reference.x_g(weights, av)[:, :, h].cpu(), w @ av[h // 2, :H],
                                   rtol=1e-12, atol=1e-14)


def test_reference_matches_hand_computed_single_query():
    # One query, one key, one adapter token: the prompt softmax is 1 and the adapter softmax is 1,
    # so out = v + tanh(gate) * av.
    q = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    k = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    v = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    ak = torch.zeros(1, 1, 2, dtype=torch.float64)
    av = torch.tensor([[[10.0, 20.0]]], dtype=torch.float64)
    gate = torch.tensor([0.5], dtype=torch.float64)
    out, (sums, counts) = reference.dca_attention(q, k, v, ak, av, gate, causal_len=1)
    g = math.tanh(0.5)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1 + 10 * g, 2 + 20 * g], dtype=torch.float64))
    # the causal weight of the one adapter token is g, and X_G = g av
    torch.testing.assert_close(sums[0, 0], torch.tensor([g], dtype=torch.float64))
    torch.testing.assert_close(reference.x_g(sums, av)[0, 0], torch.tensor([10 * g, 20 * g], dtype=torch.float64))
    assert counts.tolist() == [1]


# --------------------------------------------------------------------------------------------------
# Argument errors


def good_inputs():
    inputs, mask = make_inputs(2, 4, 2, 5, 7, 16, 3, "left", torch.float32)
    return inputs, mask


@pytest.mark.parametrize("name,value,match", [
    ("q", torch.randn(2, 4, 5), r"q must have shape \(B, Hq, T, D\)"),
    ("k", torch.randn(2, 2, 7, 8), r"k must have shape \(2, 2, 7, 16\)"),
    ("v", torch.randn(2, 2, 6, 16), r"v must have shape \(2, 2, 7, 16\)"),
    ("k", torch.randn(2, 3, 7, 16), r"k must have Hkv heads dividing Hq=4"),
    ("k", torch.randn(2, 2, 4, 16), r"k must have S >= T=5"),
    ("ak", torch.randn(2, 3, 8), r"ak must have shape \(2, 3, 16\)"),
    ("av", torch.randn(2, 4, 16), r"av must have shape \(2, 3, 16\)"),
    ("gate", torch.randn(2), r"gate must have shape \(4,\)"),
    ("q", torch.randn(2, 4, 5, 300), r"head dim D must be at most 256"),
    ("q", torch.randn(0, 4, 5, 16), r"q must have B, Hq, T and D >= 1, got shape \(0, 4, 5, 16\)"),
    ("v", torch.randn(2, 2, 7, 16, dtype=torch.float64), r"v must have the dtype of q"),
    ("q", torch.randint(0, 3, (2, 4, 5, 16)), r"q must have dtype in"),
    ("gate", [0.0] * 4, r"gate must be a torch.Tensor"),
])
def test_bad_tensor_arguments(name, value, match):
    inputs, mask = good_inputs()
    inputs[name] = value
    with pytest.raises(ValueError, match=match):
        dca_attention(**inputs, causal_len=1, key_padding_mask=mask)


@pytest.mark.parametrize("kwargs,match", [
    (dict(causal_len=4), r"causal_len must be an integer in \[0, M=3\]"),
    (dict(causal_len=-1), r"causal_len must be an integer"),
    (dict(causal_len=1.0), r"causal_len must be an integer"),
    (dict(key_padding_mask=torch.ones(2, 7)), r"key_padding_mask must be a bool tensor"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), r"key_padding_mask must have shape \(2, 7\)"),
    (dict(key_padding_mask=torch.ones(1, 7, dtype=torch.bool)), r"key_padding_mask must have shape \(2, 7\)"),
    (dict(scale=-1.0), r"scale must be a positive finite number"),
    (dict(scale=float("inf")), r"scale must be a positive finite number"),
    (dict(scale=float("nan")), r"scale must be a positive finite number"),
    (dict(gate_fn="sigmoid"), r"gate_fn must be one of \('tanh', 'identity'\)"),
    (dict(xg="mean"), r"xg must be one of"),
    (dict(backend="cuda"), r"backend must be one of"),
])
def test_bad_keyword_arguments(kwargs, match):
    inputs, mask = good_inputs()
    call = dict(causal_len=1, key_padding_mask=mask)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dca_attention(**inputs, **call)


def test_backend_environment_override(monkeypatch):
    inputs, mask = good_inputs()
    monkeypatch.setenv("FASTDCA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTDCA_BACKEND must be one of"):
        dca_attention(**inputs, causal_len=1, key_padding_mask=mask)
    monkeypatch.setenv("FASTDCA_BACKEND", "reference")
    out, _ = dca_attention(**inputs, causal_len=1, key_padding_mask=mask)
    ref, _ = reference.dca_attention(**inputs, causal_len=1, key_padding_mask=mask)
    assert torch.equal(out, ref)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, mask = good_inputs()
    inputs, mask = {n: t.cpu() for n, t in inputs.items()}, mask.cpu()
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        dca_attention(**inputs, causal_len=1, key_padding_mask=mask, backend="triton")



@pytest.fixture
def tf32_settings():
    """Sets torch's TF32 switches (the new fp32_precision API; `legacy=True` sets allow_tf32) and puts
    them back afterwards (monkeypatch cannot undo these properties)."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)

    def set_(matmul_precision=None, global_precision=None, legacy=None):
        if global_precision is not None:
            torch.backends.fp32_precision = global_precision
        if matmul_precision is not None:
            matmul.fp32_precision = matmul_precision
        if legacy is not None:
            matmul.allow_tf32 = legacy

    yield set_
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]


def test_auto_backend_by_device_and_dtype(monkeypatch, tf32_settings):
    """auto: the kernels for fp16/bf16 CUDA tensors, and float32 only where torch allows TF32 (the
    exact-fp32 kernels are a correctness path SDPA outruns); torch on the CPU and for float64."""
    from types import SimpleNamespace

    from fastdca.ops import resolve_backend

    monkeypatch.delenv("FASTDCA_BACKEND", raising=False)

    def cuda(dtype):
        return SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0))

    tf32_settings("ieee")
    assert resolve_backend(None, cuda(torch.float16)) == "triton"
    assert resolve_backend(None, cuda(torch.bfloat16)) == "triton"
    assert resolve_backend(None, cuda(torch.float32)) == "torch"
    assert resolve_backend(None, cuda(torch.float64)) == "torch"
    assert resolve_backend(None, torch.empty(1, dtype=torch.float16)) == "torch"
    tf32_settings("tf32")
    assert resolve_backend(None, cuda(torch.float32)) == "triton"


def test_tf32_setting_is_read_under_either_api(tf32_settings):
    """The legacy allow_tf32 read raises once fp32_precision was set; tf32_allowed reads both."""
    from fastdca.kernels.plumbing import tf32_allowed

    tf32_settings("tf32")
    assert tf32_allowed()
    tf32_settings("ieee")
    assert not tf32_allowed()
    tf32_settings("none", "tf32")
    assert tf32_allowed()
    tf32_settings("none", "ieee")
    assert not tf32_allowed()
    tf32_settings(legacy=True)
    assert tf32_allowed()


# --------------------------------------------------------------------------------------------------
# sliding-window attention (Mistral, Qwen2, Phi-3, Gemma 3's local layers)

WINDOW_SHAPES = [
    pytest.param((2, 4, 2, 21, 21, 64, 10, 2, None), 5, id="gqa-T21-w5"),
    pytest.param((2, 4, 4, 17, 17, 80, 10, 2, "left"), 1, id="left-w1"),
    pytest.param((2, 4, 2, 19, 19, 64, 10, 2, "right"), 7, id="right-w7"),
    pytest.param((3, 4, 1, 1, 37, 64, 10, 2, "left"), 9, id="decode-T1-S37-w9"),
    pytest.param((2, 4, 2, 5, 23, 64, 10, 10, "left"), 6, id="cache-T5-S23-w6"),
    pytest.param((1, 4, 2, 30, 30, 64, 10, 2, (9, 3, 14, 4)), 4, id="packed-w4"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("xg", ["sample", "token"])
@pytest.mark.parametrize("shape, window", WINDOW_SHAPES)
def test_torch_backend_with_a_window_matches_reference(shape, window, xg, dtype):
    check_against_reference("torch", shape, xg, dtype, window=window)


def test_a_window_covering_every_key_changes_nothing_and_bad_windows_and_caps_are_refused():
    inputs, _ = make_inputs(2, 4, 2, 9, 9, 16, 3, None, torch.float32, seed=5)
    plain, _ = dca_attention(**inputs, causal_len=2, backend="torch")
    covering, _ = dca_attention(**inputs, causal_len=2, window=9, backend="torch")
    assert torch.equal(plain, covering)
    windowed, _ = dca_attention(**inputs, causal_len=2, window=3, backend="torch")
    assert not torch.equal(plain, windowed)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        dca_attention(**inputs, causal_len=2, window=0)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        dca_attention(**inputs, causal_len=2, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        dca_attention(**inputs, causal_len=2, softcap=float("inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, window", [WINDOW_SHAPES[0], WINDOW_SHAPES[1], WINDOW_SHAPES[4], WINDOW_SHAPES[5],
                                           pytest.param((2, 4, 2, 13, 13, 64, 10, 2, "left"), None, id="left")])
def test_torch_backend_with_soft_capped_scores_matches_reference(shape, window, dtype):
    """Gemma 2's attn_logit_softcapping, here at 2.0 so that the cap bends the scores of random inputs."""
    check_against_reference("torch", shape, "token", dtype, window=window, softcap=2.0)


def test_nan_in_a_padded_key_slot_stays_out_of_real_tokens():
    """A padded slot's k and v are never attended: whatever they hold (NaN from an uninitialised cache
    slot, say) must not reach the real tokens. The reference and torch backends; the fused kernels still
    multiply a padded slot's v by its 0 weight (changing their loads waits for a GPU check)."""
    inputs, mask = good_inputs()
    assert not mask.all()
    poisoned = {n: t.clone() for n, t in inputs.items()}
    poisoned["k"][~mask[:, None, :, None].expand_as(poisoned["k"])] = float("nan")
    poisoned["v"][~mask[:, None, :, None].expand_as(poisoned["v"])] = float("nan")
    for backend in ("reference", "torch"):
        clean, _ = dca_attention(**inputs, causal_len=1, key_padding_mask=mask, backend=backend)
        out, _ = dca_attention(**poisoned, causal_len=1, key_padding_mask=mask, backend=backend)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out, clean, rtol=0, atol=0)
