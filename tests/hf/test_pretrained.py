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


def _saved_base(tmp_path, seed=0):
    """A patched model whose base was loaded from a folder, as users load one: its config names the folder."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    fastdca.patch(model, DCAConfig(adapter_layers=2, adapter_len=5, causal_len=2, alpha=0.5))
    with torch.no_grad():
        for p in patch_mod.adapter_state_dict(model).values():
            p.normal_()
    return model


IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _folder_bytes(path):
    return sum(f.stat().st_size for f in path.iterdir())


def test_save_pretrained_writes_the_adapter_and_from_pretrained_loads_it_by_its_base(tmp_path):
    model = _saved_base(tmp_path)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert names == {"adapter.safetensors", "dca_config.json", "README.md", "model.safetensors.index.json"}, names
    record = json.loads((tmp_path / "adapter" / "dca_config.json").read_text())["base_model"]
    assert record["name_or_path"] == str((tmp_path / "base").resolve())
    adapter_bytes = _folder_bytes(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "whole", full_model=True)
    print(f"save_pretrained: adapter folder {adapter_bytes} bytes, whole model {_folder_bytes(tmp_path / 'whole')}")
    assert adapter_bytes < _folder_bytes(tmp_path / "whole") / 10
    for folder in ("adapter", "whole"):
        loaded = fastdca.from_pretrained(tmp_path / folder)
        assert patch_mod.is_patched(loaded) and patch_mod.get_config(loaded) == patch_mod.get_config(model)
        assert loaded.config._attn_implementation == "fastdca_sdpa"
        with torch.no_grad():
            assert torch.equal(loaded.eval()(IDS).logits, expected)
    # kwargs go to transformers: the base in another dtype, patched and loaded all the same
    half = fastdca.from_pretrained(tmp_path / "adapter", dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16 and patch_mod.is_patched(half)


def test_base_model_overrides_the_record_and_an_old_folder_says_what_is_missing(tmp_path):
    model = _patched()                    # built in memory: its config names no base
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(fastdca.AdapterError, match="does not record its base model.*base_model="):
        fastdca.from_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    loaded = fastdca.from_pretrained(tmp_path / "adapter", base_model=str(tmp_path / "base"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IDS).logits, expected)
    # a folder fastdca wrote before adapters recorded their base: the same one-line answer
    meta = json.loads((tmp_path / "adapter" / "dca_config.json").read_text())
    del meta["base_model"]
    (tmp_path / "adapter" / "dca_config.json").write_text(json.dumps(meta))
    with pytest.raises(fastdca.AdapterError, match="does not record its base model"):
        fastdca.from_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "whole", full_model=True)
    with pytest.raises(ValueError, match="whole model.*drop base_model="):
        fastdca.from_pretrained(tmp_path / "whole", base_model=str(tmp_path / "base"))


def test_the_model_card_names_the_base_and_the_library(tmp_path):
    model = _patched()
    model.save_pretrained(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    card = (tmp_path / "README.md").read_text()
    head = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in head and "library_name: fastdca" in head
    assert "- base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in head
    assert '"causal_len": 2' in card and "fastdca.from_pretrained" in card
    # a README.md the user wrote is theirs: never replaced
    (tmp_path / "README.md").write_text("my notes\n")
    model.save_pretrained(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (tmp_path / "README.md").read_text() == "my notes\n"


def test_push_to_hub_uploads_exactly_the_saved_folder(tmp_path, monkeypatch):
    """Only the network is stubbed: huggingface_hub's create_repo and upload_folder."""
    import huggingface_hub

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, {p.name: p.read_bytes() for p in sorted(__import__("pathlib").Path(folder_path).iterdir())}))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = _patched()
    model.save_pretrained(tmp_path / "saved", base_model="org/base")
    saved = {p.name: p.read_bytes() for p in sorted((tmp_path / "saved").iterdir())}
    model.push_to_hub("me/dca", base_model="org/base")
    model.save_pretrained(tmp_path / "pushed", base_model="org/base", push_to_hub=True, repo_id="me/dca2")
    assert [repo for repo, _ in uploads] == ["me/dca", "me/dca2"]
    from safetensors.torch import load

    for _, files in uploads:
        # the adapter folder: never the base model alone. Byte for byte but for safetensors' header, whose
        # metadata order varies from one write to the next: there the tensors are compared.
        assert set(files) == set(saved) and "config.json" not in files and "model.safetensors" not in files
        for name, data in files.items():
            if name.endswith(".safetensors"):
                got, want = load(data), load(saved[name])
                assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
            else:
                assert data == saved[name], name


def test_trainer_checkpoints_are_adapter_sized_and_resume_the_adapter(tmp_path, caplog):
    """Trainer writes its checkpoints through save_pretrained: adapter-sized now, and its resume must still
    restore the adapter, reporting nothing missing."""
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": IDS[i % 2].tolist(), "labels": IDS[i % 2].tolist()} for i in range(8)]

    def trainer(model, steps):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=2,
                                 learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True, logging_steps=1,
                                 seed=0, save_only_model=False)
        return Trainer(model=model, args=args, train_dataset=rows)

    model = _patched().train()
    trainer(model, 2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert "adapter.safetensors" in names and "model.safetensors" not in names and "config.json" not in names
    trained = {k: v.detach().clone() for k, v in patch_mod.adapter_state_dict(model).items()}
    fresh = _patched(seed=5).train()       # other adapter values until resumed
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            resumed = trainer(fresh, 2)
            resumed._load_from_checkpoint(str(checkpoint))
    finally:
        transformers.logging.disable_propagation()
    assert "missing keys" not in caplog.text and "unexpected keys" not in caplog.text, caplog.text
    for name, value in patch_mod.adapter_state_dict(fresh).items():
        assert torch.equal(value, trained[name]), name
    # and a full resume runs on to the end from there
    trainer(fresh, 4).train(resume_from_checkpoint=str(checkpoint))


def _reads_attn_implementation_from_config_json():
    config = transformers.LlamaConfig.from_dict({"attn_implementation": "eager"})
    return getattr(config, "_attn_implementation_internal", None) == "eager"


@pytest.mark.skipif(not _reads_attn_implementation_from_config_json(),
                    reason=f"transformers {transformers.__version__} ignores config.json's attn_implementation, so a "
                           "plain from_pretrained of a DCA folder loads the base model (docs/integration.md: Saving the Hugging Face way)")
def test_a_plain_from_pretrained_of_a_whole_model_folder_refuses(tmp_path):
    _patched().save_pretrained(tmp_path, full_model=True)
    with pytest.raises(ValueError, match="fastdca_from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_plain_from_pretrained_of_an_adapter_folder_finds_no_model(tmp_path):
    _patched().save_pretrained(tmp_path)
    with pytest.raises((OSError, ValueError), match="config.json"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_of_a_plain_folder_says_what_it_is(tmp_path):
    model = _patched()
    fastdca.unpatch(model)
    model.save_pretrained(tmp_path)        # unpatched: transformers' own save_pretrained again
    assert "fastdca" not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no fastdca adapter or model"):
        fastdca.from_pretrained(tmp_path)


def test_from_pretrained_reports_nothing_unexpected(tmp_path, capsys, caplog):
    """transformers' load report listed the DCA tensors of model.safetensors as UNEXPECTED ("not ok if you expect
    identical arch") on every fastdca.from_pretrained: a correct load says nothing is wrong."""
    _patched().save_pretrained(tmp_path, full_model=True)
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
