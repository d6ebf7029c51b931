"""When things go wrong (docs/troubleshooting.md): divergence, interruption, damaged or mismatched files, failing writes
and dependencies' start-up noise. Each test names the row of that page's table it shows."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from fastdca import AdapterError, DCAConfig, TrainingDiverged, TrainingInterrupted
from fastdca.cli import main
from fastdca.patch import is_patched, load_adapter, patch, save_adapter
from fastdca.train.run_record import write_record
from fastdca.tasks import LetterConcatenation
from fastdca.train import TrainSettings, train

CONFIG = DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2)


def load_tiny(path):
    return LlamaForCausalLM.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture
def saved_adapter(tiny_model_dir, tmp_path):
    model, _ = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    patch(model, CONFIG)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def run_training(tiny_model_dir, output, settings, callbacks=(), **options):
    task = LetterConcatenation(n_train=64, n_test=4)
    model, tokenizer = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    patch(model, CONFIG)
    return train(model, tokenizer, task.examples("train"), output, config=CONFIG, settings=settings,
                 progress=False, callbacks=callbacks, **options)


# --------------------------------------------------------------------------------------------------
# damaged or mismatched files


def _assert_refused_untouched(tiny_model_dir, directory, match):
    model, _ = load_tiny(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=match):
        load_adapter(model, directory)
    assert not is_patched(model), "a refused adapter must leave the model unpatched"
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_truncated_adapter_file(tiny_model_dir, saved_adapter):
    path = saved_adapter / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_refused_untouched(tiny_model_dir, saved_adapter, r"adapter\.safetensors cannot be read.*truncated")


def test_corrupted_adapter_header(tiny_model_dir, saved_adapter):
    path = saved_adapter / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32                      # the JSON header after the 8-byte length
    path.write_bytes(bytes(data))
    _assert_refused_untouched(tiny_model_dir, saved_adapter, r"adapter\.safetensors cannot be read")


def test_malformed_config_json(tiny_model_dir, saved_adapter):
    path = saved_adapter / "dca_config.json"
    path.write_text(path.read_text()[:-20])
    _assert_refused_untouched(tiny_model_dir, saved_adapter, r"dca_config\.json is not valid JSON")


def test_incomplete_config_json(tiny_model_dir, saved_adapter):
    path = saved_adapter / "dca_config.json"
    meta = json.loads(path.read_text())
    del meta["dca_config"]
    path.write_text(json.dumps(meta))
    _assert_refused_untouched(tiny_model_dir, saved_adapter, r"dca_config\.json is incomplete: 'dca_config'")


def test_invalid_config_values(tiny_model_dir, saved_adapter):
    path = saved_adapter / "dca_config.json"
    meta = json.loads(path.read_text())
    meta["dca_config"]["causal_len"] = 99
    path.write_text(json.dumps(meta))
    _assert_refused_untouched(tiny_model_dir, saved_adapter, r"dca_config\.json: its dca_config is not a valid")


def test_adapter_from_another_model(tmp_path, saved_adapter):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterError, match="trained on a different model.*hidden_size"):
        load_adapter(other, saved_adapter)
    assert not is_patched(other)


def test_adapter_with_other_parameters_unpatches_again(tiny_model_dir, saved_adapter):
    """A mismatch found only after patching (the tensor names) leaves the model unpatched, as it was."""
    tensors = load_file(saved_adapter / "adapter.safetensors")
    from safetensors.torch import save_file

    save_file({k.replace("layers.2", "layers.9"): v for k, v in tensors.items()}, saved_adapter / "adapter.safetensors")
    _assert_refused_untouched(tiny_model_dir, saved_adapter, r"does not match the model's adapter parameters")


def test_non_finite_adapter_is_never_written_nor_loaded(tiny_model_dir, saved_adapter, tmp_path):
    model, _ = load_tiny(tiny_model_dir)
    patch(model, CONFIG)
    next(m for m in model.modules() if hasattr(m, "dca")).dca.prompt.data[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="refusing to write a non-finite adapter"):
        save_adapter(model, saved_adapter)
    assert math.isfinite(sum(t.sum().item() for t in load_file(saved_adapter / "adapter.safetensors").values()))
    from safetensors.torch import save_file

    tensors = load_file(saved_adapter / "adapter.safetensors")
    tensors[next(iter(tensors))][0] = float("inf")
    save_file(tensors, saved_adapter / "adapter.safetensors")
    _assert_refused_untouched(tiny_model_dir, saved_adapter, r"holds non-finite values")


def test_cli_reports_a_damaged_adapter_without_a_traceback(tiny_model_dir, saved_adapter, capsys):
    path = saved_adapter / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_model_dir), "--adapter", str(saved_adapter), "--task", "letter_concat",
              "--limit", "2", "--output", str(saved_adapter / "p.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "adapter.safetensors cannot be read" in err and "Traceback" not in err


def test_checkpoint_without_optimizer_state_is_refused(tiny_model_dir, tmp_path):
    settings = TrainSettings(max_steps=4, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=2)
    run_training(tiny_model_dir, tmp_path / "run", settings)
    os.remove(tmp_path / "run" / "checkpoint-4" / "optimizer.pt")
    more = TrainSettings(max_steps=6, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=2)
    with pytest.raises(ValueError, match=r"holds a finished run with other settings \(settings.max_steps: 4 -> 6\)"):
        run_training(tiny_model_dir, tmp_path / "run", more)
    with pytest.raises(AdapterError, match=r"checkpoint-4/optimizer\.pt is missing"):
        run_training(tiny_model_dir, tmp_path / "run", more, resume_anyway=True)


# --------------------------------------------------------------------------------------------------
# writes that fail


def test_failed_write_leaves_the_previous_adapter_whole(tiny_model_dir, saved_adapter, monkeypatch):
    """The disk fills up while the second file of the pair is written: neither file changes."""
    before = {name: (saved_adapter / name).read_bytes() for name in ("adapter.safetensors", "dca_config.json")}
    model, _ = load_tiny(tiny_model_dir)
    torch.manual_seed(1)
    patch(model, CONFIG)
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(str(path)).startswith(".dca_config.json."):
            handle.write("{\"half\": ")
            handle.close()
            raise OSError(28, "No space left on device")
        return handle

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, saved_adapter)
    monkeypatch.undo()
    assert {name: (saved_adapter / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(saved_adapter)) == ["adapter.safetensors", "dca_config.json"], "no temporary files left"


# --------------------------------------------------------------------------------------------------
# a checkpoint is whole or absent


def checkpoint_argv(model, out):
    return ["train", "--model", str(model), "--task", "letter_concat", "--output", str(out), "--adapter-layers", "2",
            "--adapter-len", "4", "--limit", "16", "--batch-size", "4", "--max-steps", "4", "--save-steps", "1",
            "--logging-steps", "1", "--seed", "2"]


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def straight_adapter(tiny_model_dir, tmp_path_factory):
    """The adapter of checkpoint_argv's run, uninterrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(checkpoint_argv(tiny_model_dir, out)) == 0
    return load_file(out / "adapter.safetensors")


def _assert_equal_adapters(folder, expected):
    adapter = load_file(folder / "adapter.safetensors")
    for name in expected:
        torch.testing.assert_close(adapter[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_full_disk_in_the_middle_of_a_checkpoint_leaves_it_absent_and_the_same_command_resumes(
        tiny_model_dir, tmp_path, monkeypatch, capsys, straight_adapter):
    """The disk fills up after checkpoint-3's adapter, optimizer and scheduler are written: one line naming the file
    and the whole checkpoint before it, no checkpoint-3 and no partial folder; the same command, once there is room,
    resumes from checkpoint-2 and ends where the uninterrupted run does."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-3" in str(f) and str(f).endswith("rng_state.pth"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    assert exit_code(checkpoint_argv(tiny_model_dir, out)) == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert last == ("fastdca train: error: writing checkpoint 3 failed (No space left on device); nothing of it was "
                    "kept and checkpoint-2 is whole: free some space and run the same command again to resume from "
                    f"it: {out / 'checkpoint-3' / 'rng_state.pth'}")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".c", "c"))) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.undo()
    assert main(checkpoint_argv(tiny_model_dir, out)) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    _assert_equal_adapters(out, straight_adapter)


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from fastdca.cli import main

    real_save = torch.save


    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if "checkpoint-3" in str(f) and str(f).endswith("scheduler.pt"):
            os.kill(os.getpid(), signal.SIGKILL)     # mid checkpoint-3: its RNG and trainer states unwritten


    torch.save = save
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_in_the_middle_of_a_checkpoint_leaves_it_absent_and_the_same_command_resumes(
        tiny_model_dir, tmp_path, capsys, straight_adapter):
    """A run killed (SIGKILL, nothing of fastdca's runs) while checkpoint-3 is written leaves no checkpoint-3, only the
    partial folder; the same command removes it, saying so, and resumes from checkpoint-2."""
    script = tmp_path / "driver.py"
    script.write_text(KILL_DRIVER)
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(script), *checkpoint_argv(tiny_model_dir, out)], capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / ".checkpoint-partial" / "checkpoint-3" / "scheduler.pt").is_file()   # killed mid-write, indeed
    assert main(checkpoint_argv(tiny_model_dir, out)) == 0
    assert (f"removed {out / '.checkpoint-partial'}: the incomplete checkpoint-3 of a run stopped while writing it "
            "(the checkpoints before it are whole)") in capsys.readouterr().out
    assert not (out / ".checkpoint-partial").exists()
    _assert_equal_adapters(out, straight_adapter)


# --------------------------------------------------------------------------------------------------
# divergence


class PoisonAt(TrainerCallback):
    """Makes a step diverge: a NaN in the first adapter prompt after step `step` (a loss that goes
    non-finite), or NaN gradients at the given steps (before the optimizer step)."""

    def __init__(self, param_after=None, grads_at=()):
        self.param_after, self.grads_at = param_after, set(grads_at)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.param_after:
            next(m for m in model.modules() if hasattr(m, "dca")).dca.prompt.data[0, 0] = float("nan")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.grads_at:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


def test_divergence_stops_and_keeps_the_last_finite_checkpoint(tiny_model_dir, tmp_path):
    settings = TrainSettings(max_steps=8, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=2)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: non-finite loss \(ce=nan") as info:
        run_training(tiny_model_dir, tmp_path / "run", settings, callbacks=[PoisonAt(param_after=5)])
    assert "checkpoint-4's" in str(info.value)
    assert not (tmp_path / "run" / "checkpoint-6").exists()
    output = load_file(tmp_path / "run" / "adapter.safetensors")
    last = load_file(tmp_path / "run" / "checkpoint-4" / "adapter.safetensors")
    assert all(torch.equal(output[k], last[k]) and torch.isfinite(last[k]).all() for k in last)
    history = json.loads((tmp_path / "run" / "loss_history.json").read_text())   # strict JSON
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert all(h["loss"] is not None and h["loss"] > 0 for h in history)


def test_divergence_before_any_checkpoint_leaves_the_output_as_it_was(tiny_model_dir, tmp_path, saved_adapter):
    before = (saved_adapter / "adapter.safetensors").read_bytes()
    # the folder of a run stopped before its first checkpoint, still holding an earlier adapter
    write_record(saved_adapter, {}, finished=False)
    settings = TrainSettings(max_steps=8, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=50)
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient.*nothing was written to"):
        run_training(tiny_model_dir, saved_adapter, settings, callbacks=[PoisonAt(grads_at=[2])])
    assert (saved_adapter / "adapter.safetensors").read_bytes() == before


def test_skip_mode_skips_steps_and_stops_after_ten_in_a_row(tiny_model_dir, tmp_path):
    settings = TrainSettings(max_steps=6, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=50,
                             nonfinite="skip")
    run_training(tiny_model_dir, tmp_path / "skip", settings, callbacks=[PoisonAt(grads_at=[2, 3])])
    adapter = load_file(tmp_path / "skip" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    settings = TrainSettings(max_steps=20, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=50,
                             nonfinite="skip")
    with pytest.raises(TrainingDiverged, match=r"step 12: .* the 10th skipped step in a row"):
        run_training(tiny_model_dir, tmp_path / "skip10", settings, callbacks=[PoisonAt(grads_at=range(3, 21))])


# --------------------------------------------------------------------------------------------------
# interruption


DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from fastdca import DCAConfig, TrainingInterrupted
    from fastdca.patch import patch
    from fastdca.tasks import LetterConcatenation
    from fastdca.train import TrainSettings, train

    model_dir, output, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class SignalAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)     # arrives in the middle of step kill_at

    model = LlamaForCausalLM.from_pretrained(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2)
    patch(model, config)
    settings = TrainSettings(max_steps=8, batch_size=4, learning_rate=1e-2, logging_steps=1, save_steps=100)
    try:
        train(model, tokenizer, LetterConcatenation(n_train=64, n_test=4).examples("train"), output, config=config,
              settings=settings, progress=False, callbacks=[SignalAt()] if kill_at else [])
    except TrainingInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        sys.exit(interrupted.exit_code)
""")


def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    import random

    kill_at = random.SystemRandom().randrange(2, 8)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)

    def run(output, kill):
        return subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(output), str(kill)],
                              capture_output=True, text=True, timeout=600)

    interrupted = run(tmp_path / "run", kill_at)
    assert interrupted.returncode == 128 + signal.SIGTERM, (kill_at, interrupted.stderr[-2000:])
    assert f"after step {kill_at}" in interrupted.stderr and "Run the same command again" in interrupted.stderr
    assert (tmp_path / "run" / f"checkpoint-{kill_at}" / "optimizer.pt").is_file()
    assert not (tmp_path / "run" / "adapter.safetensors").exists(), "an interrupted run writes no final adapter"
    resumed = run(tmp_path / "run", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run(tmp_path / "straight", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = load_file(tmp_path / "run" / "adapter.safetensors")
    b = load_file(tmp_path / "straight" / "adapter.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{name} (killed at step {kill_at})")


def test_cli_exit_status_of_an_interrupted_run(monkeypatch, capsys):
    import fastdca.cli as cli

    def interrupted(args):
        raise TrainingInterrupted(signal.SIGINT, 3, "runs/x/checkpoint-3")

    monkeypatch.setattr(cli, "run_train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model", "smollm2", "--task", "letter_concat", "--output", "runs/x"])
    assert exit_info.value.code == 130
    assert "Run the same command again" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# quiet start


def test_no_dependency_noise_at_import():
    res = subprocess.run([sys.executable, "-c", "import fastdca, bitsandbytes, transformers"],
                         capture_output=True, text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Failed to load CPU gemm_4bit_forward" not in res.stderr


def test_missing_cpu_4bit_kernel_is_explained_once(monkeypatch):
    import logging

    from fastdca import dependency_notices

    monkeypatch.setattr(dependency_notices, "_state", {"seen": False, "explained": False})
    dependency_notices.install()
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s", "No module named 'kernels'")
    with pytest.warns(UserWarning, match="4-bit layers on the CPU run on its slower PyTorch fallback"):
        dependency_notices.explain_cpu_4bit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dependency_notices.explain_cpu_4bit()
