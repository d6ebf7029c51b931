"""Parameter memory per rank under DDP and FSDP2 for LLaMA shapes, computed from the sharding of meta-device
models (no weights are allocated): the frozen base in bf16 and in 4-bit (nf4: half a byte a weight plus
one float32 absmax per 64, as bitsandbytes stores them), and the DCA parameters (float32 prompts and gates,
in the adapted layers, sharded with them). Gradients and AdamW moments exist only for the DCA parameters.
FSDP2 cells are "the rank's shard + the two layers it holds gathered at the peak" (the forward's layer and
the prefetched next one); for nf4 the absmax is a third term, whole on every rank: bitsandbytes keeps it in
the weight's quant_state, which FSDP2 does not shard (measured below). Activations are not counted.
Then, measured: a tiny patched llama sharded over two gloo processes, the bytes each rank holds.

    python benchmarks/fsdp_memory.py            # the markdown tables in BENCHMARKS.md
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
        for base, linear_bytes, absmax_bytes in (("bf16", 2.0, 0.0), ("4-bit nf4", 0.5, 4 / 64)):
            sharded = linear * linear_bytes + other * 2 + dca_bytes
            absmax = linear * absmax_bytes
            # FSDP2 gathers a layer for its forward and prefetches the next: two layers whole at the peak
            gathered = 2 * linear * linear_bytes / shape["num_hidden_layers"]
            kept = f"{gib(absmax):.1f} + " if absmax else ""
            cells = [f"{gib(sharded / r):.1f} + {kept}{gib(gathered):.1f} GiB" for r in RANKS]
            rows.append(f"| {name} | {base} | {gib(sharded + absmax):.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(rows)


TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4)


def _local_bytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _held(model):
    """(parameter bytes this rank holds, bytes of bitsandbytes' quant_state tensors)."""
    params = sum(_local_bytes(p) for p in model.parameters())
    # on the weight; once sharded, on the module (bitsandbytes keeps a copy there for FSDP)
    states = [getattr(m.weight, "quant_state", None) or getattr(m, "quant_state", None)
              for m in model.modules() if hasattr(m, "weight")]
    quant = sum(_local_bytes(s.absmax) + _local_bytes(s.code) for s in states if s is not None)
    return params, quant


def _measure_rank(rank, port, folder, base, results):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import BitsAndBytesConfig

    import fastdca

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                 bnb_4bit_quant_storage=torch.bfloat16)
        extra = {"quantization_config": nf4, "device_map": "cpu"} if base == "nf4" else {}
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra).requires_grad_(False)
        fastdca.patch(model, fastdca.DCAConfig(adapter_layers=4, adapter_len=10))
        whole = _held(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        results[rank] = (whole, _held(model))
    finally:
        dist.destroy_process_group()


def measured():
    """The tiny model (TINY, bf16 and nf4 in bf16 storage, patched) whole and sharded over two processes."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    rows = ["| tiny llama (4 layers, hidden 256) | whole, every rank | FSDP2, 2 ranks: each rank |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(folder)
        for base in ("bf16", "nf4"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            results = mp.Manager().dict()
            mp.spawn(_measure_rank, args=(port, folder, base, results), nprocs=2, join=True)
            (params, quant), (shard, shard_quant) = results[0]
            kept = f" + {shard_quant / 1e6:.3f} MB quant_state" if shard_quant else ""
            whole_kept = f" + {quant / 1e6:.3f} MB quant_state" if quant else ""
            rows.append(f"| {base} | {params / 1e6:.3f} MB{whole_kept} | {shard / 1e6:.3f} MB{kept} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
    print()
    print(measured())
