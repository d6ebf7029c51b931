"""What the causal loss costs, before and after a change, side by side in one run: a training step of the
SmolLM2-135M shape (random weights, float32, B=4, T=128, L = L' = 20, M=10, H=2) against the floor, alpha 0
and PEFT's AdaptionPrompt (benchmarks/test_training_step.py's variants), in CPU time; and the bytes saved for
backward of one step of a 7B-shaped llama (hidden 4096, 32 heads, ffn 11008, vocab 32000, 4 layers all adapted
and causal, M=10, H=2, bf16, B=2, T=256).

Each tree runs in its own process (two versions of fastdca cannot share one), the two alternating `--runs`
times; within a process the variants alternate round by round and each keeps its fastest round. Times are the
process's CPU time per step (every thread's), which other load on the machine distorts less than wall time.

    python benchmarks/causal_loss_cost.py --before 5e8db6a          # writes the tables to stdout
    python benchmarks/causal_loss_cost.py --before 5e8db6a --no-7b  # the step times only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_VARIANTS = ["floor", "fastdca-alpha1", "fastdca-alpha0", "peft-adaption-prompt"]
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--runs", type=int, default=3, help="alternations of the two trees (default 3)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per variant and run (default 8)")
    parser.add_argument("--no-7b", dest="seven_b", action="store_false",
                        help="time the SmolLM2-shape steps only (the 7B shape's saved bytes take minutes)")
    parser.add_argument("--triton-interpreted", action="store_true",
                        help="instead: the op and the default causal loss, forward and backward, on the Triton "
                             "backend under Triton's interpreter (TRITON_INTERPRET=1), in CPU time")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker and os.environ.get("FASTDCA_COST_TRITON") == "1":
        print(json.dumps(measure_triton(args.worker, args.rounds)))
        return
    if args.worker:
        print(json.dumps(measure(args.worker, args.rounds, seven_b=os.environ.get("FASTDCA_COST_7B") == "1")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        # the package maps fastdca.kernels to the repository's kernels/ (setup.py): the same in the old tree
        (before / "fastdca" / "kernels").symlink_to(before / "kernels")
        try:
            trees = {"before": before, "after": ROOT}
            results = {name: [] for name in trees}
            for run in range(args.runs):
                for name, tree in trees.items():
                    env = dict(os.environ, FASTDCA_COST_7B="1" if run == 0 and args.seven_b else "0")
                    if args.triton_interpreted:
                        env.update(TRITON_INTERPRET="1", FASTDCA_COST_TRITON="1")
                    out = subprocess.run([sys.executable, __file__, "--before", args.before, "--worker", str(tree),
                                          "--rounds", str(args.rounds)], env=env, check=True, capture_output=True,
                                         text=True).stdout
                    results[name].append(json.loads(out.strip().splitlines()[-1]))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print(report_triton(results, args.before) if args.triton_interpreted else report(results, args.before))


def measure(tree, rounds, seven_b):
    """In a worker process: fastdca imported from `tree`; {"step": {variant: CPU seconds}, "saved_7b": {variant:
    bytes}}."""
    sys.path.insert(0, str(tree))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fastdca
    import torch

    assert Path(fastdca.__file__).resolve().is_relative_to(Path(tree).resolve()), fastdca.__file__
    import test_training_step as ts

    torch.manual_seed(0)
    state = ts.LlamaForCausalLM(ts.LlamaConfig(**ts.SMOLLM2)).state_dict()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ts.SMOLLM2["vocab_size"], (ts.B, ts.T), generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones(ts.B, ts.T, dtype=torch.long)}
    steps = {}
    for name in STEP_VARIANTS:
        model = ts.VARIANTS[name](ts.frozen_model(state)).train()
        steps[name] = ts.training_step_of(model, batch)
        steps[name]()                                   # warm-up
    fastest = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.process_time()
            step()
            fastest[name] = min(fastest[name], time.process_time() - start)
    result = {"step": fastest}
    del steps
    if seven_b:
        result["saved_7b"] = {name: seven_b_saved_bytes(ts, name) for name in STEP_VARIANTS}
    return result


TRITON_SHAPE = dict(B=2, Hq=4, Hkv=2, T=64, D=32, M=10, H=2, hidden=96)


def measure_triton(tree, rounds):
    """In a worker process under the interpreter: {"triton": {"xg=None": CPU seconds, "default loss": ...}}, the
    op's forward and backward on the Triton backend without the causal statistics, and with them and the
    default loss (variance="token", xg_space="hidden", o_proj a Linear) on their output."""
    sys.path.insert(0, str(tree))
    import inspect

    import fastdca
    import torch
    from fastdca.loss import layer_causal_loss
    from fastdca.ops import dca_attention

    assert Path(fastdca.__file__).resolve().is_relative_to(Path(tree).resolve()), fastdca.__file__
    s = TRITON_SHAPE
    g = torch.Generator().manual_seed(0)
    shapes = dict(q=(s["B"], s["Hq"], s["T"], s["D"]), k=(s["B"], s["Hkv"], s["T"], s["D"]),
                  v=(s["B"], s["Hkv"], s["T"], s["D"]), ak=(s["Hkv"], s["M"], s["D"]), av=(s["Hkv"], s["M"], s["D"]),
                  gate=(s["Hq"],))
    inputs = {n: torch.randn(*shape, generator=g).requires_grad_() for n, shape in shapes.items()}
    o_proj = torch.nn.Linear(s["Hq"] * s["D"], s["hidden"], bias=False).requires_grad_(False)
    takes_av = "av" in inspect.signature(layer_causal_loss).parameters      # the loss from the causal weights

    def step(with_loss):
        out, stats = dca_attention(**inputs, causal_len=s["H"], xg="token" if with_loss else None, backend="triton")
        loss = out.float().square().mean()
        if with_loss:
            extra = (inputs["av"],) if takes_av else ()
            loss = loss + layer_causal_loss(stats, *extra, variance="token", project=o_proj)
        loss.backward()

    fastest = {}
    for name, with_loss in (("xg=None", False), ("default loss", True)):
        step(with_loss)                                                        # warm-up
        fastest[name] = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            step(with_loss)
            fastest[name] = min(fastest[name], time.process_time() - start)
    return {"triton": fastest}


def report_triton(results, before):
    s = TRITON_SHAPE
    lines = [f"The Triton backend under the interpreter, forward and backward, B={s['B']} Hq={s['Hq']} Hkv={s['Hkv']} "
             f"T={s['T']} D={s['D']} M={s['M']} H={s['H']}, fp32, CPU seconds (fastest round; before = {before}):", "",
             "| | " + " | ".join(f"{tree}, run {i + 1}" for tree in ("before", "after")
                                 for i in range(len(results[tree]))) + " |",
             "|---|" + "---|" * (len(results["before"]) + len(results["after"]))]
    for name in ("xg=None", "default loss"):
        lines.append(f"| {name} | " + " | ".join(f"{run['triton'][name]:.2f} s" for tree in ("before", "after")
                                                for run in results[tree]) + " |")
    lines.append("| default loss / xg=None | " + " | ".join(
        f"{run['triton']['default loss'] / run['triton']['xg=None']:.3f}" for tree in ("before", "after")
        for run in results[tree]) + " |")
    return "\n".join(lines)


def seven_b_saved_bytes(ts, variant):
    import torch

    torch.manual_seed(0)
    config = ts.LlamaConfig(**SEVEN_B, attn_implementation="sdpa")
    model = ts.LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    if variant == "floor":       # a trainable zero vector on the hidden state entering the first layer, in bf16
        delta = torch.nn.Parameter(torch.zeros(SEVEN_B["hidden_size"], dtype=torch.bfloat16))
        model.floor_delta = delta
        model.model.layers[0].register_forward_pre_hook(lambda module, args: (args[0] + delta,) + args[1:])
    elif variant == "peft-adaption-prompt":
        from peft import AdaptionPromptConfig, get_peft_model

        model = get_peft_model(model, AdaptionPromptConfig(adapter_len=10, adapter_layers=4, task_type="CAUSAL_LM"))
    else:
        import fastdca

        model = fastdca.patch(model, fastdca.DCAConfig(adapter_layers=4, adapter_len=10, causal_len=2,
                                                       alpha=1.0 if variant == "fastdca-alpha1" else 0.0))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SEVEN_B["vocab_size"], (2, 256), generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones(2, 256, dtype=torch.long)}
    return ts.saved_activation_bytes(model, ts.training_step_of(model, batch))


def report(results, before):
    def ratios(run):
        floor = run["step"]["floor"]
        return {name: seconds / floor for name, seconds in run["step"].items()}

    lines = [f"CPU time per step / the floor's, SmolLM2-135M shape, each run a process (before = {before}, after = "
             "the working tree):", "",
             "| variant | " + " | ".join(f"before, run {i + 1}" for i in range(len(results["before"])))
             + " | " + " | ".join(f"after, run {i + 1}" for i in range(len(results["after"]))) + " |",
             "|---|" + "---|" * (len(results["before"]) + len(results["after"]))]
    for name in STEP_VARIANTS:
        cells = [f"{ratios(run)[name]:.3f}" for tree in ("before", "after") for run in results[tree]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "saved_7b" not in results["before"][0]:
        return "\n".join(lines)
    lines += ["", "Saved for backward, one step of the 7B shape (bf16, B=2, T=256, 4 layers adapted and causal):", "",
              "| variant | before | x alpha 0 | after | x alpha 0 |", "|---|---|---|---|---|"]
    saved = {tree: results[tree][0]["saved_7b"] for tree in ("before", "after")}
    for name in STEP_VARIANTS:
        cells = []
        for tree in ("before", "after"):
            cells += [f"{saved[tree][name] / 2**20:.1f} MiB", f"{saved[tree][name] / saved[tree]['fastdca-alpha0']:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
