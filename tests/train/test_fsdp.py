"""DCA under FSDP2 (torch.distributed.fsdp.fully_shard): two gloo processes, each with its decoder layers and
root sharded and half of the batch, train as one process on the whole batch does (losses and adapter), and
save the whole adapter once, which a sharded model loads back; the same with a 4-bit base and under a bf16
mixed-precision policy. Then `fastdca train --fsdp` through Trainer and accelerate (tests/helpers/fsdp_on_cpu.py):
equal to the data-parallel run, resumable after a SIGTERM to one rank."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import fastdca
from fastdca.train.fsdp import precision_policy
from fastdca.patch import adapter_state_dict

from test_distributed import free_port

WORLD = 2
STEPS = 2
CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
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


def patched_model(variance, xg_space, checkpointing, base=None):
    """The tiny llama, random (base None) or loaded in nf4 from `base` (the weights packed in bf16, which
    FSDP2 shards like any tensor), patched with open gates."""
    torch.manual_seed(0)
    if base is None:
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    else:
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                 bnb_4bit_quant_storage=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(base, quantization_config=nf4, device_map="cpu")
    model.requires_grad_(False)
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
    """AdamW over the steps: each step's (loss, causal loss), and the first step's gradients of the DCA
    parameters (whole: gathered where sharded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    losses, first_grads = [], None
    for batch in steps:
        out = model(**batch)
        out.loss.backward()
        if first_grads is None:
            first_grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                           for name, p in adapter_state_dict(model).items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append((out.loss.detach().clone(), out.causal_loss.detach().clone()))
    return losses, first_grads


def sharded(model, policy):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = dict(mp_policy=policy if policy is not None else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def worker(rank, world, port, case, folder, results):
    """One rank of `world`: its part of each step's batch (the whole batch when world is 1)."""
    variance, xg_space, layout, checkpointing, base, compute = case
    policy = precision_policy(compute) if compute is not None else None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = sharded(patched_model(variance, xg_space, checkpointing, base), policy)
        steps = batches(layout, 3)
        losses, grads = train_steps(model, [rank_part(b, rank, layout) for b in steps] if world > 1 else
                                    [as_one_row(b) if layout == "packed" else b for b in steps])
        adapter = {name: p.full_tensor().detach().clone() for name, p in adapter_state_dict(model).items()}
        assert all(p.dtype == torch.float32 for p in adapter.values()), "the sharded DCA parameters stay float32"
        # every rank saves; rank 0 writes the whole adapter, and a fresh sharded model loads it back
        fastdca.save_adapter(model, folder)
        fresh = sharded(patched_model(variance, xg_space, checkpointing, base), policy)
        fastdca.load_adapter(fresh, folder)
        reloaded = {name: p.full_tensor().detach().clone() for name, p in adapter_state_dict(fresh).items()}
        results[rank] = (losses, adapter, reloaded, grads)
    finally:
        dist.destroy_process_group()


def run_sharded(world, case, folder):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, free_port(), case, folder, results), nprocs=world, join=True)
    return [results[rank] for rank in range(world)]


FLOAT32_CASES = [  # variance, xg_space, layout, checkpointing, base, compute dtype
    ("token", "hidden", "padded", False, None, None),
    ("sample", "head", "padded", True, None, None),
    ("token", "head", "packed", False, None, None),
    ("sample", "hidden", "packed", True, None, None),
    ("token", "hidden", "padded", True, "nf4", None),
    ("sample", "head", "packed", False, "nf4", None),
]


def one_process(case, base):
    """The same training in one plain, unsharded process on the whole batch."""
    variance, xg_space, layout, checkpointing, _, _ = case
    model = patched_model(variance, xg_space, checkpointing, base)
    losses, grads = train_steps(model, [as_one_row(b) if layout == "packed" else b for b in batches(layout, 3)])
    return losses, {name: p.detach() for name, p in adapter_state_dict(model).items()}, grads


def check_saved_and_reloaded(results, folder):
    """Rank 0 wrote the whole adapter every rank holds, and a fresh sharded model loaded it back exactly."""
    saved = load_file(os.path.join(folder, "adapter.safetensors"))
    for rank, (_, adapter, reloaded, _) in enumerate(results):
        assert saved.keys() == adapter.keys()
        for name, value in adapter.items():
            assert torch.equal(saved[name], value) and torch.equal(reloaded[name], value), f"rank {rank} {name}"


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda c: "-".join(str(v) for v in c[:5]))
def test_fsdp2_sharded_training_equals_one_process_on_the_whole_batch(case, tmp_path):
    """float32 compute (the base in float32 or nf4): to float32 rounding."""
    base = None
    if case[4] == "nf4":
        pytest.importorskip("bitsandbytes")
        torch.manual_seed(0)
        base = str(tmp_path / "base")
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(base)
    folder = str(tmp_path / "adapter")
    results = run_sharded(WORLD, (*case[:4], base, None), folder)
    expected_losses, expected_adapter, _ = one_process(case, base)
    check_saved_and_reloaded(results, folder)
    for rank, (losses, adapter, _, _) in enumerate(results):
        for step, ((loss, causal), (e_loss, e_causal)) in enumerate(zip(losses, expected_losses)):
            # every rank holds the global causal loss; its loss is its own CE plus that term
            torch.testing.assert_close(causal, e_causal, rtol=1e-4, atol=1e-7, msg=f"rank {rank} step {step}")
        assert adapter.keys() == expected_adapter.keys()
        for name, value in adapter.items():
            torch.testing.assert_close(value, expected_adapter[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"rank {rank} {name}: {m}")
    mean_loss = [sum(r[0][step][0] for r in results) / WORLD for step in range(STEPS)]
    for step, (loss, (e_loss, _)) in enumerate(zip(mean_loss, expected_losses)):
        torch.testing.assert_close(loss, e_loss, rtol=1e-5, atol=1e-6, msg=f"mean loss over ranks, step {step}")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fsdp2_bf16_mixed_precision_equals_one_process_under_the_same_policy(layout, tmp_path):
    """fastdca.train.fsdp.precision_policy(bf16): the layers gathered and computed in bf16, the DCA parameters kept
    (sharded) in float32 and the gradients reduced in float32. Two ranks against one sharded process on the
    whole batch under the same policy, and against float32."""
    case = ("token", "hidden", layout, False, None, torch.bfloat16)
    results = run_sharded(WORLD, case, str(tmp_path / "two"))
    one_losses, _, _, one_grads = run_sharded(1, case, str(tmp_path / "one"))[0]
    float32_losses, _, float32_grads = one_process(case, None)
    check_saved_and_reloaded(results, str(tmp_path / "two"))
    # the first step: the forward before any update, and the gradient before the optimizer amplifies its
    # bf16 rounding (Adam's first step moves each entry by about lr * sign(gradient), whatever its size)
    mean_loss = sum(r[0][0][0] for r in results) / WORLD
    torch.testing.assert_close(mean_loss, one_losses[0][0], rtol=4e-3, atol=0)        # bf16: 2^-8 relative
    torch.testing.assert_close(mean_loss, float32_losses[0][0], rtol=4e-3, atol=0)
    for rank, (losses, adapter, _, grads) in enumerate(results):
        assert all(v.dtype == torch.float32 for v in adapter.values())
        for name, grad in grads.items():
            # bf16 activations and products, summed in float32: under 8 units of 2^-8 of the gradient's size
            # (1-2 seen)
            for reference, what in ((one_grads[name], "one process, bf16"), (float32_grads[name], "float32")):
                error = float((grad - reference).norm() / reference.norm())
                assert error < 3e-2, f"rank {rank} {name}: relative error {error:.2e} against {what}"
        assert torch.equal(grads[name], results[0][3][name]), "every rank holds the same reduced gradient"


FSDP_RUN = ["--task", "letter_concat", "--adapter-layers", "2", "--adapter-len", "4", "--max-steps", "4",
            "--batch-size", "2", "--limit", "16", "--logging-steps", "1", "--save-steps", "2"]
SHIM = os.path.join(os.path.dirname(os.path.dirname(__file__)), "helpers", "fsdp_on_cpu.py")


def fastdca_train(tmp_path, output, args, **env):
    """`torchrun --nproc-per-node 2 tests/helpers/fsdp_on_cpu.py train ...` (fastdca.cli), with FSDP_TEST_* `env`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-port",
               str(free_port()), SHIM, "train", *args, "--output", str(tmp_path / output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, **env})


def run_result(folder):
    adapter = load_file(str(folder / "adapter.safetensors"))
    return adapter, json.loads((folder / "loss_history.json").read_text())


@pytest.mark.parametrize("extra", [["--gradient-checkpointing"],
                                   ["--packing", "--variance", "token", "--load-in-4bit"]],
                         ids=["padded-checkpointing", "packed-nf4"])
def test_fastdca_train_fsdp_equals_data_parallel_and_resumes_after_sigterm_to_one_rank(tiny_model_dir, tmp_path,
                                                                                       extra):
    if "--load-in-4bit" in extra:
        pytest.importorskip("bitsandbytes")
    args = ["--model", str(tiny_model_dir), *FSDP_RUN, *extra]
    ddp = fastdca_train(tmp_path, "ddp", args)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    sharded = fastdca_train(tmp_path, "fsdp", [*args, "--fsdp"], FSDP_TEST_ON_CPU="1")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    shards = re.findall(r"FSDP2 shards the model over 2 processes in \d+ units \(3 decoder layers", sharded.stdout)
    assert len(shards) == 1, "rank 0 says how the model was sharded"
    # a checkpoint holds what an unsharded run's does: the adapter, never the base's shards
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoint-2").iterdir()) == \
        sorted(p.name for p in (tmp_path / "ddp" / "checkpoint-2").iterdir())
    stopped = fastdca_train(tmp_path, "resumed", [*args, "--fsdp"], FSDP_TEST_ON_CPU="1", FSDP_TEST_SIGTERM="1:2")
    assert stopped.returncode != 0
    assert "interrupted by signal 15 after step 2; checkpoint written to" in stopped.stderr + stopped.stdout
    assert not (tmp_path / "resumed" / "adapter.safetensors").exists()
    resumed = fastdca_train(tmp_path, "resumed", [*args, "--fsdp"], FSDP_TEST_ON_CPU="1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected_adapter, expected_history = run_result(tmp_path / "ddp")
    for name in ("fsdp", "resumed"):
        adapter, history = run_result(tmp_path / name)
        assert adapter.keys() == expected_adapter.keys()
        for key, value in adapter.items():
            # float32; the gradients reduced in another order than DDP's (equal on gloo so far)
            torch.testing.assert_close(value, expected_adapter[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        assert [h["step"] for h in history] == [1, 2, 3, 4]
        for h, e in zip(history, expected_history):
            assert h["loss"] == pytest.approx(e["loss"], rel=1e-5) and h["ce"] == pytest.approx(e["ce"], rel=1e-5)


def test_fastdca_train_fsdp_refuses_a_single_process_and_8bit(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from test_run_folder import exit_code

    args = ["train", "--model", str(tiny_model_dir), *FSDP_RUN, "--output", str(tmp_path / "run"), "--fsdp"]
    assert exit_code(args) == 2
    assert "--fsdp shards the model over several processes: launch it with `torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "refused before anything was written"
    monkeypatch.setenv("WORLD_SIZE", "2")      # as a launcher would set it; refused before it is needed
    assert exit_code([*args, "--load-in-8bit"]) == 2
    assert "--fsdp cannot shard bitsandbytes' 8-bit weights; use --load-in-4bit" in capsys.readouterr().err


def test_fastdca_train_fsdp_on_the_cpu_refuses_instead_of_training_unsharded(tiny_model_dir, tmp_path):
    """Without the test's help, accelerate sets up no FSDP on the CPU: fastdca says so and trains nothing."""
    done = fastdca_train(tmp_path, "run", ["--model", str(tiny_model_dir), *FSDP_RUN, "--fsdp"])
    assert done.returncode != 0
    assert "--fsdp: accelerate set up no FSDP on this machine (the run is on 'cpu'" in done.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))
