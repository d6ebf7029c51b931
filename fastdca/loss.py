"""The DCA causal loss: the variance of X_G across samples, from the statistics `dca_attention` returns.

variance="sample": x_b = mean of X_G over sample b's real tokens; the layer loss is the
unbiased variance over b of x_b, averaged over every (head, dim) entry. Only the per-sample sums and
counts are needed, so the memory is O(B * Hq * D), independent of T.

variance="token" (the default): per position t, the unbiased variance of X_G[:, t] over the samples that are real at
t, averaged over the positions with at least two real samples and over every (head, dim) entry.
Positions are counted from the start of each (right-padded) row, so ranks whose rows differ in
length compare them as one right-padded global batch would.

With xg_space="hidden" the caller passes `project`, o_proj as a function of float32 (or float64)
(..., Hq * D) -> (..., hidden), and X_G is measured after it; for variance="sample" it is applied to
the per-sample means.

Under torch.distributed with more than one rank the sufficient statistics are all-reduced with an
autograd-aware collective (unless `distributed=False`), so the loss is the variance over the global
batch, the same for any number of ranks.
"""

from __future__ import annotations

import warnings

import torch

from fastdca.ops.common import compute_dtype

_warned_single_sample = False


def layer_causal_loss(xg_stats, *, variance="sample", real=None, project=None, distributed=True):
    """The causal loss of one layer, a float32 scalar (float64 for float64 statistics).

    xg_stats: for variance="sample", (sums (B, Hq, D), counts (B,)) from dca_attention(xg="sample");
        for variance="token", X_G (B, T, Hq, D) from dca_attention(xg="token").
    real: for variance="token", (B, T) bool, True where the query token is real; None = all real.
    project: None (X_G before o_proj) or o_proj as a function (..., Hq*D) -> (..., hidden) that takes
        the statistics' float dtype (it casts to its own weights' dtype itself).
    distributed: all-reduce the statistics over the ranks of the default process group, if any.
    """
    return causal_loss([xg_stats], variance=variance, real=real, projections=[project], distributed=distributed)


def causal_loss(layer_stats, *, variance="sample", real=None, projections=None, distributed=True):
    """L_causal: the mean of layer_causal_loss over the layers whose statistics `layer_stats` lists (the
    top L' adapted layers of one forward), with `projections` one `project` per layer (None: none).
    The layers must have been computed on the same samples and tokens, as one forward's layers are: their
    counts (sample) and `real` (token) are shared."""
    projections = [None] * len(layer_stats) if projections is None else list(projections)
    features = [layer_features(stats, variance=variance, project=project)
                for stats, project in zip(layer_stats, projections)]
    return causal_loss_of_features(features, variance=variance, real=real, distributed=distributed)


def layer_features(xg_stats, *, variance="sample", project=None):
    """What one layer's variance is taken over, from its statistics (as for layer_causal_loss):
    variance="sample" -> (each sample's mean X_G (B, F), the counts (B,)), flattened over (head, dim) and
    projected when asked (the mean is taken before the projection: o_proj commutes with it only without a
    bias; a sample with no real token gets 0 and is left out by its count); "token" -> X_G per token
    (B, T, F), projected when asked. In the compute dtype. A patched model forms these inside each layer's
    forward, where a sharded o_proj (FSDP) has its weights gathered."""
    if variance == "sample":
        sums, counts = xg_stats
        flat = sums.to(compute_dtype(sums.dtype)).reshape(sums.shape[0], -1)
        means = flat / counts.clamp(min=1).to(flat.dtype)[:, None]
        return (means if project is None else project(means).to(means.dtype)), counts
    if variance == "token":
        B, T = xg_stats.shape[:2]
        flat = xg_stats.to(compute_dtype(xg_stats.dtype)).reshape(B, T, -1)
        return flat if project is None else project(flat).to(flat.dtype)
    raise ValueError(f"variance must be 'sample' or 'token', got {variance!r}")


def causal_loss_of_features(features, *, variance="sample", real=None, distributed=True):
    """L_causal from each layer's `layer_features`: one variance over the layers' features laid side by
    side along the feature axis. The mean over layers of each layer's mean over its F features is the mean
    over all L * F features when every layer has F (layers are grouped by F otherwise): one pass of the
    variance's dozen tensor ops for all layers instead of one per layer."""
    if variance not in ("sample", "token"):
        raise ValueError(f"variance must be 'sample' or 'token', got {variance!r}")
    if len(features) == 0:
        raise ValueError("layer_stats must hold at least one layer's statistics")
    if variance == "sample":
        counts = features[0][1]
        features = [means for means, _ in features]
        weight = (counts > 0).to(features[0].dtype)[:, None]                               # (B, 1)
        variance_of = lambda x: _weighted_variance(x, weight, distributed).mean()  # noqa: E731
    else:
        variance_of = lambda x: _token_variance(x, real, distributed)  # noqa: E731
    groups = {}
    for x in features:
        groups.setdefault(x.shape[-1], []).append(x)
    losses = [variance_of(torch.cat(xs, dim=-1) if len(xs) > 1 else xs[0]) * len(xs) for xs in groups.values()]
    total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    return total / len(features)


def _token_variance(flat, real, distributed):
    B, T = flat.shape[:2]
    weight = (torch.ones(B, T, 1, dtype=flat.dtype, device=flat.device) if real is None
              else real.to(flat.dtype)[..., None])
    if _is_distributed(distributed):
        # positions are compared across ranks: a rank with shorter rows holds padding at the rest
        longest = _longest_over_ranks(T, flat.device)
        if longest > T:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, longest - T))
            weight = torch.nn.functional.pad(weight, (0, 0, 0, longest - T))
    per_position = _weighted_variance(flat, weight, distributed)                 # (T, F)
    counted = (_all_reduce_sum(weight.sum(0), distributed) >= 2).to(flat.dtype)         # (T, 1)
    return (per_position * counted).sum() / (counted.sum() * flat.shape[-1]).clamp(min=1)


def _weighted_variance(x, weight, distributed):
    """Unbiased variance over dim 0 of the rows of x with weight 1 (weights are 0 or 1); 0 where
    fewer than two rows count. Two passes (mean, then squared deviations) to avoid cancellation."""
    # decided from the shape, not from the weights: reading them would stall the GPU once per layer.
    # The flag is tested here, not only in the function: torch.compile cannot trace warnings.warn, so
    # a compiled forward breaks its graph for the warning once, and is traced again without it.
    if x.shape[0] < 2 and not _is_distributed(distributed) and not _warned_single_sample:
        _warn_single_sample()
    n = _all_reduce_sum(weight.sum(0), distributed)
    mean = _all_reduce_sum((x * weight).sum(0), distributed) / n.clamp(min=1)
    squares = _all_reduce_sum(((x - mean).square() * weight).sum(0), distributed)
    return torch.where(n >= 2, squares / (n - 1).clamp(min=1), torch.zeros_like(squares))


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
