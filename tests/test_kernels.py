"""The triton backend (fastdca.kernels) against the literal equations of fastdca.reference in float64.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); with one they run compiled.
"""

import os

import pytest
import torch

from fastdca import reference
from fastdca.ops import dca_attention

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the triton backend needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Errors are relative to the largest entry of the float64 reference, fed the same rounded inputs.
# fp32: the kernels accumulate in fp32 over at most ~70 keys; 1e-5 is ~100 ulp (2^-24) of headroom
#   for exp2-vs-exp and summation order (TF32 on a real GPU would need ~1e-3; the interpreter's fp32
#   dot is exact).
# fp16: the output's own rounding is u = 2^-11 = 4.9e-4, P is rounded to fp16 before P v: 1e-3 = ~2u.
#   Gradients also round dS and P^T to fp16 and cancel dP - delta with delta formed from the rounded
#   output (as FlashAttention does): 2e-3 = ~4u.
# bf16: u = 2^-8 = 3.9e-3, but the interpreter rounds fp32 -> bf16 by truncation (error up to 2u =
#   7.8e-3 per stored element), and all kernel arithmetic is fp32 after the cast: 1e-2 outputs,
#   1.6e-2 gradients (~4u). The same numbers as tests/test_ops.py uses for the torch backend.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, Hq, Hkv, T, S, D, M, H, padding)
SHAPES = [
    pytest.param((2, 4, 4, 20, 20, 64, 10, 2, None), id="mha-d64"),
    pytest.param((2, 4, 2, 33, 33, 80, 10, 1, "left"), id="gqa-d80-T=S=33-left"),
    pytest.param((1, 4, 1, 45, 45, 128, 1, 1, "right"), id="gqa4-d128-M1-H=M-right"),
    pytest.param((2, 4, 2, 1, 37, 64, 10, 0, "left"), id="decode-T1-S37-H0-left"),
    pytest.param((2, 2, 2, 1, 37, 80, 10, 10, None), id="decode-T1-S37-mha-H=M"),
    pytest.param((2, 4, 2, 21, 70, 64, 10, 10, "left"), id="cache-T21-S70-H=M-left"),
    pytest.param((2, 2, 1, 67, 67, 64, 10, 2, "right"), id="T=S=67-two-query-blocks-right"),
]

WORST = {}  # (dtype, tensor) -> worst relative error seen, printed by the last test (pytest -s)


def make_inputs(B, Hq, Hkv, T, S, D, M, padding, dtype, seed=0):
    """Random inputs in `dtype` and a padding mask; the gate is non-zero so the adapter term counts."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    inputs = dict(q=randn(B, Hq, T, D), k=randn(B, Hkv, S, D), v=randn(B, Hkv, S, D),
                  ak=randn(Hkv, M, D), av=randn(Hkv, M, D), gate=randn(Hq))
    mask = None
    if padding is not None:
        mask = torch.ones(B, S, dtype=torch.bool)
        lengths = torch.randint(1, S, (B,), generator=gen)
        lengths[0] = S // 2  # with T < S some queries of sample 0 see no real key
        for b, n in enumerate(lengths.tolist()):
            if padding == "left":
                mask[b, : S - n] = False
            else:
                mask[b, n:] = False
        mask = mask.to(DEVICE)
    return inputs, mask


def run(backend, inputs, mask, causal_len, xg, grads_out, dtype=None, **kwargs):
    leaves = {n: t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for n, t in inputs.items()}
    out, stats = dca_attention(**leaves, causal_len=causal_len, key_padding_mask=mask, xg=xg,
                               backend=backend, **kwargs)
    xg_tensor = stats[0] if xg == "sample" else stats
    loss = 0.0
    if grads_out[0] is not None:
        loss = (out.to(torch.float64) * grads_out[0]).sum()
    if xg is not None:
        loss = loss + (xg_tensor.to(torch.float64) * grads_out[1]).sum()
    loss.backward()
    results = {"out": out, "xg": xg_tensor}
    results.update({f"d{n}": leaf.grad for n, leaf in leaves.items()})
    return results, stats


def relative_error(actual, expected):
    expected = expected.to(torch.float64).cpu()
    return ((actual.to(torch.float64).cpu() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def upstream(B, T, Hq, D, xg, dtype, seed=1):
    """Upstream gradients representable in `dtype`, so both backends receive the same values."""
    gen = torch.Generator().manual_seed(seed)
    shape = (B, Hq, D) if xg == "sample" else (B, T, Hq, D)
    return tuple(torch.randn(s, generator=gen).to(dtype).to(torch.float64).to(DEVICE)
                 for s in ((B, T, Hq, D), shape))


def check_against_reference(shape, xg, dtype, gate_fn="tanh", scale=None, with_dout=True):
    B, Hq, Hkv, T, S, D, M, H, padding = shape
    inputs, mask = make_inputs(B, Hq, Hkv, T, S, D, M, padding, dtype)
    grads_out = upstream(B, T, Hq, D, xg, dtype)
    if not with_dout:
        grads_out = (None, grads_out[1])
    kw = dict(gate_fn=gate_fn, scale=scale)
    actual, stats = run("triton", inputs, mask, H, xg, grads_out, **kw)
    expected, ref_stats = run("reference", inputs, mask, H, xg, grads_out, dtype=torch.float64, **kw)

    assert actual["out"].shape == (B, T, Hq, D) and actual["out"].dtype == dtype
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, name
            continue
        assert actual[name].shape == value.shape, name
        assert actual[name].dtype == (torch.float32 if (name == "xg" and xg == "sample") else dtype), name
        assert torch.isfinite(actual[name]).all(), name
        tolerance = (GRAD_TOLERANCE if name.startswith("d") else TOLERANCE)[dtype]
        if value.abs().max() == 0:
            if not name.startswith("d"):   # X_G over H = 0 adapter tokens: nothing is summed
                assert actual[name].abs().max() == 0, f"{name} must be exactly 0"
                continue
            # a gradient that is 0 by cancellation (S = 1: dS = P (dP - delta) with P = 1) can only
            # match to rounding of the terms that cancel: measure it against the largest gradient
            scale = max(v.abs().max().item() for n, v in expected.items() if n.startswith("d") and v is not None)
            err = actual[name].abs().max().item() / scale
            assert err <= tolerance, f"{name}: {err:.2e} of the largest gradient > {tolerance:.0e}"
            continue
        err = relative_error(actual[name], value)
        key = (str(dtype).replace("torch.", ""), name)
        WORST[key] = max(WORST.get(key, 0.0), err)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"
    if xg == "sample":
        assert stats[1].dtype == torch.int64 and torch.equal(stats[1].cpu(), ref_stats[1].cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("xg", ["sample", "token", None])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, xg, dtype):
    check_against_reference(shape, xg, dtype)


@pytest.mark.parametrize("xg", ["sample", "token"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]])
def test_triton_bf16_matches_reference(shape, xg):
    check_against_reference(shape, xg, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [
    pytest.param((1, 2, 1, 9, 30, 64, 64, 64, "left"), id="M=H=64"),
    pytest.param((1, 2, 2, 18, 18, 256, 10, 2, "right"), id="D=256"),
    pytest.param((2, 3, 1, 13, 29, 40, 7, 3, None), id="D=40-M7-gqa3"),
    pytest.param((1, 2, 1, 1, 1, 80, 19, 9, None), id="T=S=1"),
])
def test_limits_of_the_contract(shape, dtype):
    """The largest M and D the op accepts, a small head dim that is not a power of two, one key."""
    check_against_reference(shape, "token", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_identity_gate_custom_scale(dtype):
    check_against_reference((2, 4, 2, 19, 26, 64, 10, 3, "left"), "token", dtype, gate_fn="identity", scale=0.07)


@pytest.mark.parametrize("xg", ["sample", "token"])
def test_gradient_through_xg_stats_only(xg):
    """No gradient reaches `out` (dout is None in the backward): the X_G statistics alone drive it."""
    check_against_reference((2, 4, 2, 20, 20, 64, 10, 2, "right"), xg, torch.float32, with_dout=False)


@pytest.mark.parametrize("T,S,padding", [(45, 45, None), (45, 45, "left"), (23, 61, "right"), (1, 50, "left")])
def test_small_blocks_many_iterations(monkeypatch, T, S, padding):
    """16 x 16 blocks: many key blocks per row, blocks skipped above the diagonal, partial tiles."""
    from fastdca.kernels import dca_attention as kmod

    def small(D, T, dtype=None, original=kmod.forward_config):
        return dict(original(D, T, dtype), BLOCK_M=16, BLOCK_N=16)

    monkeypatch.setattr(kmod, "forward_config", small)
    monkeypatch.setattr(kmod, "dkdv_config", small)
    monkeypatch.setattr(kmod, "dq_config", small)
    for xg in ("sample", "token"):
        check_against_reference((2, 4, 2, T, S, 64, 10, 2, padding), xg, torch.float32)


def test_row_without_visible_key_is_zero_not_nan():
    inputs, _ = make_inputs(1, 2, 2, 4, 8, 64, 10, None, torch.float32)
    mask = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    mask[0, :6] = False                         # query 0 sits at key 4: no real key at or before it
    inputs["gate"] = torch.zeros_like(inputs["gate"])
    leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
    out, _ = dca_attention(**leaves, causal_len=2, key_padding_mask=mask, xg=None, backend="triton")
    assert out[0, :2].abs().max() == 0 and torch.isfinite(out).all()
    out.sum().backward()
    for n, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), n


def test_backward_is_deterministic():
    inputs, mask = make_inputs(2, 4, 2, 33, 40, 64, 10, "left", torch.float32)
    grads_out = upstream(2, 33, 4, 64, "sample", torch.float32)
    first, _ = run("triton", inputs, mask, 2, "sample", grads_out)
    second, _ = run("triton", inputs, mask, 2, "sample", grads_out)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_hf_layout_noncontiguous_inputs():
    """q, k, v as HF builds them: transposed views of (B, T, H, D) tensors."""
    inputs, mask = make_inputs(2, 4, 2, 20, 20, 64, 10, "right", torch.float32)
    for n in ("q", "k", "v"):
        inputs[n] = inputs[n].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[n].is_contiguous()
    grads_out = upstream(2, 20, 4, 64, "token", torch.float32)
    actual, _ = run("triton", inputs, mask, 2, "token", grads_out)
    expected, _ = run("reference", inputs, mask, 2, "token", grads_out, dtype=torch.float64)
    for name, value in expected.items():
        assert relative_error(actual[name], value) <= TOLERANCE[torch.float32], name


def test_float64_is_refused():
    inputs, _ = make_inputs(1, 2, 2, 4, 4, 64, 10, None, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        dca_attention(**inputs, causal_len=2, backend="triton")


def test_zz_print_worst_errors():
    """Summary of the worst relative errors of this run (shown with pytest -s)."""
    for (dtype, name), err in sorted(WORST.items()):
        print(f"worst {dtype:9s} {name:6s} {err:.2e}")

