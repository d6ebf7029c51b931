"""DCA against LLaMA-Adapter, paired by seed and by test item: RESULTS.md's tables and plots of the
paper-recipe study (studies/paper_recipe.sh), from each task folder's results.jsonl and xg_stats.jsonl and
its runs' per-item predictions.

    python studies/paired_comparison.py [--runs ROOT]   # rewrites RESULTS.md's tables and <task>/accuracy.png

The runs' predictions (runs/ is not kept in git) are copied to <task>/predictions/seed-S-alpha-A.jsonl, which
is kept, so the item-level numbers can be recomputed from the repository alone; --runs takes them from
another sitting's output (`OUT=ROOT bash studies/paper_recipe.sh`), each checked against the study's own
results. Per task: DCA - LLaMA-Adapter per seed, its mean over seeds with the 95% t interval of the
seed-paired differences, the test-item standard error of that mean, sd_i(d_i) / sqrt(n) with d_i = mean over
seeds of (DCA correct - LLaMA-Adapter correct) on item i (how much the difference would move on another draw
of as many test items), and how often the two methods extract the same answer (over seeds and items);
both over the seeds whose predictions are there, named where that is not all of them.
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
from pathlib import Path

from summarize import mean_std, read_jsonl, replace_table

STUDY = Path(__file__).resolve().parent / "paper_recipe"
TASKS = {"letters": "Letter Concatenation (second-last letters)", "date_understanding": "Date Understanding"}
# two-sided 95% quantile of Student's t with (seeds - 1) degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METHODS = {0.0: "LLaMA-Adapter (alpha 0)", 1.0: "DCA (alpha 1)"}


def collect_predictions(folder: Path, runs: Path) -> dict:
    """{(seed, alpha): [the scored prediction per test item]}; copies each run's predictions.jsonl from the
    sweep folder `runs` (the study's own, or a sitting that reproduced it) beside the results, once."""
    from fastdca.commands.sweep import run_dir

    kept = folder / "predictions"
    outcomes = {}
    for row in read_jsonl(folder / "results.jsonl"):
        seed, alpha = row["seed"], row["setting"]["alpha"]
        copy = kept / f"seed-{seed}-alpha-{alpha:g}.jsonl"
        source = run_dir(runs, row["key"]) / "predictions.jsonl"
        if source.is_file() and not copy.is_file():
            kept.mkdir(exist_ok=True)
            shutil.copyfile(source, copy)
        if copy.is_file():
            items = read_jsonl(copy)
            correct = sum(bool(r["correct"]) for r in items)
            if len(items) != row["total"] or correct != row["correct"]:
                raise ValueError(f"{copy}: {correct}/{len(items)} correct, results.jsonl says "
                                 f"{row['correct']}/{row['total']}")
            outcomes[seed, alpha] = items
    return outcomes


def method_rows(rows: list[dict], alpha: float) -> list[dict]:
    """The runs of one method (its alpha), by seed."""
    return sorted((r for r in rows if r["setting"]["alpha"] == alpha), key=lambda r: r["seed"])


def paired_difference(rows: list[dict], outcomes: dict) -> dict:
    """DCA - LLaMA-Adapter in accuracy points: per seed, mean, the seed-paired 95% interval and the test-item SE."""
    by = {(r["seed"], r["setting"]["alpha"]): r for r in rows}
    seeds = sorted(s for s, a in by if a == 0.0 and (s, 1.0) in by)
    per_seed = [100 * (by[s, 1.0]["accuracy"] - by[s, 0.0]["accuracy"]) for s in seeds]
    out = {"seeds": seeds, "per_seed": per_seed, "mean": statistics.fmean(per_seed) if per_seed else None,
           "interval": None, "item_se": None, "items": None, "same_answer": None}
    if len(per_seed) > 1:
        half = T_975[len(per_seed) - 1] * statistics.stdev(per_seed) / math.sqrt(len(per_seed))
        out["interval"] = (out["mean"] - half, out["mean"] + half)
    predicted = [s for s in seeds if (s, 0.0) in outcomes and (s, 1.0) in outcomes]
    out["predicted_seeds"] = predicted
    if predicted:
        dca, adapter = ([[bool(r["correct"]) for r in outcomes[s, a]] for s in predicted] for a in (1.0, 0.0))
        n = len(dca[0])
        d = [statistics.fmean(dca[k][i] - adapter[k][i] for k in range(len(predicted))) for i in range(n)]
        out["item_se"], out["items"] = 100 * statistics.stdev(d) / math.sqrt(n), n
        out["same_answer"] = statistics.fmean(x["prediction"] == y["prediction"] for s in predicted
                                              for x, y in zip(outcomes[s, 1.0], outcomes[s, 0.0]))
    return out


def table(folder: Path, runs: Path) -> str:
    rows = read_jsonl(folder / "results.jsonl")
    stats = {r["key"]: r for r in read_jsonl(folder / "xg_stats.jsonl")}
    outcomes = collect_predictions(folder, runs)
    lines = ["| method | accuracy per seed | accuracy % (mean ± std) | final CE | causal grad share "
             "| held-out Var(X_G) | Var / mean x² | minutes per run |",
             "|---|---|---|---|---|---|---|---|"]
    for alpha, method in METHODS.items():
        own = method_rows(rows, alpha)
        if not own:
            continue
        measured = [stats[r["key"]] for r in own if r["key"] in stats]
        shares = [r["grad_share"] for r in own if r.get("grad_share") is not None]
        per_seed = ", ".join(f"{r['seed']}: {100 * r['accuracy']:.1f}%" for r in own)
        share = f"{statistics.fmean(shares):.1e}" if shares else "-"
        variance, relative = (f"{statistics.fmean(m[name] for m in measured):.2e}" if measured else "-"
                              for name in ("variance", "relative_variance"))
        lines.append(
            f"| {method} | {per_seed} | {mean_std([r['accuracy'] for r in own], 100)} "
            f"| {statistics.fmean(r['ce'] for r in own):.4f} | {share} | {variance} | {relative} "
            f"| {mean_std([r['seconds'] for r in own], 1 / 60)} |")
    diff = paired_difference(rows, outcomes)
    if diff["per_seed"]:
        per_seed = ", ".join(f"{s}: {d:+.1f}" for s, d in zip(diff["seeds"], diff["per_seed"]))
        interval = ("-" if diff["interval"] is None
                    else f"[{diff['interval'][0]:+.1f}, {diff['interval'][1]:+.1f}]")
        partial = ("" if diff["predicted_seeds"] == diff["seeds"]
                   else f", seed{'s' * (len(diff['predicted_seeds']) > 1)} "
                        f"{', '.join(map(str, diff['predicted_seeds']))} only")
        item_se = ("-" if diff["item_se"] is None
                   else f"{diff['item_se']:.2f} points ({diff['items']} items{partial})")
        same = "-" if diff["same_answer"] is None else f"{100 * diff['same_answer']:.1f}%"
        lines += ["", "| DCA − LLaMA-Adapter, points | per seed | mean | 95% interval (paired by seed, t) "
                      "| test-item SE of the mean | same answer as LLaMA-Adapter |",
                  "|---|---|---|---|---|---|",
                  f"| {TASKS[folder.name]} | {per_seed} | {diff['mean']:+.2f} | {interval} | {item_se} | {same} |"]
    return "\n".join(lines)


def plot(folder: Path, path: Path) -> None:
    """Accuracy per seed for both methods, each run's 95% binomial interval as its error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdca.io import atomic_write

    rows = read_jsonl(folder / "results.jsonl")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for offset, (alpha, method) in zip((-0.08, 0.08), METHODS.items()):
        own = method_rows(rows, alpha)
        accuracy = [100 * r["accuracy"] for r in own]
        error = [196 * math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / r["total"]) for r in own]
        ax.errorbar([r["seed"] + offset for r in own], accuracy, yerr=error, fmt="o", capsize=3, label=method)
    ax.set(xlabel="seed", ylabel="held-out accuracy (%)", title=TASKS[folder.name])
    ax.set_xticks(sorted({r["seed"] for r in rows}))
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    from fastdca.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=STUDY, metavar="ROOT",
                        help="the OUT of the sitting whose run folders hold the predictions (default: the study)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"--runs: {args.runs} is not a folder (expected the OUT of a studies/paper_recipe.sh sitting)")

    results = STUDY.parent.parent / "RESULTS.md"
    text = results.read_text()
    for name in TASKS:
        folder = STUDY / name
        if (folder / "results.jsonl").is_file():
            text = replace_table(text, f"paper_recipe/{name}", table(folder, args.runs / name))
            plot(folder, folder / "accuracy.png")
    atomic_write_text(results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
