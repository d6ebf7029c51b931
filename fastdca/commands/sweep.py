"""`fastdca sweep`: a grid over DCAConfig fields and seeds on a task and model, each run trained and
evaluated once. Every finished run is a line of `results.jsonl` in the output directory, written
atomically; a restarted sweep skips the runs that line already records and resumes an unfinished run
from its last checkpoint, so an interrupted sweep loses at most the steps since that checkpoint.
`summary.md` holds accuracy mean ± std per setting, `sweep.png` accuracy against each swept numeric
field (the paper's Fig. 5), with alpha = 0 (LLaMA-Adapter) as the baseline line where it was swept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import statistics
import time
from pathlib import Path

from fastdca.config import DCAConfig
from fastdca.io import atomic_write, atomic_write_text
from fastdca.train.locks import only_writer

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".sweep.lock"


def parse_grid(items) -> dict:
    """["alpha=0,1,10", "variance=sample,token"] -> {"alpha": [0.0, 1.0, 10.0], "variance": ["sample", "token"]},
    each value converted to the type of the DCAConfig field's default."""
    defaults = DCAConfig()
    fields = {f.name for f in dataclasses.fields(DCAConfig)}
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid takes FIELD=V1,V2,... ; got {item!r}")
        if name not in fields:
            raise ValueError(f"--grid field {name!r} is not a DCAConfig field; the fields are {sorted(fields)}")
        if name in grid:
            raise ValueError(f"--grid field {name!r} is given twice")
        kind = type(getattr(defaults, name))
        grid[name] = [_convert(v, kind, name) for v in values.split(",")]
    return grid


def _convert(text: str, kind, name):
    if text.lower() == "none":
        return None
    try:
        return kind(text) if kind in (int, float) else text
    except ValueError:
        raise ValueError(f"--grid {name}: {text!r} is not a {kind.__name__}") from None


def settings_of(grid: dict) -> list[dict]:
    """Every combination of the grid's values, in the order given."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def run_key(setting: dict, seed: int) -> str:
    return json.dumps({"setting": setting, "seed": seed}, sort_keys=True)


def read_results(output_dir) -> list[dict]:
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sweep(model, task, grid: dict, seeds, output_dir, *, base: dict | None = None, steps: int = 150,
              batch_size: int = 8, learning_rate: float = 1e-2, max_length: int = 256, test_limit=None,
              progress: bool = True, log=print, auto_batch_size: bool = False) -> list[dict]:
    """Train and evaluate every (setting, seed) not yet in results.jsonl; returns all result rows.

    `model` is a model directory or "smollm2"; `task` a fastdca Task. The base DCAConfig is the
    paper's with the task's L' (`base` overrides fields), then each setting's fields. The optimisation
    is the demo's: AdamW, cosine schedule with 5% warmup, `steps` steps of `batch_size`. One sweep at a
    time per `output_dir`: a second one raises RuntimeError while the first runs. Out of memory raises
    fastdca.out_of_memory.OutOfMemory advising `fastdca sweep`'s options; auto_batch_size halves each run's micro-batch
    (the same examples a step) and the evaluation's batches until they fit.
    """
    from fastdca.out_of_memory import OutOfMemory

    try:
        return _run_sweep(model, task, grid, seeds, output_dir, base=base, steps=steps, batch_size=batch_size,
                          learning_rate=learning_rate, max_length=max_length, test_limit=test_limit,
                          progress=progress, log=log, auto_batch_size=auto_batch_size)
    except OutOfMemory as error:
        raise error.for_command("sweep") from error.__cause__


def _run_sweep(model, task, grid, seeds, output_dir, *, base, steps, batch_size, learning_rate, max_length,
               test_limit, progress, log, auto_batch_size):
    import torch

    from fastdca.commands.eval import evaluate, write_jsonl
    from fastdca.commands.models import load_model, load_smollm2
    from fastdca.hf import patch
    from fastdca.train import TrainSettings, train

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with only_writer(output_dir, LOCK_FILE, "fastdca sweep"):
        rows = read_results(output_dir)
        done = {row["key"] for row in rows}
        test = task.examples("test")[:test_limit]
        plan = [(setting, seed) for setting in settings_of(grid) for seed in seeds]
        log(f"sweep: {len(plan)} runs, {sum(run_key(s, seed) in done for s, seed in plan)} already done")
        for index, (setting, seed) in enumerate(plan):
            key = run_key(setting, seed)
            if key in done:
                continue
            started = time.perf_counter()
            net, tokenizer = load_smollm2() if model == "smollm2" else load_model(model)
            layers = net.config.num_hidden_layers
            fields = {"adapter_layers": min(20, layers), **(base or {}), **setting}
            if "causal_layers" not in fields:   # the task's L', within the adapted layers
                fields["causal_layers"] = min(task.causal_layers or fields["adapter_layers"], fields["adapter_layers"])
            config = DCAConfig(**fields)
            torch.manual_seed(seed)          # the adapter's initial prompts
            patch(net, config)
            settings = TrainSettings(max_steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                     warmup=0.05, lr_scheduler="cosine", max_length=max_length,
                                     save_steps=max(steps // 4, 1), logging_steps=max(steps // 10, 1),
                                     auto_batch_size=auto_batch_size)
            folder = run_dir(output_dir, key)
            history = train(net, tokenizer, task.examples("train"), folder, config=config, settings=settings,
                            progress=progress)
            result = evaluate(net, tokenizer, task, test, batch_size=25, progress=progress,
                              predictions_path=folder / "predictions.jsonl", auto_batch_size=auto_batch_size)
            last = history[-1] if history else {}
            # the gradient share is measured every few logging steps: the last measurement, not the last step's
            shares = [entry["grad_share"] for entry in history if entry.get("grad_share") is not None]
            row = dict(key=key, setting=setting, seed=seed, accuracy=result["accuracy"], correct=result["correct"],
                       total=result["total"], ce=last.get("ce"), causal_loss=last.get("causal_loss"),
                       grad_share=shares[-1] if shares else None, seconds=round(time.perf_counter() - started, 1),
                       config=config.to_dict())
            rows.append(row)
            done.add(key)
            write_jsonl(output_dir / RESULTS_FILE, rows)
            log(f"run {index + 1}/{len(plan)} {setting} seed {seed}: accuracy {result['accuracy']:.1%}")
        atomic_write_text(output_dir / "summary.md", summary_table(rows))
        plot_sweep(rows, output_dir / "sweep.png")
        return rows


def run_dir(output_dir, key: str) -> Path:
    """The folder of the run `key` (run_key) in a sweep's `output_dir`: its adapter, checkpoints, loss
    history and predictions."""
    return Path(output_dir) / "runs" / f"run-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def summarize(rows) -> list[dict]:
    """Per setting: accuracy mean and sample std over its seeds, the number of seeds, the mean grad share."""
    groups = {}
    for row in rows:
        groups.setdefault(json.dumps(row["setting"], sort_keys=True), []).append(row)
    out = []
    for setting, runs in groups.items():
        accuracies = [r["accuracy"] for r in runs]
        shares = [r["grad_share"] for r in runs if r.get("grad_share") is not None]
        out.append(dict(setting=json.loads(setting), n=len(runs), mean=statistics.fmean(accuracies),
                        std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                        grad_share=statistics.fmean(shares) if shares else None))
    return out


def summary_table(rows) -> str:
    lines = ["| setting | seeds | accuracy (mean ± std) | causal grad share |", "|---|---|---|---|"]
    for s in summarize(rows):
        setting = ", ".join(f"{k}={v}" for k, v in s["setting"].items()) or "(base)"
        share = "-" if s["grad_share"] is None else f"{s['grad_share']:.2e}"
        lines.append(f"| {setting} | {s['n']} | {100 * s['mean']:.1f}% ± {100 * s['std']:.1f} | {share} |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows, path) -> Path | None:
    """Accuracy (mean ± std over seeds) against each swept numeric field, one line per setting of the
    other fields; alpha = 0 rows drawn as the LLaMA-Adapter baseline. None when nothing numeric varies."""
    summary = summarize(rows)
    names = sorted({k for s in summary for k in s["setting"]})
    numeric = [n for n in names if len({s["setting"][n] for s in summary}) > 1
               and all(isinstance(s["setting"][n], (int, float)) for s in summary)]
    if not numeric:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(numeric), figsize=(5 * len(numeric), 3.5), squeeze=False)
    baseline = [s for s in summary if s["setting"].get("alpha") == 0]
    for ax, field in zip(axes[0], numeric):
        lines = {}
        for s in summary:
            if field != "alpha" and s["setting"].get("alpha") == 0:
                continue
            others = tuple((k, v) for k, v in sorted(s["setting"].items()) if k != field)
            lines.setdefault(others, []).append(s)
        for others, points in lines.items():
            points = sorted((p for p in points if not (field == "alpha" and p["setting"]["alpha"] == 0)),
                            key=lambda p: p["setting"][field])
            if points:
                ax.errorbar([p["setting"][field] for p in points], [100 * p["mean"] for p in points],
                            yerr=[100 * p["std"] for p in points], marker="o", capsize=3,
                            label=", ".join(f"{k}={v}" for k, v in others) or None)
        if baseline:
            mean = statistics.fmean(b["mean"] for b in baseline)
            ax.axhline(100 * mean, color="gray", linestyle="--", label="alpha=0 (LLaMA-Adapter)")
        if field == "alpha":
            ax.set_xscale("log")
        ax.set(xlabel=field, ylabel="accuracy (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return Path(path)
