"""train -> save -> eval on a tiny random model, the CLI's errors, and a smoke run of the demo."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from fastdca import DCAConfig
from fastdca.cli import main
from fastdca.commands.eval import evaluate
from fastdca.patch import load_adapter, patch
from fastdca.tasks import LetterConcatenation
from fastdca.train import PadCollator, TrainSettings, compile_mode, length_buckets, tokenize_examples, train


def load_tiny(path):
    return LlamaForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)


def test_labels_mask_the_prompt_and_end_with_eos(tiny_model_dir):
    _, tokenizer = load_tiny(tiny_model_dir)
    example = LetterConcatenation(n_train=4).examples("train")[0]
    row, = tokenize_examples([example], tokenizer, max_length=256)
    prompt_len = len(tokenizer(example.prompt)["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][prompt_len:-1]) == example.target


def test_max_length_too_short_is_refused_before_training(tiny_model_dir):
    _, tokenizer = load_tiny(tiny_model_dir)
    examples = LetterConcatenation(n_train=4).examples("train")
    with pytest.raises(ValueError, match="max_length=10 is too short for the prompts"):
        tokenize_examples(examples, tokenizer, max_length=10)


def test_compiled_runs_pad_to_a_few_widths_and_use_cuda_graphs_on_cuda():
    assert length_buckets(256) == (16, 32, 64, 128, 256) and length_buckets(100) == (16, 32, 64, 100)
    rows = [dict(input_ids=[5] * n, labels=[-100] + [5] * (n - 1)) for n in (3, 20)]
    assert PadCollator(0)(rows)["input_ids"].shape == (2, 20)
    batch = PadCollator(0, length_buckets(256))(rows)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum(1).tolist() == [3, 20] and (batch["labels"][:, 20:] == -100).all()
    assert compile_mode(TrainSettings(compile=True), on_cuda=True) == "reduce-overhead"
    assert compile_mode(TrainSettings(compile=True), on_cuda=False) == "default"
    assert compile_mode(TrainSettings(compile=True, compile_mode="max-autotune"), on_cuda=True) == "max-autotune"
    assert compile_mode(TrainSettings(), on_cuda=True) is None
    with pytest.raises(ValueError, match="compile_mode 'default' needs compile"):
        TrainSettings(compile_mode="default")
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainSettings(compile=True, compile_mode="fast")


@pytest.mark.parametrize("variance", ["sample", "token"])
def test_padding_to_a_bucket_changes_no_loss_or_gradient(tiny_model_dir, variance):
    model, tokenizer = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    patch(model, DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, variance=variance))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    examples = LetterConcatenation(n_train=4).examples("train")
    rows = tokenize_examples(examples, tokenizer, max_length=256)
    longest = max(len(r["input_ids"]) for r in rows)
    results = []
    for collator in (PadCollator(tokenizer.pad_token_id), PadCollator(tokenizer.pad_token_id, (8, longest + 7, 512))):
        batch = collator(rows)
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        results.append((batch["input_ids"].shape[1], out.loss.detach(), out.causal_loss.detach(),
                        [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (narrow, loss, causal, grads), (wide, bucket_loss, bucket_causal, bucket_grads) = results
    assert narrow == longest and wide == longest + 7 and causal > 0
    torch.testing.assert_close(bucket_loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(bucket_causal, causal, rtol=1e-4, atol=0)
    for g, e in zip(bucket_grads, grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_train_save_eval_round_trip(tiny_model_dir, tmp_path):
    task = LetterConcatenation(n_train=64, n_test=6, train_variants=("second_last",))
    model, tokenizer = load_tiny(tiny_model_dir)
    config = DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2)
    patch(model, config)
    settings = TrainSettings(max_steps=6, batch_size=4, learning_rate=5e-2, logging_steps=2, save_steps=3)
    history = train(model, tokenizer, task.examples("train"), tmp_path / "run", config=config,
                    settings=settings, progress=False)
    assert [h["step"] for h in history] == [2, 4, 6]
    assert all(h["causal_loss"] >= 0 and h["ce"] > 0 for h in history)
    # one process, no accumulation: each step's loss is exactly CE + alpha * L_causal
    assert all(h["loss"] == pytest.approx(h["ce"] + config.alpha * h["causal_loss"], rel=1e-5) for h in history)
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-6" / "adapter.safetensors").is_file()
    gates = [m.dca.gate for m in model.modules() if hasattr(m, "dca")]
    assert any(g.abs().max() > 0 for g in gates), "training must move the gates off zero"

    result = evaluate(model, tokenizer, task, task.examples("test"), batch_size=4,
                      predictions_path=tmp_path / "pred.jsonl", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and result["total"] == 6 and result["correct"] == sum(r["correct"] for r in rows)

    fresh, _ = load_tiny(tiny_model_dir)
    patch(fresh, config)
    load_adapter(fresh, tmp_path / "run")
    again = evaluate(fresh, tokenizer, task, task.examples("test"), batch_size=4, progress=False,
                     predictions_path=tmp_path / "pred2.jsonl")
    assert again == result
    assert (tmp_path / "pred2.jsonl").read_text() == (tmp_path / "pred.jsonl").read_text()


class InterruptAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    task = LetterConcatenation(n_train=64, n_test=4)
    config = DCAConfig(adapter_layers=2, adapter_len=4, causal_len=1)
    settings = TrainSettings(max_steps=4, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=2)

    def run(output, **kwargs):
        model, tokenizer = load_tiny(tiny_model_dir)
        torch.manual_seed(0)  # the same initial prompts in every run
        patch(model, config)
        return train(model, tokenizer, task.examples("train"), output, config=config, settings=settings,
                     progress=False, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", callbacks=[InterruptAfter(3)])
    resumed = run(tmp_path / "run")
    straight = run(tmp_path / "straight")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4], "the resumed run keeps the finished steps"
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "/nonexistent/model", "--task", "letter_concat", "--output", "out"], "/nonexistent/model"),
    (["train", "--model", "smollm2", "--task", "nosuchtask", "--output", "out"], "unknown task 'nosuchtask'"),
    (["eval", "--model", "smollm2", "--task", "nosuchtask"], "known tasks: letter_concat"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_malformed_data_file_names_the_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "1+1?", "output": "2", "answer": "2"}\n{"instruction": \n')
    with pytest.raises(SystemExit):
        main(["train", "--model", "smollm2", "--data", str(data), "--output", str(tmp_path / "o")])
    assert "line 2" in capsys.readouterr().err


def test_cli_max_length_too_short(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tiny_model_dir), "--task", "letter_concat", "--output",
              str(tmp_path / "o"), "--max-length", "8", "--adapter-layers", "2"])
    assert "too short for the prompts" in capsys.readouterr().err
    assert not (tmp_path / "o" / "adapter.safetensors").exists()


def test_cli_train_then_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--task", "letter_concat", "--output", str(out),
                 "--adapter-layers", "2", "--adapter-len", "4", "--max-steps", "2", "--batch-size", "2",
                 "--limit", "8", "--logging-steps", "1"]) == 0
    assert (out / "adapter.safetensors").is_file()
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(out), "--task", "letter_concat",
                 "--limit", "3", "--batch-size", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["total"] == 3 and (out / "predictions.jsonl").is_file()


@pytest.mark.parametrize("quantisation", ["--load-in-4bit", "--load-in-8bit"])
def test_cli_trains_a_quantised_model(tiny_model_dir, tmp_path, quantisation):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--task", "letter_concat", "--output", str(out),
                 quantisation, "--adapter-layers", "2", "--adapter-len", "4", "--max-steps", "2",
                 "--batch-size", "2", "--limit", "4", "--logging-steps", "1"]) == 0
    history = json.loads((out / "loss_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and all(h["ce"] > 0 for h in history)


def test_demo_smoke_run(tiny_model_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "2", "--n-test", "4",
                 "--output", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "base model" in printed and "after DCA (2 steps)" in printed
    assert (tmp_path / "demo" / "losses.png").stat().st_size > 1000
    adapter = (tmp_path / "demo" / "adapter" / "adapter.safetensors").read_bytes()
    argv = ["demo", "--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "2", "--n-test", "4",
            "--output", str(tmp_path / "demo")]
    assert main(argv) == 0                  # run again: the finished run is reused, not retrained
    assert "holds this run, finished: nothing to train" in capsys.readouterr().out
    assert (tmp_path / "demo" / "adapter" / "adapter.safetensors").read_bytes() == adapter
    assert main(argv + ["--overwrite"]) == 0
    assert "nothing to train" not in capsys.readouterr().out
