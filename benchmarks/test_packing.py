"""Padded against packed training (`fastdca train --packing`), side by side in one run.

Model level: SmolLM2-135M-Instruct patched with fastdca (alpha = 1, L = 20, M = 10), a fixed sample of
real training examples of the word-problem mix (math_data.json) and of Letter Concatenation, tokenized
as `fastdca train` does, in micro-batches of 8: each round runs forward and backward on every
micro-batch, padded (PadCollator) or packed (DataCollatorWithFlattening), so both see the same
examples and the same real tokens. Records real tokens per second and the bytes saved for backward.

Op level: the torch backend's attention over packed sequences, one SDPA call per sequence, against one
SDPA call with a block-diagonal (S, S) mask and against the padded batch.
"""

import random
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

import fastdca
from fastdca.ops import packed_causal_attention
from fastdca.tasks import get_task
from fastdca.train import PadCollator, tokenize_examples
from test_training_step import saved_activation_bytes

BATCH, BATCHES = 8, 6
TASKS = {"word-problems": ("gsm8k", 256), "letter-concat": ("letter_concat", 128)}


@pytest.fixture(scope="module")
def smollm2():
    from fastdca.commands.models import load_smollm2

    model, tokenizer = load_smollm2(device="cpu")
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=20, adapter_len=10, causal_len=2, alpha=1.0,
                                           variance="sample", xg_space="head"),
                  backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)   # non-zero gates, as after training
    model.train()
    return model, tokenizer


def micro_batches(task_key, tokenizer):
    name, max_length = TASKS[task_key]
    examples = get_task(name).examples("train")
    picked = random.Random(0).sample(examples, BATCH * BATCHES)
    rows = tokenize_examples(picked, tokenizer, max_length)
    return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]


@pytest.mark.parametrize("task_key", list(TASKS))
def test_padded_vs_packed_training(benchmark, smollm2, task_key):
    """Each round times one pass over the micro-batches padded, then one packed: interleaved, so that
    other work on a shared machine slows both alike. The ratio uses each layout's fastest pass."""
    model, tokenizer = smollm2
    chunks = micro_batches(task_key, tokenizer)
    collators = {"padded": PadCollator(tokenizer.pad_token_id),
                 "packed": DataCollatorWithFlattening(return_flash_attn_kwargs=True)}
    batches = {layout: [collate(rows) for rows in chunks] for layout, collate in collators.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def one_batch(batch):
        for p in trainable:
            p.grad = None
        model(**batch).loss.backward()

    seconds = {layout: [] for layout in batches}

    def both_layouts():
        for layout, layout_batches in batches.items():
            started = time.perf_counter()
            for batch in layout_batches:
                one_batch(batch)
            seconds[layout].append(time.perf_counter() - started)

    benchmark.group = f"padded vs packed training, SmolLM2-135M, {BATCHES} micro-batches of {BATCH}, cpu"
    benchmark.pedantic(both_layouts, rounds=3, warmup_rounds=1)
    info = {"packing_task": task_key, "real_tokens": sum(len(r["input_ids"]) for rows in chunks for r in rows)}
    for layout, layout_batches in batches.items():
        saved = [saved_activation_bytes(model, lambda b=b: one_batch(b)) for b in layout_batches]
        info[layout] = dict(seconds=min(seconds[layout][1:]),      # the warm-up round excluded
                            computed_tokens=sum(b["input_ids"].numel() for b in layout_batches),
                            saved_bytes_mean=sum(saved) / len(saved))
    benchmark.extra_info.update(info)


LENGTHS = [73, 144, 120, 200, 160, 98, 250, 110]   # word-problem-like lengths (tokens)


@pytest.mark.parametrize("impl", ["per-sequence", "block-diagonal-mask", "padded"])
def test_packed_attention_cpu(benchmark, impl):
    torch.manual_seed(0)
    S, Hq, Hkv, D = sum(LENGTHS), 9, 3, 64
    cu = torch.tensor([0] + LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if impl == "padded":
        shape_q, shape_k = (len(LENGTHS), Hq, max(LENGTHS), D), (len(LENGTHS), Hkv, max(LENGTHS), D)
    else:
        shape_q, shape_k = (1, Hq, S, D), (1, Hkv, S, D)
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_k, requires_grad=True)
    v = torch.randn(shape_k, requires_grad=True)
    ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    block_diagonal = (ids[:, None] == ids[None, :]) & torch.ones(S, S, dtype=torch.bool).tril()

    def attend():
        if impl == "per-sequence":
            return packed_causal_attention(q, k, v, cu)
        if impl == "block-diagonal-mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def step():
        q.grad = k.grad = v.grad = None
        attend().sum().backward()

    benchmark.group = f"packed attention fwd+bwd, {len(LENGTHS)} sequences of {S} tokens, Hq={Hq} Hkv={Hkv} D={D}, cpu"
    benchmark.extra_info.update(packed_attention=impl)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
