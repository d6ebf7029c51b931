"""Host overhead: what fastdca's Python side costs per call and per step, measured on the CPU in CPU
thread time (other load on the machine does not count against it).

- The triton path of `dca_attention` at a tiny shape with every kernel launch replaced by a no-op, so
  that what is timed is the host side alone (argument checks, dispatch, allocations, autograd, the X_G
  statistics, launch configuration; Triton's own binding of the launch is not included, see
  BENCHMARKS.md): forward, and forward + backward (dense upstream gradients, torch.autograd.grad: no
  accumulation into .grad). The torch ops (aten, counted under a dispatch mode) and the kernel launches
  of each pass are recorded in extra_info.
- One training step of a tiny-dims model of SmolLM2's layout (30 layers, L = 20, M = 10, hidden 64,
  4/2 heads, B = 2, T = 16), where compute is negligible: the floor, fastdca (the default loss, and
  alpha = 0) and PEFT's AdaptionPrompt, side by side; `python benchmarks/report.py` gives the ratios.

    pytest benchmarks/test_host_overhead.py --benchmark-only
"""

import os
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import fastdca
from fastdca.ops import dca_attention

B, Hq, Hkv, T, D, M, H = 2, 4, 2, 32, 16, 10, 2      # T = 32: the training kernels (T <= 16 decodes)
TINY_SMOLLM2 = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
STEP_B, STEP_T, L = 2, 16, 20


class _NoLaunch:
    """Stands in for a kernel launch: `launch(kernel)[grid](*args, **kwargs)` does nothing."""

    def __init__(self, log):
        self.log = log

    def __call__(self, kernel):
        self.log.append(kernel.__name__)
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stubbed_launches(monkeypatch):
    """The kernels' launchers with every launch a no-op (the interpreter flag only lets the triton backend
    be chosen for CPU tensors; nothing is interpreted)."""
    from fastdca.kernels import plumbing as kmod

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the stubbed triton path needs TRITON_INTERPRET=1 set before triton is imported")
    log = []
    monkeypatch.setattr(kmod, "_direct", _NoLaunch(log))
    return log


def _op_inputs(requires_grad):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    ak, av = torch.randn(Hkv, M, D, generator=g), torch.randn(Hkv, M, D, generator=g)
    gate = torch.randn(Hq, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, ak, av, gate)]


@pytest.mark.benchmark(timer=time.thread_time)
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
def test_triton_path_host_time(benchmark, stubbed_launches, passes):
    inputs = _op_inputs(passes != "forward")
    g = torch.Generator().manual_seed(1)
    d_out, d_sums = torch.randn(B, T, Hq, D, generator=g), torch.randn(B, Hq, H, generator=g)

    def forward():
        out, (sums, _) = dca_attention(*inputs, causal_len=H, xg="sample", backend="triton")
        return out, sums

    def backward(outputs):
        # dense upstream gradients, as a loss gives them, and no accumulation into .grad: the op's own work
        torch.autograd.grad(outputs, inputs, (d_out, d_sums))

    def call():
        outputs = forward()
        if passes != "forward":
            backward(outputs)

    call()
    counts = {}
    stubbed_launches.clear()
    with _CountOps() as counter:
        outputs = forward()
    counts["torch_ops_forward"], counts["launches_forward"] = len(counter.ops), len(stubbed_launches)
    if passes != "forward":
        stubbed_launches.clear()
        with _CountOps() as counter:
            backward(outputs)
        counts["torch_ops_backward"], counts["launches_backward"] = len(counter.ops), len(stubbed_launches)
    benchmark.extra_info.update(counts)
    benchmark.group = f"triton path host time per call (launches stubbed), B={B} Hq={Hq} T={T} D={D} M={M}"
    benchmark.pedantic(call, rounds=300, warmup_rounds=20)


def _tiny_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_SMOLLM2, attn_implementation="sdpa"))
    return model.requires_grad_(False)


def _floor(model):
    delta = torch.nn.Parameter(torch.zeros(model.config.hidden_size))
    model.floor_delta = delta
    first = model.config.num_hidden_layers - L
    model.model.layers[first].register_forward_pre_hook(lambda module, args: (args[0] + delta,) + args[1:])
    return model


def _fastdca(alpha):
    return lambda model: fastdca.patch(model, fastdca.DCAConfig(adapter_layers=L, adapter_len=M, causal_len=2,
                                                                alpha=alpha), backend="torch")


def _peft(model):
    from peft import AdaptionPromptConfig, get_peft_model

    return get_peft_model(model, AdaptionPromptConfig(adapter_len=M, adapter_layers=L, task_type="CAUSAL_LM"))


STEP_VARIANTS = {"floor": _floor, "fastdca-alpha1": _fastdca(1.0), "fastdca-alpha0": _fastdca(0.0),
                 "peft-adaption-prompt": _peft}


@pytest.mark.benchmark(timer=time.thread_time)
@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_tiny_dims_training_step(benchmark, variant):
    model = STEP_VARIANTS[variant](_tiny_model()).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_SMOLLM2["vocab_size"], (STEP_B, STEP_T), generator=g)
    batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)     # open gates: the adapter and the causal term do real work

    def step():
        for p in trainable:
            p.grad = None
        model(**batch).loss.backward()

    step()
    benchmark.group = (f"tiny-dims training step, SmolLM2 layout (30 layers, L={L}, M={M}), hidden 64, "
                       f"B={STEP_B} T={STEP_T}, cpu thread time")
    benchmark.extra_info.update(variant=variant)
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)
