"""The training data as Trainer reads it: examples tokenized with the prompt masked out of the labels, and
the collators that batch them (padded, padded to a few widths for a compiled run, or packed)."""

from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

from fastdca.tasks import Example

IGNORE_INDEX = -100


def length_buckets(max_length: int, smallest: int = 16) -> tuple:
    """The row widths a compiled run pads its batches to: powers of two from `smallest` below max_length,
    then max_length. A compiled step is specialised (and under CUDA graphs recorded) per shape: a few
    widths keep it to a few compilations, at most twice the tokens of the longest row."""
    widths = []
    width = smallest
    while width < max_length:
        widths.append(width)
        width *= 2
    return tuple(widths) + (max_length,)


def tokenize_examples(examples: list[Example], tokenizer, max_length: int) -> list[dict]:
    """prompt + target + EOS as input_ids, with the prompt tokens masked out of the labels.

    Raises ValueError, before any training, when a prompt leaves no room for its answer within
    max_length. Targets longer than the room left are truncated (the prompt is never cut).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; fastdca needs one to end the training targets")
    rows = []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"max_length={max_length} is too short for the prompts: example {ex.id!r} has a "
                             f"{len(prompt_ids)}-token prompt; use --max-length {len(prompt_ids) + 32} or more")
        target_ids = target_ids[:room]
        rows.append({"input_ids": prompt_ids + target_ids,
                     "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids})
    return rows


class PadCollator:
    """Right-pads input_ids (with the pad token), labels (with -100) and builds the attention mask, to
    the longest row of the batch, or with `buckets` (increasing widths) to the narrowest bucket that holds
    it. Padding to a bucket changes no loss: the pads are masked out of attention, CE and the causal loss."""

    def __init__(self, pad_token_id: int, buckets=None):
        self.pad_token_id = pad_token_id
        self.buckets = tuple(buckets) if buckets else None

    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        if self.buckets is not None:
            width = next((b for b in self.buckets if b >= width), width)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}


def packing_collator():
    """transformers' DataCollatorWithFlattening: a micro-batch's examples end to end in one row, position_ids
    restarting at 0 for each and the boundaries as cu_seq_lens_q/k, which fastdca.patch reads; the first
    label of each example is masked, so no example is trained to predict the next one's first token."""
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)
