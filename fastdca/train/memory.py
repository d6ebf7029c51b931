"""Out of memory in training: the error that says what ran out and what to change (fastdca.out_of_memory.OutOfMemory),
and `--auto-batch-size`, which halves the micro-batch and doubles the accumulation until a step fits.

The search is accelerate's find_executable_batch_size (what transformers' auto_find_batch_size runs) with a
reduction of fastdca's: transformers' own multiplies the micro-batch by 0.9 and keeps the accumulation, which
changes the number of examples an optimisation step averages over; here each micro-batch tried divides the
step's examples (batch_size x grad_accum), the accumulation makes up the rest, and the micro-batch stays at 2
or more while the causal loss is on (the variance over one sample is 0). Each try after the first starts
where the first did: from the checkpoint it resumed, or from the adapter, optimizer and RNG as they were.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from fastdca.out_of_memory import OutOfMemory, next_micro_batch, search_batch_size, what_ran_out

def micro_batch_floor(config) -> int:
    """The smallest micro-batch that still has a causal loss: 2 with alpha > 0 (L_causal is a variance over the
    micro-batch's samples), else 1."""
    return 2 if config.alpha > 0 else 1


def search_micro_batch(run, start: int, effective: int, floor: int):
    """`run(micro_batch, grad_accum)` with micro_batch = start, then after each out-of-memory error with the
    next smaller micro-batch that divides `effective` (at most half the last, at least `floor`) and
    grad_accum = effective / micro_batch, until one returns (fastdca.out_of_memory.search_batch_size: accelerate's
    find_executable_batch_size). Returns what `run` returned; when none fits, the last out-of-memory error
    propagates."""
    return search_batch_size(lambda size: run(size, effective // size), start,
                             lambda size: next_micro_batch(size, effective, floor))


class Retries:
    """What a try after an out-of-memory error starts from: the checkpoint the run resumed (the last one this
    run wrote, if it wrote one), else the trainable parameters and the seed as they were before the first try."""

    def __init__(self, trainer, model, checkpoint, searching: bool):
        self.trainer, self.model, self.checkpoint = trainer, model, checkpoint
        self.tries = 0
        self.initial = ({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
                        if searching and checkpoint is None else {})

    def start(self, batch_size: int, grad_accum: int):
        """Set the micro-batch for this try and put the run back where the first try started; returns the
        checkpoint to resume from."""
        self.tries += 1
        if self.tries > 1:
            self.trainer.forget_try()
            written = self.trainer.last_checkpoint_written
            if written is not None:
                self.checkpoint = written
            elif self.checkpoint is None:
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        if name in self.initial:
                            p.copy_(self.initial[name])
                set_seed(self.trainer.args.seed)
        self.trainer.use_micro_batch(batch_size, grad_accum)
        return self.checkpoint


class SettledMicroBatch(TrainerCallback):
    """With --auto-batch-size: when a try's first step has fitted, says so once (tqdm.write, beside the bar) and
    calls `record(batch_size, grad_accum)` (run.json keeps it, and a resume starts there)."""

    def __init__(self, record):
        self.record, self.said = record, None

    def on_step_end(self, args, state, control, **kwargs):
        settled = (args.per_device_train_batch_size, args.gradient_accumulation_steps)
        if self.said != settled:
            self.said = settled
            from tqdm.auto import tqdm

            tqdm.write(f"--auto-batch-size: a step fits at micro-batch {settled[0]}, {settled[1]} accumulated "
                       f"({settled[0] * settled[1]} examples a step)")
            self.record(*settled)
        return control


def out_of_memory_in_training(error, trainer, settings, config, output_dir) -> OutOfMemory:
    """fastdca's OutOfMemory for an out-of-memory `error` in trainer.train: the memory that ran out, the step
    and micro-batch it ran out in, what to change, and the checkpoint a resume starts from."""
    what, allocation = what_ran_out(error)
    batch, accum = trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    shape = trainer.last_micro_batch_shape
    if shape is None:
        rows = f"a micro-batch of {batch} examples"
    elif settings.packing:
        rows = f"a micro-batch of {batch} examples packed into {shape[-1]} tokens"
    else:
        rows = f"a micro-batch of {shape[0]} examples padded to {shape[-1]} tokens"
    doing = (f"in training step {trainer.state.global_step + 1}, {rows} (batch size {batch}, accumulation {accum}, "
             f"max length {settings.max_length})")
    checkpoint = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    return OutOfMemory(what, doing, command="train", stage="train", batch_size=batch, grad_accum=accum,
                       min_batch=micro_batch_floor(config), checkpoint=checkpoint, allocation=allocation)
