"""The triton backend (fastdca.kernels) against the literal equations of fastdca.reference in float64.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); with one they run compiled.
"""

import contextlib
import math
import os
from types import SimpleNamespace

import pytest
import torch

from backend_check import (
    DEVICE, TOLERANCE, check_against_reference, make_inputs, relative_error, run, upstream,
)
from fastdca.ops import dca_attention

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the triton backend needs CUDA or TRITON_INTERPRET=1",
)


@pytest.fixture(autouse=True)
def fresh_launch_configs():
    """The launchers cache launch_config's answers per shape: tests that patch it start and end uncached."""
    from fastdca.kernels import tuning

    tuning._table_configs.cache_clear()
    yield
    tuning._table_configs.cache_clear()


def spy_on_launches(monkeypatch, name):
    """(grid, keyword arguments) of each launch of `fastdca.kernels`' kernel `name` from now on (it still runs),
    patched in the module that defines it and launches it."""
    from fastdca.kernels import backward, decode, forward, merge

    module = next(m for m in (forward, decode, merge, backward) if hasattr(m, name))
    launched, kernel = [], getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((grid, kwargs))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Spy())
    return launched


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

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("xg", ["sample", "token", None])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, xg, dtype):
    check_against_reference("triton", shape, xg, dtype)


@pytest.mark.parametrize("xg", ["sample", "token"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]])
def test_triton_bf16_matches_reference(shape, xg):
    check_against_reference("triton", shape, xg, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [
    pytest.param((1, 2, 1, 9, 30, 64, 64, 64, "left"), id="M=H=64"),
    pytest.param((1, 2, 2, 18, 18, 256, 10, 2, "right"), id="D=256"),
    pytest.param((2, 3, 1, 13, 29, 40, 7, 3, None), id="D=40-M7-gqa3"),
    pytest.param((1, 2, 1, 1, 1, 80, 19, 9, None), id="T=S=1"),
])
def test_limits_of_the_contract(shape, dtype):
    """The largest M and D the op accepts, a small head dim that is not a power of two, one key."""
    check_against_reference("triton", shape, "token", dtype)


def test_bf16_rounding_is_to_nearest_even():
    """Kernels round float32 -> bfloat16 as GPUs and torch do (under the interpreter, via conftest)."""
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))

    x = torch.randn(4096, device=DEVICE) * torch.logspace(-30, 30, 4096, device=DEVICE)
    y = torch.empty(4096, dtype=torch.bfloat16, device=DEVICE)
    to_bf16[(1,)](x, y, N=4096)
    assert torch.equal(y, x.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_identity_gate_custom_scale(dtype):
    check_against_reference("triton", (2, 4, 2, 19, 26, 64, 10, 3, "left"), "token", dtype, gate_fn="identity", scale=0.07)


@pytest.mark.parametrize("xg", ["sample", "token"])
def test_gradient_through_xg_stats_only(xg):
    """No gradient reaches `out` (dout is None in the backward): the X_G statistics, the causal weights w,
    alone drive it, into q, ak and gate (k, v and av get None: w does not depend on them)."""
    check_against_reference("triton", (2, 4, 2, 20, 20, 64, 10, 2, "right"), xg, torch.float32, with_dout=False)


# Every forward path that writes the causal weights w (token mode) or their sums (sample mode): (shape, dtype,
# FASTDCA_SDPA_FWD, the kernel that writes them); packed sequences take w per token and sum it per sequence
WEIGHT_PATHS = [
    pytest.param((2, 4, 2, 20, 20, 64, 10, 3, "left"), torch.float32, "0", "_dca_fwd_kernel", id="fused-left"),
    pytest.param((2, 4, 2, 20, 26, 64, 10, 0, "right"), torch.float16, "0", "_dca_fwd_kernel", id="fused-H0-right"),
    pytest.param((2, 4, 2, 3, 30, 64, 10, 3, "left"), torch.float16, "0", "_dca_decode_combine_kernel",
                 id="decode-T3-left"),
    pytest.param((2, 4, 2, 3, 30, 64, 10, 0, None), torch.float32, "0", "_dca_decode_combine_kernel",
                 id="decode-T3-H0"),
    pytest.param((2, 4, 2, 33, 33, 64, 10, 3, "right"), torch.float16, "1", "_dca_merge_kernel", id="merge-right"),
    pytest.param((2, 4, 2, 20, 20, 64, 10, 0, "left"), torch.float32, "1", "_dca_merge_kernel", id="merge-H0-left"),
    pytest.param((1, 4, 2, 40, 40, 64, 10, 3, (9, 3, 14, 14)), torch.float32, "0", "_dca_fwd_kernel", id="packed"),
    pytest.param((1, 4, 2, 40, 40, 64, 10, 0, (9, 3, 14, 14)), torch.float16, "0", "_dca_fwd_kernel",
                 id="packed-H0"),
]


@pytest.mark.parametrize("with_dout", [True, False], ids=["with-dout", "w-only"])
@pytest.mark.parametrize("xg", ["sample", "token"])
@pytest.mark.parametrize("shape, dtype, sdpa, kernel", WEIGHT_PATHS)
def test_causal_weights_and_their_gradients_on_every_forward_path(monkeypatch, shape, dtype, sdpa, kernel, xg,
                                                                   with_dout):
    """w = g * softmax(q ak^T * scale)[..., :H] (B, T, Hq, H) float32, or its sums over each sample's real
    tokens, from the fused, flash-decoding and merge forwards and with packed sequences, H = 0 (no column)
    included; and the gradients, also with w the only output that carries one."""
    from fastdca.kernels.plumbing import XG_CODES

    monkeypatch.setenv("FASTDCA_SDPA_FWD", sdpa)
    launched = spy_on_launches(monkeypatch, kernel)
    check_against_reference("triton", shape, xg, dtype, with_dout=with_dout)
    packed = isinstance(shape[-1], tuple)
    assert launched and all(kwargs["XG_MODE"] == XG_CODES["token" if packed else xg] for _, kwargs in launched)


@pytest.mark.parametrize("xg", ["sample", "token"])
def test_backward_reads_the_weights_gradient_in_any_layout(xg):
    """dca_backward takes the gradient of w (token) or of its sums (sample: (B, Hq, H), or the forward's whole
    extra (B, Hq * H + 1), whose count column it does not read: NaN there changes nothing) in any strides and
    floating dtype, with the same result as the contiguous float32 one; without dout, dk, dv and dav are None."""
    from fastdca.kernels import backward, forward

    B, Hq, Hkv, T, D, M, H = 2, 4, 2, 20, 64, 10, 3
    inputs, mask = make_inputs(B, Hq, Hkv, T, T, D, M, "left", torch.float32)
    kw = dict(causal_len=H, scale=D ** -0.5, key_padding_mask=mask, xg=xg)
    out, lse, extra = forward.dca_forward(*inputs.values(), **kw)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    if xg == "token":
        assert extra.shape == (B, T, Hq, H) and extra.dtype == torch.float32
        dxg = torch.randn(B, T, Hq, H, generator=gen).to(DEVICE)
        layouts = [dxg.double(), dxg.transpose(1, 3).contiguous().transpose(1, 3), dxg[:1].expand(B, T, Hq, H)]
        references = [dxg, dxg, dxg[:1].expand(B, T, Hq, H).contiguous()]
    else:
        assert extra.shape == (B, Hq * H + 1) and extra.dtype == torch.float32
        dxg = torch.randn(B, Hq, H, generator=gen).to(DEVICE)
        whole = torch.cat([dxg.reshape(B, Hq * H), torch.full((B, 1), float("nan"), device=DEVICE)], dim=1)
        layouts = [whole, dxg.double(), dxg.transpose(1, 2).contiguous().transpose(1, 2), dxg[:1].expand(B, Hq, H)]
        references = [dxg, dxg, dxg, dxg[:1].expand(B, Hq, H).contiguous()]
    for layout_, reference_ in zip(layouts, references):
        expected = backward.dca_backward(None, reference_, *inputs.values(), out, lse, **kw)
        got = backward.dca_backward(None, layout_, *inputs.values(), out, lse, **kw)
        assert [g is None for g in got] == [False, True, True, False, True, False]
        for i, name in ((0, "dq"), (3, "dak"), (5, "dgate")):
            assert torch.isfinite(got[i]).all() and torch.equal(got[i], expected[i]), name


@pytest.mark.parametrize("T,S,padding", [(45, 45, None), (45, 45, "left"), (23, 61, "right"), (1, 50, "left")])
def test_small_blocks_many_iterations(monkeypatch, T, S, padding):
    """16 x 16 blocks: many key blocks per row, blocks skipped above the diagonal, partial tiles."""
    from fastdca.kernels import tuning

    def small(kernel, D, T, dtype, arch, original=tuning.launch_config):
        return dict(original(kernel, D, T, dtype, arch), BLOCK_M=16, BLOCK_N=16)

    monkeypatch.setattr(tuning, "launch_config", small)
    for xg in ("sample", "token"):
        check_against_reference("triton", (2, 4, 2, T, S, 64, 10, 2, padding), xg, torch.float32)


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
    grads_out = upstream(2, 33, 4, 64, 2, "sample", torch.float32)
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
    grads_out = upstream(2, 20, 4, 64, 2, "token", torch.float32)
    actual, _ = run("triton", inputs, mask, 2, "token", grads_out)
    expected, _ = run("reference", inputs, mask, 2, "token", grads_out, dtype=torch.float64)
    for name, value in expected.items():
        assert relative_error(actual[name], value) <= TOLERANCE[torch.float32], name


def test_key_span_kernel_finds_each_rows_first_and_last_real_key():
    from fastdca.kernels import forward

    gen = torch.Generator().manual_seed(seed := int(torch.randint(0, 2**31, ()).item()))
    for S in (1, 37, 1500, 2100):             # one block and several of the kernel's 1024 keys
        mask = torch.rand(5, S, generator=gen) < 0.3
        mask[1] = False
        mask[2] = True
        span = forward.key_span(mask.to(DEVICE), mask.stride(0), True, torch.empty(0, device=DEVICE), None)
        positions = torch.arange(S)
        first = torch.where(mask, positions, S).amin(1)
        last = torch.where(mask, positions + 1, 0).amax(1)
        assert torch.equal(span.cpu(), torch.stack([first, last], 1).int()), (S, seed)


def test_key_span_is_found_once_per_mask_and_again_when_the_mask_changes(monkeypatch):
    """The layers of a forward and its backward share one mask object: one span launch for all of them, and
    a new one for a new mask or after the mask is written to."""
    from fastdca.kernels import backward, forward

    launched = spy_on_launches(monkeypatch, "_dca_key_span_kernel")
    inputs, mask = make_inputs(2, 2, 2, 20, 20, 64, 10, "right", torch.float16)
    kw = dict(causal_len=2, scale=0.125, key_padding_mask=mask, xg="sample")
    for _ in range(3):       # three layers, forward and backward
        out, lse, extra = forward.dca_forward(*inputs.values(), **kw)
        backward.dca_backward(torch.ones_like(out), torch.zeros_like(extra), *inputs.values(), out, lse, **kw)
    assert len(launched) == 1
    mask[0, -1] = False                      # written to: its version moves on
    forward.dca_forward(*inputs.values(), **kw)
    forward.dca_forward(*inputs.values(), **dict(kw, key_padding_mask=mask.clone()))
    assert len(launched) == 3


def test_padded_rows_with_holes_and_without_real_keys_match_reference():
    """The kernels skip the key blocks outside each row's first to last real key (SPAN); inside that span
    the mask still decides: holes in the mask, padding on both sides, and a row with no real key at all."""
    B, Hq, Hkv, T, D, M, H = 3, 4, 2, 70, 64, 10, 2
    inputs, _ = make_inputs(B, Hq, Hkv, T, T, D, M, None, torch.float16)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :20] = mask[0, 55:] = False          # both sides
    mask[0, 30:33] = mask[0, 41] = False         # holes
    mask[1] = False                              # no real key
    mask[2, 3::4] = False
    mask = mask.to(DEVICE)
    grads_out = upstream(B, T, Hq, D, H, "sample", torch.float16)
    actual, _ = run("triton", inputs, mask, H, "sample", grads_out)
    expected, _ = run("reference", inputs, mask, H, "sample", grads_out, dtype=torch.float64)
    for name, value in expected.items():
        assert relative_error(actual[name], value) <= TOLERANCE[torch.float16], name


def test_float64_is_refused():
    inputs, _ = make_inputs(1, 2, 2, 4, 4, 64, 10, None, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        dca_attention(**inputs, causal_len=2, backend="triton")


def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the launchers must make the tensors' device current."""
    from fastdca.kernels import backward, forward, plumbing

    active, launches = [], []

    @contextlib.contextmanager
    def on_device(q):
        active.append(q.device)
        try:
            yield
        finally:
            active.pop()

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, list(active)))

    monkeypatch.setattr(plumbing, "_on_device", on_device)
    for module, name in ((forward, "_dca_fwd_kernel"), (backward, "_dca_bwd_adapter_kernel"),
                         (backward, "_dca_bwd_dkdv_kernel"), (backward, "_dca_bwd_dq_kernel")):
        monkeypatch.setattr(module, name, Recorder(name))
    inputs, mask = make_inputs(2, 4, 2, 20, 20, 64, 10, "left", torch.float16)
    kw = dict(causal_len=2, scale=0.125, key_padding_mask=mask, xg="sample")
    out, lse, extra = forward.dca_forward(*inputs.values(), **kw)
    backward.dca_backward(torch.zeros_like(out), torch.zeros_like(extra), *inputs.values(), out, lse, **kw)
    assert [name for name, _ in launches] == ["_dca_fwd_kernel", "_dca_bwd_adapter_kernel",
                                              "_dca_bwd_dkdv_kernel", "_dca_bwd_dq_kernel"]
    assert all(devices == [inputs["q"].device] for _, devices in launches)


def test_on_device_makes_the_tensors_cuda_device_current(monkeypatch):
    from fastdca.kernels import plumbing

    selected = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: selected.append(device) or contextlib.nullcontext())
    with plumbing._on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        pass
    assert selected == [torch.device("cuda", 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_the_first_is_current():
    inputs, mask = make_inputs(2, 4, 2, 33, 33, 64, 10, "left", torch.float16)
    grads_out = upstream(2, 33, 4, 64, 2, "sample", torch.float16)
    with torch.cuda.device(0):
        on_second = {n: t.to("cuda:1") for n, t in inputs.items()}
        actual, _ = run("triton", on_second, mask.to("cuda:1"), 2, "sample", tuple(g.to("cuda:1") for g in grads_out))
    expected, _ = run("reference", inputs, mask, 2, "sample", grads_out, dtype=torch.float64)
    for name, value in expected.items():
        assert relative_error(actual[name].cpu(), value.cpu()) <= 2 * TOLERANCE[torch.float16], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [
    pytest.param((2, 8, 2, 1, 77, 64, 10, 2, "left"), id="T1-gqa4-left"),
    pytest.param((1, 4, 4, 3, 50, 80, 7, 3, "right"), id="T3-mha-right"),
    pytest.param((2, 6, 2, 16, 40, 64, 10, 10, None), id="T16-gqa3-48-rows"),
])
def test_flash_decoding_splits_the_keys(monkeypatch, shape, dtype):
    """T <= 16 runs the flash-decoding kernels: chunks of 16 keys over several programs, merged."""
    from fastdca.kernels import tuning

    def small(kernel, D, T, dtype, arch, original=tuning.launch_config):
        config = original(kernel, D, T, dtype, arch)
        return dict(config, BLOCK_N=16, SPLITS=3) if kernel == "decode" else config

    monkeypatch.setattr(tuning, "launch_config", small)
    launched = spy_on_launches(monkeypatch, "_dca_decode_split_kernel")
    for xg in ("sample", "token"):
        check_against_reference("triton", shape, xg, dtype)
    assert launched and all(grid[0] >= 2 for grid, _ in launched)     # chunks rounded up to whole 16-key blocks


WINDOWED = [
    pytest.param((2, 4, 2, 45, 45, 64, 10, 2, None), 7, id="T=S=45-w7"),
    pytest.param((2, 4, 2, 45, 45, 64, 10, 2, "left"), 16, id="T=S=45-left-w16"),
    pytest.param((2, 4, 2, 23, 61, 64, 10, 2, "right"), 20, id="cache-T23-S61-right-w20"),
    pytest.param((2, 4, 2, 1, 50, 64, 10, 2, "left"), 9, id="decode-T1-S50-left-w9"),
    pytest.param((2, 4, 2, 5, 40, 64, 10, 2, None), 3, id="decode-T5-S40-w3"),
    pytest.param((1, 4, 2, 40, 40, 64, 10, 2, (9, 3, 14, 14)), 5, id="packed-w5"),
]


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["", "softcap"])
@pytest.mark.parametrize("blocks", ["default", "16x16"])
@pytest.mark.parametrize("shape, window", WINDOWED)
def test_sliding_window_matches_reference(monkeypatch, shape, window, blocks, softcap):
    """The kernels' window: the key blocks before a query block's window are skipped (16 x 16 blocks make
    that several blocks per row), the rest masked, forward, decoding and backward; with Gemma 2's soft-cap
    (2.0, low enough to bend random scores) too."""
    from fastdca.kernels import tuning

    if blocks == "16x16":
        def small(kernel, D, T, dtype, arch, original=tuning.launch_config):
            return dict(original(kernel, D, T, dtype, arch), BLOCK_M=16, BLOCK_N=16)

        monkeypatch.setattr(tuning, "launch_config", small)
    for xg in ("sample", "token"):
        check_against_reference("triton", shape, xg, torch.float32, window=window, softcap=softcap)


def test_sliding_window_and_soft_cap_bf16_match_reference():
    check_against_reference("triton", (2, 4, 2, 33, 33, 64, 10, 2, "left"), "token", torch.bfloat16, window=6)
    check_against_reference("triton", (2, 4, 2, 33, 33, 64, 10, 2, "right"), "token", torch.bfloat16, softcap=2.0)


@pytest.mark.parametrize("shape", [pytest.param((2, 4, 2, 20, 20, 64, 10, 2, None), id="mha"),
                                   pytest.param((2, 4, 2, 21, 70, 64, 10, 10, "left"), id="cache-left")])
def test_soft_cap_without_a_window_matches_reference(shape):
    for xg in ("sample", "token"):
        check_against_reference("triton", shape, xg, torch.float32, softcap=2.0)


# the shapes the kernels behind switches (FASTDCA_ATOMIC_DQ, FASTDCA_TMA_FWD) are checked on: (shape, window,
# softcap, id); each variant picks a dtype per shape
SWITCHED_SHAPES = [
    (SHAPES[1].values[0], None, None, "gqa-d80-left"),
    (SHAPES[5].values[0], None, None, "cache-T21-S70-left"),
    (SHAPES[6].values[0], None, None, "two-query-blocks-right"),
    ((1, 4, 2, 40, 40, 64, 10, 2, (9, 3, 14, 14)), 5, 2.0, "packed-window-softcap"),
]


def switched_cases(dtypes):
    return [pytest.param(shape, window, softcap, dtype, id=f"{name}-{str(dtype)[6:]}")
            for (shape, window, softcap, name), dtype in zip(SWITCHED_SHAPES, dtypes)]


ATOMIC_CASES = switched_cases([torch.float32, torch.float16, torch.float32, torch.float32])


@pytest.mark.parametrize("shape, window, softcap, dtype", ATOMIC_CASES)
def test_atomic_dq_backward_matches_reference(monkeypatch, shape, window, softcap, dtype):
    """FASTDCA_ATOMIC_DQ=1: dq accumulated with atomics inside the dk/dv kernel, no dq kernel launched."""
    from fastdca.kernels import backward

    monkeypatch.setenv("FASTDCA_ATOMIC_DQ", "1")
    assert backward._atomic_dq(shape[5])
    launched = spy_on_launches(monkeypatch, "_dca_bwd_dq_kernel")
    for xg in ("sample", "token"):
        check_against_reference("triton", shape, xg, dtype, window=window, softcap=softcap)
    assert launched == []


def test_atomic_dq_is_off_by_default_and_under_deterministic_algorithms(monkeypatch):
    from fastdca.kernels import backward

    monkeypatch.delenv("FASTDCA_ATOMIC_DQ", raising=False)
    assert not backward._atomic_dq(128)
    monkeypatch.setenv("FASTDCA_ATOMIC_DQ", "1")
    torch.use_deterministic_algorithms(True)
    try:
        assert not backward._atomic_dq(128)
    finally:
        torch.use_deterministic_algorithms(False)
    assert backward._atomic_dq(128)
    assert not backward._atomic_dq(256)         # D = 256 keeps the dq kernel


TMA_CASES = switched_cases([torch.float16, torch.bfloat16, torch.float16, torch.float16])    # no float32 TMA


@pytest.mark.parametrize("shape, window, softcap, dtype", TMA_CASES)
def test_tma_forward_matches_reference(monkeypatch, shape, window, softcap, dtype):
    """FASTDCA_TMA_FWD=1: the forward reads q, K and V and writes out through tensor descriptors, whose rows
    past T or S and columns past D read as 0 and are not written (S not a multiple of the key block, D = 80
    padded to 128)."""
    monkeypatch.setenv("FASTDCA_TMA_FWD", "1")
    launched = spy_on_launches(monkeypatch, "_dca_fwd_kernel")
    for xg in ("sample", "token"):
        check_against_reference("triton", shape, xg, dtype, window=window, softcap=softcap)
    assert launched and all(kwargs["TMA"] for _, kwargs in launched)


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic-dq"])
@pytest.mark.parametrize("shape, window, softcap, dtype", TMA_CASES)
def test_tma_backward_matches_reference(monkeypatch, shape, window, softcap, dtype, atomic):
    """FASTDCA_TMA_BWD=1: the dk/dv kernel reads its q and dout blocks through tensor descriptors (4-D, at
    [b, h]), whose rows past T and columns past D read as 0, and the dq kernel (without atomic dq) its K
    and V blocks; with and without atomic dq."""
    monkeypatch.setenv("FASTDCA_TMA_BWD", "1")
    monkeypatch.setenv("FASTDCA_ATOMIC_DQ", "1" if atomic else "0")
    dkdv = spy_on_launches(monkeypatch, "_dca_bwd_dkdv_kernel")
    dq = spy_on_launches(monkeypatch, "_dca_bwd_dq_kernel")
    for xg in ("sample", "token"):
        check_against_reference("triton", shape, xg, dtype, window=window, softcap=softcap)
    assert dkdv and all(kwargs["TMA"] and kwargs["ATOMIC_DQ"] == atomic for _, kwargs in dkdv)
    assert len(dq) == (0 if atomic else len(dkdv)) and all(kwargs["TMA"] for _, kwargs in dq)


def test_tma_forward_only_where_asked_for_and_where_tma_can_read_k_and_v(monkeypatch):
    from fastdca.kernels import forward

    def kv(D=64, dtype=torch.float16):
        return torch.zeros(1, 2, 40, D, dtype=dtype)

    monkeypatch.delenv("FASTDCA_TMA_FWD", raising=False)
    assert not forward._tma_forward(kv(), kv(), kv(), 0.125)
    monkeypatch.setenv("FASTDCA_TMA_FWD", "1")
    assert forward._tma_forward(kv(), kv(), kv(), 0.125)
    fp32 = kv(dtype=torch.float32)
    assert not forward._tma_forward(fp32, fp32, fp32, 0.125)
    transposed = torch.zeros(1, 2, 64, 40, dtype=torch.float16).transpose(2, 3)     # D not the unit stride
    assert not forward._tma_forward(kv(), transposed, kv(), 0.125)
    assert not forward._tma_forward(kv(20), kv(20), kv(20), 0.125)       # rows of 40 bytes: not 16-aligned
    shifted = torch.zeros(4 + 2 * 40 * 64, dtype=torch.float16)[4:].view(1, 2, 40, 64)     # base 8 bytes off
    assert not forward._tma_forward(kv(), kv(), shifted, 0.125)
    assert not forward._tma_forward(kv(), kv(), kv(), -0.125)     # the folded scale needs scale > 0


def test_tma_backward_only_where_asked_for_and_where_tma_can_read_q_and_dout(monkeypatch):
    from fastdca.kernels import backward

    q = kv = torch.zeros(1, 2, 40, 64, dtype=torch.float16)
    dout = torch.zeros(1, 40, 2, 64, dtype=torch.float16)
    monkeypatch.delenv("FASTDCA_TMA_BWD", raising=False)
    assert not backward._tma_backward(q, kv, kv, dout)
    monkeypatch.setenv("FASTDCA_TMA_BWD", "1")
    assert backward._tma_backward(q, kv, kv, dout)
    assert backward._tma_backward(q.transpose(1, 2).contiguous().transpose(1, 2), kv, kv, dout)     # as HF builds q
    assert not backward._tma_backward(q.float(), kv.float(), kv.float(), dout.float())
    assert not backward._tma_backward(q, kv, kv, torch.zeros(1, 40, 64, 2, dtype=torch.float16).transpose(2, 3))
    assert not backward._tma_backward(q, kv, kv.transpose(2, 3).contiguous().transpose(2, 3), dout)   # v: D strided
    odd = torch.zeros(1, 2, 40, 20, dtype=torch.float16)                 # rows of 40 bytes: not 16-aligned
    assert not backward._tma_backward(odd, odd, odd, torch.zeros(1, 40, 2, 20, dtype=torch.float16))


# FASTDCA_SDPA_FWD: where torch's fused attention takes the prompt half (T = S > 16, padding or none)
SDPA_CASES = [pytest.param(SHAPES[1].values[0], torch.float16, id="gqa-d80-T=S=33-left-float16"),
              pytest.param(SHAPES[2].values[0], torch.bfloat16, id="gqa4-d128-M1-right-bfloat16"),
              pytest.param(SHAPES[6].values[0], torch.float32, id="T=S=67-two-query-blocks-right-float32"),
              pytest.param((2, 4, 4, 20, 20, 64, 10, 2, None), torch.bfloat16, id="mha-d64-bfloat16")]


@pytest.mark.parametrize("shape, dtype", SDPA_CASES)
def test_sdpa_forward_matches_reference(monkeypatch, shape, dtype):
    """FASTDCA_SDPA_FWD=1: the prompt half from torch's fused attention with its log-sum-exp, the adapter term
    merged by the merge kernel, then the fused backward on that lse: output, the causal weights (or their sums)
    and all six gradients."""
    monkeypatch.setenv("FASTDCA_SDPA_FWD", "1")
    merged = spy_on_launches(monkeypatch, "_dca_merge_kernel")
    fused = spy_on_launches(monkeypatch, "_dca_fwd_kernel")
    for xg in ("sample", "token"):
        check_against_reference("triton", shape, xg, dtype)
    assert merged and not fused


@pytest.mark.parametrize("shape, window, softcap", [
    (SHAPES[5].values[0], None, None),                                     # T < S (a cache)
    ((1, 4, 2, 40, 40, 64, 10, 2, (9, 3, 14, 14)), None, None),            # packed sequences
    (SHAPES[6].values[0], 5, None), (SHAPES[6].values[0], None, 2.0)])      # a window; a softcap
def test_sdpa_forward_leaves_what_sdpa_cannot_express_to_the_fused_forward(monkeypatch, shape, window, softcap):
    monkeypatch.setenv("FASTDCA_SDPA_FWD", "1")
    merged = spy_on_launches(monkeypatch, "_dca_merge_kernel")
    check_against_reference("triton", shape, "sample", torch.float16, window=window, softcap=softcap)
    assert merged == []


@pytest.mark.parametrize("sdpa_faster", [True, False])
def test_sdpa_forward_auto_times_both_forwards_once_per_shape_and_takes_the_faster(monkeypatch, sdpa_faster):
    from fastdca.ops import triton_backend

    monkeypatch.setenv("FASTDCA_SDPA_FWD", "auto")
    monkeypatch.setattr(triton_backend, "MEASURED", {})
    timed = []

    def seconds(fn, cuda):
        fn()
        timed.append(fn.__name__)
        return {"merged": 1.0, "fused": 2.0}[fn.__name__] * (1 if sdpa_faster else -1)

    monkeypatch.setattr(triton_backend, "_seconds", seconds)
    inputs, mask = make_inputs(2, 4, 2, 33, 33, 64, 10, "left", torch.float16)
    merged = spy_on_launches(monkeypatch, "_dca_merge_kernel")
    fused = spy_on_launches(monkeypatch, "_dca_fwd_kernel")
    for _ in range(2):
        dca_attention(**inputs, causal_len=2, key_padding_mask=mask, backend="triton")
    assert sorted(timed) == ["fused", "merged"]                 # measured once, at the first call
    assert list(triton_backend.MEASURED.values()) == ["sdpa" if sdpa_faster else "fused"]
    merged.clear(), fused.clear()
    dca_attention(**inputs, causal_len=2, key_padding_mask=mask, backend="triton")
    assert (len(merged), len(fused)) == ((1, 0) if sdpa_faster else (0, 1))
    # another shape is measured for itself; deterministic algorithms take the fused forward unmeasured
    torch.use_deterministic_algorithms(True)
    try:
        other, _ = make_inputs(1, 4, 2, 40, 40, 64, 10, None, torch.float16)
        dca_attention(**other, causal_len=2, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(timed) == 2 and len(triton_backend.MEASURED) == 1


def test_sdpa_forward_switch_names_its_variable_on_a_bad_value(monkeypatch):
    monkeypatch.setenv("FASTDCA_SDPA_FWD", "yes")
    inputs, _ = make_inputs(1, 2, 2, 20, 20, 64, 10, None, torch.float16)
    with pytest.raises(ValueError, match="FASTDCA_SDPA_FWD must be 0, 1 or auto"):
        dca_attention(**inputs, causal_len=2, backend="triton")


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_merge_kernel_adds_the_adapter_term_to_any_prompt_half(padding):
    """dca_merge_forward on a prompt half from the float64 equations (strided, as torch's kernels return it),
    with NaN in the rows that see no real key (what a fused kernel may leave there): out, the causal weights w
    (token) or their sums and counts (sample) and the lse
    the backward reads (log2 units, +inf where no key) equal the fused forward's definition."""
    from fastdca import reference
    from fastdca.kernels.merge import dca_merge_forward
    from fastdca.ops.common import causal_visible

    B, Hq, Hkv, T, D, M, H = 3, 4, 2, 37, 64, 10, 3
    inputs, mask = make_inputs(B, Hq, Hkv, T, T, D, M, padding, torch.float16)
    q, k, v, ak, av, gate = (inputs[n] for n in ("q", "k", "v", "ak", "av", "gate"))
    group = Hq // Hkv
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
    mask64 = None if mask is None else mask.cpu()
    scores = q64 @ k64.transpose(-1, -2) * D ** -0.5
    visible = causal_visible(T, T, "cpu")[None, None]
    visible = visible if mask64 is None else visible & mask64[:, None, None, :]
    has_key = visible.any(-1)                                                       # (B, 1 or Hq, T)
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)
    prompt = reference.prompt_probs(q64, k64, D ** -0.5, mask64) @ v64
    prompt_out = prompt.to(q.dtype).masked_fill(~has_key[..., None], float("nan"))
    prompt_lse = lse.float().masked_fill(~has_key, float("nan"))
    # torch's kernels return (B, Hq, T) views of other layouts: out from (B, T, Hq, D), lse from (B, T, Hq)
    prompt_out = prompt_out.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)
    prompt_lse = prompt_lse.transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE)
    for xg in ("sample", "token"):
        out, lse2, extra = dca_merge_forward(q, prompt_out, prompt_lse, ak, av, gate, causal_len=H,
                                             scale=D ** -0.5, key_padding_mask=mask, xg=xg)
        rest = (inputs[n].double().cpu() for n in ("k", "v", "ak", "av", "gate"))
        expected, stats = reference.dca_attention(q64, *rest, causal_len=H, key_padding_mask=mask64, xg=xg)
        assert relative_error(out.cpu(), expected) <= TOLERANCE[torch.float16]
        want_lse = torch.where(has_key.expand_as(lse), lse / math.log(2), torch.inf)
        assert torch.equal(torch.isinf(lse2.cpu()), torch.isinf(want_lse))
        finite = torch.isfinite(want_lse)
        assert (lse2.cpu()[finite] - want_lse[finite]).abs().max() <= 1e-5 * want_lse[finite].abs().max()
        if xg == "token":
            assert extra.shape == (B, T, Hq, H) and extra.dtype == torch.float32
            assert relative_error(extra.cpu(), stats) <= TOLERANCE[torch.float16]
        else:
            assert extra.shape == (B, Hq * H + 1) and extra.dtype == torch.float32
            assert relative_error(extra[:, :-1].cpu().view(B, Hq, H), stats[0]) <= TOLERANCE[torch.float16]
            assert torch.equal(extra[:, -1].long().cpu(), stats[1])


def test_check_interpret_reruns_itself_when_triton_was_imported_without_the_flag(monkeypatch):
    """`fastdca check --interpret` from the CLI, whose imports load Triton first: the flag only works set
    before that import, so the check runs again in a process started with it (it failed with
    "Cannot call @triton.jit'd outside of the scope of a kernel")."""
    import subprocess
    import sys

    from fastdca.commands import check

    calls = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda argv, env: calls.append((argv, env)) or SimpleNamespace(returncode=0))
    assert "triton" in sys.modules
    assert check.run_check(interpret=True, speed=False) == 0
    (argv, env), = calls
    assert argv[1:] == ["-m", "fastdca.cli", "check", "--interpret", "--no-speed"] and env["TRITON_INTERPRET"] == "1"
