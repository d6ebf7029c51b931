"""fastdca.patch on tiny random LLaMA-family models (llama, mistral, qwen2), fp32/fp16/bf16 and bitsandbytes."""

import copy
import importlib
import inspect
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastdca  # noqa: E402
from fastdca import DCAConfig, reference  # noqa: E402

patch_mod = importlib.import_module("fastdca.patch")  # the module; `fastdca.patch` is the function
attention_mod = importlib.import_module("fastdca.hf.attention")  # where the attention function calls the op

MODEL_TYPES = ("llama", "mistral", "qwen2")
VOCAB = 100


def tiny_config(model_type, layers=3, attn="sdpa", **extra):
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
                  **extra)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[model_type]
    config = cls(**kwargs)
    config._attn_implementation = attn
    return config


def tiny_model(model_type="llama", layers=3, attn="sdpa", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, layers, attn))
    return model.to(dtype).eval()


def padded_batch(seed=1, B=3, T=9):
    """Left-padded row 1, right-padded row 2; labels -100 on padding and on the first two tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, T - 2:] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    return ids, mask, labels


def position_ids(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def randomize_gates(model, seed=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in patch_mod.adapter_state_dict(model).items():
            if name.endswith("gate"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def dca_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CFG = DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2)


# --------------------------------------------------------------------------------------------------
# Initialisation, equality with the unpatched model and with the reference backend


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_zero_gate_equals_unpatched(model_type, attn):
    model = tiny_model(model_type, attn=attn)
    ids, mask, _ = padded_batch()
    pos = position_ids(mask)
    with torch.no_grad():
        before = model(ids, attention_mask=mask, position_ids=pos).logits
        plain = model(ids).logits
    fastdca.patch(model, CFG)
    assert model.config._attn_implementation == f"fastdca_{attn}"
    for i, layer in enumerate(model.model.layers):
        assert hasattr(layer.self_attn, "dca") == (i >= 1)
    dca = model.model.layers[2].self_attn.dca
    assert dca.prompt.dtype == torch.float32 and dca.prompt.shape == (5, 64)
    assert dca.gate.shape == (4,) and torch.equal(dca.gate, torch.zeros(4))
    with torch.no_grad():
        after = model(ids, attention_mask=mask, position_ids=pos).logits
        plain_after = model(ids).logits
    real = mask.bool()
    if attn == "sdpa":  # the op's prompt part is the same SDPA call: bit-identical
        assert torch.equal(after[real], before[real])
        assert torch.equal(plain_after, plain)
    else:  # eager materialises the scores itself; the op uses SDPA
        torch.testing.assert_close(after[real], before[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain_after, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_zero_gate_and_backward(dtype):
    model = tiny_model("llama", dtype=dtype)
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    fastdca.patch(model, CFG)
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
    assert after.dtype == dtype
    assert torch.equal(after[mask.bool()], before[mask.bool()])
    randomize_gates(model)
    model.train()
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss) and out.causal_loss > 0
    out.loss.backward()
    for p in patch_mod.adapter_state_dict(model).values():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("model_type,cfg", [
    ("llama", CFG),
    ("mistral", DCAConfig(adapter_layers=3, adapter_len=4, causal_len=3, causal_layers=2, variance="token")),
    ("qwen2", DCAConfig(adapter_layers=2, adapter_len=6, causal_len=1, xg_space="hidden", gate_fn="identity")),
])
def test_matches_reference_backend(model_type, cfg, monkeypatch):
    model = tiny_model(model_type)
    fastdca.patch(model, cfg)
    randomize_gates(model, scale=0.5)
    model.train()
    ids, mask, labels = padded_batch()
    pos = position_ids(mask)

    def run(backend):
        monkeypatch.setenv("FASTDCA_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, position_ids=pos, labels=labels)
        out.loss.backward()
        return out, dca_grads(model)

    fast, fast_grads = run("torch")
    ref, ref_grads = run("reference")
    real = mask.bool()
    torch.testing.assert_close(fast.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.causal_loss, ref.causal_loss, rtol=1e-5, atol=1e-7)
    assert fast.causal_loss > 0
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert set(fast_grads) == set(ref_grads) == set(patch_mod.adapter_state_dict(model))
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_independent_layer_computation():
    """One adapted layer checked against docs/DESIGN.md section 1 written out here, on the module's own
    projections and RoPE (captured inputs), independent of the op's backends."""
    model = tiny_model("llama", layers=2)
    fastdca.patch(model, DCAConfig(adapter_layers=1, adapter_len=3, causal_len=1))
    randomize_gates(model)
    attn = model.model.layers[1].self_attn
    captured = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, k, o: captured.update(out=o[0]), with_kwargs=True)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=position_ids(mask))
    h1.remove(), h2.remove()
    x = captured["hidden_states"]
    cos, sin = captured["position_embeddings"]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    B, T, _ = x.shape
    with torch.no_grad():
        q = attn.q_proj(x).view(B, T, 4, 16).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, 2, 16).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, 2, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        ak = attn.k_proj(attn.dca.prompt).view(3, 2, 16).transpose(0, 1).repeat_interleave(2, 0)
        av = attn.v_proj(attn.dca.prompt).view(3, 2, 16).transpose(0, 1).repeat_interleave(2, 0)
        s = q @ k.transpose(-1, -2) / 4.0
        visible = torch.ones(T, T).tril().bool()[None, None] & mask.bool()[:, None, None, :]
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        a = torch.tanh(attn.dca.gate)[None, :, None, None] * torch.softmax(q @ ak.transpose(-1, -2) / 4.0, -1)
        out = (p @ v + a @ av).transpose(1, 2).reshape(B, T, 64)
        expected = attn.o_proj(out)
    real = mask.bool()
    torch.testing.assert_close(captured["out"][real], expected[real], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Training: only adapter grads, padding, gradient checkpointing, quantised models


def test_only_dca_params_train_and_trainer_signature():
    model = tiny_model("qwen2")
    fastdca.patch(model, CFG)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(patch_mod.adapter_state_dict(model))
    assert trainable == {f"model.layers.{i}.self_attn.dca.{p}" for i in (1, 2) for p in ("prompt", "gate")}
    randomize_gates(model)
    model.train()
    ids, mask, labels = padded_batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    params = inspect.signature(model.forward).parameters  # what Trainer inspects to keep dataset columns
    assert "labels" in params and "attention_mask" in params
    assert "causal_loss" in model.config.keys_to_ignore_at_inference
    assert "causal_term" in model.config.keys_to_ignore_at_inference


def test_loss_is_ce_plus_alpha_causal_and_padding_invariant():
    model = tiny_model("llama")
    cfg = DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=0.7)
    fastdca.patch(model, cfg)
    randomize_gates(model)
    model.train()
    ids, mask, labels = padded_batch()
    out = model(ids, attention_mask=mask, labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
    assert out.causal_loss > 0
    torch.testing.assert_close(out.loss, ce + 0.7 * out.causal_loss)
    # Extra right padding changes nothing: not the CE, not the causal loss.
    pad = 4
    ids2 = torch.cat([ids, torch.zeros(3, pad, dtype=ids.dtype)], 1)
    mask2 = torch.cat([mask, torch.zeros(3, pad, dtype=mask.dtype)], 1)
    labels2 = torch.cat([labels, torch.full((3, pad), -100)], 1)
    out2 = model(ids2, attention_mask=mask2, labels=labels2)
    torch.testing.assert_close(out2.causal_loss, out.causal_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-5, atol=1e-6)
    # alpha = 0: plain CE, no statistics collected
    model2 = tiny_model("llama")
    fastdca.patch(model2, DCAConfig(adapter_layers=2, adapter_len=5, alpha=0.0))
    model2.load_state_dict(model.state_dict())
    model2.train()
    out3 = model2(ids, attention_mask=mask, labels=labels)
    assert "causal_loss" not in out3
    torch.testing.assert_close(out3.loss, ce)


@pytest.mark.parametrize("variance, xg_space", [("sample", "head"), ("token", "hidden")])
def test_causal_loss_matches_definition(variance, xg_space):
    """L_causal from the model equals its definition computed directly from X_G: the variance over samples
    of each sample's mean X_G (sample, head), or per position the variance over the samples real there
    of o_proj(X_G), averaged over the positions with two or more (token, hidden)."""
    model = tiny_model("llama", layers=2)
    fastdca.patch(model, DCAConfig(adapter_layers=1, adapter_len=4, causal_len=2, variance=variance,
                                   xg_space=xg_space))
    randomize_gates(model)
    model.train()
    ids, mask, labels = padded_batch()
    out = model(ids, attention_mask=mask, position_ids=position_ids(mask), labels=labels)
    # X_G per sample with the token variance's raw X_G from the reference op: rerun with variance="token"
    attn = model.model.layers[1].self_attn
    captured = {}
    orig = attention_mod.dca_attention

    def spy(*args, **kwargs):
        kwargs["xg"] = "token"
        result = orig(*args, **kwargs)
        captured["xg"] = reference.x_g(result[1], args[4])                       # X_G = w av[:H]
        captured["kpm"] = kwargs["key_padding_mask"]
        return result

    model.eval()  # the hooks collect nothing; the spy captures the causal weights ("token"), hence X_G
    attention_mod.dca_attention = spy
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=position_ids(mask))
    finally:
        attention_mod.dca_attention = orig
    assert torch.equal(captured["kpm"], mask.bool())
    xg = captured["xg"]                                              # (B, T, Hq, D)
    real = mask.bool()
    if variance == "sample":
        means = torch.stack([xg[b][real[b]].mean(0) for b in range(3)])
        expected = means.var(0, unbiased=True).mean()
    else:
        hidden = attn.o_proj(xg.flatten(2))                          # (B, T, hidden)
        per_position = [hidden[real[:, t], t].var(0, unbiased=True).mean()
                        for t in range(xg.shape[1]) if real[:, t].sum() >= 2]
        expected = torch.stack(per_position).mean()
    torch.testing.assert_close(out.causal_loss.detach(), expected, rtol=1e-4, atol=1e-8)
    assert attn.dca.gate.requires_grad


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_gradient_checkpointing_same_loss_and_grads(model_type):
    model = tiny_model(model_type)
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2))
    randomize_gates(model)
    model.train()
    ids, mask, labels = padded_batch()

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.loss.detach(), out.causal_loss.detach(), dca_grads(model)

    loss, closs, grads = step()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    loss_gc, closs_gc, grads_gc = step()
    model.gradient_checkpointing_disable()
    torch.testing.assert_close(loss_gc, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(closs_gc, closs, rtol=1e-6, atol=1e-9)
    assert set(grads) == set(grads_gc) and len(grads) == 4
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-7)
    assert importlib.import_module("fastdca.hf.state").state_of(model).stats == {}  # the recomputation recorded nothing
    # Reentrant checkpointing would drop the causal loss's gradient: refused with a clear message.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="non-reentrant gradient checkpointing"):
        model(ids, attention_mask=mask, labels=labels)
    model.gradient_checkpointing_disable()


def _save_tiny(tmp_path, model_type="llama"):
    model = tiny_model(model_type, layers=2)
    path = tmp_path / "base"
    model.save_pretrained(path)
    return path


def test_4bit_gradients_survive_an_eval_forward_on_the_cpu(tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference at the first eval-mode forward, and that layout
    passes no gradient: the patched model must undo it before a forward that trains."""
    pytest.importorskip("bitsandbytes")
    path = _save_tiny(tmp_path)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    ids, mask, labels = padded_batch(T=6)
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    k_proj = model.model.layers[1].self_attn.k_proj
    if not getattr(k_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    model.train()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    prompt_grads = [m.dca.prompt.grad for m in model.modules() if hasattr(m, "dca")]
    assert all(g is not None and g.abs().sum() > 0 for g in prompt_grads)


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_training_lowers_loss(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    path = _save_tiny(tmp_path)
    if bits == 4:
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32)
    else:
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    kproj = type(model.model.layers[1].self_attn.k_proj).__name__
    assert kproj == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2))
    assert "trainable parameters: 520 of" in fastdca.describe(model)
    model.train()
    ids, mask, labels = padded_batch(B=4, T=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(map(lambda x: x == x, losses))
    assert losses[-1] < losses[0] - 0.05, losses
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(patch_mod.adapter_state_dict(model))
    model.eval()
    with torch.no_grad():
        gen = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 11)


# --------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("model_type,attn", [("llama", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa")])
def test_generate_cache_matches_no_cache(model_type, attn):
    model = tiny_model(model_type, attn=attn)
    fastdca.patch(model, CFG)
    randomize_gates(model, scale=2.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in patch_mod.adapter_state_dict(model).values():
            if p.dim() == 2:
                p.mul_(3.0)
    ids = torch.randint(1, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0   # left padding
    mask[2, :4] = 0
    ids[mask == 0] = 0
    dcas = [model.model.layers[i].self_attn.dca for i in (1, 2)]
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = [d.kv_computations for d in dcas]
        cached = model.generate(ids, use_cache=True, return_dict_in_generate=True, **kw)
        after = [d.kv_computations for d in dcas]
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached)
    assert [a - b for a, b in zip(after, before)] == [1, 1]  # once per generate call, not per step
    # The adapter keys never enter the KV cache: it holds exactly the prompt + generated tokens.
    assert cached.past_key_values.get_seq_length() == cached.sequences.shape[1] - 1
    # The tokens differ from the unpatched model's: the adapter is live.
    base = tiny_model(model_type, attn=attn)
    with torch.no_grad():
        plain = base.generate(ids, **kw)
    assert not torch.equal(plain, uncached)
    # Changing the prompt in place invalidates the cached adapter keys.
    with torch.no_grad():
        dcas[0].prompt.add_(1.0)
        model.generate(ids, use_cache=True, **kw)
    assert dcas[0].kv_computations == after[0] + 1


# --------------------------------------------------------------------------------------------------
# Save / load / unpatch / describe


def test_save_load_round_trip(tmp_path):
    base = tiny_model("mistral")
    model = copy.deepcopy(base)
    cfg = DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=0.5)
    fastdca.patch(model, cfg)
    model.train()
    ids, mask, labels = padded_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    out_dir = tmp_path / "adapter"
    fastdca.save_adapter(model, out_dir)
    assert sorted(os.listdir(out_dir)) == ["adapter.safetensors", "dca_config.json"]
    meta = json.loads((out_dir / "dca_config.json").read_text())
    assert DCAConfig.from_dict(meta["dca_config"]) == cfg
    fresh = copy.deepcopy(base)
    fastdca.patch(fresh, cfg)
    fastdca.load_adapter(fresh, out_dir)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = fresh(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    # An unpatched model is patched with the saved config on load.
    other = fastdca.load_adapter(copy.deepcopy(base), out_dir)
    assert patch_mod.get_config(other) == cfg
    with torch.no_grad():
        assert torch.equal(other(ids, attention_mask=mask).logits, a)
    fastdca.save_adapter(model, out_dir)  # overwrite in place, no temp files left
    assert sorted(os.listdir(out_dir)) == ["adapter.safetensors", "dca_config.json"]


def test_load_adapter_refuses_mismatches(tmp_path):
    model = tiny_model("llama")
    fastdca.patch(model, CFG)
    fastdca.save_adapter(model, tmp_path / "a")
    other = tiny_model("llama")
    fastdca.patch(other, DCAConfig(adapter_layers=2, adapter_len=6, causal_len=2))
    with pytest.raises(ValueError, match="different DCAConfig.*adapter_len: model 6 vs adapter 5"):
        fastdca.load_adapter(other, tmp_path / "a")
    deeper = tiny_model("llama", layers=4)
    fastdca.patch(deeper, CFG)
    with pytest.raises(ValueError, match="different model.*num_hidden_layers"):
        fastdca.load_adapter(deeper, tmp_path / "a")
    qwen = tiny_model("qwen2")
    fastdca.patch(qwen, CFG)
    with pytest.raises(ValueError, match="model_type: model 'qwen2' vs adapter 'llama'"):
        fastdca.load_adapter(qwen, tmp_path / "a")
    # Tampered tensor shapes are caught too.
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    tensors["model.layers.2.self_attn.dca.gate"] = torch.zeros(7)
    save_file(tensors, tmp_path / "a" / "adapter.safetensors")
    fresh = tiny_model("llama")
    fastdca.patch(fresh, CFG)
    with pytest.raises(ValueError, match=r"dca.gate has shape \(7,\) in the adapter, \(4,\) in the model"):
        fastdca.load_adapter(fresh, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no fastdca adapter"):
        fastdca.load_adapter(fresh, tmp_path / "missing")
    # A refused adapter leaves an unpatched model as it was.
    unpatched = tiny_model("llama", layers=4)
    flags = {n: p.requires_grad for n, p in unpatched.named_parameters()}
    with pytest.raises(ValueError, match="different model.*num_hidden_layers"):
        fastdca.load_adapter(unpatched, tmp_path / "a")
    assert not patch_mod.is_patched(unpatched)
    assert {n: p.requires_grad for n, p in unpatched.named_parameters()} == flags


def test_attention_dropout_in_training_is_refused():
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    fastdca.patch(model, CFG)
    ids, mask, labels = padded_batch()
    model.train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        model(ids, attention_mask=mask, labels=labels)
    model.eval()
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


def test_unpatch_restores_model():
    model = tiny_model("qwen2", attn="eager")
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    fastdca.patch(model, CFG)
    randomize_gates(model)
    with torch.no_grad():
        assert not torch.equal(model(ids, attention_mask=mask).logits, before)
    fastdca.unpatch(model)
    assert model.config._attn_implementation == "eager"
    assert not any(".dca." in n for n, _ in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_flags
    # transformers >= 5.24 configs do not have the attribute until someone sets it
    assert "causal_loss" not in (getattr(model.config, "keys_to_ignore_at_inference", None) or [])
    assert not model._forward_hooks and not model._forward_pre_hooks
    model.train()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    assert "causal_loss" not in out
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
    fastdca.patch(model, CFG)  # can be patched again
    with pytest.raises(ValueError, match="not patched"):
        fastdca.unpatch(tiny_model("llama"))


def test_describe_and_parameter_counts():
    model = tiny_model("llama", layers=4)
    fastdca.patch(model, DCAConfig(adapter_layers=3, adapter_len=10))
    text = fastdca.describe(model)
    total = sum(p.numel() for p in model.parameters())
    assert "adapted layers: 3 (1-3)" in text
    assert f"trainable parameters: 1,932 of {total:,}" in text
    count = patch_mod.trainable_parameter_count
    assert count(20, 10, 4096, 32) == 819_840      # LLaMA-7B, L = 20
    assert count(30, 10, 4096, 32) == 1_229_760    # LLaMA-7B, L = 30
    assert count(20, 10, 576, 9) == 115_380        # SmolLM2-135M, L = 20


def test_errors(monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="adapter_layers=4 is larger than the model's 3 decoder layers"):
        fastdca.patch(model, DCAConfig(adapter_layers=4))
    assert not patch_mod.is_patched(model) and all(p.requires_grad for p in model.parameters())
    fastdca.patch(model, CFG)
    with pytest.raises(RuntimeError, match="already patched"):
        fastdca.patch(model, CFG)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model type 'gpt2'.*llama, mistral, qwen2"):
        fastdca.patch(gpt2, CFG)
    with pytest.raises(TypeError, match="DCAConfig"):
        fastdca.patch(tiny_model("llama"), {"adapter_layers": 2})
    # (transformers' lazy module may have been replaced in sys.modules; patch the one an import returns)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    with pytest.raises(RuntimeError, match="supports transformers >=5.0.0,<6.0.0; found 4.40.0"):
        fastdca.patch(tiny_model("llama"), CFG)


def test_shared_config_is_not_rerouted():
    config = tiny_config("llama")
    torch.manual_seed(0)
    patched = transformers.AutoModelForCausalLM.from_config(config)
    other = transformers.AutoModelForCausalLM.from_config(config)
    assert patched.config is other.config
    fastdca.patch(patched, CFG)
    assert other.config._attn_implementation == "sdpa"
    assert patched.config._attn_implementation == "fastdca_sdpa"
    assert patched.model.layers[0].self_attn.config is patched.config
    fastdca.unpatch(patched)
    assert patched.config is other.config


def test_num_items_in_batch_weights_the_causal_term():
    """Trainer's gradient accumulation divides the summed CE by the tokens of the whole accumulated
    batch (num_items_in_batch); the causal term is weighted by this micro-batch's share of them."""
    model = tiny_model("llama")
    fastdca.patch(model, CFG)
    randomize_gates(model)
    model.train()
    ids, mask, labels = padded_batch()
    count = int(labels[:, 1:].ne(-100).sum())
    plain = model(ids, attention_mask=mask, labels=labels)
    out = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(2 * count))
    ce = plain.loss - plain.causal_loss
    torch.testing.assert_close(out.loss, ce / 2 + 0.5 * out.causal_loss)


def test_trainer_needs_no_change(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    fastdca.patch(model, CFG)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(1, VOCAB, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids.clone()}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), eval_dataset=Data())
    trainer.train()
    gates = [model.model.layers[i].self_attn.dca.gate for i in (1, 2)]
    assert all(bool((g != 0).all()) for g in gates)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == metrics["eval_loss"]


def test_matches_peft_adaption_prompt():
    """An independent implementation of LLaMA-Adapter: PEFT's AdaptionPrompt (one scalar gate per layer,
    used as is) equals DCA with gate_fn="identity" and that gate on every head."""
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2,
                                                                                  task_type="CAUSAL_LM"))
    ours = fastdca.patch(copy.deepcopy(base), DCAConfig(adapter_layers=2, adapter_len=5, gate_fn="identity"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in (1, 2):
            attn = theirs.base_model.model.model.layers[i].self_attn
            attn.adaption_gate.copy_(torch.randn(attn.adaption_gate.shape, generator=g))
            dca = ours.model.layers[i].self_attn.dca
            dca.prompt.copy_(attn.adaption_prompt.reshape(dca.prompt.shape))
            dca.gate.copy_(attn.adaption_gate.expand(dca.gate.shape))
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(ids).logits
        plain = base(ids).logits
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# disable_adapter, print_trainable_parameters, eager attention at pads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_disable_adapter_gives_the_base_model(attn):
    model = tiny_model("llama", attn=attn)
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask, labels=labels)
    fastdca.patch(model, CFG)
    randomize_gates(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    with fastdca.disable_adapter(model):
        with torch.no_grad():
            off = model(ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        on = model(ids, attention_mask=mask, labels=labels)
    assert torch.equal(off.logits, base.logits) and torch.equal(off.loss, base.loss)
    assert getattr(off, "causal_loss", None) is None
    assert not torch.equal(on.logits, base.logits) and on.causal_loss > 0     # and on again after the context
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_print_trainable_parameters(capsys):
    model = tiny_model("llama")
    total = sum(p.numel() for p in model.parameters())
    fastdca.patch(model, CFG)
    fastdca.print_trainable_parameters(model)
    trainable = 2 * (5 * 64 + 4)       # L x (M x hidden + heads)
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,} || all params: {total + trainable:,} "
                                               f"|| trainable%: {100 * trainable / (total + trainable):.4f}")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_eager_left_padding_equals_the_unpatched_model_everywhere(model_type):
    """Labels on every token, pads included (what a collator that does not mask pads gives): a query with
    no real key to see gets eager's uniform average of v, so the loss equals the unpatched model's."""
    model = tiny_model(model_type, attn="eager")
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask, labels=ids)
    fastdca.patch(model, CFG)
    with torch.no_grad():
        after = model(ids, attention_mask=mask, labels=ids)
    # eager materialises the scores itself, the op goes through SDPA: float32 rounding only
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.loss, before.loss, rtol=1e-6, atol=0)
