"""What a training run in an output folder was started with (run.json), and the decision a new run
into that folder takes from it: start, resume, or stop because the run there is finished or differs.

run.json holds every setting that changes the result (the data's fingerprint, the model, the
optimisation settings, the DCAConfig) and whether the run finished. A resume with other settings would
silently mix two runs, and a new run into a finished run's folder would silently replace its adapter:
both are refused, naming each difference, unless asked for (resume_anyway, overwrite). The same examples a
step split into other micro-batches (batch_size x grad_accum, what a run short of memory changes) is the
same run: a resume takes it and records it. With --auto-batch-size run.json also keeps the micro-batch the
search settled on ("auto_batch_size"), where a resume starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from fastdca.adapter_file import ADAPTER_FILE
from fastdca.io import atomic_write_text

RUN_FILE = "run.json"
# TrainSettings fields that change what a run computes (logging, saving and progress do not)
RESULT_SETTINGS = ("epochs", "max_steps", "batch_size", "grad_accum", "learning_rate", "weight_decay", "warmup",
                   "lr_scheduler", "max_length", "seed", "bf16", "fp16", "nonfinite", "packing", "extra")


def data_fingerprint(examples) -> str:
    """sha256 of the examples' prompts and targets, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt, example.target]).encode())
    return digest.hexdigest()


def run_record(examples, settings, config, model_name=None) -> dict:
    """The settings of a run that decide its result, as run.json stores them (through JSON, so that a
    record compares equal to the one read back: tuples become lists)."""
    record = {"data": {"examples": len(examples), "sha256": data_fingerprint(examples)},
              "model": model_name,
              "settings": {name: getattr(settings, name) for name in RESULT_SETTINGS},
              # fsdp lays the optimizer state in checkpoints out by parameter name (recorded only when on, so
              # that records written before it existed still match)
              **({"sharding": "fsdp"} if settings.fsdp else {}),
              "config": config.to_dict()}
    return json.loads(json.dumps(record, default=str))


def split_change(saved: dict, record: dict):
    """'settings.batch_size x grad_accum: 96 x 1 -> 48 x 2 (the same 96 examples a step)' when two records split
    the same examples a step into other micro-batches, else None."""
    old, new = saved.get("settings"), record.get("settings")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    try:
        before, after = (old["batch_size"], old["grad_accum"]), (new["batch_size"], new["grad_accum"])
        same = before != after and before[0] * before[1] == after[0] * after[1]
    except (KeyError, TypeError):
        return None
    return (f"settings.batch_size x grad_accum: {before[0]} x {before[1]} -> {after[0]} x {after[1]} (the same "
            f"{after[0] * after[1]} examples a step)") if same else None


def differences(saved: dict, record: dict) -> list:
    """'name: old -> new' for each setting that differs between two run records; another split of the same
    examples a step into micro-batches is not one (split_change)."""
    split = split_change(saved, record) is not None
    out = []
    for section in ("data", "model", "settings", "config", "sharding"):
        old, new = saved.get(section), record.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for name in sorted(set(old) | set(new)):
                if split and section == "settings" and name in ("batch_size", "grad_accum"):
                    continue
                if old.get(name) != new.get(name):
                    out.append(f"{section}.{name}: {old.get(name)!r} -> {new.get(name)!r}")
        elif old != new:
            out.append(f"{section}: {old!r} -> {new!r}")
    return out


def read_record(output_dir):
    """The folder's run.json, or None where there is none; ValueError naming the file if it is unreadable."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({error}); delete it and pass --overwrite to start over") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a run record (expected a JSON object); pass --overwrite to start over")
    return saved


def decide_run(output_dir, record: dict, *, resume: bool, overwrite: bool, resume_anyway: bool) -> tuple:
    """Decide what a run into `output_dir` does: (action, the differences a resume carries over) with action
    "fresh", "resume", or "finished" (the folder holds this very run, finished: nothing to train).
    ValueError where it holds another run and neither overwrite nor (for an unfinished run) resume_anyway
    allows going on. overwrite removes the old run's adapter,
    checkpoints and record first. Temporary files of a killed write are removed (the caller holds the
    folder's lock, so no live write owns them)."""
    output_dir = Path(output_dir)
    for leftover in output_dir.glob(".*.tmp"):      # a write killed before its rename (fastdca.io)
        leftover.unlink(missing_ok=True)
    saved = read_record(output_dir)
    checkpoints = sorted(output_dir.glob("checkpoint-*")) if output_dir.is_dir() else []
    holds_results = (output_dir / ADAPTER_FILE).exists() or bool(checkpoints)
    if overwrite:
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
        for name in (ADAPTER_FILE, RUN_FILE):
            (output_dir / name).unlink(missing_ok=True)
        return "fresh", []
    if saved is None:
        if holds_results:
            raise ValueError(f"{output_dir} holds an adapter or checkpoints but no {RUN_FILE} to compare this run's "
                             "settings with; pass --overwrite to replace it, or give another --output")
        return "fresh", []
    diffs = differences(saved, record)
    if saved.get("finished"):
        if not diffs:
            return "finished", []
        if resume and resume_anyway and checkpoints:
            return "resume", diffs     # continuing a finished run, for more steps say: asked for by name
        raise ValueError(f"{output_dir} holds a finished run with other settings ({'; '.join(diffs)}); pass "
                         "--overwrite to replace it, --resume-anyway to continue it from its last checkpoint with "
                         "the new settings, or give another --output")
    if not resume or not checkpoints:
        return "fresh", []
    if diffs and not resume_anyway:
        raise ValueError(f"{output_dir} holds an unfinished run with other settings ({'; '.join(diffs)}); resuming "
                         f"would mix them: pass --resume-anyway to resume with the new settings, --no-resume to "
                         f"start over, or give another --output{_split_hint(saved, record)}")
    split = split_change(saved, record)
    return "resume", diffs + ([split] if split else [])


def _split_hint(saved: dict, record: dict) -> str:
    """Where the micro-batch is all that changed and with it the examples a step (a run short of memory given a
    smaller --batch-size alone): the --grad-accum with which the same command resumes instead."""
    old, new = saved.get("settings") or {}, record.get("settings") or {}
    others = [d for d in differences(saved, record)
              if not d.startswith(("settings.batch_size:", "settings.grad_accum:"))]
    try:
        effective = old["batch_size"] * old["grad_accum"]
        if not others and new["batch_size"] != old["batch_size"] and effective % new["batch_size"] == 0:
            return (f" (--batch-size {new['batch_size']} --grad-accum {effective // new['batch_size']} keeps its "
                    f"{effective} examples a step, and resumes)")
    except (KeyError, TypeError):
        pass
    return ""


def write_record(output_dir, record: dict, *, finished: bool, resumed_anyway=()) -> None:
    """run.json for the run now in `output_dir` (atomically); resumed_anyway lists the differences a
    resume was allowed to carry over, kept with the record's earlier ones."""
    saved = read_record(output_dir) or {}
    history = list(saved.get("resumed_anyway", [])) + list(resumed_anyway)
    body = dict(record, finished=finished, **({"resumed_anyway": history} if history else {}))
    atomic_write_text(Path(output_dir) / RUN_FILE, json.dumps(body, indent=1, default=str))
