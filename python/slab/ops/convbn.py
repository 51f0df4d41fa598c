"""Conv-BN fold (Efficient ConvBN "Tune mode"): a wrapper over ``torch.ops.slab.fold_conv_bn``
plus its fake tensors and autograd.

* :func:`fold_conv_bn` -- the weights of an eval-mode Conv/Linear followed by BatchNorm, folded
  into one layer on the fly, differentiable in the layer's weight and bias and in the BN affine
  parameters (the running statistics are constants).

Schemas and kernels live in C++ (csrc/convbn/convbn_ops.cpp).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dtypes import acc_dtype
from ._fake import register_fake

__all__ = ["fold_conv_bn"]

_lib = torch.ops.slab


def fold_conv_bn(
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """``(w', b')`` with ``conv(x, w', b') == batch_norm_eval(conv(x, weight, bias))``.

    Per output channel ``o`` (dim 0 of ``weight``: a conv weight (O, I/groups, *kernel) or a linear
    weight (O, I)), ``g = bn_weight / sqrt(running_var + eps)``, ``w'[o] = weight[o] * g[o]`` and
    ``b' = bn_bias + (bias - running_mean) * g``; a None ``bias`` / ``bn_bias`` counts as 0 and a
    None ``bn_weight`` as 1 (``affine=False``). Both results have ``weight``'s dtype (float32,
    bfloat16, float16 or float64); the per-channel vectors may be that dtype or float32 (a half
    model with float32 BatchNorm), arithmetic is float32 (float64 for float64 weights). ``eps``
    must be finite and >= 0; variances are used as given, as BatchNorm's eval mode does (a
    variance of -eps gives inf). Gradients flow to ``weight``, ``bias``, ``bn_weight`` and
    ``bn_bias``; the backward sums over each channel in a fixed order (deterministic).
    """
    return _lib.fold_conv_bn(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)


# ---- fake tensors ------------------------------------------------------------------------------


def _check_weight(weight: Tensor) -> None:
    torch._check(
        weight.dim() >= 2,
        lambda: (
            f"weight must have at least 2 dimensions (out_channels, in_channels, *kernel), got {tuple(weight.shape)}"
        ),
    )


def _check_vec(t: Optional[Tensor], weight: Tensor, name: str) -> None:
    if t is None:
        return
    torch._check(
        t.shape == (weight.shape[0],),
        lambda: f"{name} must have shape ({weight.shape[0]},) = (out_channels of weight,), got {tuple(t.shape)}",
    )
    torch._check(
        t.dtype in (weight.dtype, acc_dtype(weight.dtype)),
        lambda: f"{name} must be {weight.dtype} or {acc_dtype(weight.dtype)} to match weight, got {t.dtype}",
    )


@register_fake("fold_conv_bn")
def _(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    _check_weight(weight)
    for t, name in (
        (bias, "bias"),
        (bn_weight, "bn_weight"),
        (bn_bias, "bn_bias"),
        (running_mean, "running_mean"),
        (running_var, "running_var"),
    ):
        _check_vec(t, weight, name)
    return torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((weight.shape[0],))


@register_fake("fold_conv_bn_backward")
def _(grad_weight, grad_bias, weight, bias, bn_weight, running_mean, running_var, eps, weight_grad, bn_weight_grad):
    _check_weight(weight)
    torch._check(
        grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype,
        lambda: "grad_weight must have the shape and dtype of weight",
    )
    for t, name in (
        (grad_bias, "grad_bias"),
        (bias, "bias"),
        (bn_weight, "bn_weight"),
        (running_mean, "running_mean"),
        (running_var, "running_var"),
    ):
        _check_vec(t, weight, name)
    o, acc = weight.shape[0], acc_dtype(weight.dtype)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty((0,))
    return (
        dw,
        weight.new_empty((o,), dtype=acc),
        weight.new_empty((o if bn_weight_grad else 0,), dtype=acc),
        weight.new_empty((o,), dtype=acc),
    )


# ---- autograd ----------------------------------------------------------------------------------


def _fold_setup_context(ctx, inputs, output):
    weight, bias, bn_weight, bn_bias, running_mean, running_var, eps = inputs
    ctx.weight_grad, ctx.bn_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    # weight is read only for bn_weight's gradient
    ctx.save_for_backward(weight if ctx.bn_weight_grad else None, bias, bn_weight, running_mean, running_var)
    ctx.eps = eps
    ctx.dtypes = [None if t is None else t.dtype for t in (bias, bn_weight, bn_bias)]


def _fold_backward(ctx, grad_weight, grad_bias):
    weight, bias, bn_weight, running_mean, running_var = ctx.saved_tensors
    dw, db, dg, dbeta = _lib.fold_conv_bn_backward(
        grad_weight,
        grad_bias,
        grad_weight if weight is None else weight,
        bias,
        bn_weight,
        running_mean,
        running_var,
        ctx.eps,
        ctx.weight_grad,
        ctx.bn_weight_grad,
    )
    need = ctx.needs_input_grad
    vec = [g.to(dt) if n and dt is not None else None for g, n, dt in zip((db, dg, dbeta), need[1:4], ctx.dtypes)]
    return (dw if need[0] else None, *vec, None, None, None)


torch.library.register_autograd("slab::fold_conv_bn", _fold_backward, setup_context=_fold_setup_context)
