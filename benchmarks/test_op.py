"""Op level: fastdca's dca_attention (auto backend) and its reference against the separate path.

The separate path is what PEFT's AdaptionPrompt and lit-gpt do: SDPA over the prompt keys, then an
eager attention over the repeated adapter keys, added on top. Every case of one shape runs in the same
session, so the ratios in each group compare like with like.
"""


import pytest
import torch

from fastdca.ops import dca_attention
from separate_path import separate_path

B, M, H = 2, 10, 2
HEADS = {"llama7b": (32, 32, 128), "smollm2": (9, 3, 64)}
SEQ_LENS = (128, 512, 2048)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.bfloat16) if DEVICE == "cuda" else (torch.float32,)


def fastdca_path(backend):
    def run(q, k, v, ak, av, gate):
        out, (sums, _) = dca_attention(q, k, v, ak, av, gate, causal_len=H, backend=backend)
        return out, sums
    return run


IMPLEMENTATIONS = {
    "fastdca": fastdca_path(None),
    "fastdca-triton": fastdca_path("triton"),
    "reference": fastdca_path("reference"),
    "separate": lambda *args: (separate_path(*args),),
}


def make_inputs(heads, T, dtype):
    Hq, Hkv, D = HEADS[heads]
    shapes = dict(q=(B, Hq, T, D), k=(B, Hkv, T, D), v=(B, Hkv, T, D), ak=(Hkv, M, D), av=(Hkv, M, D), gate=(Hq,))
    return {n: torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True) for n, s in shapes.items()}


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["forward", "backward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("T", SEQ_LENS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op(benchmark, dtype, heads, T, impl, mode):
    if impl == "fastdca-triton" and DEVICE != "cuda":
        pytest.skip("the triton backend runs compiled only on CUDA (the interpreter is not a benchmark)")
    if impl == "reference" and T > 512 and DEVICE == "cpu":
        pytest.skip("the reference materialises (B, Hq, T, T) scores: minutes per call at T=2048 on a CPU")
    inputs = make_inputs(heads, T, dtype)
    fn = IMPLEMENTATIONS[impl]
    args = list(inputs.values())
    benchmark.group = f"op {mode} {heads} T={T} {str(dtype).split('.')[1]} {DEVICE}"
    benchmark.extra_info.update(impl=impl, mode=mode, heads=heads, T=T, device=DEVICE)

    def forward():
        return fn(*args)

    def loss_of(outputs):
        return sum(o.float().sum() for o in outputs)

    if mode == "forward":
        def step():
            with torch.no_grad():
                forward()
            synchronize()
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    elif mode == "forward+backward":
        def step():
            loss_of(forward()).backward()
            synchronize()
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    else:
        def setup():
            return (loss_of(forward()),), {}

        def step(loss):
            loss.backward()
            synchronize()
        benchmark.pedantic(step, setup=setup, rounds=3, warmup_rounds=1)
