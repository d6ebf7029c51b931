"""`python -m fastdca.cli` with accelerate's FSDP set up on the CPU, for tests/test_fsdp.py (run under torchrun).

accelerate applies FSDP only on GPUs and other accelerators; on the CPU (gloo) it silently falls back to
data parallelism. This script lets accelerate's FSDP2 path (fully_shard of each decoder layer, the sharded
optimizer) run on the CPU by setting what its device check withholds, so that `fastdca train --fsdp` is
tested through the same Trainer and accelerate code it runs on GPUs. With FSDP_TEST_SIGTERM="RANK:STEP",
that rank sends itself SIGTERM at the end of that step."""

import os
import signal
import sys

import accelerate.state
from accelerate.utils import DistributedType
from transformers import TrainerCallback

import fastdca.train
from fastdca.cli import main

_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


class SignalAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


if os.environ.get("FSDP_TEST_ON_CPU") == "1":
    accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
if os.environ.get("FSDP_TEST_SIGTERM"):
    rank, step = map(int, os.environ["FSDP_TEST_SIGTERM"].split(":"))
    if int(os.environ["RANK"]) == rank:
        _train = fastdca.train.train
        fastdca.train.train = lambda *a, callbacks=(), **k: _train(*a, callbacks=(*callbacks, SignalAtStep(step)), **k)

sys.exit(main(sys.argv[1:]))
