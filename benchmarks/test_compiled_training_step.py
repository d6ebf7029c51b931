"""torch.compile: one training step of the SmolLM2-135M-shaped model (random weights), compiled against eager.

Side by side in one run: the floor (docs/DESIGN.md section 6) and fastdca (alpha = 1, L' = L), each eager
and compiled with torch.compile's default backend, Inductor, as `fastdca train --compile` does. The
compiled variants are warmed up (compiled) before the timed rounds; `python benchmarks/report.py`
turns the times into compiled/eager ratios and ratios to the floor compiled the same way.

On a busy machine the load changes between one variant's rounds and the next's:
`python benchmarks/test_compiled_training_step.py [rounds]` times the four side by side instead, one step
of each in turn per round, and prints the ratios of their fastest steps.
"""

import sys
import time

import pytest
import torch

from transformers import LlamaConfig, LlamaForCausalLM

from test_training_step import (SMOLLM2, B, DEVICE, L, M, T, base_state, batch, fastdca_model, floor,  # noqa: F401
                                frozen_model, training_step_of)

# the cheaper causal loss, as when these results were recorded: compiling, not the definition, is measured
VARIANTS = {"floor": floor, "fastdca-alpha1-sample-head": fastdca_model(1.0, variance="sample", xg_space="head")}


def training_step(base_state, batch, variant, compiled):  # noqa: F811
    """One warmed-up training step of `variant`, eager or compiled, as a function."""
    model = VARIANTS[variant](frozen_model(base_state))
    model.train()
    step = training_step_of(model, batch, torch.compile(model) if compiled else None)
    for _ in range(2):  # compilation (the backward compiles at its first call), then one cached run
        step()
    return step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_training_step(benchmark, base_state, batch, variant, compiled):  # noqa: F811
    torch._dynamo.reset()
    step = training_step(base_state, batch, variant, compiled)
    benchmark.group = f"compiled training step SmolLM2-135M B={B} T={T} L={L} M={M} {DEVICE}"
    benchmark.extra_info.update(step_variant=variant, compiled=compiled, device=DEVICE)
    benchmark.pedantic(step, rounds=8, warmup_rounds=1)


def interleaved(rounds: int) -> dict:
    """{(variant, compiled): fastest step in seconds}, the four steps timed in turn in every round."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).state_dict()
    ids = torch.randint(0, SMOLLM2["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    steps = {(v, c): training_step(base, inputs, v, c) for v in VARIANTS for c in (False, True)}
    fastest = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            fastest[key] = min(fastest[key], time.perf_counter() - start)
    return fastest


if __name__ == "__main__":
    times = interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
    print(f"one training step, SmolLM2-135M shape, B={B} T={T} L={L} M={M}, {DEVICE}, fastest of each:")
    for variant in VARIANTS:
        eager, compiled = times[(variant, False)], times[(variant, True)]
        print(f"  {variant:15s} eager {eager * 1e3:6.0f} ms  compiled {compiled * 1e3:6.0f} ms  "
              f"compiled/eager {compiled / eager:.3f}  eager x floor {eager / times[('floor', False)]:.3f}  "
              f"compiled x floor {compiled / times[('floor', True)]:.3f}")
