"""The errors fastdca raises when a run or a file goes wrong; each message names what and where. Out of memory
has its own module, fastdca.out_of_memory."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter or checkpoint folder that cannot be used (damaged, incomplete, or from another model
    or config). The message names the file and what is wrong; the model is left as it was."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient stopped training (or, with nonfinite="skip", too many in a row)."""

    def __init__(self, step: int, ce, causal_loss, detail: str, kept: str = ""):
        self.step, self.ce, self.causal_loss, self.detail, self.kept = step, ce, causal_loss, detail, kept
        super().__init__(f"training diverged at step {step}: {detail} (ce={ce}, causal_loss={causal_loss})"
                         f"{'; ' + kept if kept else ''}. Lower the learning rate, or pass --nonfinite skip to "
                         "skip such steps")


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written; running the same command
    again resumes from it. `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint written to {checkpoint}. "
                         "Run the same command again to resume from it")
