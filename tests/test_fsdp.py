"""DCA under FSDP2 (torch.distributed.fsdp.fully_shard): two gloo processes, each with its decoder layers and
root sharded and half of the batch, train as one process on the whole batch does (losses and adapter), and
save the whole adapter once, which a sharded model loads back."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import fastdca
from fastdca.patch import adapter_state_dict

from test_distributed import free_port

WORLD = 2
STEPS = 2
CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")


def batches(layout, seed):
    """Per step, the whole batch: {"input_ids", "labels", ...}. Each rank's half has as many label tokens
    as the other's, so the mean of the ranks' CE is the CE of the whole batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        if layout == "packed":        # one row per rank, two sequences each (lengths 5 + 7), position_ids restarting
            ids = torch.randint(0, CONFIG["vocab_size"], (WORLD, 12), generator=g)
            positions = torch.cat([torch.arange(5), torch.arange(7)]).expand(WORLD, 12)
            # no sequence is trained to predict the next one's first token (DataCollatorWithFlattening's rule)
            labels = ids.masked_fill(positions == 0, -100)
            out.append(dict(input_ids=ids, labels=labels, position_ids=positions))
        else:                          # two rows per rank: one full, one with 3 left pads
            ids = torch.randint(0, CONFIG["vocab_size"], (2 * WORLD, 9), generator=g)
            mask = torch.ones_like(ids)
            mask[1::2, :3] = 0
            out.append(dict(input_ids=ids, labels=ids.masked_fill(mask == 0, -100), attention_mask=mask))
    return out


def rank_part(batch, rank, layout):
    if layout == "packed":
        return {k: v[rank:rank + 1] for k, v in batch.items()}
    return {k: v[2 * rank:2 * rank + 2] for k, v in batch.items()}


def as_one_row(batch):
    """The packed batch of all ranks as one row (its four sequences end to end)."""
    return {k: v.reshape(1, -1) for k, v in batch.items()}


def patched_model(variance, xg_space, checkpointing):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).requires_grad_(False)
    fastdca.patch(model, fastdca.DCAConfig(adapter_layers=2, adapter_len=4, causal_len=2, alpha=1.0,
                                           variance=variance, xg_space=xg_space))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter_state_dict(model).items():
            if name.endswith("gate"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)     # open gates: the adapter term counts
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def train_steps(model, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    losses = []
    for batch in steps:
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((out.loss.detach().clone(), out.causal_loss.detach().clone()))
    return losses


def worker(rank, port, variance, xg_space, layout, checkpointing, folder, results):
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = patched_model(variance, xg_space, checkpointing)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        losses = train_steps(model, [rank_part(b, rank, layout) for b in batches(layout, 3)])
        adapter = {name: p.full_tensor().detach().clone() for name, p in adapter_state_dict(model).items()}
        # every rank saves; rank 0 writes the whole adapter, and a fresh sharded model loads it back
        fastdca.save_adapter(model, folder)
        fresh = patched_model(variance, xg_space, checkpointing)
        for layer in fresh.model.layers:
            fully_shard(layer)
        fully_shard(fresh)
        fastdca.load_adapter(fresh, folder)
        reloaded = {name: p.full_tensor().detach().clone() for name, p in adapter_state_dict(fresh).items()}
        results[rank] = (losses, adapter, reloaded)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variance,xg_space,layout,checkpointing", [
    ("token", "hidden", "padded", False),
    ("sample", "head", "padded", True),
    ("token", "head", "packed", False),
    ("sample", "hidden", "packed", True),
])
def test_fsdp2_sharded_training_equals_one_process_on_the_whole_batch(variance, xg_space, layout, checkpointing,
                                                                    tmp_path):
    results = mp.Manager().dict()
    folder = str(tmp_path / "adapter")
    mp.spawn(worker, args=(free_port(), variance, xg_space, layout, checkpointing, folder, results), nprocs=WORLD,
             join=True)
    whole = batches(layout, 3)
    single = patched_model(variance, xg_space, checkpointing)
    expected_losses = train_steps(single, [as_one_row(b) if layout == "packed" else b for b in whole])
    expected_adapter = {name: p.detach() for name, p in adapter_state_dict(single).items()}
    saved = load_file(os.path.join(folder, "adapter.safetensors"))
    assert saved.keys() == expected_adapter.keys()
    for rank in range(WORLD):
        losses, adapter, reloaded = results[rank]
        for name, value in adapter.items():
            assert torch.equal(saved[name], value) and torch.equal(reloaded[name], value), name
        for step, ((loss, causal), (e_loss, e_causal)) in enumerate(zip(losses, expected_losses)):
            # every rank holds the global causal loss; its loss is its own CE plus that term
            torch.testing.assert_close(causal, e_causal, rtol=1e-4, atol=1e-7, msg=f"rank {rank} step {step}")
        assert adapter.keys() == expected_adapter.keys()
        for name, value in adapter.items():
            torch.testing.assert_close(value, expected_adapter[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"rank {rank} {name}: {m}")
    mean_loss = [sum(results[r][0][step][0] for r in range(WORLD)) / WORLD for step in range(STEPS)]
    for step, (loss, (e_loss, _)) in enumerate(zip(mean_loss, expected_losses)):
        torch.testing.assert_close(loss, e_loss, rtol=1e-5, atol=1e-6, msg=f"mean loss over ranks, step {step}")
