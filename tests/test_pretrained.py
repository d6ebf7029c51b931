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


def test_from_pretrained_reports_nothing_unexpected(tmp_path, capsys, caplog):
    """transformers' load report listed the DCA tensors of model.safetensors as UNEXPECTED ("not ok if you expect
    identical arch") on every fastdca.from_pretrained: a correct load says nothing is wrong."""
    _patched().save_pretrained(tmp_path)
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            fastdca.from_pretrained(tmp_path)
    finally:
        transformers.logging.disable_propagation()
    said = capsys.readouterr().err + caplog.text
    assert "UNEXPECTED" not in said and "dca." not in said, said
    # the class is left as it was: a plain load of the base model still reports what it does not expect
    assert "_keys_to_ignore_on_load_unexpected" not in transformers.LlamaForCausalLM.__dict__


def test_an_adapter_of_the_bare_decoder_loads_into_the_causal_lm_and_back(tmp_path):
    """base_model_prefix: an adapter saved from LlamaModel (layers.N...) loads into LlamaForCausalLM (model.layers.N...)
    and the reverse, as transformers maps weights; the adapted hidden states are equal."""
    causal = _patched()
    bare = transformers.AutoModel.from_config(causal.config.__class__.from_dict(
        {**causal.config.to_dict(), "attn_implementation": "sdpa"})).eval()
    bare.load_state_dict(causal.model.state_dict(), strict=False)      # base weights; the adapter comes from the file
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    fastdca.save_adapter(causal, tmp_path / "from-causal")
    fastdca.load_adapter(bare, tmp_path / "from-causal")
    with torch.no_grad():
        expected = causal(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(bare(ids).last_hidden_state, expected)
    fastdca.save_adapter(bare, tmp_path / "from-bare")
    fresh = transformers.LlamaForCausalLM(causal.config.__class__.from_dict(
        {**causal.config.to_dict(), "attn_implementation": "sdpa"})).eval()
    fresh.load_state_dict({k: v for k, v in causal.state_dict().items() if ".dca." not in k}, strict=False)
    fastdca.load_adapter(fresh, tmp_path / "from-bare")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, causal(ids).logits)
