"""What the backend tests share: fresh random inputs, one forward and backward through a backend, and
the comparison of a backend against fastdca.reference in float64 with tolerances justified by dtype."""

import random

import torch

from fastdca.ops import dca_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Errors are relative to the largest entry of the float64 reference, fed the same rounded inputs.
# fp32: both backends accumulate in fp32 over at most ~70 keys; 1e-5 is ~100 ulp (2^-24) of headroom
#   for exp2-vs-exp and summation order (TF32 on a real GPU would need ~1e-3; the interpreter's fp32
#   dot is exact).
# fp16: the output's own rounding is u = 2^-11 = 4.9e-4, P is rounded to fp16 before P v: 1e-3 = ~2u.
#   Gradients also round dS and P^T to fp16 and cancel dP - delta with delta formed from the rounded
#   output (as FlashAttention and torch's SDPA backward do): 2e-3 = ~4u.
# bf16: u = 2^-8 = 3.9e-3 (and the interpreter rounds fp32 -> bf16 by truncation, up to 2u per stored
#   element): 1e-2 for outputs, 1.6e-2 = ~4u for gradients.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

WORST = {}  # (backend, dtype, tensor) -> worst relative error seen, printed at the end of the run (conftest)


def fresh_seed():
    """A new seed for every draw, so that every run tests new inputs; failures print it."""
    return random.SystemRandom().randrange(2**62)


def make_inputs(B, Hq, Hkv, T, S, D, M, padding, dtype, seed=None):
    """Random inputs in `dtype` and a padding mask; the gate is non-zero so the adapter term counts."""
    gen = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)

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


def upstream(B, T, Hq, D, xg, dtype, seed=None):
    """Upstream gradients representable in `dtype`, so both backends receive the same values."""
    gen = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    shape = (B, Hq, D) if xg == "sample" else (B, T, Hq, D)
    return tuple(torch.randn(s, generator=gen).to(dtype).to(torch.float64).to(DEVICE)
                 for s in ((B, T, Hq, D), shape))


def check_against_reference(backend, shape, xg, dtype, gate_fn="tanh", scale=None, with_dout=True):
    B, Hq, Hkv, T, S, D, M, H, padding = shape
    seed = fresh_seed()
    inputs, mask = make_inputs(B, Hq, Hkv, T, S, D, M, padding, dtype, seed=seed)
    grads_out = upstream(B, T, Hq, D, xg, dtype, seed=seed + 1)
    if not with_dout:
        grads_out = (None, grads_out[1])
    kw = dict(gate_fn=gate_fn, scale=scale)
    actual, stats = run(backend, inputs, mask, H, xg, grads_out, **kw)
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
        if value.abs().max() == 0 and not name.startswith("d"):  # X_G over H = 0 adapter tokens
            assert actual[name].abs().max() == 0, f"{name} must be exactly 0"
            continue
        if value.abs().max() == 0 or (S == 1 and name in ("dq", "dk")):
            # With S = 1 every prompt softmax has one entry, P = 1, so the prompt shares of dq and dk,
            # P (dP - delta), are differences of equal terms. A FlashAttention-style backward forms delta
            # from the rounded output, so those shares come out as the rounding of delta, ~u |out| |dout|
            # |k| scale, not 0; dq's remaining (adapter) share can be ten times smaller than that, and dk
            # has none. Both are measured against the largest gradient, the size of the terms that cancel.
            scale = max(v.abs().max().item() for n, v in expected.items() if n.startswith("d") and v is not None)
            err = (actual[name].to(torch.float64).cpu() - value.cpu()).abs().max().item() / scale
            assert err <= tolerance, f"{name}: {err:.2e} of the largest gradient > {tolerance:.0e} (seed {seed})"
            continue
        err = relative_error(actual[name], value)
        key = (backend, str(dtype).replace("torch.", ""), name)
        WORST[key] = max(WORST.get(key, 0.0), err)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e} (seed {seed})"
    if xg == "sample":
        assert stats[1].dtype == torch.int64 and torch.equal(stats[1].cpu(), ref_stats[1].cpu())
