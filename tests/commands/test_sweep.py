"""fastdca sweep on a tiny model: the grid, the results file, the resume, the summary and the plot."""

import json

import pytest

from fastdca.cli import main
from fastdca.commands.sweep import parse_grid, read_results, summarize


def test_grid_parsing_and_its_errors():
    assert parse_grid(["alpha=0,1,10", "variance=sample,token", "causal_len=2"]) == {
        "alpha": [0.0, 1.0, 10.0], "variance": ["sample", "token"], "causal_len": [2]}
    with pytest.raises(ValueError, match="not a DCAConfig field"):
        parse_grid(["alpah=1"])
    with pytest.raises(ValueError, match="is not a int"):
        parse_grid(["causal_len=two"])
    with pytest.raises(ValueError, match="FIELD=V1,V2"):
        parse_grid(["alpha"])


def test_sweep_runs_once_resumes_and_summarises(tiny_model_dir, tmp_path, monkeypatch):
    def argv(*seeds):
        return ["sweep", "--model", str(tiny_model_dir), "--task", "letter_concat", "--grid", "adapter_layers=2",
                "--grid", "adapter_len=4", "--grid", "alpha=0,1", "--grid", "causal_len=1,2",
                "--task-option", "train_variants=second_last", "--task-option", "n_train=40",
                "--seeds", *map(str, seeds), "--steps", "2", "--batch-size", "2", "--limit", "3",
                "--output", str(tmp_path / "sweep")]

    assert main(argv(0, 1)) == 0
    rows = read_results(tmp_path / "sweep")
    assert len(rows) == 2 * 2 * 2
    assert {(r["setting"]["alpha"], r["setting"]["causal_len"], r["seed"]) for r in rows} == {
        (a, h, s) for a in (0.0, 1.0) for h in (1, 2) for s in (0, 1)}
    assert all(r["total"] == 3 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["config"]["causal_len"] == r["setting"]["causal_len"] for r in rows)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert summary.count("\n") == 2 + 4 and "alpha=1.0, causal_len=2" in summary

    # a restart trains nothing already in results.jsonl; one more seed trains only its four runs
    import fastdca.train as train_module

    trained, original = [], train_module.train

    def counting(*args, **kwargs):
        trained.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", counting)
    assert main(argv(0, 1)) == 0
    assert trained == [] and len(read_results(tmp_path / "sweep")) == 8
    assert main(argv(0, 1, 2)) == 0
    assert len(trained) == 4 and len(read_results(tmp_path / "sweep")) == 12


def test_a_second_sweep_into_the_same_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    """While one sweep holds the folder, another would rewrite results.jsonl without the first one's rows."""
    fcntl = pytest.importorskip("fcntl")
    from fastdca.commands.sweep import LOCK_FILE

    output = tmp_path / "sweep"
    output.mkdir()
    argv = ["sweep", "--model", str(tiny_model_dir), "--task", "letter_concat", "--grid", "adapter_layers=2",
            "--grid", "adapter_len=4", "--task-option", "n_train=8", "--steps", "1", "--batch-size", "2",
            "--limit", "2", "--output", str(output)]
    with open(output / LOCK_FILE, "w") as held:     # what a running sweep holds
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2
        assert "another fastdca sweep (pid 4242) is writing to" in capsys.readouterr().err
        assert read_results(output) == []
    assert main(argv) == 0 and len(read_results(output)) == 1


def test_summary_mean_and_std():
    rows = [dict(setting={"alpha": 1.0}, accuracy=a, grad_share=g) for a, g in ((0.1, 1e-3), (0.3, 3e-3))]
    rows.append(dict(setting={"alpha": 0.0}, accuracy=0.2, grad_share=0.0))
    by_alpha = {s["setting"]["alpha"]: s for s in summarize(rows)}
    assert by_alpha[1.0]["mean"] == pytest.approx(0.2) and by_alpha[1.0]["std"] == pytest.approx(0.1414213, rel=1e-6)
    assert by_alpha[1.0]["grad_share"] == pytest.approx(2e-3) and by_alpha[0.0]["n"] == 1
    assert json.dumps(by_alpha[0.0]["setting"]) == '{"alpha": 0.0}'


def test_the_grad_share_is_the_last_measured_one(tiny_model_dir, tmp_path):
    """The share is measured at logging steps (every steps // 10); a last step off that grid logs none, and the
    results keep the last measurement instead of nothing."""
    output = tmp_path / "sweep"
    argv = ["sweep", "--model", str(tiny_model_dir), "--task", "letter_concat", "--grid", "adapter_layers=2",
            "--grid", "adapter_len=4", "--grid", "alpha=1", "--task-option", "n_train=16", "--steps", "21",
            "--batch-size", "2", "--limit", "2", "--output", str(output)]
    assert main(argv) == 0
    (row,) = read_results(output)
    (run,) = (output / "runs").iterdir()
    history = json.loads((run / "loss_history.json").read_text())
    assert history[-1]["step"] == 21 and history[-1]["grad_share"] is None
    measured = [entry["grad_share"] for entry in history if entry["grad_share"] is not None]
    assert measured and row["grad_share"] == measured[-1] > 0
