"""Sharded training for `fastdca train --fsdp`: FSDP2 (torch.distributed.fsdp.fully_shard) through Trainer and
accelerate. Every decoder layer is one sharded unit, its DCA parameters with it; under bf16/fp16 the layers
compute in that dtype while gradients are reduced in float32; a checkpoint holds the adapter and the
optimizer state of the DCA parameters, gathered into the same files as an unsharded run's, never the frozen
base's shards."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from fastdca.hf import decoder_layer_class_names


def trainer_options(model) -> dict:
    """The TrainingArguments fields that turn FSDP2 on for the patched `model`."""
    # newer transformers take fsdp=True with everything in fsdp_config (and deprecate the strategy string);
    # older ones read the strategy and the auto-wrap policy from the string alone
    legacy = not hasattr(TrainingArguments, "_apply_legacy_fsdp_to_config")
    return {"fsdp": "full_shard auto_wrap" if legacy else True,
            "fsdp_config": {"version": 2, "reshard_after_forward": True,
                            "transformer_layer_cls_to_wrap": decoder_layer_class_names(model)}}


def check_launch() -> None:
    """ValueError unless this process is one of several launched together (torchrun / accelerate launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards the model over several processes: launch it with `torchrun "
                         "--nproc-per-node N -m fastdca.cli train ... --fsdp` (or `accelerate launch`), N >= 2")


def check_applied(trainer) -> None:
    """ValueError when --fsdp was asked for but accelerate set up no FSDP (it shards on GPUs and other
    accelerators, not on the CPU): the run would silently hold the whole model on every rank."""
    if not trainer.is_fsdp_enabled:
        device = trainer.args.device.type
        raise ValueError(f"--fsdp: accelerate set up no FSDP on this machine (the run is on {device!r}; accelerate "
                         "shards on GPUs only); drop --fsdp to train data-parallel (every rank holds the model)")


class ShardingCheck(TrainerCallback):
    """When training begins (accelerate has sharded the model by then): RuntimeError unless the decoder layers
    are FSDP2 units; rank 0 says how the model is sharded."""

    def __init__(self, model):
        self.layer_classes = set(decoder_layer_class_names(model))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        layers = [m for m in units if self.layer_classes & {c.__name__ for c in type(m).__mro__}]
        if not layers:
            raise RuntimeError(f"--fsdp: no decoder layer ({', '.join(sorted(self.layer_classes))}) was sharded; "
                               "the model would be held whole on every rank")
        if state.is_world_process_zero:
            print(f"fastdca: FSDP2 shards the model over {args.world_size} processes in {len(units)} units "
                  f"({len(layers)} decoder layers, each with its DCA parameters)", flush=True)


def reduce_in_float32(trainer) -> None:
    """Under bf16/fp16 mixed precision (accelerate's policy: parameters and gradient reduction in that
    dtype) keep the compute dtype and reduce gradients in float32."""
    plugin = trainer.accelerator.state.fsdp_plugin
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is not None:
        plugin.mixed_precision_policy = precision_policy(policy.param_dtype)


def precision_policy(compute_dtype: torch.dtype):
    """FSDP2's MixedPrecisionPolicy for DCA: the layers (frozen base and DCA parameters, kept in float32 as
    their sharded master copies) gathered and computed in `compute_dtype`, gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return dataclasses.replace(MixedPrecisionPolicy(), param_dtype=compute_dtype, reduce_dtype=torch.float32)


def save_optimizer(model, optimizer, path) -> None:
    """The optimizer's state, gathered whole (a collective: every rank calls); rank 0 writes it to `path`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save(state, path)


def load_optimizer(model, optimizer, path) -> None:
    """The optimizer state save_optimizer wrote, each rank taking its shards (every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
