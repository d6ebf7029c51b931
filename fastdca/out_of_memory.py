"""Out of memory: OutOfMemory, the one-line error that says what ran out and what to change in each command's
options; recognising the error types of the CPU allocator and the accelerators; and the search for a
micro-batch that fits (--auto-batch-size), accelerate's find_executable_batch_size with a halving that keeps
the examples of a step."""

from __future__ import annotations

import re
import sys
from typing import Optional


class OutOfMemory(RuntimeError):
    """Memory ran out (a GPU's, the CPU's allocator, Python's MemoryError) in one of fastdca's steps. The message
    is one line: what ran out, in what step at which batch size and length, what to change (the options of
    `command`, the `fastdca` command the advice is for), and the checkpoint a resume starts from. `__cause__`
    is the original error.

    Attributes: `what` ("CPU memory (RAM)", "GPU 0's memory (79.19 GiB)", ...), `doing` (the step and its
    sizes), `stage` ("train", "generate", or "" where fastdca does not know), `batch_size` and `grad_accum` (the
    micro-batch that did not fit and its accumulation), `min_batch` (the smallest micro-batch that keeps a
    causal loss: 2 with alpha > 0, the variance over one sample being 0), `checkpoint` (the folder a resume
    starts from, or None), `allocation` (the allocation that failed, "" where the error does not say)."""

    def __init__(self, what: str, doing: str, *, command: str = "train", stage: str = "train",
                 batch_size: Optional[int] = None, grad_accum: int = 1, min_batch: int = 1,
                 checkpoint: Optional[str] = None, allocation: str = ""):
        self.what, self.doing, self.command, self.stage = what, doing, command, stage
        self.batch_size, self.grad_accum, self.min_batch = batch_size, grad_accum, min_batch
        self.checkpoint, self.allocation = checkpoint, allocation
        super().__init__(self._message())

    def for_command(self, command: str) -> "OutOfMemory":
        """The same error advising `command`'s options (fastdca demo and sweep run fastdca.train.train, whose
        error names fastdca train's); raise it `from` this error's cause."""
        return OutOfMemory(self.what, self.doing, command=command, stage=self.stage, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, min_batch=self.min_batch, checkpoint=self.checkpoint,
                           allocation=self.allocation)

    def _message(self) -> str:
        allocation = f": it tried to allocate {self.allocation}" if self.allocation else ""
        changes, resumes, note = _memory_advice(self)
        text = f"out of {self.what} {self.doing}{allocation}. To fit, try {_or(changes)}{note}"
        if self.checkpoint:
            name = self.checkpoint.rstrip("/").rsplit("/", 1)[-1]
            text += (f". The checkpoints before it are kept: the same command with {_or(resumes)} resumes from {name}"
                     if resumes else f". The checkpoints before it are kept ({name} the last)")
        return text


def next_micro_batch(current: int, effective: int, floor: int = 1) -> Optional[int]:
    """The micro-batch to try after `current` did not fit: the largest divisor of `effective` (the examples of an
    optimisation step) at most half of `current`, so that an accumulation of effective / it keeps the step's
    examples; None below `floor`."""
    for size in range(current // 2, max(floor, 1) - 1, -1):
        if effective % size == 0:
            return size
    return None


# the first accelerate whose find_executable_batch_size takes reduce_batch_size_fn
ACCELERATE_WITH_REDUCTION = "1.7"


def search_batch_size(run, start: int, smaller):
    """`run(batch_size)` with batch_size = start, then after each out-of-memory error with smaller(the last)
    (None: no smaller one to try), until one returns: accelerate's find_executable_batch_size, the search
    transformers' auto_find_batch_size runs, with this reduction instead of its x 0.9. Returns what `run`
    returned; when none fits, the last try's own error propagates (not accelerate's "reached zero")."""
    import inspect

    from accelerate.utils import find_executable_batch_size

    if "reduce_batch_size_fn" not in inspect.signature(find_executable_batch_size).parameters:
        raise RuntimeError(f"--auto-batch-size needs accelerate >= {ACCELERATE_WITH_REDUCTION}: "
                           "pip install -U accelerate")
    tried = {"size": start, "error": None}

    def reduce():
        tried["size"] = smaller(tried["size"]) or 0          # 0: accelerate stops
        return tried["size"]

    def attempt(batch_size):
        try:
            return run(batch_size)
        except BaseException as error:
            tried["error"] = error
            raise

    try:
        return find_executable_batch_size(attempt, starting_batch_size=start, reduce_batch_size_fn=reduce)()
    except RuntimeError as error:
        if tried["error"] is None or "No executable batch size found" not in str(error):
            raise
    raise tried["error"]          # none fits; raised outside the handler, so without accelerate's error as context


def _or(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _memory_advice(error: OutOfMemory) -> tuple:
    """(what to change, the changes among them after which the same command resumes the run's checkpoint, a note
    on the micro-batch's floor), in the options of the error's command."""
    b, floor = error.batch_size, error.min_batch
    if error.stage == "generate":
        half = b // 2 if b and b > 1 else None
        auto = ["--auto-batch-size (halves the batch until it fits)"] if half else []
        if error.command == "eval":
            return [*([f"--batch-size {half}"] if half else []), *auto, "--load-in-4bit"], [], ""
        return auto or ["a machine with more memory"], ["--auto-batch-size"] if auto else [], ""
    if error.stage != "train":          # loading the model, say
        options = {"train": ["--load-in-4bit", "a smaller --batch-size", "--gradient-checkpointing"],
                   "eval": ["--load-in-4bit", "a smaller --batch-size"]}
        return options.get(error.command, ["a smaller model", "a machine with more memory"]), [], ""
    effective = b * error.grad_accum if b else None
    smaller = next_micro_batch(b, effective, floor) if b else None
    auto = ["--auto-batch-size (smaller micro-batches, more of them accumulated, until a step fits)"] if smaller else []
    note = (f" (no micro-batch below {floor}: the variance over one sample is 0, no causal loss)"
            if b and not smaller and floor > 1 else "")
    if error.command == "train":
        split = f"--batch-size {smaller} --grad-accum {effective // smaller}" if smaller else None
        changes = [*([f"{split} (the same {effective} examples a step)"] if split else []),
                   "--gradient-checkpointing", "a shorter --max-length", "--load-in-4bit", *auto]
        resumes = [*([split] if split else []), "--gradient-checkpointing", *(["--auto-batch-size"] if auto else [])]
        return changes, resumes, note
    changes = [*auto, *([f"a smaller --batch-size ({smaller}: fewer examples a step, another run)"] if smaller else [])]
    if error.command == "sweep":
        changes.append("a shorter --max-length (another run)")
    return changes or ["a smaller model"], ["--auto-batch-size"] if auto else [], note


# what each kind of out-of-memory error says (torch's OutOfMemoryError for CUDA/HIP/XPU, the CPU allocator,
# MPS, Gaudi) and the memory it names; accelerate's find_executable_batch_size retries on the same texts
_OUT_OF_MEMORY_TEXTS = {"DefaultCPUAllocator: can't allocate memory": "CPU memory (RAM)",
                        "CUDA out of memory": "GPU memory", "HIP out of memory": "GPU memory",
                        "XPU out of memory": "XPU memory", "MPS backend out of memory": "Apple GPU memory (MPS)",
                        "PT_DEVMEM Allocation failed": "Gaudi memory (HPU)",
                        "CUBLAS_STATUS_ALLOC_FAILED": "GPU memory", " out of memory": "accelerator memory"}


def out_of_memory_cause(error: BaseException) -> Optional[BaseException]:
    """The out-of-memory error `error` is or was raised from (following `__cause__`), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        torch = sys.modules.get("torch")
        if (isinstance(error, (OutOfMemory, MemoryError))
                or (torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())))
                or (isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_TEXTS))):
            return error
        error = error.__cause__
    return None


def what_ran_out(error: BaseException) -> tuple:
    """(the memory that ran out, in words; the allocation that failed, "" where the error does not say) of an
    out-of-memory error."""
    if isinstance(error, OutOfMemory):
        return error.what, error.allocation
    text = str(error)
    what = "CPU memory (RAM)" if isinstance(error, MemoryError) else next(
        (name for marker, name in _OUT_OF_MEMORY_TEXTS.items() if marker in text), "accelerator memory")
    gpu = re.search(r"GPU (\d+) has a total capacity of ([\d.]+ \w+)", text)
    if gpu:
        what = f"GPU {gpu.group(1)}'s memory ({gpu.group(2)})"
    size = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", text)
    if size:
        return what, size.group(1)
    size = re.search(r"tried to allocate (\d+) bytes", text)
    if not size:
        return what, ""
    n = int(size.group(1))
    return what, next(f"{n / scale:.3g} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "bytes"))
                      if n >= scale or unit == "bytes")
