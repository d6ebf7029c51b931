"""PEFT LoRA and DCA on one model: both train, whichever object is patched, and equal a reference
(the LoRA merged into the base weights, then patched with the same DCA parameters)."""

import importlib

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastdca  # noqa: E402
from fastdca import DCAConfig  # noqa: E402

patch_mod = importlib.import_module("fastdca.patch")  # the module; `fastdca.patch` is the function
CFG = DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=1.0)


def _base(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                                      initializer_range=0.1)
    return transformers.LlamaForCausalLM(config)


def _lora(model, seed=1):
    torch.manual_seed(seed)   # init_lora_weights=False: B is random too, so LoRA changes q and v from the start
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def _lora_dca(entry, seed=2):
    peft_model = _lora(_base())
    torch.manual_seed(seed)
    fastdca.patch(peft_model if entry == "peft_model" else peft_model.get_base_model(), CFG)
    with torch.no_grad():
        for name, p in patch_mod.adapter_state_dict(peft_model).items():
            p.normal_() if name.endswith("gate") else None
    return peft_model


def _reference(peft_model):
    """The LoRA merged into a plain copy of the base, patched with the same DCA parameters."""
    merged = _base()
    lora_state = {k: v for k, v in peft_model.get_base_model().state_dict().items() if ".dca." not in k}
    plain = _lora(merged)
    plain.get_base_model().load_state_dict(lora_state)
    merged = plain.merge_and_unload()
    fastdca.patch(merged, CFG)
    with torch.no_grad():
        for name, p in patch_mod.adapter_state_dict(merged).items():
            p.copy_(patch_mod.adapter_state_dict(peft_model)[name])
    return merged


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (3, 9), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


@pytest.mark.parametrize("entry", ["peft_model", "base_model"])
def test_lora_and_dca_train_together_and_equal_the_merged_reference(entry):
    model = _lora_dca(entry).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(".dca." in n for n in trainable) == 4 and sum("lora_" in n for n in trainable) == 12
    reference = _reference(model).train()
    out, ref = model(**_batch()), reference(**_batch())
    # float32: the merged weight W + BA is rounded once, LoRA adds BAx in a second product
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.causal_loss, ref.causal_loss, rtol=1e-4, atol=0)
    assert out.causal_loss > 0
    out.loss.backward()
    ref.loss.backward()
    ref_params = dict(patch_mod.adapter_state_dict(reference))
    for name, p in patch_mod.adapter_state_dict(model).items():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item())
    # two optimiser steps (the second raised "backward through the graph a second time" before)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        optimizer.zero_grad()
        model(**_batch()).loss.backward()
        optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_both_entries_give_the_same_model():
    a, b = _lora_dca("peft_model").train(), _lora_dca("base_model").train()
    assert torch.equal(a(**_batch()).loss, b(**_batch()).loss)


def test_adapter_keys_follow_lora_weights_changed_in_place_without_grad():
    model = _lora_dca("peft_model").eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        first = model(ids).logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
        second = model(ids).logits
        expected = _reference(model).eval()(ids).logits
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


def test_patch_then_get_peft_model_is_refused_naming_peft():
    model = _base()
    fastdca.patch(model, CFG)
    peft_model = _lora(model).train()
    assert not any(p.requires_grad for p in patch_mod.adapter_state_dict(peft_model).values())
    with pytest.raises(RuntimeError, match="PEFT froze fastdca's DCA parameters"):
        peft_model(**_batch())


def test_peft_save_pretrained_writes_and_load_adapter_reads_both_adapters(tmp_path):
    model = _lora_dca("peft_model").eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter.safetensors").is_file()
    fresh = _lora(_base(), seed=7)                 # other LoRA and DCA values until loaded
    fastdca.patch(fresh, CFG)
    fresh.load_adapter(str(tmp_path), adapter_name="default")   # what Trainer's resume calls
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("loader", ["AutoPeftModelForCausalLM", "PeftModel.from_pretrained",
                                    "transformers from_pretrained", "fastdca.from_pretrained"])
def test_a_lora_and_dca_folder_loads_both_through_every_loader(loader, tmp_path):
    """A patched PeftModel's folder loaded the ways PEFT and transformers load adapters gives LoRA and DCA, never
    LoRA alone (fastdca is imported: it wraps their load_adapter)."""
    base = _base()
    base.save_pretrained(tmp_path / "base")
    peft_model = _lora(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    fastdca.patch(peft_model, CFG)
    with torch.no_grad():
        for name, p in patch_mod.adapter_state_dict(peft_model).items():
            p.normal_()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        lora_only = _lora(_base())
        lora_only.get_base_model().load_state_dict(
            {k: v for k, v in peft_model.get_base_model().state_dict().items() if ".dca." not in k})
        assert (lora_only.eval()(ids).logits - expected).abs().max() > 1e-3     # DCA changes the logits
    peft_model.save_pretrained(tmp_path / "out")
    if loader == "AutoPeftModelForCausalLM":
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    elif loader == "PeftModel.from_pretrained":
        loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                                tmp_path / "out")
    elif loader == "transformers from_pretrained":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    else:
        loaded = fastdca.from_pretrained(tmp_path / "out")
    assert patch_mod.is_patched(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)
