"""Every supported model family, on tiny random fp32 configs: (a) a freshly patched model equals the
unpatched one; (b) with non-zero gates it equals an independent implementation, written here from the
family's modeling code and DCA's equations (not through fastdca's op or its architecture entries),
forward and adapter gradients, padded and packed; (c) generate with the cache gives the tokens it gives
without; (d) a few training steps lower the loss; and 4-bit loading trains. Windows (4) are shorter than
the rows (9), and Gemma 2's soft-cap (2.0) bends the scores. Other families are refused."""

import copy
import importlib
import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import fastdca
from fastdca import DCAConfig, reference
from fastdca.hf.state import state_of

patch_mod = importlib.import_module("fastdca.patch")  # the module; `fastdca.patch` is the function

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.1)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**BASE),
    "mistral": lambda: transformers.MistralConfig(sliding_window=4, **BASE),      # windows shorter than the rows
    "qwen2": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **BASE),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **BASE),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, **BASE),
    "olmo2": lambda: transformers.Olmo2Config(**BASE),
    "granite": lambda: transformers.GraniteConfig(attention_multiplier=0.3, embedding_multiplier=2.0,
                                                  residual_multiplier=0.5, logits_scaling=2.0, **BASE),
    "phi3": lambda: transformers.Phi3Config(sliding_window=4, **BASE),
    "smollm3": lambda: transformers.SmolLM3Config(**BASE),
    "cohere": lambda: transformers.CohereConfig(use_qk_norm=True, **BASE),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, **BASE),
    "gemma2": lambda: transformers.Gemma2Config(
        head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, **BASE),     # a cap low enough to bend the scores
}
EAGER_ONLY = {"gemma2"}   # no SDPA path in transformers (it cannot soft-cap)
CFG = DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=1.0)


def _model(family, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config._attn_implementation = "eager" if family in EAGER_ONLY else attn
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _open_gates(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in patch_mod.adapter_state_dict(model).items():
            if name.endswith("gate"):
                p.copy_(torch.randn(p.shape, generator=g))


def _padded_batch(seed=1, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0                  # left padding
    mask[2, T - 2:] = 0              # right padding
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100              # predicted from the last pad, whose output no definition fixes
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


# --------------------------------------------------------------------------------------------------
# The independent implementation: the family's own eager attention, plus the adapter term


def _adapter_kv(family, attn, prompt, Hkv, D):
    """ak, av (Hkv, M, D): the prompt as the family's modeling code turns hidden states into keys and
    values, without RoPE."""
    x = prompt[None]
    if family == "phi3":
        qkv = attn.qkv_proj(x)
        q_size = attn.config.num_attention_heads * D
        k, v = qkv[..., q_size:q_size + Hkv * D], qkv[..., q_size + Hkv * D:]
    else:
        k, v = attn.k_proj(x), attn.v_proj(x)
    if family == "olmo2":
        k = attn.k_norm(k)                                   # over the whole key width
    k, v = k.view(-1, Hkv, D), v.view(-1, Hkv, D)
    if family in ("qwen3", "qwen3_moe", "cohere", "gemma3_text"):
        k = attn.k_norm(k)                                   # per head
    return k.transpose(0, 1), v.transpose(0, 1)


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    out, weights = eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    prompt = getattr(module, "test_prompt", None)
    if prompt is None:
        return out, weights
    Hkv, D = key.shape[1], key.shape[3]
    ak, av = _adapter_kv(module.test_family, module, prompt, Hkv, D)
    group = query.shape[1] // Hkv
    ak, av = ak.repeat_interleave(group, 0), av.repeat_interleave(group, 0)          # (Hq, M, D)
    probs = torch.softmax((query @ ak.transpose(-1, -2)) * scaling, dim=-1)         # (B, Hq, T, M)
    adapter = torch.tanh(module.test_gate)[None, :, None, None] * probs @ av        # (B, Hq, T, D)
    return out + adapter.transpose(1, 2), weights


AttentionInterface.register("test_dca_reference", _reference_attention)
AttentionMaskInterface.register("test_dca_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _twin(family, patched, unpatched):
    """The unpatched model running the reference attention with leaf copies of the patched adapter."""
    twin = copy.deepcopy(unpatched)
    twin.set_attn_implementation("test_dca_reference")
    for name, p in patch_mod.adapter_state_dict(patched).items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        attn = twin.model.layers[layer].self_attn
        attn.test_family = family
        setattr(attn, "test_" + name.rsplit(".", 1)[1], p.detach().clone().requires_grad_(True))
    return twin


def _twin_grads(twin):
    return {i: (layer.self_attn.test_prompt.grad, layer.self_attn.test_gate.grad)
            for i, layer in enumerate(twin.model.layers) if hasattr(layer.self_attn, "test_prompt")}


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_fresh_patch_equals_the_unpatched_model(family, attn):
    model = _model(family, attn)
    batch = _padded_batch()
    with torch.no_grad():
        before = model(**batch)
    fastdca.patch(model, CFG)
    with torch.no_grad():
        after = model(**batch)
    real = batch["attention_mask"].bool()
    if attn == "sdpa" and family not in EAGER_ONLY:      # the op's prompt part is the same SDPA call
        assert torch.equal(after.logits[real], before.logits[real])
    else:                   # eager materialises the scores, the op goes through SDPA: float32 rounding
        torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.ce_loss, before.loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_open_gates_equal_the_independent_implementation(family, layout, attn):
    if attn == "sdpa" and family in EAGER_ONLY:
        pytest.skip(f"transformers runs {family} with eager attention only")
    unpatched = _model(family, attn)
    model = copy.deepcopy(unpatched)
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=0.0))
    _open_gates(model)
    twin = _twin(family, model, unpatched)
    padded = _padded_batch()
    real = padded["attention_mask"].bool()
    # the reference runs each sequence as a row of the padded batch, numbered from 0 as when packed
    ref = twin(**padded, position_ids=(padded["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    if layout == "packed":
        rows = [{"input_ids": ids[m].tolist(), "labels": lab[m].tolist()}
                for ids, m, lab in zip(padded["input_ids"], real, padded["labels"])]
        out = model(**DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows))
        logits = out.logits[0]
    else:
        out = model(**padded, position_ids=(padded["attention_mask"].cumsum(-1) - 1).clamp(min=0))
        logits = out.logits[real]
    # float32: SDPA against materialised scores, adapter products in another order
    torch.testing.assert_close(logits, ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    ref.loss.backward()
    twin_grads = _twin_grads(twin)
    assert len(twin_grads) == 2
    for i, (prompt_grad, gate_grad) in twin_grads.items():
        dca = model.model.layers[i].self_attn.dca
        torch.testing.assert_close(dca.prompt.grad, prompt_grad, rtol=1e-4, atol=1e-6 * prompt_grad.abs().max().item())
        torch.testing.assert_close(dca.gate.grad, gate_grad, rtol=1e-4, atol=1e-6 * gate_grad.abs().max().item())
    print(f"{family} {layout} {attn}: largest logit difference against the independent implementation "
          f"{(logits - ref.logits[real]).abs().max().item():.2e}")


def _variance_by_definition(x_g, real, variance, project):
    """Today's definition on X_G (B, T, Hq, D): each sample's mean over its real tokens (sample) or each token
    (token), through o_proj where given, then the unbiased variance over the samples (real at the position),
    averaged over the features (and the positions with two or more)."""
    B, T = real.shape
    flat = x_g.reshape(B, T, -1)
    if variance == "sample":
        means = torch.stack([flat[b][real[b]].mean(0) for b in range(B)])
        return (means if project is None else project(means)).var(0).mean()
    flat = flat if project is None else project(flat)
    return torch.stack([flat[real[:, t], t].var(0).mean() for t in range(T) if real[:, t].sum() >= 2]).mean()


@pytest.mark.parametrize("variance,xg_space", [("token", "hidden"), ("sample", "head")])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_causal_loss_equals_its_definition_on_x_g(family, variance, xg_space, monkeypatch):
    """L_causal of a patched float64 model, formed from the causal weights and the Gram matrix of each layer's
    basis, equals today's definition written here: X_G per token by the reference equations on the very
    inputs each causal layer's op received, through the layer's o_proj, then the variance. Value to float64
    round-off, and its gradients in the adapter prompts and gates. (Against the independent implementation
    above the model itself differs by float32 rounding flips: the families' norms compute in float32.)"""
    model = _model(family)
    if family == "qwen3_moe":
        model.set_experts_implementation("eager")     # torch's grouped matmul has no float64
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, variance=variance,
                                   xg_space=xg_space))
    model.double()          # the adapter too: patch keeps it in float32 for a narrower model
    _open_gates(model)
    attention = importlib.import_module("fastdca.hf.attention")
    op, calls = attention.dca_attention, []

    def spy(q, k, v, ak, av, gate, **kwargs):
        if kwargs["xg"] is not None:
            _, weights = reference.dca_attention(q, k, v, ak, av, gate, causal_len=2, scale=kwargs["scale"],
                                                 key_padding_mask=kwargs["key_padding_mask"], xg="token")
            calls.append(reference.x_g(weights, av))                              # (B, T, Hq, D)
        return op(q, k, v, ak, av, gate, **kwargs)

    monkeypatch.setattr(attention, "dca_attention", spy)
    padded = _padded_batch()
    if family in EAGER_ONLY:
        # float64 eager attention gives a left pad, which sees no key, NaN, and the NaN reaches the real tokens
        # of the next layers through 0 * NaN in probs @ v: no left padding (the other families have it)
        padded["attention_mask"][1] = 1
    out = model(**padded, position_ids=(padded["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    causal = [model.model.layers[i].self_attn for i in sorted(state_of(model).causal_ids)]
    assert len(calls) == len(causal) == 2
    real = padded["attention_mask"].bool()
    expected = torch.stack([_variance_by_definition(x_g, real, variance, attn.o_proj if xg_space == "hidden" else None)
                            for x_g, attn in zip(calls, causal)]).mean()
    torch.testing.assert_close(out.causal_loss, expected, rtol=1e-12, atol=0)
    adapters = [t for attn in causal for t in (attn.dca.prompt, attn.dca.gate)]
    for a, e in zip(torch.autograd.grad(out.causal_loss, adapters, retain_graph=True),
                    torch.autograd.grad(expected, adapters)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-14 * e.abs().max().item())


@pytest.mark.parametrize("family", list(CONFIGS))
def test_generate_with_the_cache_equals_without(family):
    model = _model(family)
    fastdca.patch(model, CFG)
    _open_gates(model)
    batch = _padded_batch()
    mask = batch["attention_mask"].clone()
    mask[2] = 1                                        # generation batches are left-padded
    ids = batch["input_ids"]
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def _train(model, params, steps):
    """`steps` AdamW steps (lr 1e-2) on the padded batch; the losses."""
    batch = _padded_batch()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_few_training_steps_lower_the_loss(family):
    model = _model(family).train()
    fastdca.patch(model, CFG)
    losses = _train(model, [p for p in model.parameters() if p.requires_grad], 6)
    assert losses[-1] < losses[0], losses


def test_other_families_are_refused_naming_the_supported_ones():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="does not support model type 'gpt2'; supported model types: llama, "):
        fastdca.patch(model, CFG)
    assert not patch_mod.is_patched(model)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_4bit_loading_trains(family, tmp_path):
    """bitsandbytes nf4 (its CPU path: hidden and intermediate sizes are multiples of 64): patch, and a few
    steps that reach every adapter and lower the loss."""
    pytest.importorskip("bitsandbytes")
    _model(family).save_pretrained(tmp_path)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map="cpu")
    fastdca.patch(model, CFG)
    model.train()
    params = list(patch_mod.adapter_state_dict(model).values())
    losses = _train(model, params, 4)
    # after the first step opened the gates, the gradient reaches every prompt and gate
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert losses[-1] < losses[0], losses
