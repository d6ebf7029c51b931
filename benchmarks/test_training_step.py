"""Model level: one training step of a SmolLM2-135M-shaped model with random weights.

Side by side in one run (docs/DESIGN.md section 6): the floor (the same frozen model with one trainable
zero vector added to the hidden state entering the first adapted layer, so that the backward covers the
same layers), fastdca with alpha = 1 (L' = L; the default causal loss, token/hidden, and the cheaper
sample/head), fastdca with alpha = 0, and PEFT's AdaptionPrompt with
the same L and M. Each records the bytes saved for backward (every storage counted once, parameters
excluded) and, on CUDA, the peak memory; `python benchmarks/report.py` turns the times into ratios to
the floor.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastdca

B, T, L, M = 4, 128, 20, 10
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
               tie_word_embeddings=True)


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2)).state_dict()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (B, T), generator=g)
    return {"input_ids": ids.to(DEVICE), "labels": ids.to(DEVICE),
            "attention_mask": torch.ones(B, T, dtype=torch.long, device=DEVICE)}


def frozen_model(base_state):
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, attn_implementation="sdpa"))
    model.load_state_dict(base_state)
    model.to(DEVICE, DTYPE).requires_grad_(False)
    return model


def floor(model):
    first = model.config.num_hidden_layers - L
    delta = torch.nn.Parameter(torch.zeros(model.config.hidden_size, device=DEVICE, dtype=DTYPE))
    model.floor_delta = delta

    def add_delta(module, args):
        return (args[0] + delta,) + args[1:]

    model.model.layers[first].register_forward_pre_hook(add_delta)
    return model


def fastdca_model(alpha, **definition):
    def build(model):
        return fastdca.patch(model, fastdca.DCAConfig(adapter_layers=L, adapter_len=M, causal_len=2, alpha=alpha,
                                                      **definition))
    return build


def peft_adaption_prompt(model):
    from peft import AdaptionPromptConfig, get_peft_model

    return get_peft_model(model, AdaptionPromptConfig(adapter_len=M, adapter_layers=L, task_type="CAUSAL_LM"))


VARIANTS = {
    "floor": floor,
    "fastdca-alpha1": fastdca_model(1.0),
    "fastdca-alpha1-sample-head": fastdca_model(1.0, variance="sample", xg_space="head"),
    "fastdca-alpha0": fastdca_model(0.0),
    "peft-adaption-prompt": peft_adaption_prompt,
}


def saved_activation_bytes(model, step):
    """Bytes of the tensors autograd saves for backward during `step`, each storage once, parameters and
    buffers excluded."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def training_step_of(model, batch, forward=None):
    """One training step of `model` on `batch` as a function: gradients cleared, the loss's backward, a
    CUDA synchronisation. `forward` runs the model (a compiled one, say); the model itself by default."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward = model if forward is None else forward

    def step():
        for p in trainable:
            p.grad = None
        forward(**batch).loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step(benchmark, base_state, batch, variant):
    model = VARIANTS[variant](frozen_model(base_state))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, f"{variant} has no trainable parameter"
    step = training_step_of(model, batch)
    step()  # warm-up, and the adapter's gradients become real
    benchmark.extra_info["saved_bytes"] = saved_activation_bytes(model, step)
    benchmark.extra_info["trainable_parameters"] = sum(p.numel() for p in trainable)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    benchmark.group = f"training step SmolLM2-135M B={B} T={T} L={L} M={M} {DEVICE}"
    benchmark.extra_info.update(variant=variant, device=DEVICE)
    benchmark.pedantic(step, rounds=12, warmup_rounds=1)
