"""The DCA causal loss: the variance of X_G across samples, from the causal weights `dca_attention` returns.

X_G = w av[:H] per head, with w = g * softmax(q ak^T * scale)[..., :H] the causal weights (B, T, Hq, H): the
adapter keys and values are the same for every sample and token, so any linear map of X_G (o_proj for
xg_space="hidden", the identity for "head") is y = w P + c, with P the (Hq * H, F) basis whose row (h, j) is
the map of av[kv(h), j] placed in head h's slot, minus the map of 0. The variance of y over samples, summed
over its F features, is then the quadratic form d G d^T of the deviations d of w from their mean, with the
Gram matrix G = P P^T ((Hq * H)^2): X_G is never formed, per token or projected, and what is kept for the
backward per token is w, not (B, T, hidden).

variance="sample": x_b = mean of X_G over sample b's real tokens; the layer loss is the unbiased variance over b
of x_b, averaged over every feature. variance="token" (the default): per position t, the unbiased variance of
X_G[:, t] over the samples that are real at t, averaged over the positions with at least two real samples and
over every feature. Positions are counted from the start of each (right-padded) row, so ranks whose rows differ
in length compare them as one right-padded global batch would.

Under torch.distributed with more than one rank the sufficient statistics are all-reduced with an
autograd-aware collective (unless `distributed=False`), so the loss is the variance over the global
batch, the same for any number of ranks.
"""

from __future__ import annotations

import typing
import warnings

import torch

from fastdca.ops.common import compute_dtype

_warned_single_sample = False


class CausalFeatures(typing.NamedTuple):
    """What one layer's variance is taken over (`layer_features`): the causal weights per token (B, T, K) or
    per sample, their mean over the sample's real tokens (N, K), with K = Hq * H; the Gram matrix (K, K) of
    the layer's basis; the number F of features the variance is averaged over; the samples' real-token
    counts (N,) (variance="sample"; None for "token")."""

    weights: torch.Tensor
    gram: torch.Tensor
    width: int
    counts: typing.Optional[torch.Tensor] = None


def layer_causal_loss(xg_stats, av, *, variance="sample", real=None, project=None, distributed=True):
    """The causal loss of one layer, a float32 scalar (float64 for float64 statistics).

    xg_stats: for variance="sample", (sums of w (N, Hq, H), counts (N,)) from dca_attention(xg="sample");
        for variance="token", w (B, T, Hq, H) from dca_attention(xg="token").
    av: (Hkv, M, D), the adapter values the op was called with.
    real: for variance="token", (B, T) bool, True where the query token is real; None = all real.
    project: None (X_G before o_proj) or o_proj as a function (..., Hq*D) -> (..., hidden) (it casts to its
        own weights' dtype itself); it is applied to the Hq * H basis rows only (`causal_basis`).
    distributed: all-reduce the statistics over the ranks of the default process group, if any.
    """
    return causal_loss([xg_stats], [av], variance=variance, real=real, projections=[project],
                       distributed=distributed)


def causal_loss(layer_stats, avs, *, variance="sample", real=None, projections=None, distributed=True):
    """L_causal: the mean of layer_causal_loss over the layers whose statistics `layer_stats` lists (the
    top L' adapted layers of one forward), `avs` their adapter values and `projections` one `project` per
    layer (None: none). The layers must have been computed on the same samples and tokens, as one forward's
    layers are: their counts (sample) and `real` (token) are shared."""
    _check_variance(variance)
    projections = [None] * len(layer_stats) if projections is None else list(projections)
    features = []
    for stats, av, project in zip(layer_stats, avs, projections):
        num_heads, causal_len = (stats[0] if variance == "sample" else stats).shape[-2:]
        features.append(layer_features(stats, causal_basis(av, num_heads, causal_len, project), variance=variance))
    return causal_loss_of_features(features, variance=variance, real=real, distributed=distributed)


def causal_basis(av, num_heads, causal_len, project=None):
    """P (Hq * H, F): row (h, j) is av[kv(h), j] placed in query head h's slot of a (Hq * D) vector (each
    query head h reads kv head h // (Hq / Hkv)), mapped by `project` minus project(0) where given (a bias
    cancels; a 4-bit or 8-bit o_proj is applied as the module it is). F = Hq * D, or project's output width.
    av (Hkv, M, D); H = causal_len. In av's dtype, or project's output dtype.

    The map must be the one applied to every token: where o_proj is not a fixed linear map of its input,
    such as LoRA on o_proj with dropout in training, the basis rows get one dropout draw between them where
    per-token X_G would get one per token: the loss then has the same expectation over dropout for a linear
    map, and other noise."""
    Hkv, _, D = av.shape
    H = causal_len
    values = av[:, :H].repeat_interleave(num_heads // Hkv, dim=0)                 # (Hq, H, D)
    slots = torch.eye(num_heads, dtype=av.dtype, device=av.device)[:, None, :, None]
    basis = (values[:, :, None, :] * slots).reshape(num_heads * H, num_heads * D)  # (Hq * H, Hq * D)
    if project is None:
        return basis
    return project(basis) - project(torch.zeros_like(basis[:1]))


def layer_features(xg_stats, basis, *, variance="sample"):
    """One layer's CausalFeatures from its statistics (as for layer_causal_loss) and its `causal_basis`:
    the weights flattened over (head, j) in the compute dtype (per sample, their means: a sample with no real
    token gets 0 and is left out by its count), and the basis's Gram matrix. A patched model forms these
    inside each layer's forward, where a sharded o_proj (FSDP) has its weights gathered."""
    if variance == "sample":
        sums, counts = xg_stats
        flat = sums.to(compute_dtype(sums.dtype)).reshape(sums.shape[0], -1)
        weights = flat / counts.clamp(min=1).to(flat.dtype)[:, None]
    elif variance == "token":
        B, T = xg_stats.shape[:2]
        weights, counts = xg_stats.to(compute_dtype(xg_stats.dtype)).reshape(B, T, -1), None
    else:
        _check_variance(variance)
    if basis.shape[0] != weights.shape[-1]:
        raise ValueError(f"the basis has {basis.shape[0]} rows for {weights.shape[-1]} causal weights per token")
    return CausalFeatures(weights, _Gram.apply(basis, weights.dtype), basis.shape[1], counts)


class _Gram(torch.autograd.Function):
    """G = P P^T in `dtype` (the compute dtype), keeping P for the backward in its own dtype (a bf16 o_proj's
    basis is kept in bf16, half the float32 copy's bytes)."""

    @staticmethod
    def forward(ctx, basis, dtype):
        ctx.save_for_backward(basis)
        p = basis.to(dtype)
        return p @ p.T

    @staticmethod
    def backward(ctx, grad):
        (basis,) = ctx.saved_tensors
        return ((grad + grad.T) @ basis.to(grad.dtype)).to(basis.dtype), None


def causal_loss_of_features(features, *, variance="sample", real=None, distributed=True):
    """L_causal from each layer's `layer_features`: the mean over layers of each layer's variance, summed
    over its features as d G d^T and divided by its F. Layers with the same K are stacked: one pass of the
    variance's dozen tensor ops for all of them instead of one per layer."""
    _check_variance(variance)
    if len(features) == 0:
        raise ValueError("layer_stats must hold at least one layer's statistics")
    groups = {}
    for layer in features:
        groups.setdefault(layer.weights.shape[-1], []).append(layer)
    losses = []
    for layers in groups.values():
        x = torch.stack([layer.weights for layer in layers])                     # (L, N, K) or (L, B, T, K)
        gram = torch.stack([layer.gram for layer in layers])                      # (L, K, K)
        widths = torch.tensor([layer.width for layer in layers], dtype=x.dtype, device=x.device)
        if variance == "sample":
            summed = _sample_variance_sums(x, gram, layers[0].counts, distributed)   # (L,)
        else:
            summed = _token_variance_sums(x, gram, real, distributed)              # (L,)
        losses.append((summed / widths).sum())
    total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    return total / len(features)


def _quadratic_form(d, gram):
    """d G d^T summed over the samples: d (L, B, ..., K), G (L, K, K) -> (L, ...)."""
    shape = d.shape
    flat = d.reshape(shape[0], -1, shape[-1])                                     # (L, B * ..., K)
    forms = (torch.bmm(flat, gram) * flat).sum(-1)                                # (L, B * ...)
    return forms.view(shape[:-1]).sum(1)


def _sample_variance_sums(x, gram, counts, distributed):
    """Per layer, the unbiased variance over the samples with real tokens of their mean weights' image
    under the basis, summed over the features: (L,)."""
    weight = (counts > 0).to(x.dtype)[None, :, None]                              # (1, N, 1)
    return _weighted_variance_sum(x, weight, gram, distributed)


def _token_variance_sums(x, gram, real, distributed):
    """Per layer, the mean over the positions with at least two real samples of the unbiased variance over
    those samples, summed over the features: (L,)."""
    L, B, T = x.shape[:3]
    weight = (torch.ones(1, B, T, 1, dtype=x.dtype, device=x.device) if real is None
              else real.to(x.dtype)[None, :, :, None])
    if _is_distributed(distributed):
        # positions are compared across ranks: a rank with shorter rows holds padding at the rest
        longest = _longest_over_ranks(T, x.device)
        if longest > T:
            x = torch.nn.functional.pad(x, (0, 0, 0, longest - T))
            weight = torch.nn.functional.pad(weight, (0, 0, 0, longest - T))
    per_position = _weighted_variance_sum(x, weight, gram, distributed)          # (L, T)
    counted = (_all_reduce_sum(weight.sum(1)[0, :, 0], distributed) >= 2).to(x.dtype)   # (T,)
    return (per_position * counted).sum(-1) / counted.sum().clamp(min=1)


def _weighted_variance_sum(x, weight, gram, distributed):
    """The unbiased variance over dim 1 of the rows of x (L, B, ..., K) with weight 1 (weights (1, B, ..., 1)
    are 0 or 1), each row taken through the basis, summed over the features: sum_b d_b G d_b^T / (n - 1), d_b
    the deviation from the weighted mean; 0 where fewer than two rows count. Two passes (mean, then
    deviations) to avoid cancellation."""
    # decided from the shape, not from the weights: reading them would stall the GPU once per layer.
    # The flag is tested here, not only in the function: torch.compile cannot trace warnings.warn, so
    # a compiled forward breaks its graph for the warning once, and is traced again without it.
    if x.shape[1] < 2 and not _is_distributed(distributed) and not _warned_single_sample:
        _warn_single_sample()
    n = _all_reduce_sum(weight.sum(1), distributed)                              # (1, ..., 1)
    mean = _all_reduce_sum((x * weight).sum(1), distributed) / n.clamp(min=1)    # (L, ..., K)
    deviations = (x - mean[:, None]) * weight
    squares = _all_reduce_sum(_quadratic_form(deviations, gram), distributed)     # (L, ...)
    n = n[..., 0]
    return torch.where(n >= 2, squares / (n - 1).clamp(min=1), torch.zeros_like(squares))


def _check_variance(variance):
    if variance not in ("sample", "token"):
        raise ValueError(f"variance must be 'sample' or 'token', got {variance!r}")


def _is_distributed(distributed):
    return (distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _all_reduce_sum(tensor, distributed):
    return _AllReduceSum.apply(tensor) if _is_distributed(distributed) else tensor


def _longest_over_ranks(T, device):
    longest = torch.tensor([T], device=device)
    torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
    return int(longest)


class _AllReduceSum(torch.autograd.Function):
    """The sum of `tensor` over all ranks. Its backward all-reduces the gradients too: every rank holds
    the same global loss, so each rank's share of the gradient arrives world_size times, which
    DistributedDataParallel's average over ranks turns back into the gradient of the global loss."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


def _warn_single_sample():
    global _warned_single_sample
    if not _warned_single_sample:
        _warned_single_sample = True
        warnings.warn("the DCA causal loss needs at least two samples with real tokens; with fewer the "
                      "variance is undefined and L_causal is 0 (use a batch size of 2 or more)",
                      stacklevel=4)
