"""A run's checkpoints (checkpoint-N folders, Trainer's layout with fastdca's adapter files): what resuming
needs of one, checked before Trainer reads it, and the adapter a diverged run leaves in its output folder."""

from __future__ import annotations

import json
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
