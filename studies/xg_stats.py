"""Held-out X_G statistics of every finished run of a `fastdca sweep` directory (RESULTS.md).

For each run, `fastdca.commands.eval.xg_variance` over the task's test prompts (the quantity the causal loss
trains down, measured on data no run saw): Var(X_G) and mean x^2, each averaged over the top L' layers
the causal loss covers, and their ratio. One line per run in `<sweep>/xg_stats.jsonl` (written atomically;
runs already there are skipped, so the script resumes), and a table per setting on stdout.

    python studies/xg_stats.py studies/letters --task letter_concat
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fastdca.commands.eval import xg_variance
from fastdca.commands.models import load_smollm2
from fastdca.commands.sweep import read_results, run_dir
from fastdca.tasks.options import parse_task_options
from fastdca.hf import load_adapter
from fastdca.io import atomic_write_text
from fastdca.tasks import get_task

STATS_FILE = "xg_stats.jsonl"


def causal_layer_means(stats: dict) -> dict:
    """Var(X_G) and mean x^2, each averaged over the causal layers (as L_causal averages its layers), and
    their ratio: X_G's spread across prompts relative to its own size."""
    rows = [r for r in stats["layers"] if r["causal_layer"]]
    variance = statistics.fmean(r["variance"] for r in rows)
    mean_square = statistics.fmean(r["mean_square"] for r in rows)
    return {"variance": variance, "mean_square": mean_square, "relative_variance": variance / mean_square}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a fastdca sweep --output directory")
    parser.add_argument("--task", required=True)
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    task = get_task(args.task, **parse_task_options(args.task_option))
    prompts = [e.prompt for e in task.examples("test")]
    path = args.sweep / STATS_FILE
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    known = {row["key"] for row in done}
    for result in read_results(args.sweep):
        if result["key"] in known:
            continue
        folder = run_dir(args.sweep, result["key"])
        if not (folder / "adapter.safetensors").is_file():
            print(f"skipped {result['setting']} seed {result['seed']}: no adapter in {folder}", file=sys.stderr)
            continue
        net, tokenizer = load_smollm2()
        load_adapter(net, folder)
        stats = xg_variance(net, tokenizer, prompts, progress=False)
        done.append(dict(key=result["key"], setting=result["setting"], seed=result["seed"],
                         accuracy=result["accuracy"], **causal_layer_means(stats)))
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in done))

    groups = {}
    for row in done:
        groups.setdefault(json.dumps(row["setting"], sort_keys=True), []).append(row)
    print("| setting | seeds | held-out Var(X_G) | mean x^2 | Var / mean x^2 |")
    print("|---|---|---|---|---|")
    for setting, rows in sorted(groups.items()):
        label = ", ".join(f"{k}={v}" for k, v in json.loads(setting).items())
        means = [statistics.fmean(r[name] for r in rows) for name in ("variance", "mean_square", "relative_variance")]
        print(f"| {label} | {len(rows)} | " + " | ".join(f"{m:.3g}" for m in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
