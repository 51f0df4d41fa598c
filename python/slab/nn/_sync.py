"""Data-parallel (synchronised) RepBN / PRepBN for ``slab.nn`` modules created with ``sync=True``.

Every rank holds a slice of the global batch.  ``prep_bn_sync`` makes each rank normalise its tokens
with the batch statistics of the *whole* global batch (only tokens whose mask is True count), and
its backward returns, on each rank, exactly the gradient a single process would compute for that
rank's slice of the concatenated batch.  It is built from the raw stage ops of the PRepBN family
(``torch.ops.slab.prep_bn_stats``, ``prep_bn_apply``, ``prep_bn_backward_reduce``, ``prep_bn_backward_apply``,
``bn_update_running_stats``), so the per-element arithmetic is the same as in the fused
single-process kernels.

Communication (all collectives are SUM all-reduces of small float32 vectors, O(C) elements, on
``process_group``; nothing scales with the number of tokens):

forward, 2 collectives
    1. ``[count, count * mean]`` (C + 1 values) -> global kept-token count N and global mean.
    2. ``m2 + count * (mean - global_mean) ** 2`` (C values) -> global M2, the sum of squared
       deviations from the global mean (Chan et al.'s parallel variance formula).
    The second round trip is the price of numerical robustness: reducing ``sum x`` and
    ``sum x**2`` in one collective would need ``E[x^2] - E[x]^2``, which cancels catastrophically
    in float32 when |mean| >> std.  Here every reduced term is non-negative and each rank's local
    M2 comes from the stats kernel, so the global variance is as accurate as a single-pass
    Welford over the concatenated batch.  (The alternative, one ``all_gather`` of
    ``(count, mean, m2)`` per rank, saves a latency but makes the message grow with the world
    size.)  A rank may hold zero kept tokens: it then contributes exact zeros.  All ranks get
    bit-identical statistics, so the running statistics (updated in place with momentum and the
    unbiased global variance ``M2 / (N - 1)``) stay identical across ranks.

backward, 1 collective
    ``[sum dy, sum dy * xhat_bn]`` (2C values).  The input gradient of batch norm needs these two
    per-channel sums over the global batch (every rank's output depends on every rank's kept
    tokens through the shared mean and variance).  The kept-token count needed alongside them is
    the global N of the forward, saved, so it needs no second exchange.  Parameter gradients
    (``norm1`` weight/bias, ``bn`` weight/bias, ``alpha``) are computed from the *local* sums,
    like ``torch.nn.SyncBatchNorm``: the data-parallel wrapper (DDP / FSDP) already reduces
    parameter gradients across ranks, and the sum over ranks of the local gradients is the
    single-process gradient of the concatenated batch.

Without an initialised ``torch.distributed`` (or with a group of one rank) no collective is issued
and the result equals the single-process op.  Like every collective, this must be called by all
ranks of ``process_group`` in the same order (the same modules, each rank with its own tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["prep_bn_sync"]

_NORMS = ("none", "layer", "rms")


def _world_size(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _all_reduce_(t: torch.Tensor, process_group, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


class _PRepBNSync(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        norm_weight,
        norm_bias,
        bn_weight,
        bn_bias,
        alpha,
        running_mean,
        running_var,
        lam,
        momentum,
        eps,
        norm_eps,
        norm,
        mask,
        process_group,
    ):
        world = _world_size(process_group)

        # Local per-channel statistics of the kept tokens (float32, float64 for float64 x).
        mean, m2, count = torch.ops.slab.prep_bn_stats(x, mask)
        has = count > 0  # (1,) — a rank may hold no kept token; then mean/m2 may be undefined
        mean = torch.where(has, mean, torch.zeros_like(mean))
        m2 = torch.where(has, m2, torch.zeros_like(m2))

        # Collective 1: global count and global sum -> global mean.
        buf = torch.cat([count.reshape(1), mean * count])
        _all_reduce_(buf, process_group, world)
        g_count = buf[:1]
        n = float(g_count.item())
        if n < 2:
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{int(n)} kept value(s) per channel in the global batch over {world} rank(s) "
                f"(input size {tuple(x.shape)} on this rank)"
            )
        g_mean = buf[1:] / g_count

        # Collective 2: M2 around the global mean (Chan's combination, every term >= 0).
        g_m2 = m2 + count * (mean - g_mean).square()
        _all_reduce_(g_m2, process_group, world)
        var = g_m2 / g_count
        rstd = torch.rsqrt(var + eps)

        if running_mean is not None and running_var is not None:
            torch.ops.slab.bn_update_running_stats(running_mean, running_var, g_mean, g_m2 / (g_count - 1), momentum)

        y, row_mean, row_rstd = torch.ops.slab.prep_bn_apply(
            x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, g_mean, rstd, lam, norm_eps, norm
        )

        ctx.save_for_backward(x, norm_weight, bn_weight, alpha, row_mean, row_rstd, g_mean, rstd, g_count, mask)
        ctx.lam = lam
        ctx.norm = norm
        ctx.process_group = process_group
        ctx.world = world
        ctx.norm_bias_dtype = norm_bias.dtype if norm_bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, g_count, mask) = ctx.saved_tensors
        lam, norm = ctx.lam, ctx.norm
        need = ctx.needs_input_grad
        dx = d_nw = d_nb = d_bw = d_bb = d_alpha = None

        # Local per-channel sums over ALL local tokens: [sum dy, sum dy*xhat_bn, sum dy*xhat_norm].
        sums, _local_count = torch.ops.slab.prep_bn_backward_reduce(
            dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm, mask
        )

        if need[0]:
            # Collective (backward): the two sums the batch-statistics terms of dx need.
            g = sums[0:2].clone()
            _all_reduce_(g, ctx.process_group, ctx.world)
            g_sums = torch.cat([g, sums[2:3]])
            dx = torch.ops.slab.prep_bn_backward_apply(
                dy,
                x,
                norm_weight,
                bn_weight,
                alpha,
                row_mean,
                row_rstd,
                bn_mean,
                bn_rstd,
                g_sums,
                g_count,
                lam,
                True,
                norm,
                mask,
            )

        # Parameter gradients from the LOCAL sums (DDP reduces them across ranks).
        if need[1] and norm_weight is not None:
            d_nw = (lam * sums[2]).to(norm_weight.dtype)
        if need[2] and ctx.norm_bias_dtype is not None:
            d_nb = (lam * sums[0]).to(ctx.norm_bias_dtype)
        if need[3]:
            d_bw = ((1.0 - lam) * sums[1]).to(bn_weight.dtype)
        if need[4]:
            d_bb = ((1.0 - lam) * sums[0]).to(bn_weight.dtype)
        if need[5]:
            d_alpha = (1.0 - lam) * (sums[1] / bn_rstd + bn_mean * sums[0]).sum()
            d_alpha = d_alpha.reshape(alpha.shape).to(alpha.dtype)
        return (dx, d_nw, d_nb, d_bw, d_bb, d_alpha) + (None,) * 9


def prep_bn_sync(
    x: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    lam: float,
    momentum: float,
    eps: float,
    norm_eps: float,
    norm: str,
    mask: Optional[torch.Tensor],
    process_group=None,
) -> torch.Tensor:
    """Training-mode PRepBN (``norm`` "layer"/"rms") or RepBN (``norm="none"``) with batch
    statistics synchronised over ``process_group`` (default: the world group).

    ``y = lam * Norm1(x) + (1 - lam) * (BN(x) + alpha * x)`` where BN uses the mean and biased
    variance of the kept tokens (``mask`` True; all tokens when ``mask`` is None) of the global
    batch.  ``running_mean``/``running_var`` (may be None) are updated in place exactly as
    ``torch.nn.BatchNorm1d`` would on the concatenated batch.  For RepBN pass ``norm="none"``,
    ``norm_weight = norm_bias = None`` and ``lam = 0.0``.  See the module docstring for the
    communication.  Raises ValueError when the global batch has fewer than 2 kept tokens.
    """
    if norm not in _NORMS:
        raise ValueError(f"prep_bn_sync: norm must be one of {_NORMS}, got {norm!r}")
    lam = float(lam)
    if norm == "none":
        if norm_weight is not None or norm_bias is not None:
            raise ValueError("prep_bn_sync: norm='none' (RepBN) takes norm_weight=None and norm_bias=None")
        if lam != 0.0:
            raise ValueError(f"prep_bn_sync: norm='none' (RepBN) needs lam=0.0, got {lam}")
    if norm == "rms" and norm_bias is not None:
        raise ValueError("prep_bn_sync: norm='rms' takes no norm_bias (expected None)")
    if momentum is None:
        raise ValueError(
            "prep_bn_sync: momentum must be a float (resolve cumulative averaging in the module before calling)"
        )
    return _PRepBNSync.apply(
        x,
        norm_weight,
        norm_bias,
        bn_weight,
        bn_bias,
        alpha,
        running_mean,
        running_var,
        lam,
        float(momentum),
        float(eps),
        float(norm_eps),
        norm,
        mask,
        process_group,
    )
