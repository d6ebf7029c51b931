"""The optimisation settings of a training run (`fastdca train`'s options) and the compile mode they imply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fastdca.config import COMPILE_MODES
from fastdca.train.guards import NONFINITE_MODES


@dataclass
class TrainSettings:
    """The optimisation settings of `fastdca train`; the defaults are the paper's."""

    epochs: float = 5.0
    max_steps: int = -1            # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.02
    warmup: float = 0.0            # warmup steps, or a fraction of the total when < 1
    lr_scheduler: str = "linear"
    max_length: int = 256
    seed: int = 0
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    logging_steps: int = 10
    bf16: bool = False
    fp16: bool = False
    dataloader_workers: int = 0
    nonfinite: str = "stop"        # "stop" at the first non-finite loss or gradient, or "skip" such steps
    packing: bool = False          # each micro-batch's examples end to end in one row, no padding
    compile: bool = False          # torch.compile the model (Trainer's torch_compile, Inductor by default)
    compile_mode: Optional[str] = None  # torch.compile mode; None: "reduce-overhead" (CUDA graphs) on CUDA
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward (non-reentrant)
    fsdp: bool = False             # shard the model over the launched processes (FSDP2; fastdca.train.fsdp)
    auto_batch_size: bool = False  # out of memory: halve the micro-batch, double grad_accum (fastdca.train.memory)
    extra: dict = field(default_factory=dict)  # further TrainingArguments fields

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 when max_steps is not set, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {self.nonfinite!r}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_mode is not None and not self.compile:
            raise ValueError(f"compile_mode {self.compile_mode!r} needs compile (--compile)")


def compile_mode(settings: "TrainSettings", on_cuda: bool) -> Optional[str]:
    """The torch.compile mode of a compiled run: the one asked for, else "reduce-overhead" on CUDA (CUDA
    graphs replay each step's launches, so the host side stops setting the pace) and "default" elsewhere
    (CUDA graphs need a GPU); None when the run is not compiled."""
    if not settings.compile:
        return None
    return settings.compile_mode or ("reduce-overhead" if on_cuda else "default")
