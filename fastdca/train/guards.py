"""Trainer callbacks that keep a run from losing work: NonFiniteGuard stops (or skips) at the first
non-finite loss or gradient before the optimizer applies it, InterruptGuard turns SIGINT/SIGTERM into a
checkpoint and a clean stop."""

from __future__ import annotations

import math
import signal
import threading

import torch
from transformers import TrainerCallback

from fastdca.errors import TrainingDiverged

NONFINITE_MODES = ("stop", "skip")
MAX_SKIPPED_IN_A_ROW = 10


class NonFiniteGuard(TrainerCallback):
    """Checks each optimisation step's losses and gradients just before the optimizer step.

    mode="stop" raises TrainingDiverged at the first non-finite one; mode="skip" drops that step's
    gradients (the optimizer then leaves the adapter as it was) and raises after MAX_SKIPPED_IN_A_ROW
    skipped steps in a row. With fp16 loss scaling, non-finite gradients are the scaler's to handle
    (it skips the step and lowers the scale); only non-finite losses count then.
    """

    def __init__(self, trainer, mode: str = "stop"):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
        self.trainer, self.mode = trainer, mode
        self.skipped_in_a_row = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        losses = self.trainer.take_step_losses()
        bad_loss = next((entry for entry in losses if not all(math.isfinite(v) for v in entry.values())), None)
        bad_grad = None
        if self.trainer.accelerator.scaler is None:
            grads = {name: p.grad for name, p in self.trainer.model.named_parameters() if p.grad is not None}
            # one device-to-host read for every gradient; the name is looked up only when one is bad
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
                bad_grad = next(name for name, g in grads.items() if not bool(torch.isfinite(g).all()))
        if bad_loss is None and bad_grad is None:
            self.skipped_in_a_row = 0
            return
        step = state.global_step + 1
        entry = bad_loss or (losses[-1] if losses else {"ce": float("nan"), "causal_loss": float("nan")})
        detail = "non-finite loss" if bad_loss is not None else f"non-finite gradient of {bad_grad}"
        if self.mode == "skip" and self.skipped_in_a_row + 1 < MAX_SKIPPED_IN_A_ROW:
            self.skipped_in_a_row += 1
            for p in self.trainer.model.parameters():
                p.grad = None
            return
        if self.mode == "skip":
            detail += f", the {MAX_SKIPPED_IN_A_ROW}th skipped step in a row"
        raise TrainingDiverged(step, entry["ce"], entry["causal_loss"], detail)


class InterruptGuard(TrainerCallback):
    """While active (a context manager), SIGINT and SIGTERM only set a flag; at the end of the current
    optimisation step the Trainer then writes a checkpoint and stops. A second signal interrupts at once.
    Under several processes the ranks agree at each step's end: a signal to any one of them stops all at
    the same step (a checkpoint is written by all together)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal {signum}")
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:
            self.signum = _signal_on_any_rank(self.signum)
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


def _signal_on_any_rank(signum):
    """The signal one of the ranks received (the highest number), or None: a collective every rank calls."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None
