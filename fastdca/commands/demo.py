"""`fastdca demo`: SmolLM2-135M-Instruct on Letter Concatenation, evaluated before and after DCA.

The base model is evaluated on held-out names (the second-last-letter variant the paper reports),
patched with DCA, fine-tuned for a few minutes, evaluated again on the same names; a before/after
table is printed and the CE, causal-loss and gradient-share curves are written as a PNG.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastdca.config import DCAConfig
from fastdca.io import atomic_write


def demo(*, model: str = "smollm2", steps: int = 150, batch_size: int = 8, learning_rate: float = 1e-2,
         n_test: int = 100, output_dir="fastdca-demo", progress: bool = True, overwrite: bool = False,
         auto_batch_size: bool = False) -> dict:
    """Run the demo; returns {"before", "after", "train_seconds", "plot", ...}. An interrupted demo resumes
    from its checkpoint; a finished one is reused (its adapter loaded, no training) unless overwrite. Out of
    memory raises fastdca.out_of_memory.OutOfMemory advising `fastdca demo`'s options; auto_batch_size halves the
    micro-batch (the same examples a step) and the evaluation's batches until they fit."""
    from fastdca.out_of_memory import OutOfMemory

    try:
        return _demo(model=model, steps=steps, batch_size=batch_size, learning_rate=learning_rate, n_test=n_test,
                     output_dir=output_dir, progress=progress, overwrite=overwrite, auto_batch_size=auto_batch_size)
    except OutOfMemory as error:
        raise error.for_command("demo") from error.__cause__


def _demo(*, model, steps, batch_size, learning_rate, n_test, output_dir, progress, overwrite, auto_batch_size):
    import torch

    from fastdca.commands.eval import evaluate
    from fastdca.commands.models import load_model, load_smollm2
    from fastdca.hf import describe, patch
    from fastdca.tasks import LetterConcatenation
    from fastdca.train import TrainSettings, train

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    output_dir = Path(output_dir)
    started = time.perf_counter()
    # Trained on the variant it is tested on, with names never seen in training: the shortest route
    # to a visible gain for a 135M model (docs/DESIGN.md section 7).
    task = LetterConcatenation(n_train=steps * batch_size, n_test=n_test, train_variants=("second_last",))
    test = task.examples("test")
    torch.manual_seed(0)
    net, tokenizer = load_smollm2() if model == "smollm2" else load_model(model)
    print(f"model: {model}; task: Letter Concatenation (second-last letters), {len(test)} held-out names")

    before = evaluate(net, tokenizer, task, test, batch_size=25, progress=progress,
                      predictions_path=output_dir / "predictions_before.jsonl", auto_batch_size=auto_batch_size)
    config = DCAConfig(adapter_layers=min(20, net.config.num_hidden_layers), adapter_len=10, causal_len=2,
                       causal_layers=min(task.causal_layers, net.config.num_hidden_layers), alpha=1.0)
    patch(net, config)
    print(describe(net))
    settings = TrainSettings(max_steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                             warmup=0.05, lr_scheduler="cosine", max_length=128,
                             save_steps=max(steps // 2, 1), logging_steps=max(steps // 30, 1),
                             auto_batch_size=auto_batch_size)
    train_started = time.perf_counter()
    history = train(net, tokenizer, task.examples("train"), output_dir / "adapter", config=config,
                    settings=settings, progress=progress, overwrite=overwrite)
    train_seconds = time.perf_counter() - train_started
    after = evaluate(net, tokenizer, task, test, batch_size=25, progress=progress,
                     predictions_path=output_dir / "predictions_after.jsonl", auto_batch_size=auto_batch_size)
    plot = plot_losses(history, output_dir / "losses.png", accuracy=(before["accuracy"], after["accuracy"]))

    total = time.perf_counter() - started
    print()
    print(f"{'':24}{'accuracy':>10}{'correct':>10}")
    print(f"{'base model':24}{before['accuracy']:>10.1%}{before['correct']:>7}/{before['total']}")
    print(f"{'after DCA (%d steps)' % steps:24}{after['accuracy']:>10.1%}{after['correct']:>7}/{after['total']}")
    print(f"\ntraining {train_seconds:.0f} s, whole demo {total:.0f} s; adapter in {output_dir / 'adapter'}, "
          f"loss curves in {plot}")
    return {"before": before, "after": after, "train_seconds": train_seconds, "total_seconds": total,
            "plot": str(plot), "history": history}


def plot_losses(history: list[dict], path: Path, accuracy=None) -> Path:
    """CE, causal loss and the causal term's share of the adapter gradient against the step, as a PNG;
    `accuracy` ((before, after) fractions) goes in the title. CE starts an order of magnitude above where
    it settles, so it is drawn on a log scale, which keeps the later steps readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ce_ax, causal_ax, share_ax) = plt.subplots(1, 3, figsize=(14, 4))
    ce_ax.semilogy(steps, [h["ce"] for h in history], color="tab:blue")
    ce_ax.set(title="cross-entropy", xlabel="step", ylabel="CE (nats per token, log scale)")
    causal_ax.plot(steps, [h["causal_loss"] for h in history], color="tab:orange")
    causal_ax.set(title="causal loss", xlabel="step", ylabel="L_causal (variance of X_G)")
    shares = [(h["step"], h["grad_share"]) for h in history if h.get("grad_share")]
    if shares:
        share_ax.semilogy(*zip(*shares), color="tab:green")
    share_ax.set(title="causal term's share of the adapter gradient", xlabel="step",
                 ylabel="||d term|| / ||d CE|| (log scale)")
    if accuracy is not None:
        before, after = accuracy
        fig.suptitle(f"DCA training: held-out accuracy {before:.0%} before, {after:.0%} after")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
