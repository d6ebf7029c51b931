"""Parameter memory per rank under DDP and FSDP2 for LLaMA shapes, computed from the sharding of meta-device
models (no weights are allocated): the frozen base in bf16 and in 4-bit (nf4: half a byte a weight plus
one float32 absmax per 64, as bitsandbytes stores them), and the DCA parameters (float32 prompts and gates,
in the adapted layers, sharded with them). Gradients and AdamW moments exist only for the DCA parameters.
FSDP2 cells are "the rank's shard + the two layers it holds gathered at the peak" (the forward's layer and
the prefetched next one). Activations are not counted.

    python benchmarks/fsdp_memory.py            # the markdown table in BENCHMARKS.md
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "LLaMA-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}
RANKS = (2, 4, 8)
ADAPTER_LAYERS, ADAPTER_LEN = 30, 10


def counts(shape):
    """(linear weights, other base parameters, DCA parameters) in elements, from a meta-device model."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    total = sum(p.numel() for p in model.parameters())
    layers = min(ADAPTER_LAYERS, shape["num_hidden_layers"])
    dca = layers * (ADAPTER_LEN * shape["hidden_size"] + shape["num_attention_heads"])
    return linear, total - linear, dca


def gib(n_bytes):
    return n_bytes / 2**30


def table():
    rows = ["| model | base | DDP, every rank | " + " | ".join(f"FSDP2, {r} ranks" for r in RANKS) + " |",
            "|---|---|---|" + "---|" * len(RANKS)]
    for name, shape in SHAPES.items():
        linear, other, dca = counts(shape)
        dca_bytes = dca * 4 * 4          # float32 parameter, gradient and two AdamW moments
        for base, linear_bytes in (("bf16", 2.0), ("4-bit nf4", 0.5 + 4 / 64)):
            whole = linear * linear_bytes + other * 2 + dca_bytes
            # FSDP2 gathers a layer for its forward and prefetches the next: two layers whole at the peak
            gathered = 2 * linear * linear_bytes / shape["num_hidden_layers"]
            cells = [f"{gib(whole / r):.1f} + {gib(gathered):.1f} GiB" for r in RANKS]
            rows.append(f"| {name} | {base} | {gib(whole):.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
