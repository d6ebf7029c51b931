"""What the backend tests share: fresh random inputs, one forward and backward through a backend, and
the comparison of a backend against fastdca.reference in float64 with tolerances justified by dtype."""

import random

import torch

from fastdca import reference
from fastdca.ops import dca_attention, sequence_members
from fastdca.ops.common import adapter_probs, gate_values

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Errors are relative to the largest entry of the float64 reference, fed the same rounded inputs.
# fp32: both backends accumulate in fp32 over at most ~70 keys; 1e-5 is ~100 ulp (2^-24) of headroom
#   for exp2-vs-exp and summation order (TF32 on a real GPU would need ~1e-3; the interpreter's fp32
#   dot is exact).
# fp16: the output's own rounding is u = 2^-11 = 4.9e-4, P is rounded to fp16 before P v: 1e-3 = ~2u.
#   Gradients also round dS and P^T to fp16 and cancel dP - delta with delta formed from the rounded
#   output (as FlashAttention and torch's SDPA backward do): 2e-3 = ~4u.
# bf16: u = 2^-8 = 3.9e-3: 1e-2 for outputs, 1.6e-2 = ~4u for gradients (under the interpreter, conftest
#   makes fp32 -> bf16 round to nearest even, as on a GPU, instead of truncating).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Three errors are not relative to the result: the rounding of delta in dq and dk, float32 summation
# in dgate and the fused multiply-add in the adapter softmax's backward (dak). Where the allowance for them (rounding_allowances) exceeds tolerance x the largest entry,
# an element may be off by the allowance instead.
DELTA_ERROR = {torch.float32: 16 * 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DELTA_SIGMAS = 4
FP32_SUM_SIGMAS = 4
FP32_CANCEL = 4 * 2.0**-24

WORST = {}  # (backend, dtype, tensor) -> worst relative error seen, printed at the end of the run (conftest)


def fresh_seed():
    """A new seed for every draw, so that every run tests new inputs; failures print it."""
    return random.SystemRandom().randrange(2**62)


def make_inputs(B, Hq, Hkv, T, S, D, M, padding, dtype, seed=None):
    """Random inputs in `dtype` and their layout: a padding mask (padding "left"/"right"), None, or for
    `padding` a tuple of sequence lengths packed in one row (B = 1, T = S = their sum), cu_seqlens
    int32. The gate is non-zero so the adapter term counts."""
    gen = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    inputs = dict(q=randn(B, Hq, T, D), k=randn(B, Hkv, S, D), v=randn(B, Hkv, S, D),
                  ak=randn(Hkv, M, D), av=randn(Hkv, M, D), gate=randn(Hq))
    mask = None
    if isinstance(padding, tuple):
        assert B == 1 and T == S == sum(padding), "packed sequences fill one row"
        mask = torch.tensor([0, *padding], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    elif padding is not None:
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


def layout(mask) -> dict:
    """The op's keyword for what make_inputs returned: a padding mask or cu_seqlens."""
    if mask is not None and mask.dtype == torch.int32:
        return {"cu_seqlens": mask}
    return {"key_padding_mask": mask}


def run(backend, inputs, mask, causal_len, xg, grads_out, dtype=None, **kwargs):
    leaves = {n: t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for n, t in inputs.items()}
    out, stats = dca_attention(**leaves, causal_len=causal_len, xg=xg, backend=backend, **layout(mask), **kwargs)
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


def upstream(B, T, Hq, D, H, xg, dtype, seed=None, samples=None):
    """Upstream gradients representable in `dtype`, so both backends receive the same values: of out, and of
    the causal weights w (B, T, Hq, H), or in sample mode of their sums ((samples or B), Hq, H), one per
    sample."""
    gen = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    shape = (samples or B, Hq, H) if xg == "sample" else (B, T, Hq, H)
    return tuple(torch.randn(s, generator=gen).to(dtype).to(torch.float64).to(DEVICE)
                 for s in ((B, T, Hq, D), shape))


def check_against_reference(backend, shape, xg, dtype, gate_fn="tanh", scale=None, with_dout=True, window=None,
                            softcap=None):
    B, Hq, Hkv, T, S, D, M, H, padding = shape
    seed = fresh_seed()
    inputs, mask = make_inputs(B, Hq, Hkv, T, S, D, M, padding, dtype, seed=seed)
    grads_out = upstream(B, T, Hq, D, H, xg, dtype, seed=seed + 1,
                         samples=len(padding) if isinstance(padding, tuple) else None)
    if not with_dout:
        grads_out = (None, grads_out[1])
    kw = dict(gate_fn=gate_fn, scale=scale, window=window, softcap=softcap)
    actual, stats = run(backend, inputs, mask, H, xg, grads_out, **kw)
    expected, ref_stats = run("reference", inputs, mask, H, xg, grads_out, dtype=torch.float64, **kw)

    assert actual["out"].shape == (B, T, Hq, D) and actual["out"].dtype == dtype
    allowance = rounding_allowances(inputs, mask, H, expected, grads_out, dtype, gate_fn, scale, window, softcap)
    for name, value in expected.items():
        if value is None:
            assert actual[name] is None, name
            continue
        assert actual[name].shape == value.shape, name
        assert actual[name].dtype == (torch.float32 if name == "xg" else dtype), name
        assert torch.isfinite(actual[name]).all(), name
        tolerance = (GRAD_TOLERANCE if name.startswith("d") else TOLERANCE)[dtype]
        got, value = actual[name].to(torch.float64).cpu(), value.cpu()
        if value.numel() == 0:                                # w over H = 0 adapter tokens
            continue
        if value.abs().max() == 0 and name not in allowance:
            assert got.abs().max() == 0, f"{name} must be exactly 0"
            continue
        # relative to the largest entry or, where it is larger, to the allowance in units of the tolerance
        limit = torch.tensor(max(value.abs().max().item(), 1e-30), dtype=torch.float64)
        if name in allowance:
            limit = (allowance[name] / tolerance).clamp(min=limit)
        err = ((got - value).abs() / limit).max().item()
        key = (backend, str(dtype).replace("torch.", ""), name)
        WORST[key] = max(WORST.get(key, 0.0), err)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e} (seed {seed})"
    if xg == "sample":
        assert stats[1].dtype == torch.int64 and torch.equal(stats[1].cpu(), ref_stats[1].cpu())


def rounding_allowances(inputs, mask, causal_len, expected, grads_out, dtype, gate_fn, scale, window=None,
                        softcap=None):
    """Elementwise float64 allowances, by gradient name, for two errors that are not relative to the result.

    dq, dk: a FlashAttention-style backward forms delta = rowsum(dout * out) from the stored output
    (torch's SDPA from its prompt part, the triton kernels from the sum of both parts), each element off
    by about e |out|: e the unit roundoff of the dtype, or for float32, where out is not rounded to a
    narrower type, the several roundings of computing it (DELTA_ERROR). At random, delta is then off by
    e/sqrt(3) |dout * (|P v| + |A av|)| (one standard deviation, the norm over D), and dS = P (dP - delta)
    by P times that. Where a softmax is concentrated on one key, dP - delta is a difference of nearly
    equal terms (exactly equal when a single key is visible): the true dq and dk are small and this
    rounding is what is left, summed over keys into dq (P |k|) and, in quadrature, over query rows into
    dk (P^T w |q|). DELTA_SIGMAS standard deviations are allowed.
    dgate: a sum over every token, adapter key and channel, g'(gate) sum Pa (dout av^T), plus
    g'(gate) sum Pa[:H] dw for the causal weights. With random upstream gradients it can cancel far below its terms, and float32
    accumulation leaves rounding relative to the sum of their magnitudes. Its longest sequential sum is
    the dot dout av^T over D channels (the sums over keys and rows are trees); summing n terms of one
    size in order, the k-th addition rounds a partial sum of ~k terms, so the error has a standard
    deviation of ~u sqrt(n / 3) times the sum of magnitudes (u = 2^-24): FP32_SUM_SIGMAS of those with
    n = D. (A fixed 8u failed at D = 256, where one such deviation is 9u: seed 2332010859671330611.)
    dak: the adapter softmax's backward cancels (exactly, with M = 1) and a GPU's fused multiply-add
    leaves float32 rounding of its terms (FP32_CANCEL); the interpreter does not fuse.
    """
    f64 = {n: t.detach().to(torch.float64).cpu() for n, t in inputs.items()}
    q, k, v, ak, av, gate = (f64[n] for n in ("q", "k", "v", "ak", "av", "gate"))
    placement = {n: None if t is None else t.cpu() for n, t in layout(mask).items()}
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1 / D**0.5 if scale is None else scale
    kf, vf = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    akf, avf = ak.repeat_interleave(group, dim=0), av.repeat_interleave(group, dim=0)
    probs = reference.prompt_probs(q, kf, scale, window=window, softcap=softcap, **placement)  # (B, Hq, T, S)
    prompt_out = probs @ vf                                                          # (B, Hq, T, D)
    adapter_out = expected["out"].detach().cpu().transpose(1, 2) - prompt_out
    dout = torch.zeros_like(q) if grads_out[0] is None else grads_out[0].cpu().transpose(1, 2)

    sigma = DELTA_ERROR[dtype] / 3**0.5
    w = (dout * (prompt_out.abs() + adapter_out.abs())).square().sum(-1, keepdim=True).sqrt()  # (B, Hq, T, 1)
    dq = DELTA_SIGMAS * sigma * scale * w * (probs @ kf.abs())
    dk = DELTA_SIGMAS * sigma * scale * ((probs * w).square().transpose(-1, -2) @ q.square()).view(
        B, Hkv, group, S, D).sum(2).sqrt()

    pa = adapter_probs(q, akf, scale)                                               # (B, Hq, T, M)
    terms = pa * (dout.abs() @ avf.abs().transpose(-1, -2))
    if expected["xg"] is not None:
        dxg = grads_out[1].cpu()
        if dxg.dim() == 3:                       # sample: one gradient per sample, for each of its tokens
            members = sequence_members(**placement, B=B, T=T, S=S, device="cpu").to(dxg.dtype)  # (B, N, T)
            dxg = torch.einsum("bnt,bnhj->bhtj", members, dxg.view(B, members.shape[1], Hq, causal_len))
        else:
            dxg = dxg.transpose(1, 2)
        terms[..., :causal_len] += pa[..., :causal_len] * dxg.abs()
    g = gate_values(gate, gate_fn)
    dg = 1 - g**2 if gate_fn == "tanh" else torch.ones_like(g)
    # dak: the adapter softmax's backward, Pa (dPa - rowsum(Pa dPa)) with dPa = g dA, cancels to exactly
    # 0 with one adapter key (M = 1) and far below its terms with a concentrated softmax; a GPU contracts
    # g dA into the subtraction (FMA), leaving float32 rounding of the terms Pa |g dA|, carried by q^T.
    dsa_terms = g.abs()[None, :, None, None] * terms                                  # (B, Hq, T, M)
    dak = FP32_CANCEL * scale * (dsa_terms.transpose(-1, -2) @ q.abs()).view(B, Hkv, group, -1, D).sum((0, 2))
    fp32_sum = FP32_SUM_SIGMAS * 2.0**-24 * (D / 3) ** 0.5
    return {"dq": dq, "dk": dk, "dgate": fp32_sum * dg.abs() * terms.sum((0, 2, 3)), "dak": dak}
