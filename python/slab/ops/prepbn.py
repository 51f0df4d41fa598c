"""PRepBN ops (SLAB): wrappers over ``torch.ops.slab.*`` plus their fake tensors and autograd.

Schemas and kernels live in C++ (csrc/<family>/<family>_ops.cpp); this module registers what
torch.compile (fake tensors) and autograd need, next to the public wrappers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._fake import register_fake

__all__ = ["rep_bn", "prep_bn"]

_lib = torch.ops.slab


# ---- PRepBN -----------------------------------------------------------------------------------


def rep_bn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    alpha: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """RepBN (SLAB): ``y = BatchNorm(x) + alpha * x`` over the last dimension of ``x`` (..., C).

    Training normalises with the batch statistics of the tokens where ``mask`` is True (all tokens
    when ``mask`` is None) and updates ``running_mean``/``running_var`` in place as
    ``torch.nn.BatchNorm1d`` does (unbiased variance). Eval uses the running statistics:
    ``y = x * (weight / sqrt(running_var + eps) + alpha) + bias - running_mean * weight / sqrt(running_var + eps)``.
    """
    return _lib.rep_bn(x, weight, bias, alpha, running_mean, running_var, training, momentum, eps, mask)


def prep_bn(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Optional[Tensor],
    bn_weight: Tensor,
    bn_bias: Tensor,
    alpha: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    lam: float,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    norm_eps: float = 1e-6,
    norm: str = "layer",
    mask: Optional[Tensor] = None,
) -> Tensor:
    """PRepBN (SLAB): ``y = lam * Norm1(x) + (1 - lam) * RepBN(x)`` in one fused kernel.

    ``Norm1`` is LayerNorm (``norm="layer"``, ``norm_bias`` optional) or RMSNorm (``norm="rms"``,
    ``norm_bias`` None) with ``norm_eps``; RepBN as :func:`rep_bn`. The statistics of both norms
    and the mixed output take two passes over ``x`` (the batch statistics must be complete before
    any output), the backward two passes over ``x`` and ``dy``.
    """
    return _lib.prep_bn(
        x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, running_mean, running_var,
        lam, training, momentum, eps, norm_eps, norm, mask,
    )


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_stat_len(x: Tensor, norm: str) -> int:
    return 0 if norm == "none" else x.numel() // x.shape[-1]


@register_fake("prep_bn_fwd")
def _(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, running_mean, running_var, lam, training,
      eps, norm_eps, norm, mask):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    c, acc = x.shape[-1], _acc_dtype(x)
    torch._check(bn_weight.shape == (c,), lambda: f"bn_weight must have shape ({c},)")
    rows = _row_stat_len(x, norm)
    stat = lambda n: x.new_empty((n,), dtype=acc)  # noqa: E731
    return (torch.empty_like(x, memory_format=torch.contiguous_format), stat(rows), stat(rows),
            stat(c), stat(c), stat(c))


@register_fake("prep_bn_bwd")
def _(dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, lam, training, norm,
      mask):
    c, acc = x.shape[-1], _acc_dtype(x)
    stat = lambda n: x.new_empty((n,), dtype=acc)  # noqa: E731
    return (torch.empty_like(x, memory_format=torch.contiguous_format), stat(c), stat(c), stat(c),
            stat(c), stat(1))


@register_fake("prep_bn_stats")
def _(x, mask):
    c, acc = x.shape[-1], _acc_dtype(x)
    return x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), x.new_empty((1,), dtype=acc)


@register_fake("prep_bn_apply")
def _(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, bn_mean, bn_rstd, lam, norm_eps, norm):
    rows, acc = _row_stat_len(x, norm), _acc_dtype(x)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((rows,), dtype=acc), x.new_empty((rows,), dtype=acc))


@register_fake("prep_bn_bwd_reduce")
def _(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm, mask):
    c, acc = x.shape[-1], _acc_dtype(x)
    return x.new_empty((3, c), dtype=acc), x.new_empty((1,), dtype=acc)


@register_fake("prep_bn_bwd_apply")
def _(dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, sums, count, lam,
      training, norm, mask):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _prep_bn_fwd_setup_context(ctx, inputs, output):
    (x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, _rm, _rv, lam, training, _eps, _neps,
     norm, mask) = inputs
    _y, row_mean, row_rstd, bn_mean, bn_rstd, bn_var = output
    # Statistics are outputs for the backward and the running-stat update, never differentiated:
    # marking them keeps the in-place update of running_mean/running_var out of the graph.
    ctx.mark_non_differentiable(row_mean, row_rstd, bn_mean, bn_rstd, bn_var)
    ctx.save_for_backward(x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, mask)
    ctx.lam, ctx.training, ctx.norm = lam, training, norm
    ctx.param_dtypes = [None if t is None else t.dtype
                        for t in (norm_weight, norm_bias, bn_weight, bn_bias, alpha)]
    ctx.alpha_shape = alpha.shape


def _prep_bn_fwd_backward(ctx, dy, *_unused_stat_grads):
    x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, mask = ctx.saved_tensors
    dx, d_nw, d_nb, d_bw, d_bb, d_alpha = _lib.prep_bn_bwd(
        dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd,
        ctx.lam, ctx.training, ctx.norm, mask,
    )
    grads = [None if dt is None else g.to(dt)
             for g, dt in zip((d_nw, d_nb, d_bw, d_bb, d_alpha), ctx.param_dtypes)]
    grads[4] = grads[4].reshape(ctx.alpha_shape)
    return (dx.view_as(x), *grads, None, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "slab::prep_bn_fwd", _prep_bn_fwd_backward, setup_context=_prep_bn_fwd_setup_context
)


@register_fake("bn_update_running_stats")
def _(running_mean, running_var, mean, var, momentum):
    return None
