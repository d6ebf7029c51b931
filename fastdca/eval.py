"""Accuracy on a task from batched greedy generation with the KV cache."""

from __future__ import annotations

import json
from typing import Optional

import torch
from tqdm.auto import tqdm

from fastdca.io import atomic_write_text
from fastdca.tasks import Example, Task


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], *, batch_size: int = 16,
                       max_new_tokens: int = 32, progress: bool = True, desc: str = "eval") -> list[str]:
    """Greedy continuations of `prompts`, in batches, left-padded so every prompt ends where generation
    starts. Returns the decoded new tokens of each prompt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, use_cache=True)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return responses


def evaluate(model, tokenizer, task: Task, examples: list[Example], *, batch_size: int = 16,
             max_new_tokens: Optional[int] = None, predictions_path=None, progress: bool = True) -> dict:
    """Generate for every example, score with the task's answer extraction, and (optionally) write one
    JSON line per example to `predictions_path`. Returns {"accuracy", "correct", "total"}."""
    responses = generate_responses(model, tokenizer, [ex.prompt for ex in examples], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens or task.max_new_tokens, progress=progress,
                                   desc=f"eval {task.name}")
    rows = task.score(responses, examples)
    if predictions_path is not None:
        write_jsonl(predictions_path, rows)
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows) if rows else 0.0, "correct": correct, "total": len(rows)}


def write_jsonl(path, rows) -> None:
    """One JSON object a line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
