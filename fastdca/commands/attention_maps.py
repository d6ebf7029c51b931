"""Where the adapter looks: the DCA paper's Fig. 3 for a patched model, and how far X_G moves between prompts.

For one adapted layer, the gated adapter probabilities A = g * softmax(q ak^T * scale) (docs/DESIGN.md
section 1) of every query token of each prompt over the M adapter tokens, drawn as heatmaps side by side;
and, per adapted layer, the distance between the two prompts' token-mean X_G, the quantity the causal
loss is meant to hold fixed. The numbers come from `fastdca.hf.record_adapter_attention`, which
recomputes them with the reference equations from the op's own inputs.

(What `fastdca inspect` runs, not named after it: a module named `inspect` would shadow the standard
library's for any file of its folder run as a script.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from fastdca.io import atomic_write, atomic_write_text


def adapter_attention_maps(model, tokenizer, prompts: list[str], *, layer: Optional[int] = None,
                           head: Optional[int] = None) -> dict:
    """The adapter attention of every token of one or two prompts at one adapted layer of a patched model.

    Each prompt runs alone (batch 1, no padding) through `model`, tokenized as `fastdca eval` feeds
    prompts (the tokenizer's special tokens included).

    Args:
        prompts: one or two prompt texts.
        layer: the decoder layer index to draw, an adapted one; None = the last adapted layer.
        head: the query head to draw, in [0, num_attention_heads); None = the mean over heads of |A|
            (see `plot_attention_maps`). Only the drawing depends on it: the result holds every head.

    Returns a JSON-ready dict:
        layer, head (None = mean over heads), adapted_layers, adapter_len (M), causal_len (H), gate_fn;
        gates: g = gate_fn(gate) of `layer`, (Hq,);
        prompts: per prompt {"text", "tokens": T token labels, "adapter_probs": A[0] of `layer`, (Hq, T, M)};
        xg_difference: with two prompts, per adapted layer {"layer", "norms": [|x1|, |x2|], "difference":
            |x1 - x2|, "relative": |x1 - x2| / ((|x1| + |x2|) / 2), None when both norms are 0}, where x_p is
            prompt p's X_G averaged over its tokens, (Hq, D), and |.| the Frobenius norm; [] with one prompt.
    """
    from fastdca.hf import adapted_layers, get_config, record_adapter_attention

    if isinstance(prompts, str) or not 1 <= len(prompts) <= 2 or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"prompts must be a list of one or two non-empty strings, got {prompts!r}")
    adapted = adapted_layers(model)
    num_layers = model.config.num_hidden_layers
    num_heads = model.config.num_attention_heads
    layer = adapted[-1] if layer is None else layer
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be a decoder layer index in [0, {num_layers}), an adapted one "
                         f"({adapted[0]}-{adapted[-1]}); got {layer!r}")
    if layer not in adapted:
        raise ValueError(f"layer {layer} has no DCA adapter; the adapted layers are {adapted[0]}-{adapted[-1]}")
    if head is not None and (not isinstance(head, int) or not 0 <= head < num_heads):
        raise ValueError(f"head must be a query head index in [0, {num_heads}) or None (the mean over heads); "
                         f"got {head!r}")
    config = get_config(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    drawn, token_mean_xg = [], []
    try:
        for text in prompts:
            encoded = tokenizer(text, return_tensors="pt").to(device)
            with torch.no_grad(), record_adapter_attention(model) as records:
                model(**encoded)
            drawn.append({"text": text, "tokens": token_labels(tokenizer, encoded["input_ids"][0]),
                          "adapter_probs": records[layer].probs[0].tolist()})
            token_mean_xg.append({i: record.xg[0].double().mean(0) for i, record in records.items()})
    finally:
        model.train(was_training)
    gates = records[layer].gates.tolist()
    return {"layer": layer, "head": head, "adapted_layers": adapted, "adapter_len": config.adapter_len,
            "causal_len": config.causal_len, "gate_fn": config.gate_fn, "gates": gates,
            "prompts": drawn, "xg_difference": xg_difference(*token_mean_xg) if len(prompts) == 2 else []}


def xg_difference(first: dict, second: dict) -> list[dict]:
    """Per layer, how far two token-mean X_G ({layer: (Hq, D)}) lie apart: the Frobenius norms of each,
    of their difference, and the difference relative to the mean of the two norms (None if both are 0)."""
    rows = []
    for i in sorted(first):
        norms = [float(first[i].norm()), float(second[i].norm())]
        difference = float((first[i] - second[i]).norm())
        scale = (norms[0] + norms[1]) / 2
        rows.append({"layer": i, "norms": norms, "difference": difference,
                     "relative": difference / scale if scale > 0 else None})
    return rows


def token_labels(tokenizer, ids) -> list[str]:
    """Each token decoded alone, with newlines and tabs escaped so that every label is one line."""
    return [repr(tokenizer.decode([int(i)], clean_up_tokenization_spaces=False))[1:-1] for i in ids]


def xg_difference_table(maps: dict) -> str:
    """The `xg_difference` rows as a text table, one adapted layer a line."""
    lines = [f"{'layer':>5}  {'|x1|':>10}  {'|x2|':>10}  {'|x1 - x2|':>10}  {'relative':>8}"]
    for row in maps["xg_difference"]:
        relative = "-" if row["relative"] is None else f"{row['relative']:.4f}"
        lines.append(f"{row['layer']:>5}  {row['norms'][0]:>10.4g}  {row['norms'][1]:>10.4g}  "
                     f"{row['difference']:>10.4g}  {relative:>8}")
    return "\n".join(lines)


def plot_attention_maps(maps: dict, path) -> Path:
    """One heatmap per prompt, side by side, on one colour scale: rows the prompt's tokens, columns the M
    adapter tokens (X_G's first H left of the dashed line). With `maps["head"]` set, that head's A =
    g * softmax(...), signed (g = tanh(gate) may be negative) on a diverging scale centred at 0; with None,
    the mean over heads of |A|, so that heads whose gates differ in sign do not cancel. Written atomically
    as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = maps["head"]
    images = []
    for prompt in maps["prompts"]:
        probs = torch.tensor(prompt["adapter_probs"])                            # (Hq, T, M)
        images.append(probs.abs().mean(0) if head is None else probs[head])
    M, H = maps["adapter_len"], maps["causal_len"]
    longest = max(image.shape[0] for image in images)
    top = max(float(image.abs().max()) for image in images) or 1.0
    if head is None:
        colours = dict(cmap="viridis", vmin=0.0, vmax=top)
        what, line = "mean over heads of |A|", "white"
    else:
        colours = dict(cmap="RdBu_r", vmin=-top, vmax=top)
        what, line = f"head {head}, g = {maps['gates'][head]:+.3g}", "gray"
    fig, axes = plt.subplots(1, len(images), figsize=(3.2 + 3.6 * len(images) * max(1.0, M / 10),
                                                     max(3.0, 1.5 + 0.2 * longest)), squeeze=False,
                             layout="constrained")
    for p, (ax, image, prompt) in enumerate(zip(axes[0], images, maps["prompts"])):
        shown = ax.imshow(image.numpy(), aspect="auto", interpolation="nearest", **colours)
        ax.set_yticks(range(len(prompt["tokens"])), prompt["tokens"], fontsize=7)
        ax.set_xticks(range(M), [f"adap{m + 1}" for m in range(M)], rotation=90, fontsize=7)
        if 0 < H < M:
            ax.axvline(H - 0.5, color=line, linestyle="--", linewidth=1)
        ax.set_title(f"prompt {p + 1}", fontsize=9)
        ax.set_xlabel(f"adapter token (X_G = the first {H})", fontsize=8)
    fig.colorbar(shown, ax=list(axes[0]), fraction=0.04, label="A = g * softmax(q ak^T * scale)")
    fig.suptitle(f"adapter attention A, layer {maps['layer']}, {what}", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def write_attention_maps(maps: dict, prefix) -> tuple[Path, Path]:
    """PREFIX.png (the heatmaps) and PREFIX.json (`maps`), each written atomically. Returns both paths."""
    prefix = str(prefix)
    png = plot_attention_maps(maps, prefix + ".png")
    json_path = Path(prefix + ".json")
    atomic_write_text(json_path, json.dumps(maps, indent=1, allow_nan=False))
    return png, json_path


__all__ = ["adapter_attention_maps", "xg_difference", "xg_difference_table", "plot_attention_maps",
           "write_attention_maps", "token_labels"]
