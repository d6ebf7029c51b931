"""One run per output folder (fastdca.run_record, fastdca.locks): finished runs are neither retrained nor
trained over, resumes cannot mix settings, --seed reproduces, and folder errors are one line."""

import json
import os
import stat

import pytest
from safetensors.torch import load_file

from fastdca.cli import main
from fastdca.locks import only_writer


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
