"""Fused optimizer ops: wrappers over the multi-tensor engine ``torch.ops.slab.*`` plus fakes.

Each op takes lists of tensors of one (device, dtype) group and walks them in one pass (CPU:
parallel over chunks of all tensors; CUDA: one launch per 48 tensors). The in-place ops mutate
the lists their schema marks ``Tensor(a!)[]`` and return nothing; none is differentiable (they
are optimizer steps, run under ``torch.no_grad()``). The optimizers in :mod:`slab.optim` are the
documented entry; these are the building blocks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._fake import register_fake

__all__ = [
    "multi_tensor_sq_norm",
    "dog_update_",
    "lion_update_",
    "multi_tensor_lerp_",
    "lamb_stage1_",
    "lamb_stage2_",
    "momentum_update_",
    "adamp_stage1_",
    "adamp_stage2_",
]

_lib = torch.ops.slab


def _non_empty(tensors: Sequence[Tensor], name: str) -> list[Tensor]:
    # An empty list reaches no dispatch key; say what is wrong before the dispatcher does.
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor")
    return tensors


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def multi_tensor_sq_norm(
    tensors: Sequence[Tensor],
    others: Optional[Sequence[Tensor]] = None,
    weight_decay: float = 0.0,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """Per-tensor squared norms ``out[i] = ||tensors[i] / grad_scale + weight_decay * others[i]||^2``.

    Returns a float32 (float64 for float64 inputs) vector of ``len(tensors)`` values on their
    device. ``others`` (the parameters, for an L2 penalty) is needed when ``weight_decay != 0``.
    """
    others = None if others is None else list(others)
    return _lib.multi_tensor_sq_norm(_non_empty(tensors, "tensors"), others, weight_decay, grad_scale)


def dog_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    x0: Sequence[Tensor],
    eta: Tensor,
    dist2: Sequence[Tensor],
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """In place: ``x -= eta[i] * (g / grad_scale + weight_decay * x)`` (``-g`` when maximize), then
    ``dist2[i] = ||x_new - x0[i]||^2`` (one pass). Does nothing when ``found_inf`` is nonzero.
    ``x0``/``eta``/``dist2`` are float32 (float64 for float64 params); ``dist2[i]`` hold one value each.
    """
    _lib.dog_update_(
        _non_empty(params, "params"), list(grads), list(x0), eta, list(dist2), weight_decay, maximize, grad_scale,
        found_inf,
    )


def lion_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """In place, Lion: ``c = b1*m + (1-b1)*g; x = x*(1 - lr*wd) - lr*sign(c); m = b2*m + (1-b2)*g``
    with ``g`` unscaled by ``grad_scale`` (negated when maximize). Skipped when ``found_inf`` != 0.
    """
    _lib.lion_update_(
        _non_empty(params, "params"), list(grads), list(exp_avgs), lr, beta1, beta2, weight_decay, maximize, grad_scale,
        found_inf,
    )


def multi_tensor_lerp_(avg: Sequence[Tensor], x: Sequence[Tensor], weight: float) -> None:
    """In place: ``avg[i] += weight * (x[i] - avg[i])`` for every tensor (one pass)."""
    _lib.multi_tensor_lerp_(_non_empty(avg, "avg"), list(x), weight)


def lamb_stage1_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    bias_corr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Tensor:
    """LAMB stage 1, in place on the moments: ``m += (1-b1)(g - m)``, ``v += (1-b2)(g^2 - v)`` with
    ``g`` unscaled (negated when maximize); returns per-tensor ``[||x||^2, ||u||^2]`` (shape (n, 2))
    with ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * x``; ``bias_corr`` holds
    ``[1 / (1 - beta1^t), 1 / sqrt(1 - beta2^t)]`` (accumulation dtype). A found_inf step writes
    nothing and returns 0s."""
    return _lib.lamb_stage1_(
        _non_empty(params, "params"), list(grads), list(exp_avgs), list(exp_avg_sqs), bias_corr, beta1, beta2, eps,
        weight_decay, maximize, grad_scale, found_inf,
    )


def lamb_stage2_(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    bias_corr: Tensor,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    found_inf: Optional[Tensor] = None,
) -> None:
    """LAMB stage 2, in place: ``x -= lr[i] * u`` with ``u`` recomputed from the moments and
    ``lr[i]`` the per-tensor step (lr times the trust ratio)."""
    _lib.lamb_stage2_(
        _non_empty(params, "params"), list(exp_avgs), list(exp_avg_sqs), bias_corr, lr, beta1, beta2, eps,
        weight_decay, found_inf,
    )


def momentum_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    scale: Tensor,
    lr: Tensor,
    momentum: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """In place (LARS): ``buf = momentum * buf + scale[i] * (g + weight_decay * x); x -= lr * buf``."""
    _lib.momentum_update_(
        _non_empty(params, "params"), list(grads), list(momentum_buffers), scale, lr, momentum, weight_decay,
        maximize, grad_scale, found_inf,
    )


def adamp_stage1_(params, grads, exp_avgs, exp_avg_sqs, bias_corr: Tensor, beta1: float, beta2: float, eps: float,
                  nesterov: bool = False, maximize: bool = False, grad_scale: Optional[Tensor] = None,
                  found_inf: Optional[Tensor] = None) -> Tensor:
    """AdamP stage 1, in place on the moments (as :func:`lamb_stage1_`); returns per-row sums
    ``[<g,x>, <g,g>, <x,x>, <x,p>]`` (shape (total_rows, 4); rows = size(0) of 2+-D tensors, 1
    otherwise) with ``p = n / (sqrt(v_hat) + eps)`` the unprojected direction."""
    return _lib.adamp_stage1_(_non_empty(params, "params"), list(grads), list(exp_avgs), list(exp_avg_sqs), bias_corr,
                              beta1, beta2, eps, nesterov, maximize, grad_scale, found_inf)


def adamp_stage2_(params, grads, exp_avgs, exp_avg_sqs, bias_corr: Tensor, coef: Tensor, decay: Tensor, lr: Tensor,
                  beta1: float, beta2: float, eps: float, nesterov: bool = False, maximize: bool = False,
                  grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """AdamP stage 2, in place: ``x = x * (1 - decay[i]) - lr / bc1 * (p - coef[row] * x)``."""
    _lib.adamp_stage2_(_non_empty(params, "params"), list(grads), list(exp_avgs), list(exp_avg_sqs), bias_corr, coef,
                       decay, lr, beta1, beta2, eps, nesterov, maximize, grad_scale, found_inf)


def _rows(params) -> int:
    return sum(p.shape[0] if p.dim() > 1 else 1 for p in params)


# ---- fake tensors -------------------------------------------------------------------------------


@register_fake("multi_tensor_sq_norm")
def _sq_norm_fake(tensors, others=None, weight_decay=0.0, grad_scale=None):
    torch._check(len(tensors) > 0, lambda: "tensors must hold at least one tensor")
    return tensors[0].new_empty((len(tensors),), dtype=_acc(tensors[0].dtype))


@register_fake("dog_update_")
def _dog_update_fake(params, grads, x0, eta, dist2, weight_decay=0.0, maximize=False, grad_scale=None, found_inf=None):
    torch._check(len(grads) == len(params) and len(x0) == len(params) and len(dist2) == len(params))
    return None


@register_fake("lion_update_")
def _lion_update_fake(
    params, grads, exp_avgs, lr, beta1, beta2, weight_decay=0.0, maximize=False, grad_scale=None, found_inf=None
):
    torch._check(len(grads) == len(params) and len(exp_avgs) == len(params))
    return None


@register_fake("multi_tensor_lerp_")
def _lerp_fake(avg, x, weight):
    torch._check(len(avg) == len(x))
    return None


@register_fake("lamb_stage1_")
def _lamb_stage1_fake(params, grads, exp_avgs, exp_avg_sqs, bias_corr, beta1, beta2, eps, weight_decay,
                      maximize=False, grad_scale=None, found_inf=None):
    torch._check(len(params) > 0 and len(grads) == len(params) and len(exp_avgs) == len(params))
    return params[0].new_empty((len(params), 2), dtype=_acc(params[0].dtype))


@register_fake("lamb_stage2_")
def _lamb_stage2_fake(params, exp_avgs, exp_avg_sqs, bias_corr, lr, beta1, beta2, eps, weight_decay,
                      found_inf=None):
    torch._check(len(exp_avgs) == len(params) and len(exp_avg_sqs) == len(params))
    return None


@register_fake("momentum_update_")
def _momentum_update_fake(params, grads, momentum_buffers, scale, lr, momentum, weight_decay=0.0, maximize=False,
                          grad_scale=None, found_inf=None):
    torch._check(len(grads) == len(params) and len(momentum_buffers) == len(params))
    return None


@register_fake("adamp_stage1_")
def _adamp_stage1_fake(params, grads, exp_avgs, exp_avg_sqs, bias_corr, beta1, beta2, eps, nesterov=False,
                       maximize=False, grad_scale=None, found_inf=None):
    torch._check(len(params) > 0 and len(grads) == len(params) and len(exp_avgs) == len(params))
    return params[0].new_empty((_rows(params), 4), dtype=_acc(params[0].dtype))


@register_fake("adamp_stage2_")
def _adamp_stage2_fake(params, grads, exp_avgs, exp_avg_sqs, bias_corr, coef, decay, lr, beta1, beta2, eps,
                       nesterov=False, maximize=False, grad_scale=None, found_inf=None):
    torch._check(len(grads) == len(params) and len(exp_avgs) == len(params))
    return None
