"""`train`: one training run into its output folder. The folder is created and checked writable and roomy,
locked for this run and compared with the run it holds (fastdca.train.run_record: start, resume, or nothing
to train); then Trainer is set up with fastdca's collator, callbacks and guards, and the loss history, the
adapter and run.json are written; a diverged, interrupted or out-of-memory run says what it left."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from fastdca.config import DCAConfig
from fastdca.errors import TrainingDiverged, TrainingInterrupted
from fastdca.out_of_memory import out_of_memory_cause
from fastdca.grad_share import warn_if_causal_term_inert
from fastdca.hf import load_adapter, save_adapter
from fastdca.io import atomic_write_text
from fastdca.tasks import Example
from fastdca.train import fsdp
from fastdca.train.checkpoints import check_checkpoint, keep_last_checkpoint, remove_partial_checkpoint
from fastdca.train.data import PadCollator, length_buckets, packing_collator, tokenize_examples
from fastdca.train.guards import InterruptGuard, NonFiniteGuard
from fastdca.train.locks import only_writer
from fastdca.train.memory import (Retries, SettledMicroBatch, micro_batch_floor, out_of_memory_in_training,
                                  search_micro_batch)
from fastdca.train.run_record import decide_run, differences, read_record, run_record, split_change, write_record
from fastdca.train.settings import TrainSettings, compile_mode
from fastdca.train.trainer import DCATrainer, LogLastStep, LossProgressBar

HISTORY_FILE = "loss_history.json"
LOCK_FILE = ".train.lock"


def train(model, tokenizer, examples: list[Example], output_dir, *, config: DCAConfig,
          settings: Optional[TrainSettings] = None, resume: bool = True, progress: bool = True,
          callbacks=(), overwrite: bool = False, resume_anyway: bool = False, model_name: Optional[str] = None):
    """Fine-tune a patched model on `examples`; the adapter is saved in `output_dir` at the end and in
    its checkpoint-N folders. With resume=True an interrupted run continues from its last checkpoint.

    One run per folder (fastdca.train.run_record): `output_dir/run.json` records the settings that decide the
    result (`model_name` among them). While this runs it holds a lock on the folder (a second run there
    stops at once). A folder that holds this very run, finished, is not trained again: its adapter is
    loaded into `model` and its history returned. A folder that holds another run is refused, naming the
    differences, unless overwrite=True (which deletes that run's adapter and checkpoints) or, for an
    unfinished run being resumed, resume_anyway=True (recorded in run.json).

    Args:
        model: a causal LM patched with `fastdca.patch(model, config)`; trained in place.
        tokenizer: its tokenizer; it needs an EOS token (the pad token defaults to it).
        examples: the training examples (`fastdca.tasks.Example`: prompt and target), at least one.
        output_dir: the run's folder (created): adapter.safetensors, dca_config.json, checkpoint-N/,
            loss_history.json, run.json.
        config: the DCAConfig `model` was patched with (recorded in run.json).
        settings: the optimisation settings; None = TrainSettings(), the paper's.
        resume: continue an unfinished run from its last checkpoint (False: start over).
        progress: show a progress bar with CE and the causal loss.
        callbacks: extra transformers TrainerCallbacks.
        overwrite: replace the run the folder holds, finished or not, whatever its settings.
        resume_anyway: resume the folder's run although its settings differ.
        model_name: what run.json records as the model (`fastdca train` gives the folder and dtype).

    Returns:
        The loss history, one dict per logged step: {"step", "ce", "causal_loss", "grad_share" (the causal
        term's share of the gradient on the DCA parameters, measured on the logged step's first micro-batch;
        see fastdca.grad_share), "loss", "learning_rate"}.

    Raises:
        ValueError: no examples, a prompt that leaves no room for its answer in settings.max_length, an output
            folder that cannot be written or holds another run, too little free disk.
        AdapterError (a ValueError): the checkpoint to resume lacks a file or is damaged.
        RuntimeError: another run holds the folder's lock.
        OutOfMemory (fastdca.errors, a RuntimeError): a step ran out of memory (with settings.auto_batch_size, even
            the smallest micro-batch); it names what ran out, the micro-batch, what to change and the checkpoint
            a resume starts from, and is raised from the original error.
        OSError: writing a checkpoint failed (a full disk, say): nothing of that checkpoint is left, the ones
            before it are whole.
        TrainingDiverged: a non-finite loss or gradient (output_dir's adapter is the last checkpoint's, if any).
        TrainingInterrupted: SIGINT or SIGTERM; a checkpoint was written, the same call resumes it.
    """
    settings = TrainSettings() if settings is None else settings
    if settings.fsdp:
        fsdp.check_launch()
    if settings.auto_batch_size and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--auto-batch-size searches in one process (ranks that shrink their micro-batches apart "
                         "would wait on each other); give each process a --batch-size and --grad-accum that fit")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    rows = tokenize_examples(examples, tokenizer, settings.max_length)
    output_dir = prepare_output_dir(output_dir)
    record = run_record(examples, settings, config, model_name)
    if not is_rank_zero():
        # rank 0 decides, cleans and writes; the others read the same record and follow its checkpoints
        saved = None if overwrite else read_record(output_dir)
        if saved is not None and saved.get("finished") and not differences(saved, record):
            return _finished_run(model, output_dir)
        return _train(model, tokenizer, rows, output_dir, config, settings, resume and not overwrite, progress,
                      callbacks)
    with only_writer(output_dir, LOCK_FILE, "fastdca train"):
        removed = remove_partial_checkpoint(output_dir)
        if removed:
            print(removed)
        saved = read_record(output_dir)
        action, carried = decide_run(output_dir, record, resume=resume, overwrite=overwrite,
                                     resume_anyway=resume_anyway)
        if action == "finished":
            print(f"{output_dir} holds this run, finished: nothing to train (its adapter is loaded; --overwrite "
                  "trains it again from the start)")
            return _finished_run(model, output_dir)
        check_free_space(output_dir, model, settings)
        if action == "resume" and split_change(saved, record):
            print(f"resuming with another micro-batch: {split_change(saved, record)}")
        start = _recorded_micro_batch(saved if action == "resume" else None, settings)
        if start is not None:
            record["auto_batch_size"] = saved["auto_batch_size"]
        write_record(output_dir, record, finished=False, resumed_anyway=carried)

        def settled(batch_size, grad_accum):
            record["auto_batch_size"] = {"batch_size": batch_size, "grad_accum": grad_accum}
            write_record(output_dir, record, finished=False)

        history = _train(model, tokenizer, rows, output_dir, config, settings, action == "resume", progress,
                         callbacks, start_batch=start, settled=settled)
        write_record(output_dir, record, finished=True)
        return history


def _recorded_micro_batch(saved, settings):
    """The micro-batch a resumed --auto-batch-size run settled on (run.json's "auto_batch_size"), where its
    search starts again, if it holds the same examples a step; else None."""
    recorded = (saved or {}).get("auto_batch_size")
    if not settings.auto_batch_size or not isinstance(recorded, dict):
        return None
    batch, accum = recorded.get("batch_size"), recorded.get("grad_accum")
    if not isinstance(batch, int) or not isinstance(accum, int) or batch < 1:
        return None
    return batch if batch * accum == settings.batch_size * settings.grad_accum else None



def _finished_run(model, output_dir) -> list:
    """A finished run's result without training: its adapter loaded into `model`, its history."""
    load_adapter(model, output_dir)
    history = output_dir / HISTORY_FILE
    return json.loads(history.read_text()) if history.is_file() else []


def is_rank_zero() -> bool:
    """This process is rank 0 of a torchrun / accelerate launch, or the only one (read before
    torch.distributed is set up, as launchers set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output_dir(output_dir) -> Path:
    """`output_dir`, created and checked writable before any training: ValueError naming it otherwise."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test.", delete=True)
        probe.close()
    except FileExistsError:
        raise ValueError(f"--output {output_dir} is a file, not a folder") from None
    except NotADirectoryError:
        raise ValueError(f"--output {output_dir}: a parent of it is a file, not a folder") from None
    except OSError as error:
        raise ValueError(f"--output {output_dir} is not writable ({error.strerror}); give a folder you can "
                         "write to") from None
    return output_dir


def check_free_space(output_dir, model, settings) -> None:
    """ValueError, before training, when `output_dir`'s disk cannot hold what the run writes: the adapter, and
    each kept checkpoint's adapter, optimizer state (two moments) and small files, with a margin of 2x."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    kept = settings.save_total_limit if settings.save_total_limit is not None else 10
    needed = 2 * (trainable * (1 + 4 * kept) + (kept + 1) * 1_000_000)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise ValueError(f"--output {output_dir} has {free / 1e6:.0f} MB free and this run writes up to about "
                         f"{needed / 2e6:.0f} MB (adapter and {kept} checkpoints); free some space or choose "
                         "another folder")


def _train(model, tokenizer, rows, output_dir, config, settings, resume, progress, callbacks, start_batch=None,
           settled=None):
    on_cuda = next(model.parameters()).is_cuda
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup,
        lr_scheduler_type=settings.lr_scheduler,
        logging_steps=settings.logging_steps,
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        seed=settings.seed,
        bf16=settings.bf16 and on_cuda,
        fp16=settings.fp16 and on_cuda,
        use_cpu=not on_cuda,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=settings.dataloader_workers,
        disable_tqdm=True,
        logging_nan_inf_filter=False,      # log what was optimised, NaN included, not a stand-in
        torch_compile=settings.compile,
        **({"torch_compile_mode": compile_mode(settings, on_cuda)} if settings.compile else {}),
        **(fsdp.trainer_options(model) if settings.fsdp else {}),
        **settings.extra,
    )
    if args.n_gpu > 1:
        raise ValueError(f"{args.n_gpu} GPUs in one process would run torch.nn.DataParallel, whose replicas "
                         "would share the adapter's loss bookkeeping; launch one process per GPU with "
                         "`torchrun --nproc-per-node N -m fastdca.cli train ...` instead")
    if settings.gradient_checkpointing:
        # the model's own switch (Trainer's has been renamed across transformers versions); non-reentrant,
        # which the causal term needs (fastdca.hf.hooks)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    buckets = length_buckets(settings.max_length) if settings.compile else None
    collator = packing_collator() if settings.packing else PadCollator(tokenizer.pad_token_id, buckets)
    trainer = DCATrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    if settings.fsdp:
        fsdp.check_applied(trainer)
        fsdp.reduce_in_float32(trainer)
        trainer.add_callback(fsdp.ShardingCheck(model))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    bar = LossProgressBar() if progress else None
    if bar is not None:
        trainer.add_callback(bar)
    for callback in callbacks:
        trainer.add_callback(callback)
    checkpoint = get_last_checkpoint(str(output_dir)) if resume else None
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    trainer.add_callback(LogLastStep())
    trainer.add_callback(NonFiniteGuard(trainer, settings.nonfinite))
    interrupt = InterruptGuard()
    trainer.add_callback(interrupt)
    retries = Retries(trainer, model, checkpoint, settings.auto_batch_size)

    def run(batch_size, grad_accum):
        return trainer.train(resume_from_checkpoint=retries.start(batch_size, grad_accum))

    try:
        with interrupt, _compiled_backward_retains_graph(settings.compile), _quiet_resume_warning():
            if settings.auto_batch_size:
                if settled is not None:
                    trainer.add_callback(SettledMicroBatch(settled))
                search_micro_batch(run, start_batch or settings.batch_size, settings.batch_size * settings.grad_accum,
                                   micro_batch_floor(config))
            else:
                run(settings.batch_size, settings.grad_accum)
    except TrainingDiverged as diverged:
        _write_history(trainer, output_dir)
        kept = keep_last_checkpoint(trainer, output_dir)
        raise TrainingDiverged(diverged.step, diverged.ce, diverged.causal_loss, diverged.detail, kept) from None
    except BaseException as error:
        cause = out_of_memory_cause(error)
        if cause is None:
            raise
        raise out_of_memory_in_training(cause, trainer, settings, config, output_dir) from cause
    finally:
        if bar is not None:
            bar.close()        # the bar's line ends before any message that follows it
    history = _write_history(trainer, output_dir)
    if interrupt.signum is not None:
        # the checkpoint this interruption wrote, not the highest-numbered one (a restarted run's folder
        # can still hold an older run's later checkpoints)
        written = output_dir / f"checkpoint-{trainer.state.global_step}"
        raise TrainingInterrupted(interrupt.signum, trainer.state.global_step,
                                  str(written) if written.is_dir() else get_last_checkpoint(str(output_dir)))
    if trainer.is_fsdp_enabled or trainer.is_world_process_zero():
        save_adapter(model, output_dir)     # sharded: a gather, every rank takes part and rank 0 writes
    if trainer.is_world_process_zero():
        warn_if_causal_term_inert(history, config.alpha)
    return history


class _DropResumeArgumentsWarning(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith("Warning: The following arguments do not match")


@contextlib.contextmanager
def _quiet_resume_warning():
    """Without Trainer's multi-line warning that a resumed checkpoint's batch size (or logging, saving steps)
    differs from the run's: run.json compares the settings that change the result and names them itself
    (fastdca.train.run_record), and another micro-batch of the same examples a step is expected."""
    quiet = _DropResumeArgumentsWarning()
    loggers = [logging.getLogger(name) for name in ("transformers.trainer", "transformers.trainer_utils")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _compiled_backward_retains_graph(compiled: bool):
    """The gradient share (fastdca.grad_share) takes two extra backward passes through the retained graph,
    which a compiled backward allows only when its inputs' buffers are not donated to its outputs (AOTAutograd's
    donated_buffer, a memory saving): off while a compiled model trains."""
    if not compiled:
        return contextlib.nullcontext()
    return torch._functorch.config.patch(donated_buffer=False)


def _write_history(trainer, output_dir) -> list:
    """loss_history.json (strict JSON: a non-finite value is written as null); returns the history."""
    history = [dict(step=h["step"], ce=h["ce"], causal_loss=h["causal_loss"], grad_share=h.get("grad_share"),
                    loss=h["loss"], learning_rate=h.get("learning_rate"))
               for h in trainer.state.log_history if "ce" in h]
    if trainer.is_world_process_zero():
        safe = [{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in h.items()}
                for h in history]
        atomic_write_text(Path(output_dir) / HISTORY_FILE, json.dumps(safe, indent=1, allow_nan=False))
    return history
