"""The Trainer fastdca trains with: DCATrainer (adapter-only checkpoints, CE and the causal loss logged
apart, the causal term's gradient share measured on logged steps, FSDP's optimizer state gathered, each
checkpoint whole or absent) and the callbacks that show and log its progress."""

from __future__ import annotations

import errno
import os
import shutil

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from fastdca.train import fsdp
from fastdca.grad_share import causal_gradient_share, measurement_due
from fastdca.hf import adapter_state_dict, load_adapter, save_adapter
from fastdca.train.checkpoints import OPTIMIZER_FILE, PARTIAL_CHECKPOINT_DIR, SCHEDULER_FILE, move_into_place


class LogLastStep(TrainerCallback):
    """Log the last step whatever logging_steps is, so that the history always ends at the final step
    (with logging_steps above max_steps it would otherwise stay empty)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_log = True
        return control


class DCATrainer(Trainer):
    """Trainer that checkpoints only the adapter and logs CE and the causal loss separately.

    A checkpoint is whole or absent: Trainer writes it into OUTPUT/.checkpoint-partial/checkpoint-N, which is
    renamed to OUTPUT/checkpoint-N once every file is written. A write that fails (a full disk) removes the
    partial folder and raises an OSError naming the file and the checkpoint a resume starts from; a process
    killed during the write leaves only the partial folder, which the next run into OUTPUT removes
    (fastdca.train.checkpoints.remove_partial_checkpoint), and no checkpoint-N that is not whole."""

    def __init__(self, model, *args, **kwargs):
        # Trainer refuses a quantised model unless trainable adapters sit on it, and it recognises only
        # PEFT's; DCA's float32 adapters on the frozen 4-bit/8-bit weights are exactly that case.
        flagged = getattr(model, "_hf_peft_config_loaded", False)
        model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            model._hf_peft_config_loaded = flagged
        self._loss_sums = {"ce": 0.0, "causal": 0.0, "n": 0}
        self._step_losses = []
        self._share = {"step": None, "value": None}
        self._staging = None                    # set while a checkpoint is written into the partial folder
        self.last_checkpoint_written = None     # the checkpoint-N folder this trainer last moved into place
        self.last_micro_batch_shape = None      # the input_ids shape of the latest micro-batch (an OOM names it)

    def use_micro_batch(self, batch_size: int, grad_accum: int) -> None:
        """Train with micro-batches of `batch_size`, `grad_accum` of them a step (--auto-batch-size's tries);
        Trainer does the accumulation itself (its accelerator's is 1), reading both from args."""
        self.args.per_device_train_batch_size = batch_size
        self.args.gradient_accumulation_steps = grad_accum
        self._train_batch_size = batch_size

    def _inner_training_loop(self, batch_size=None, *args, **kwargs):
        # The micro-batch is the one in args: transformers 5.0 resumes a checkpoint at the batch size its
        # trainer_state.json recorded (5.2x only under auto_find_batch_size), which would silently undo
        # another split of the same examples a step (fastdca.train.run_record decides what a resume may change).
        return super()._inner_training_loop(self.args.train_batch_size, *args, **kwargs)

    def forget_try(self) -> None:
        """Drop what a try that ran out of memory left: the optimizer and schedule it created (the next try
        creates them again, or loads a checkpoint's), the losses it summed, its model wrapping."""
        self.optimizer = self.lr_scheduler = None
        self._loss_sums = {"ce": 0.0, "causal": 0.0, "n": 0}
        self._step_losses = []
        self._share = {"step": None, "value": None}
        self.model_wrapped = self.model
        self.last_micro_batch_shape = None

    def take_step_losses(self) -> list:
        """The {"loss", "ce", "causal_loss"} of each micro-batch since the last call (NonFiniteGuard)."""
        losses, self._step_losses = self._step_losses, []
        return losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and isinstance(inputs.get("input_ids"), torch.Tensor):
            self.last_micro_batch_shape = tuple(inputs["input_ids"].shape)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training:
            # Trainer may rescale the model's loss (token averaging across devices multiplies it by the
            # number of processes, in place: outputs["loss"] is that tensor): the CE part gets the same
            # factor, so that the logged CE and Trainer's logged loss agree. Without collected statistics
            # (alpha = 0) the model's loss is all CE.
            ce, term = outputs.get("ce_loss"), outputs.get("causal_term")
            raw = float(outputs["loss"].detach() if ce is None or term is None else (ce + term).detach())
            scale = float(loss.detach()) / raw if raw else 1.0
            ce_value = float((outputs["loss"] if ce is None else ce).detach())
            self._loss_sums["ce"] += ce_value * scale
            causal = outputs.get("causal_loss")
            causal_value = 0.0 if causal is None else float(causal.detach())
            self._loss_sums["causal"] += causal_value
            self._loss_sums["n"] += 1
            self._step_losses.append({"loss": raw, "ce": ce_value, "causal_loss": causal_value})
            self._measure_gradient_share(outputs)
        return (loss, outputs) if return_outputs else loss

    def _measure_gradient_share(self, outputs):
        """On the first micro-batch of each step that will be logged: the causal term's share of the
        gradient on the DCA parameters (fastdca.grad_share). Not under several processes, whose
        gradient synchronisation an extra backward would disturb."""
        step = self.state.global_step + 1
        if not measurement_due(self.args, step, self._share["step"]):
            return
        params = adapter_state_dict(self.accelerator.unwrap_model(self.model)).values()
        self._share = {"step": step, "value": causal_gradient_share(outputs, params)}

    def log(self, logs, *args, **kwargs):
        n = self._loss_sums["n"]
        if n and "loss" in logs:
            steps = n / max(self.args.gradient_accumulation_steps, 1)
            logs["ce"] = round(self._loss_sums["ce"] / steps, 6)
            logs["causal_loss"] = round(self._loss_sums["causal"] / n, 8)
            if self._share["step"] == self.state.global_step and self._share["value"] is not None:
                logs["grad_share"] = float(f"{self._share['value']:.4g}")
            self._loss_sums = {"ce": 0.0, "causal": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            save_adapter(self.accelerator.unwrap_model(self.model), output_dir)

    def _get_output_dir(self, trial):
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, written into the partial folder and moved into place when whole."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, PARTIAL_CHECKPOINT_DIR)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()        # every rank writes its RNG state into the partial folder
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
        except BaseException as error:
            self._staging = None
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            failure = _checkpoint_write_error(error, staging, os.path.join(run_dir, name), run_dir)
            if failure is error:
                raise
            raise failure from error
        self._staging = None
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            move_into_place(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_in(run_dir)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint_written = final

    def _rotate_in(self, run_dir):
        """Trainer's rotation (save_total_limit) in the output folder, which it ran in the partial folder."""
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:      # transformers before 5.2x: a Trainer method
            return self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model),
                     resume_from_checkpoint)

    # Under FSDP, Trainer's checkpoint would be the whole sharded model (the frozen base too) and it would
    # write no adapter; fastdca's holds what an unsharded run's does, gathered (every rank takes part).
    def save_model(self, output_dir=None, _internal_call=False):
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        save_adapter(self.model, output_dir if output_dir is not None else self.args.output_dir)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        fsdp.save_optimizer(self.model, self.optimizer, os.path.join(output_dir, OPTIMIZER_FILE))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not self.is_fsdp_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        fsdp.load_optimizer(self.model, self.optimizer, os.path.join(checkpoint, OPTIMIZER_FILE))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_FILE), weights_only=True))


def _checkpoint_write_error(error, staging, final, run_dir):
    """A failed checkpoint write as an OSError naming the file (in checkpoint-N, not the partial folder it was
    written in) and the checkpoint a resume starts from; other errors (a second Ctrl-C) as they are."""
    from transformers.trainer_utils import get_last_checkpoint

    step = os.path.basename(final).rsplit("-", 1)[-1]
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        filename = str(error.filename or final).replace(staging, os.path.dirname(final), 1)
    elif isinstance(error, RuntimeError) and ("PytorchStreamWriter" in str(error) or "inline_container" in str(error)):
        # torch.save's zip writer reports a full disk as an internal assertion that names no file
        reason, filename = f"is the disk full? {str(error).splitlines()[0][:160]}", final
    else:
        return error
    code = getattr(error, "errno", None) or errno.EIO
    fix = "free some space and " if code in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else ""
    last = get_last_checkpoint(run_dir)
    kept = (f"nothing of it was kept and {os.path.basename(last)} is whole: {fix}run the same command again to resume "
            "from it" if last else f"nothing of it was kept: {fix}run the same command again to start over")
    return OSError(code, f"writing checkpoint {step} failed ({reason}); {kept}", filename)


class LossProgressBar(TrainerCallback):
    """One tqdm bar over the optimisation steps, showing the latest CE and causal loss; a try that starts again
    (--auto-batch-size) reuses it. `close()` ends its line, as a run that stops on an error must before the
    error's line."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.bar is None:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
        else:
            self.bar.reset(total=state.max_steps)
            self.bar.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "ce" in logs:
            postfix = dict(ce=f"{logs['ce']:.4f}", causal=f"{logs['causal_loss']:.2e}")
            if "grad_share" in logs:
                postfix["share"] = f"{logs['grad_share']:.1e}"     # the causal term's pull on the adapter
            self.bar.set_postfix(**postfix, lr=f"{logs.get('learning_rate', 0):.1e}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
