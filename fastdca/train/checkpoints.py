"""A run's checkpoints (checkpoint-N folders, Trainer's layout with fastdca's adapter files): what resuming
needs of one, checked before Trainer reads it; the partial folder a checkpoint is written in before it is moved
into place whole (fastdca.train.trainer.DCATrainer), and what a killed write leaves of it; the adapter a
diverged run leaves in its output folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

from fastdca.adapter_file import ADAPTER_FILE, CONFIG_FILE
from fastdca.errors import AdapterError
from fastdca.io import atomic_write_all

# Trainer's names
OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE_FILE = "optimizer.pt", "scheduler.pt", "trainer_state.json"
CHECKPOINT_FILES = (ADAPTER_FILE, CONFIG_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE_FILE)
# where a checkpoint is written before it is renamed into place (hidden: Trainer's checkpoint-* lookups skip it)
PARTIAL_CHECKPOINT_DIR = ".checkpoint-partial"


def move_into_place(staged, final) -> None:
    """Rename the whole checkpoint folder `staged` to `final` (one rename on the same disk). A `final` already
    there (an earlier run's checkpoint of the same step) is moved aside first and deleted after: at every
    moment checkpoint-N is one whole checkpoint or absent."""
    replaced = None
    if os.path.lexists(final):
        replaced = os.path.join(os.path.dirname(staged), "replaced-" + os.path.basename(final))
        os.rename(final, replaced)
    os.rename(staged, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def remove_partial_checkpoint(output_dir):
    """Remove what a run killed while writing a checkpoint left (the partial folder); the caller holds the
    folder's lock, so no live write owns it. Returns a one-line notice naming it, or None."""
    partial = Path(output_dir) / PARTIAL_CHECKPOINT_DIR
    if not partial.is_dir():
        return None
    names = sorted(p.name for p in partial.iterdir() if not p.name.startswith("replaced-")) or ["checkpoint"]
    shutil.rmtree(partial)
    return (f"removed {partial}: the incomplete {', '.join(names)} of a run stopped while writing it (the "
            "checkpoints before it are whole)")


def check_checkpoint(path) -> None:
    """Refuse to resume from a checkpoint folder that lacks a file resuming needs (Trainer would quietly
    restart the optimizer or the schedule without it), or whose files are damaged: each is read here, so
    the error names the file instead of coming from deep inside Trainer's resume."""
    path = Path(path)
    advice = f"delete {path} to resume from an earlier checkpoint, or pass --no-resume to start over"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise AdapterError(f"{path / name} is missing: checkpoint {path.name} cannot be resumed exactly; {advice}")
    try:
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise AdapterError(f"{path / TRAINER_STATE_FILE} is unreadable ({error}); {advice}") from None
    fields = {"global_step": int, "log_history": list}
    wrong = [name for name, kind in fields.items() if not isinstance(state, dict) or not isinstance(state.get(name), kind)]
    if wrong:
        raise AdapterError(f"{path / TRAINER_STATE_FILE} has no valid {', '.join(wrong)}; {advice}")
    for file in [path / OPTIMIZER_FILE, path / SCHEDULER_FILE, *sorted(path.glob("rng_state*.pth"))]:
        try:
            torch.load(file, map_location="cpu", weights_only=False)
        except Exception as error:       # truncated zip, unpickling garbage, ...
            raise AdapterError(f"{file} is damaged ({type(error).__name__}: {str(error)[:200]}); {advice}") from None


def keep_last_checkpoint(trainer, output_dir) -> str:
    """After divergence: the output adapter becomes the last checkpoint's (written while every parameter
    was finite); with no checkpoint the output directory keeps what it had. Says which."""
    last = get_last_checkpoint(str(output_dir))
    if last is None:
        return f"nothing was written to {output_dir}"
    if trainer.is_world_process_zero():
        # the pair together, as save_adapter writes it
        atomic_write_all({Path(output_dir) / name: lambda tmp, source=Path(last) / name: shutil.copyfile(source, tmp)
                          for name in (ADAPTER_FILE, CONFIG_FILE)})
    return f"the adapter in {output_dir} is {Path(last).name}'s, the last checkpoint"
