"""One run per output folder (fastdca.train.run_record, fastdca.train.locks): finished runs are neither retrained nor
trained over, resumes cannot mix settings, --seed reproduces, and folder errors are one line."""

import json
import os
import stat

import pytest
from safetensors.torch import load_file

from fastdca.cli import main
from fastdca.train.locks import only_writer


def train_argv(model, out, *extra):
    return ["train", "--model", str(model), "--task", "letter_concat", "--output", str(out), "--adapter-layers", "2",
            "--adapter-len", "4", "--max-steps", "2", "--batch-size", "2", "--limit", "8", "--logging-steps", "1",
            "--save-steps", "1", *extra]


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def test_a_finished_run_rerun_is_a_no_op_and_other_settings_need_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, out)) == 0
    adapter = (out / "adapter.safetensors").read_bytes()
    history = (out / "loss_history.json").read_text()
    assert json.loads((out / "run.json").read_text())["finished"] is True
    capsys.readouterr()

    assert main(train_argv(tiny_model_dir, out)) == 0
    assert "holds this run, finished: nothing to train" in capsys.readouterr().out
    assert (out / "adapter.safetensors").read_bytes() == adapter and (out / "loss_history.json").read_text() == history
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    assert exit_code(train_argv(tiny_model_dir, out, "--lr", "0.05")) == 2
    err = capsys.readouterr().err
    assert "holds a finished run with other settings (settings.learning_rate: 0.001 -> 0.05)" in err
    assert "Traceback" not in err and (out / "adapter.safetensors").read_bytes() == adapter

    assert main(train_argv(tiny_model_dir, out, "--lr", "0.05", "--overwrite")) == 0
    assert (out / "adapter.safetensors").read_bytes() != adapter
    assert json.loads((out / "run.json").read_text())["settings"]["learning_rate"] == 0.05


def test_a_resume_with_other_settings_is_refused_naming_them(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, out)) == 0
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(dict(record, finished=False)))   # as a run killed before its end
    capsys.readouterr()
    assert exit_code(train_argv(tiny_model_dir, out, "--lr", "0.05", "--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run with other settings" in err
    assert "settings.batch_size: 2 -> 4" in err and "settings.learning_rate: 0.001 -> 0.05" in err
    assert main(train_argv(tiny_model_dir, out, "--lr", "0.05", "--resume-anyway", "--max-steps", "3")) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["finished"] is True and "settings.learning_rate: 0.001 -> 0.05" in record["resumed_anyway"]
    assert json.loads((out / "loss_history.json").read_text())[-1]["step"] == 3


def test_an_adapter_without_a_run_record_is_not_trained_over(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(b"someone's adapter")
    assert exit_code(train_argv(tiny_model_dir, out)) == 2
    assert "holds an adapter or checkpoints but no run.json" in capsys.readouterr().err
    assert (out / "adapter.safetensors").read_bytes() == b"someone's adapter"


def test_the_same_command_gives_the_same_adapter(tiny_model_dir, tmp_path):
    adapters = []
    for name in ("a", "b"):
        assert main(train_argv(tiny_model_dir, tmp_path / name, "--seed", "3")) == 0
        adapters.append(load_file(str(tmp_path / name / "adapter.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert all((adapters[0][k] == adapters[1][k]).all() for k in adapters[0])


def test_a_second_run_into_a_busy_folder_stops_at_once(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with only_writer(out, ".train.lock", "fastdca train"):
        assert exit_code(train_argv(tiny_model_dir, out)) == 2
    assert f"another fastdca train (pid {os.getpid()}) is writing to {out}" in capsys.readouterr().err
    assert not (out / "adapter.safetensors").exists()


def test_output_folder_errors_are_one_line_before_training(tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "run", "a parent of it is a file")):
        assert exit_code(train_argv(tiny_model_dir, out)) == 2
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    if os.geteuid() != 0:      # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert exit_code(train_argv(tiny_model_dir, locked)) == 2
        assert "is not writable" in capsys.readouterr().err


def test_files_get_the_umask_mode(tiny_model_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(train_argv(tiny_model_dir, tmp_path / "run")) == 0
    finally:
        os.umask(previous)
    for name in ("adapter.safetensors", "dca_config.json", "loss_history.json", "run.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("argv", [
    ["train", "--model", "smollm2", "--task", "letter_concat", "--output", "out", "--limit=-3"],
    ["eval", "--model", "smollm2", "--task", "letter_concat", "--limit=-98"],
    ["eval", "--model", "smollm2", "--task", "letter_concat", "--max-new-tokens", "0"],
])
def test_counts_below_one_are_refused(argv, capsys):
    assert exit_code(argv) == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_damaged_checkpoint_files_are_named_before_resuming(tiny_model_dir, tmp_path):
    from fastdca import AdapterError
    from fastdca.train import check_checkpoint

    out = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, out)) == 0
    checkpoint = out / "checkpoint-2"
    check_checkpoint(checkpoint)
    damages = {"trainer_state.json": (b"", "trainer_state.json is unreadable"),
               "optimizer.pt": (None, "optimizer.pt is damaged"),
               "scheduler.pt": (b"\x80\x04garbage", "scheduler.pt is damaged")}
    for name, (content, message) in damages.items():
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(original[: len(original) // 2] if content is None else content)
        with pytest.raises(AdapterError, match=message):
            check_checkpoint(checkpoint)
        (checkpoint / name).write_bytes(original)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps(dict(state, global_step="two")))
    with pytest.raises(AdapterError, match="trainer_state.json has no valid global_step"):
        check_checkpoint(checkpoint)


def test_a_failed_adapter_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from fastdca import adapter_file

    def full_disk(*args, **kwargs):
        raise RuntimeError("No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device") as raised:
        adapter_file.write(tmp_path, {"w": torch.zeros(2)}, {})
    assert raised.value.filename == str(tmp_path / "adapter.safetensors")
    assert list(tmp_path.iterdir()) == []       # no temporary file left behind


def test_leftover_temporary_files_of_a_killed_write_are_removed(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".adapter.safetensors.k1ll3d.tmp").write_bytes(b"")
    assert main(train_argv(tiny_model_dir, out)) == 0
    assert not list(out.glob(".*.tmp"))


def test_the_history_ends_at_the_last_step_whatever_logging_steps_is(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, out, "--logging-steps", "10")) == 0
    assert [h["step"] for h in json.loads((out / "loss_history.json").read_text())] == [2]


def test_cli_misc_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import warnings

    import fastdca.cli as cli
    from fastdca.tasks import get_task

    with pytest.raises(ValueError, match=r"task 'letter_concat' does not take the options \['n_trian'\]"):
        get_task("letter_concat", n_trian=3)
    assert exit_code(["eval", "--model", "smollm2", "--task", "letter_concat", "--output", str(tmp_path)]) == 2
    assert "is a folder; give the path of the predictions file" in capsys.readouterr().err

    def second_ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_check", second_ctrl_c)
    assert exit_code(["check"]) == 130
    err = capsys.readouterr().err
    assert "interrupted again" in err and "Traceback" not in err

    seen = []

    def warns(args):
        seen.append(warnings.formatwarning("the causal term barely pulled", UserWarning, "/x/train.py", 328,
                                           "warn_if_causal_term_inert(history)"))
        return 0

    monkeypatch.setattr(cli, "run_check", warns)
    assert exit_code(["check"]) == 0
    assert seen == ["fastdca: warning: the causal term barely pulled\n"]     # one plain line, no path or code


CLI_DRIVER = """
import os, signal, sys
from transformers import TrainerCallback
import fastdca.train
from fastdca.cli import main

kill_at, argv = int(sys.argv[1]), sys.argv[2:]


class SignalAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)


original = fastdca.train.train


def train(*args, callbacks=(), **kwargs):
    return original(*args, callbacks=[*callbacks, *([SignalAt()] if kill_at else [])], **kwargs)


fastdca.train.train = train
sys.exit(main(argv))
"""


def test_a_cli_run_interrupted_and_resumed_equals_the_same_command_uninterrupted(tiny_model_dir, tmp_path):
    """The command alone decides the result: --seed seeds the adapter's prompts, the resume restores the rest."""
    import random
    import signal
    import subprocess
    import sys

    import torch

    kill_at = random.SystemRandom().randrange(2, 6)
    script = tmp_path / "driver.py"
    script.write_text(CLI_DRIVER)

    def run(output, kill):
        argv = train_argv(tiny_model_dir, output, "--max-steps", "6", "--save-steps", "100", "--seed", "5")
        return subprocess.run([sys.executable, str(script), str(kill), *argv], capture_output=True, text=True,
                              timeout=600)

    interrupted = run(tmp_path / "run", kill_at)
    assert interrupted.returncode == 128 + signal.SIGTERM, (kill_at, interrupted.stderr[-2000:])
    assert f"checkpoint-{kill_at}" in interrupted.stderr.strip().splitlines()[-1]
    assert run(tmp_path / "run", 0).returncode == 0
    assert run(tmp_path / "straight", 0).returncode == 0
    a = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{name} (killed at step {kill_at})")


def test_a_disk_too_full_for_the_run_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert exit_code(train_argv(tiny_model_dir, tmp_path / "run")) == 2
    assert "has 0 MB free and this run writes up to about" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_a_full_disk_during_a_checkpoint_names_the_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10432 vs 10320")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    assert exit_code(train_argv(tiny_model_dir, out)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "writing checkpoint 1 failed (is the disk full?" in last and str(out) in last


def test_eval_of_a_base_model_writes_no_file_unless_asked(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "letter_concat", "--limit", "2", "--batch-size", "2"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"] is None
    assert list(tmp_path.iterdir()) == []
    assert main(argv + ["--output", "base.jsonl"]) == 0
    assert (tmp_path / "base.jsonl").is_file()


def test_a_sharded_run_differs_from_an_unsharded_one_in_its_record():
    """--fsdp checkpoints lay the optimizer state out by parameter name: resuming one without --fsdp (or the
    other way round) is a difference the run record names; records written before --fsdp existed still match."""
    from fastdca.config import DCAConfig
    from fastdca.train.run_record import differences, run_record
    from fastdca.tasks import LetterConcatenation
    from fastdca.train import TrainSettings

    examples = LetterConcatenation(n_train=4, n_test=1).examples("train")
    plain = run_record(examples, TrainSettings(), DCAConfig(), "m")
    sharded = run_record(examples, TrainSettings(fsdp=True), DCAConfig(), "m")
    assert differences(plain, sharded) == ["sharding: None -> 'fsdp'"]
    assert "sharding" not in plain and differences(plain, run_record(examples, TrainSettings(), DCAConfig(), "m")) == []
