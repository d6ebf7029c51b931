"""model.save_pretrained of a patched model, fastdca.from_pretrained, and a plain load that refuses."""

import importlib
import json

import pytest
import torch
import transformers

import fastdca
from fastdca import DCAConfig

patch_mod = importlib.import_module("fastdca.patch")  # the module; `fastdca.patch` is the function


def _patched(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=0.5))
    with torch.no_grad():
        for p in patch_mod.adapter_state_dict(model).values():
            p.normal_()
    return model


def test_save_pretrained_and_from_pretrained_restore_the_adapted_model(tmp_path):
    model = _patched()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "adapter.safetensors", "dca_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = fastdca.from_pretrained(tmp_path)
    assert patch_mod.is_patched(loaded)
    assert patch_mod.get_config(loaded) == patch_mod.get_config(model)
    assert loaded.config._attn_implementation == "fastdca_sdpa"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, expected)


def _reads_attn_implementation_from_config_json():
    config = transformers.LlamaConfig.from_dict({"attn_implementation": "eager"})
    return getattr(config, "_attn_implementation_internal", None) == "eager"


@pytest.mark.skipif(not _reads_attn_implementation_from_config_json(),
                    reason=f"transformers {transformers.__version__} ignores config.json's attn_implementation, so a "
                           "plain from_pretrained of a DCA folder loads the base model (README: Saving)")
def test_a_plain_from_pretrained_of_a_dca_folder_refuses(tmp_path):
    _patched().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fastdca_from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_of_a_plain_folder_says_what_it_is(tmp_path):
    model = _patched()
    fastdca.unpatch(model)
    model.save_pretrained(tmp_path)        # unpatched: transformers' own save_pretrained again
    assert "fastdca" not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(fastdca.AdapterError, match="not written by a fastdca-patched model"):
        fastdca.from_pretrained(tmp_path)
