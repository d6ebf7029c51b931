"""torch.compile: one training step of the SmolLM2-135M-shaped model (random weights), compiled against eager.

Side by side in one run: the floor (DESIGN.md section 6) and fastdca (alpha = 1, L' = L), each eager
and compiled with torch.compile's default backend, Inductor, as `fastdca train --compile` does. The
compiled variants are warmed up (compiled) before the timed rounds; `python benchmarks/report.py`
turns the times into compiled/eager ratios and ratios to the floor compiled the same way.
"""

import pytest
import torch

from test_training_step import B, DEVICE, L, M, T, base_state, batch, fastdca_model, floor, frozen_model  # noqa: F401

VARIANTS = {"floor": floor, "fastdca-alpha1": fastdca_model(1.0)}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_training_step(benchmark, base_state, batch, variant, compiled):  # noqa: F811
    torch._dynamo.reset()
    model = VARIANTS[variant](frozen_model(base_state))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if compiled else model

    def step():
        for p in trainable:
            p.grad = None
        forward(**batch).loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # compilation (the backward compiles at its first call), then one cached run
        step()
    benchmark.group = f"compiled training step SmolLM2-135M B={B} T={T} L={L} M={M} {DEVICE}"
    benchmark.extra_info.update(step_variant=variant, compiled=compiled, device=DEVICE)
    benchmark.pedantic(step, rounds=8, warmup_rounds=1)
