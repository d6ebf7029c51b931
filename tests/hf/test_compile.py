"""torch.compile: the registered operators (opcheck), graph breaks in a patched model, and compiled results
against eager ones.

The compiles use backend="aot_eager" (Dynamo and AOTAutograd, which is where graph breaks, fake
implementations and the registered autograd formulas are exercised) except one Inductor test: Inductor
on a 2-core CPU takes most of a minute for even a tiny model.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import fastdca
from fastdca.ops import custom_ops  # noqa: F401  (the operators under test)

HIDDEN, HEADS, KV_HEADS, VOCAB = 64, 4, 2, 300
# the three rows: no padding, left padding, right padding
B, T = 3, 12


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def patched_model(backend=None, layers=3, adapted=2, **config):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=HEADS,
                                         num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                                         attn_implementation="sdpa"))
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=adapted, adapter_len=4, causal_len=2, alpha=1.0, **config),
                  backend=backend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dca.gate"):
                p.copy_(torch.randn_like(p))  # open gates: the adapters change the logits and X_G is not 0
    return model.train()


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 9:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def training_step(call, model, batch):
    """(loss, causal loss, {adapter parameter: gradient}) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = call(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.causal_loss.detach(), grads


def assert_fp32_close(actual, expected):
    """Equal up to float32 rounding: a few units in the last place of the tensor's largest entry."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------------------
# graph breaks


@pytest.mark.parametrize("variance,xg_space", [("sample", "head"), ("token", "hidden")])
def test_patched_model_training_forward_has_no_graph_break(variance, xg_space):
    model = patched_model(variance=variance, xg_space=xg_space)
    explanation = torch._dynamo.explain(lambda batch: model(**batch))(padded_batch())
    reasons = [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_one_decoder_layer_compiles_with_fullgraph():
    model = patched_model()
    layer = model.model.layers[-1]
    h = torch.randn(B, T, HIDDEN)
    positions = torch.arange(T)[None].expand(B, T)
    rotary = model.model.rotary_emb(h, positions)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    mask[1, :, :, :4] = False                                  # row 1's first four keys are padding

    state = model._fastdca_state

    def run_layer(h, mask):
        state.xg_mode, state.recording, state.stats = "sample", True, {}
        out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        features = state.stats[layer.self_attn.dca.layer_idx][0]
        return out, (features.weights, features.gram, features.counts)   # per-sample mean weights, Gram, counts

    expected, (means, gram, counts) = run_layer(h, mask)
    compiled, (c_means, c_gram, c_counts) = torch.compile(run_layer, fullgraph=True, backend="aot_eager")(h, mask)
    assert_fp32_close(compiled, expected)
    assert_fp32_close(c_means, means)
    assert_fp32_close(c_gram, gram)
    assert torch.equal(c_counts, counts) and counts.tolist() == [T, T - 4, T]


# --------------------------------------------------------------------------------------------------
# compiled results equal eager ones


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_training_step_equals_eager(backend):
    batch = padded_batch()
    eager = patched_model(backend)
    loss, causal, grads = training_step(eager, eager, batch)
    assert causal > 0
    model = patched_model(backend)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the second step runs the cached graph
        c_loss, c_causal, c_grads = training_step(compiled, model, batch)
        assert_fp32_close(c_loss, loss)
        assert_fp32_close(c_causal, causal)
        assert c_grads.keys() == grads.keys()
        for name in grads:
            assert_fp32_close(c_grads[name], grads[name])


def test_inductor_training_step_equals_eager():
    batch = padded_batch()
    eager = patched_model(layers=2, adapted=1)
    loss, causal, grads = training_step(eager, eager, batch)
    model = patched_model(layers=2, adapted=1)
    c_loss, c_causal, c_grads = training_step(torch.compile(model), model, batch)
    assert_fp32_close(c_loss, loss)
    assert_fp32_close(c_causal, causal)
    for name in grads:
        assert_fp32_close(c_grads[name], grads[name])


def test_compiled_generate_equals_eager():
    eager = patched_model().eval()
    model = patched_model().eval()
    model.compile(backend="aot_eager")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0                                            # left padding, as for generation
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch._dynamo.utils.counters.clear()
    generated = model.generate(**kwargs)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch.equal(generated, eager.generate(**kwargs))


# --------------------------------------------------------------------------------------------------
# the operators


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_registered_operator_and_compiled_calls_use_it():
    q, k, v, ak, av, gate = op_inputs(torch.float32)
    with _RecordOps() as recorded:
        fastdca.dca_attention(q, k, v, ak, av, gate, causal_len=2, backend="torch")
    assert not any(name.startswith("fastdca.") for name in recorded.names)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(lambda *x: fastdca.dca_attention(*x, causal_len=2, backend="torch"), backend=capture)(
        q, k, v, ak, av, gate)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert "fastdca.adapter_attention" in targets


def op_inputs(dtype, B=2, Hq=4, Hkv=2, T=5, S=7, D=16, M=3):
    g = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    return (tensor(B, Hq, T, D), tensor(B, Hkv, S, D), tensor(B, Hkv, S, D), tensor(Hkv, M, D),
            tensor(Hkv, M, D), tensor(Hq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xg", ["sample", "token", None])
def test_opcheck_torch_backend_operators(xg, dtype):
    q, _, _, ak, av, gate = op_inputs(dtype)
    members = torch.ones(2, 1, 5, dtype=torch.bool)
    members[1, 0, :2] = False
    members = members if xg == "sample" else None      # read for the sample statistics only
    args = (q, ak, av, gate, members, 2, 0.25, "tanh", xg)
    torch.library.opcheck(torch.ops.fastdca.adapter_attention.default, args)
    adapter_out, probs, stat = torch.ops.fastdca.adapter_attention(*args)
    assert probs.dtype == torch.float32 and probs.shape == (2, 2, 3, 2 * 5)
    assert stat.shape == {"sample": (2, 4, 2), "token": (2, 5, 4, 2), None: (0,)}[xg]
    d_stat = None if xg is None else torch.randn(stat.shape).to(stat.dtype)
    torch.library.opcheck(torch.ops.fastdca.adapter_attention_backward.default,
                          (torch.randn(adapter_out.shape).to(dtype), d_stat, q.detach(), ak.detach(), av.detach(),
                           gate.detach(), members, probs.detach(), 2, 0.25, "tanh", xg))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("xg", ["sample", "token", None])
def test_opcheck_fused_kernel_operators(xg, layout):
    """Under the interpreter here (tiny shapes: it is slow); on CUDA where the suite runs on a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if layout == "padded":
        q, k, v, ak, av, gate = (t.detach().to(device).requires_grad_() for t in op_inputs(torch.float32))
        key_padding_mask = torch.ones(2, 7, dtype=torch.bool, device=device)
        key_padding_mask[1, :3] = False
        cu_seqlens = None
    else:
        q, k, v, ak, av, gate = (t.detach().to(device).requires_grad_() for t in op_inputs(torch.float32, B=1, T=7))
        key_padding_mask = None
        cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    # one call with a sliding window and a soft-cap, one with neither
    window, softcap = (3, 2.0) if layout == "packed" else (None, None)
    args = (q, k, v, ak, av, gate, key_padding_mask, cu_seqlens, window, softcap, 2, 0.25, "tanh", xg)
    torch.library.opcheck(torch.ops.fastdca.dca_attention.default, args)
    out, lse, extra = torch.ops.fastdca.dca_attention(*args)
    B, Hq, T, D = q.shape
    assert extra.shape == {"sample": (B, Hq * 2 + 1), "token": (B, T, Hq, 2), None: (0,)}[xg]
    dextra = None if xg is None else torch.randn_like(extra)
    torch.library.opcheck(torch.ops.fastdca.dca_attention_backward.default,
                          (torch.randn_like(out), dextra, *(t.detach() for t in (q, k, v, ak, av, gate, out, lse)),
                           key_padding_mask, cu_seqlens, window, softcap, 2, 0.25, "tanh", xg))


# --------------------------------------------------------------------------------------------------
# fastdca train --compile


def test_compiled_trainer_follows_eager_training(tiny_model_dir, tmp_path):
    """Trainer's torch_compile (what `fastdca train --compile` sets) gives the eager run's losses, gradient
    shares and adapter; aot_eager here, Inductor being the subject of test_inductor_training_step_equals_eager."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from fastdca.patch import adapter_state_dict
    from fastdca.tasks import LetterConcatenation
    from fastdca.train import TrainSettings, train

    examples = LetterConcatenation(n_train=16, n_test=2, train_variants=("second_last",)).examples("train")
    config = fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
        torch.manual_seed(0)  # the same adapter prompts for both runs
        fastdca.patch(model, config)
        settings = TrainSettings(max_steps=3, batch_size=4, learning_rate=5e-2, logging_steps=1, compile=compiled,
                                 extra={"torch_compile_backend": "aot_eager"} if compiled else {})
        torch._dynamo.utils.counters.clear()
        history = train(model, tokenizer, examples, tmp_path / str(compiled), config=config, settings=settings,
                        progress=False)
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert compiled_graphs >= 1 if compiled else compiled_graphs == 0
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
        runs[compiled] = history, {name: p.detach().clone() for name, p in adapter_state_dict(model).items()}
    (eager_history, eager_adapter), (history, adapter) = runs[False], runs[True]
    assert [h["step"] for h in history] == [1, 2, 3]
    for h, e in zip(history, eager_history):
        for key in ("loss", "ce", "causal_loss", "grad_share"):
            assert h[key] == pytest.approx(e[key], rel=1e-4), key
    for name in eager_adapter:
        assert_fp32_close(adapter[name], eager_adapter[name])
