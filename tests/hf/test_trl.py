"""TRL's SFTTrainer trains DCA, not LLaMA-Adapter: the causal term reaches its loss in its padded,
packing and padding-free modes, its loss sequence is plain Trainer's, and a loss the term cannot ride
on is refused before the first step."""

import importlib

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer  # noqa: E402

import fastdca  # noqa: E402

patch_mod = importlib.import_module("fastdca.patch")  # the module; `fastdca.patch` is the function

NAMES = ["ANNA", "BOB", "CARLOS", "DORA", "EVE", "FRED", "GINA", "HANS", "IVY", "JACK", "KIM", "LEOPOLD"]
TEXTS = [f"Take the last letters of {a} {b}: {a[-1]}{b[-1]}" for a in NAMES for b in NAMES[:4]]
MODES = {"padded": {}, "packing": {"packing": True}, "padding_free": {"padding_free": True, "max_length": None}}


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=160, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=64)


def _model(tokenizer, alpha, **dca):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    model = LlamaForCausalLM(config)
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, alpha=alpha, **dca),
                  backend="torch")
    with torch.no_grad():   # open gates: X_G is not zero, so the causal term has something to pull on
        for name, p in model.named_parameters():
            if name.endswith("dca.gate"):
                p.fill_(0.5)
    return model


def _args(tmp_path, **extra):
    # gradient checkpointing is SFTConfig's default (on), and stays on
    settings = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True, bf16=False,
                    dataloader_num_workers=0)
    return trl.SFTConfig(**{**settings, **extra})


def _sft(tmp_path, tokenizer, alpha, mode, **dca):
    model = _model(tokenizer, alpha, **dca)
    dataset = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    trainer = trl.SFTTrainer(model=model, args=_args(tmp_path, **MODES[mode]), train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    adapter = {n: p.detach().clone() for n, p in patch_mod.adapter_state_dict(model).items()}
    return trainer, adapter


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("mode", list(MODES))
def test_sft_trainer_optimises_the_causal_term(tmp_path, tokenizer, mode):
    trainer0, adapter0 = _sft(tmp_path / "a0", tokenizer, 0.0, mode)
    trainer1, adapter1 = _sft(tmp_path / "a1", tokenizer, 100.0, mode)
    diff = max((adapter1[k] - adapter0[k]).abs().max().item() for k in adapter0)
    print(f"{mode}: largest difference between the alpha = 0 and alpha = 100 adapters {diff:.3e}")
    assert diff > 1e-3      # a step of lr 1e-2 that the causal term moved; bit-identical before
    logs = [h for h in trainer1.state.log_history if "loss" in h]
    assert all(h["causal_loss"] > 0 for h in logs)
    assert all(h["grad_share"] > 0 for h in logs)      # measured at every logging step
    assert all("causal_loss" not in h for h in trainer0.state.log_history)


@pytest.mark.parametrize("mode", list(MODES))
def test_sft_trainer_loss_equals_plain_trainer(tmp_path, tokenizer, mode):
    """The same processed data, collator, order and seed through transformers' Trainer, which takes the
    model's own outputs.loss = CE + alpha * L_causal."""
    sft, _ = _sft(tmp_path / "sft", tokenizer, 1.0, mode)
    model = _model(tokenizer, 1.0)
    model.gradient_checkpointing_enable()
    # the packed rows' seq_lengths column is not a forward argument: Trainer would drop it
    args = _args(tmp_path / "plain", remove_unused_columns=False, **MODES[mode])
    plain = Trainer(model=model, args=args, train_dataset=sft.train_dataset,
                    data_collator=sft.data_collator)
    plain.train()
    sft_losses, plain_losses = _losses(sft), _losses(plain)
    print(f"{mode}: SFTTrainer {sft_losses}, Trainer {plain_losses}, largest difference "
          f"{max(abs(a - b) for a, b in zip(sft_losses, plain_losses)):.2e}")
    assert len(sft_losses) == 3
    # float32: the fused LM head sums log-probabilities in another order than the model's cross-entropy
    torch.testing.assert_close(torch.tensor(sft_losses), torch.tensor(plain_losses), rtol=2e-6, atol=0)


def test_dft_loss_is_refused_before_the_first_step(tmp_path, tokenizer):
    model = _model(tokenizer, 1.0)
    before = {n: p.detach().clone() for n, p in patch_mod.adapter_state_dict(model).items()}
    dataset = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    trainer = trl.SFTTrainer(model=model, args=_args(tmp_path, loss_type="dft"), train_dataset=dataset,
                             processing_class=tokenizer)
    with pytest.raises(ValueError, match="loss_type='dft'"):
        trainer.train()
    assert trainer.state.global_step == 0
    for n, p in patch_mod.adapter_state_dict(model).items():
        assert torch.equal(p, before[n])


def test_compute_loss_func_without_the_term_stops_and_with_it_trains(tmp_path, tokenizer):
    """A compute_loss_func computes the loss from the logits: without outputs.causal_term the first
    backward raises; with it, the run equals SFTTrainer's default loss."""
    import torch.nn.functional as F

    def ce_only(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    def with_term(outputs, labels, num_items_in_batch=None):
        return ce_only(outputs, labels) + outputs.causal_term

    dataset = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    trainer = trl.SFTTrainer(model=_model(tokenizer, 1.0), args=_args(tmp_path / "a"), train_dataset=dataset,
                             processing_class=tokenizer, compute_loss_func=ce_only)
    with pytest.raises(RuntimeError, match="causal term did not reach"):
        trainer.train()
    assert trainer.state.global_step == 0
    custom = trl.SFTTrainer(model=_model(tokenizer, 1.0), args=_args(tmp_path / "b"), train_dataset=dataset,
                            processing_class=tokenizer, compute_loss_func=with_term)
    custom.train()
    default, _ = _sft(tmp_path / "c", tokenizer, 1.0, "padded")
    torch.testing.assert_close(torch.tensor(_losses(custom)), torch.tensor(_losses(default)), rtol=2e-6, atol=0)


def test_sft_trainer_checkpoints_are_adapter_sized_and_resume_the_adapter(tmp_path, tokenizer):
    """SFTTrainer saves through the patched model's save_pretrained: the checkpoint holds the adapter, not the
    base, and resuming from it restores the adapter and runs on (Trainer's own resume path)."""
    dataset = datasets.Dataset.from_list([{"text": t} for t in TEXTS])

    def sft(model, steps):
        args = _args(tmp_path, max_steps=steps, save_strategy="steps", save_steps=2)
        return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)

    model = _model(tokenizer, 1.0)
    sft(model, 2).train()
    checkpoint = tmp_path / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert "adapter.safetensors" in names and "model.safetensors" not in names, names
    trained = {n: p.detach().clone() for n, p in patch_mod.adapter_state_dict(model).items()}
    fresh = _model(tokenizer, 1.0)       # gates 0.5, prompts as drawn: not the trained adapter
    assert not all(torch.equal(p, trained[n]) for n, p in patch_mod.adapter_state_dict(fresh).items())
    resumed = sft(fresh, 2)
    resumed._load_from_checkpoint(str(checkpoint))
    for name, p in patch_mod.adapter_state_dict(fresh).items():
        assert torch.equal(p, trained[name]), name
    sft(fresh, 3).train(resume_from_checkpoint=str(checkpoint))
