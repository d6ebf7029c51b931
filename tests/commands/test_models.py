"""fastdca.commands.models: path errors and a round trip through a tiny random model (the real SmolLM2 load is
opt-in: FASTDCA_TEST_SMOLLM2=1)."""

import os

import pytest
import torch

from fastdca.commands.models import load_model, smollm2_cache_dir


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_not_a_model_file(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        load_model(p)


def test_4bit_and_8bit_exclusive(tmp_path):
    with pytest.raises(ValueError, match="exclusive"):
        load_model(tmp_path, load_in_4bit=True, load_in_8bit=True)


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / "fastdca" / "smollm2"


def test_round_trip_tiny_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "a", "b", "c"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok2.pad_token == "</s>"  # given the EOS token when the tokenizer has none


@pytest.mark.skipif(not os.environ.get("FASTDCA_TEST_SMOLLM2"), reason="set FASTDCA_TEST_SMOLLM2=1 (loads the real model)")
def test_smollm2_loads():  # pragma: no cover - opt-in
    from fastdca.commands.models import load_smollm2
    model, tok = load_smollm2()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.pad_token is not None and tok.model_max_length == 8192
