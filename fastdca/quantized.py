"""bitsandbytes 4-bit weights that autograd can pass through, on the CPU.

On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weights the first time the layer runs in
eval mode on an input that needs no gradient ("packing_format_for_cpu", for faster inference) and
keeps that layout for good (it only undoes it to save a state dict). From then on every forward goes
through `gemv_4bit`, which has no autograd formula: the output is computed, but no gradient reaches
the input. For DCA that silently drops the adapter prompt's gradient through k_proj/v_proj and every
gradient through the frozen projections above the lowest adapter, after any eval-mode forward (a
generate, an evaluation) of the same model, or within a forward that builds a graph in eval mode.
`Linear4bitGradients` keeps the repacking off during forwards that build a graph, undoing it where it
happened, and lets bitsandbytes repack for inference otherwise.
"""

from __future__ import annotations

import sys


class Linear4bitGradients:
    """The bitsandbytes Linear4bit modules of one model and whether bitsandbytes may repack each."""

    def __init__(self, model):
        classes = sys.modules.get("bitsandbytes.nn.modules")
        found = [] if classes is None else [m for m in model.modules() if isinstance(m, classes.Linear4bit)]
        self.modules = [m for m in found if hasattr(m, "support_avx512bf16_for_cpu")]
        self.repack_allowed = [m.support_avx512bf16_for_cpu for m in self.modules]

    def before_forward(self, builds_graph: bool) -> None:
        """Before a forward: with a graph to build, no repacking and none left from earlier forwards;
        without, bitsandbytes' own choice."""
        for module, allowed in zip(self.modules, self.repack_allowed):
            module.support_avx512bf16_for_cpu = allowed and not builds_graph
            if builds_graph:
                _unpack(module)

    def restore(self) -> None:
        """bitsandbytes' own choice on every module again (unpatch)."""
        for module, allowed in zip(self.modules, self.repack_allowed):
            module.support_avx512bf16_for_cpu = allowed


def _unpack(module) -> None:
    quant_state = getattr(module.weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    inverse = getattr(sys.modules["bitsandbytes.nn.modules"], "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise RuntimeError("bitsandbytes repacked this model's 4-bit weights for CPU inference (an eval-mode "
                           "forward) and this version offers no way back, so no gradient would pass through "
                           "them; reload the model, or call model.train() before its first forward")
    module.weight.data, module.weight.quant_state = inverse(module.weight.data, quant_state)
