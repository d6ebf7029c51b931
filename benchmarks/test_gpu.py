"""GPU benchmarks (CUDA only; skipped elsewhere): the fused kernels at LLaMA sizes, decoding, and one
training step of a LLaMA-7B-shaped model.

- op: forward, backward and forward+backward of dca_attention (the Triton kernels), SDPA on the
  prompt-only problem (the same causal attention without the adapter: less work, so the floor) and
  the separate path (SDPA plus an eager adapter attention, what PEFT and lit-gpt do); bf16, B=4,
  D=128, Hq/Hkv 32/32 and 32/8, T in {512, 2048, 8192}. `extra_info["flops"]` is the causal prompt
  attention's forward FLOPs (the backward does 2.5x), from which benchmarks/report.py gives TFLOP/s.
- decode: one new token against a cache of S in {1024, 8192}, B in {1, 8}, 32/8 heads, D=128.
- training step: a LLaMA-7B-shaped model (4 decoder layers, random bf16 weights, B=4, T=1024) for
  the floor, fastdca (L = 4, M = 10, alpha = 1) and PEFT's AdaptionPrompt, with time and
  torch.cuda.max_memory_allocated; the same with nf4 weights when bitsandbytes is installed.
"""


import pytest
import torch
import torch.nn.functional as F

import fastdca
from fastdca.ops import dca_attention
from separate_path import separate_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

DTYPE = torch.bfloat16
B, D, M, H = 4, 128, 10, 2
HEADS = {"32/32": (32, 32), "32/8": (32, 8)}


def _sync():
    torch.cuda.synchronize()


def _device_info(benchmark, **info):
    import triton

    versions = f"torch {torch.__version__}, Triton {triton.__version__}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), versions=versions, **info)


OP_IMPLS = {
    "fastdca": lambda q, k, v, ak, av, gate: dca_attention(q, k, v, ak, av, gate, causal_len=H)[0],
    "sdpa-prompt-only": lambda q, k, v, ak, av, gate: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]),
    "separate": separate_path,
}


@pytest.mark.parametrize("mode", ["forward", "backward", "forward+backward"])
@pytest.mark.parametrize("impl", list(OP_IMPLS))
@pytest.mark.parametrize("T", [512, 2048, 8192])
@pytest.mark.parametrize("heads", list(HEADS))
def test_gpu_op(benchmark, heads, T, impl, mode):
    Hq, Hkv = HEADS[heads]
    torch.manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE, requires_grad=True)

    q, k, v, ak, av, gate = rand(B, Hq, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D), rand(Hkv, M, D), \
        rand(Hkv, M, D), rand(Hq)
    fn = OP_IMPLS[impl]
    grad = torch.randn(B, T, Hq, D, device="cuda", dtype=DTYPE)
    if impl == "sdpa-prompt-only":
        grad = grad.transpose(1, 2)
    leaves = (q, k, v, ak, av, gate) if impl != "sdpa-prompt-only" else (q, k, v)
    benchmark.group = f"gpu op {heads} T={T} {mode}"
    _device_info(benchmark, gpu_op=True, impl=impl, mode=mode, heads=heads, T=T,
                 flops=4 * B * Hq * D * T * (T + 1) / 2)
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(q, k, v, ak, av, gate)
            _sync()
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    elif mode == "backward":
        def setup():
            return (fn(q, k, v, ak, av, gate),), {}

        def step(out):
            torch.autograd.grad(out, leaves, grad)
            _sync()
        benchmark.pedantic(step, setup=setup, rounds=20, warmup_rounds=3)
    else:
        def step():
            torch.autograd.grad(fn(q, k, v, ak, av, gate), leaves, grad)
            _sync()
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("impl", ["fastdca", "sdpa-prompt-only"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("S", [1024, 8192])
def test_gpu_decode(benchmark, S, batch, impl):
    Hq, Hkv = HEADS["32/8"]
    torch.manual_seed(0)
    q = torch.randn(batch, Hq, 1, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(batch, Hkv, S, D, device="cuda", dtype=DTYPE) for _ in range(2))
    ak, av = (torch.randn(Hkv, M, D, device="cuda", dtype=DTYPE) for _ in range(2))
    gate = torch.randn(Hq, device="cuda", dtype=DTYPE)

    def step():
        with torch.no_grad():
            if impl == "fastdca":
                dca_attention(q, k, v, ak, av, gate, causal_len=H, xg=None)
            else:
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        _sync()

    benchmark.group = f"gpu decode S={S} B={batch}"
    _device_info(benchmark, gpu_decode=True, impl=impl, S=S, B=batch)
    benchmark.pedantic(step, rounds=50, warmup_rounds=5)


LLAMA7B_4_LAYERS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
STEP_B, STEP_T, STEP_L = 4, 1024, 4


def _llama7b(quantized):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA7B_4_LAYERS, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to("cuda", DTYPE)
    if quantized:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, linear in list(parent.named_children()):
                    if isinstance(linear, torch.nn.Linear):
                        q4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                               compute_dtype=DTYPE, quant_type="nf4")
                        q4.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False,
                                                      quant_type="nf4")
                        setattr(parent, name, q4.to("cuda"))
    return model.requires_grad_(False)


def _floor(model):
    delta = torch.nn.Parameter(torch.zeros(model.config.hidden_size, device="cuda", dtype=DTYPE))
    model.floor_delta = delta
    model.model.layers[0].register_forward_pre_hook(lambda module, args: (args[0] + delta,) + args[1:])
    return model


STEP_VARIANTS = {
    "floor": _floor,
    "fastdca": lambda model: fastdca.patch(model, fastdca.DCAConfig(adapter_layers=STEP_L, adapter_len=M,
                                                                    causal_len=H, alpha=1.0)),
    "fastdca-sample-head": lambda model: fastdca.patch(model, fastdca.DCAConfig(
        adapter_layers=STEP_L, adapter_len=M, causal_len=H, alpha=1.0, variance="sample", xg_space="head")),
    "peft-adaption-prompt": lambda model: __import__("peft").get_peft_model(
        model, __import__("peft").AdaptionPromptConfig(adapter_len=M, adapter_layers=STEP_L, task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
@pytest.mark.parametrize("weights", ["bf16", "nf4"])
def test_gpu_training_step(benchmark, weights, variant):
    if weights == "nf4":
        pytest.importorskip("bitsandbytes")
    torch.cuda.empty_cache()
    model = STEP_VARIANTS[variant](_llama7b(quantized=weights == "nf4"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, LLAMA7B_4_LAYERS["vocab_size"], (STEP_B, STEP_T), generator=g).cuda()
    batch = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))

    def step():
        for p in trainable:
            p.grad = None
        model(**batch).loss.backward()
        _sync()

    step()
    torch.cuda.reset_peak_memory_stats()
    step()
    benchmark.group = f"gpu training step LLaMA-7B shape, 4 layers, {weights}, B={STEP_B} T={STEP_T}"
    _device_info(benchmark, gpu_step=True, variant=variant, weights=weights,
                 peak_memory_bytes=torch.cuda.max_memory_allocated())
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
