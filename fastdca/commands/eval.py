"""Accuracy on a task from batched greedy generation with the KV cache, and the spread of X_G across the
evaluated samples (`fastdca eval --xg-stats`). Out of memory, both raise fastdca.out_of_memory.OutOfMemory naming the
batch; with auto_batch_size they halve the batch until it fits, keeping the batches already done."""

from __future__ import annotations

import json
from typing import Optional

import torch
from tqdm.auto import tqdm

from fastdca.out_of_memory import OutOfMemory, out_of_memory_cause, search_batch_size, what_ran_out
from fastdca.io import atomic_write_text
from fastdca.tasks import Example, Task


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], *, batch_size: int = 16,
                       max_new_tokens: int = 32, progress: bool = True, desc: str = "eval",
                       auto_batch_size: bool = False) -> list[str]:
    """Greedy continuations of `prompts`, in batches, left-padded so every prompt ends where generation
    starts. Returns the decoded new tokens of each prompt. Out of memory: OutOfMemory naming the batch, or with
    auto_batch_size the batch is halved until it fits (the prompts already answered are kept)."""
    responses = []
    current = {}

    def generate(size):
        for batch in prompt_batches(model, tokenizer, prompts[len(responses):], size, "left", desc, progress):
            current.update(batch=batch["input_ids"].shape[0], tokens=batch["input_ids"].shape[1])
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, use_cache=True)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))

    def doing(size):
        rows = (f"a batch of {current['batch']} prompts of up to {current['tokens']} tokens" if current
                else f"a batch of {size} prompts")
        return f"generating for {rows} (batch size {size}, up to {max_new_tokens} new tokens)"

    fit_batches(generate, batch_size, auto_batch_size, doing)
    return responses


def fit_batches(run, batch_size: int, auto_batch_size: bool, doing) -> int:
    """`run(batch_size)`; with auto_batch_size, after an out-of-memory error run(half of it) and so on
    (fastdca.out_of_memory.search_batch_size), the batch it settled on printed once. An out-of-memory error that is
    not searched past becomes OutOfMemory, `doing(the batch size)` naming the step. Returns the batch size
    that ran."""
    tried = {"size": batch_size}

    def attempt(size):
        tried["size"] = size
        run(size)
        return size

    try:
        if not auto_batch_size:
            return attempt(batch_size)
        settled = search_batch_size(attempt, batch_size, lambda size: size // 2 or None)
        print(f"--auto-batch-size: batches of {settled} fit")
        return settled
    except BaseException as error:
        cause = out_of_memory_cause(error)
        if cause is None:
            raise
        what, allocation = what_ran_out(cause)
        raise OutOfMemory(what, doing(tried["size"]), command="eval", stage="generate", batch_size=tried["size"],
                          allocation=allocation) from cause


def prompt_batches(model, tokenizer, prompts: list[str], batch_size: int, padding_side: str, desc: str,
                   progress: bool):
    """The prompts tokenized in batches, padded on `padding_side`, on the model's device, with the model in
    eval mode; the model's mode and the tokenizer's padding side are restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    saved_side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True):
            yield tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)


def evaluate(model, tokenizer, task: Task, examples: list[Example], *, batch_size: int = 16,
             max_new_tokens: Optional[int] = None, predictions_path=None, progress: bool = True,
             auto_batch_size: bool = False) -> dict:
    """Generate for every example, score with the task's answer extraction, and (optionally) write one
    JSON line per example to `predictions_path`.

    Args:
        model: a causal LM, patched or not (with an adapter: `fastdca.load_adapter(model, folder)` first).
        tokenizer: its tokenizer (the pad token defaults to EOS).
        task: the `fastdca.tasks.Task` that extracts and scores the answers.
        examples: the examples to score, e.g. `task.examples("test")`.
        batch_size: prompts generated together (greedy, left-padded, with the KV cache).
        max_new_tokens: the longest continuation; None = the task's.
        predictions_path: a JSONL file to write (atomically), one scored row per example; None = none.
        progress: show a progress bar.
        auto_batch_size: out of memory, halve the batch until it fits (else raise OutOfMemory).

    Returns:
        {"accuracy": correct / total (0.0 with no examples), "correct": int, "total": int}.

    Raises:
        OutOfMemory (fastdca.errors, a RuntimeError): a batch did not fit (with auto_batch_size, not even one
            prompt); it names the batch and what to change, and is raised from the original error.
    """
    responses = generate_responses(model, tokenizer, [ex.prompt for ex in examples], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens or task.max_new_tokens, progress=progress,
                                   desc=f"eval {task.name}", auto_batch_size=auto_batch_size)
    rows = task.score(responses, examples)
    if predictions_path is not None:
        write_jsonl(predictions_path, rows)
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows) if rows else 0.0, "correct": correct, "total": len(rows)}


XG_VARIANCE_DEFINITION = (
    "per adapted layer: x_n = the mean of X_G (before o_proj) over the tokens of prompt n, (Hq, D); variance = "
    "the unbiased variance over the prompts of x_n, averaged over (head, dim), the causal loss's "
    "variance='sample', xg_space='head'; mean_square = the mean over (prompt, head, dim) of x_n^2; "
    "relative_variance = variance / mean_square")


@torch.no_grad()
def xg_variance(model, tokenizer, prompts: list[str], *, batch_size: int = 16, progress: bool = True,
                auto_batch_size: bool = False) -> dict:
    """Var(X_G) across `prompts`, per adapted layer of a patched `model`, as the causal loss measures it.

    x_n = the mean of X_G (before o_proj) over the real tokens of prompt n, (Hq, D), from one forward over
    the prompts (right-padded batches, the tokenizer's special tokens included, as generation reads them);
    variance = mean over (h, d) of the unbiased Var_n(x_n), i.e. the causal loss's variance="sample",
    xg_space="head" over the whole set instead of one batch. mean_square = mean over (n, h, d) of x_n^2 puts
    it on X_G's own scale (an adapter can lower the variance by shrinking X_G): relative_variance =
    variance / mean_square (None when X_G is 0, e.g. zero gates). The moments are accumulated per batch
    in float64 (Chan et al.'s pairwise update), so the memory does not grow with the number of prompts.

    Args:
        model: a patched model (`fastdca.patch` or `fastdca.load_adapter`).
        tokenizer: its tokenizer.
        prompts: the prompt texts, e.g. a task's test prompts.
        batch_size: prompts run together in one forward.
        progress: show a progress bar.
        auto_batch_size: out of memory, halve the batch until it fits (else raise OutOfMemory).

    Returns:
        {"definition": how each number is computed, "samples": the prompts counted, "layers": one row per
        adapted layer, {"layer", "causal_layer" (one of the top L' layers the causal loss averages),
        "variance", "mean_square", "relative_variance"}}; variance is None with fewer than two prompts.
    """
    from fastdca.hf import adapted_layers, get_config, record_adapter_attention

    layers = adapted_layers(model)
    causal = set(layers[len(layers) - get_config(model).causal_layers:])
    moments = {i: _RunningMoments() for i in layers}
    done = {"prompts": 0, "tokens": None}

    def measure(size):
        for batch in prompt_batches(model, tokenizer, prompts[done["prompts"]:], size, "right", "X_G statistics",
                                    progress):
            done["tokens"] = batch["input_ids"].shape[1]
            with record_adapter_attention(model) as records:
                model(**batch)
            means = {}
            for i, record in records.items():
                real = record.real.to(record.xg.dtype)[:, :, None, None]                     # (B, T, 1, 1)
                counts = real.sum(1)
                means[i] = (record.xg * real).sum(1) / counts.clamp(min=1)                   # (B, Hq, D)
                # a prompt with no real token has no mean, as in the causal loss
                means[i] = means[i][counts.flatten() > 0].flatten(1).to("cpu", torch.float64)
            for i, rows in means.items():       # added once the whole batch is measured: a retry repeats none
                moments[i].add(rows)
            done["prompts"] += batch["input_ids"].shape[0]

    fit_batches(measure, batch_size, auto_batch_size,
                lambda size: f"measuring X_G for a batch of {size} prompts"
                             + (f" of up to {done['tokens']} tokens" if done["tokens"] else ""))
    rows = []
    for i in layers:
        m = moments[i]
        variance = m.variance()
        mean_square = m.mean_square()
        rows.append({"layer": i, "causal_layer": i in causal, "variance": variance, "mean_square": mean_square,
                     "relative_variance": variance / mean_square if variance is not None and mean_square else None})
    return {"definition": XG_VARIANCE_DEFINITION, "samples": moments[layers[0]].count, "layers": rows}


def xg_variance_table(stats: dict) -> str:
    """`xg_variance`'s rows as a text table; * marks the top L' layers the causal loss averages."""
    def number(x):
        return "-" if x is None else f"{x:.4g}"

    lines = [f"Var(X_G) across {stats['samples']} samples (x_n = prompt n's token-mean X_G)",
             f"{'layer':>6}  {'Var(X_G)':>10}  {'mean x^2':>10}  {'Var / mean x^2':>14}"]
    for row in stats["layers"]:
        mark = "*" if row["causal_layer"] else " "
        lines.append(f"{row['layer']:>5}{mark}  {number(row['variance']):>10}  {number(row['mean_square']):>10}  "
                     f"{number(row['relative_variance']):>14}")
    return "\n".join(lines)


class _RunningMoments:
    """Count, mean and sum of squared deviations of rows (n, F) added a chunk at a time, float64."""

    def __init__(self):
        self.count = 0
        self.mean = self.squared_deviations = self.sum_of_squares = None

    def add(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(0)
        squared_deviations = (rows - mean).square().sum(0)
        if self.count == 0:
            self.mean, self.squared_deviations, self.sum_of_squares = mean, squared_deviations, rows.square().sum(0)
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.squared_deviations = (self.squared_deviations + squared_deviations
                                       + delta.square() * (self.count * n / total))
            self.sum_of_squares = self.sum_of_squares + rows.square().sum(0)
        self.count += n

    def variance(self) -> Optional[float]:
        """The unbiased variance over the rows, averaged over the F columns; None with fewer than two rows."""
        return float((self.squared_deviations / (self.count - 1)).mean()) if self.count >= 2 else None

    def mean_square(self) -> Optional[float]:
        return float(self.sum_of_squares.mean() / self.count) if self.count else None


def write_json(path, data) -> None:
    """`data` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False))


def write_jsonl(path, rows) -> None:
    """One JSON object a line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
