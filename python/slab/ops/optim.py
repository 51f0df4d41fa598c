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

from ._dtypes import acc_dtype
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


def _tensors(tensors: Sequence[Tensor], name: str) -> list[Tensor]:
    # torch refuses a None (or any non-tensor) inside a Tensor[] argument without saying which
    # element; name it, as the C++ checks name a None for a single tensor argument.
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise RuntimeError(f"{name}[{i}] must be a tensor, got {'None' if t is None else type(t).__name__}")
    return tensors


def _non_empty(tensors: Sequence[Tensor], name: str) -> list[Tensor]:
    # An empty list reaches no dispatch key; say what is wrong before the dispatcher does.
    tensors = _tensors(tensors, name)
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor")
    return tensors


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
    others = None if others is None else _tensors(others, "others")
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
        _non_empty(params, "params"),
        _tensors(grads, "grads"),
        _tensors(x0, "x0"),
        eta,
        _tensors(dist2, "dist2"),
        weight_decay,
        maximize,
        grad_scale,
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
        _non_empty(params, "params"),
        _tensors(grads, "grads"),
        _tensors(exp_avgs, "exp_avgs"),
        lr,
        beta1,
        beta2,
        weight_decay,
        maximize,
        grad_scale,
        found_inf,
    )


def multi_tensor_lerp_(avg: Sequence[Tensor], x: Sequence[Tensor], weight: float) -> None:
    """In place: ``avg[i] += weight * (x[i] - avg[i])`` for every tensor (one pass)."""
    _lib.multi_tensor_lerp_(_non_empty(avg, "avg"), _tensors(x, "x"), weight)


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
    with ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * x``; row ``i`` of ``bias_corr``
    (shape (n, 2), accumulation dtype) holds ``[1 / (1 - beta1^t), 1 / sqrt(1 - beta2^t)]`` with
    ``t`` the step count of tensor ``i``. A found_inf step writes nothing and returns 0s."""
    return _lib.lamb_stage1_(
        _non_empty(params, "params"),
        _tensors(grads, "grads"),
        _tensors(exp_avgs, "exp_avgs"),
        _tensors(exp_avg_sqs, "exp_avg_sqs"),
        bias_corr,
        beta1,
        beta2,
        eps,
        weight_decay,
        maximize,
        grad_scale,
        found_inf,
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
    ``lr[i]`` the per-tensor step (lr times the trust ratio); ``bias_corr`` as in :func:`lamb_stage1_`."""
    _lib.lamb_stage2_(
        _non_empty(params, "params"),
        _tensors(exp_avgs, "exp_avgs"),
        _tensors(exp_avg_sqs, "exp_avg_sqs"),
        bias_corr,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        found_inf,
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
        _non_empty(params, "params"),
        _tensors(grads, "grads"),
        _tensors(momentum_buffers, "momentum_buffers"),
        scale,
        lr,
        momentum,
        weight_decay,
        maximize,
        grad_scale,
        found_inf,
    )


def adamp_stage1_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    bias_corr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Tensor:
    """AdamP stage 1, in place on the moments (as :func:`lamb_stage1_`, per-tensor ``bias_corr`` of
    shape (n, 2) too); returns per-row sums ``[<g,x>, <g,g>, <x,x>, <x,p>]`` (shape (total_rows, 4);
    rows = size(0) of 2+-D tensors, 1 otherwise) with ``p = n / (sqrt(v_hat) + eps)`` the
    unprojected direction."""
    return _lib.adamp_stage1_(
        _non_empty(params, "params"),
        _tensors(grads, "grads"),
        _tensors(exp_avgs, "exp_avgs"),
        _tensors(exp_avg_sqs, "exp_avg_sqs"),
        bias_corr,
        beta1,
        beta2,
        eps,
        nesterov,
        maximize,
        grad_scale,
        found_inf,
    )


def adamp_stage2_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    bias_corr: Tensor,
    coef: Tensor,
    decay: Tensor,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """AdamP stage 2, in place: ``x = x * (1 - decay[i]) - lr / bc1[i] * (p - coef[row] * x)``."""
    _lib.adamp_stage2_(
        _non_empty(params, "params"),
        _tensors(grads, "grads"),
        _tensors(exp_avgs, "exp_avgs"),
        _tensors(exp_avg_sqs, "exp_avg_sqs"),
        bias_corr,
        coef,
        decay,
        lr,
        beta1,
        beta2,
        eps,
        nesterov,
        maximize,
        grad_scale,
        found_inf,
    )


def _rows(params) -> int:
    return sum(p.shape[0] if p.dim() > 1 else 1 for p in params)


# ---- fake tensors -------------------------------------------------------------------------------
# The fakes check what the real ops check of the tensors (list lengths, shapes, dtypes; the device
# rule is register_fake's), so a traced call fails where the eager one would, with the same error
# type (RuntimeError: the real ops' checks raise nothing else through torch's stable ABI).

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_lead(ts, name: str) -> torch.dtype:
    torch._check(len(ts) > 0, lambda: f"{name} must hold at least one tensor")
    dtype = ts[0].dtype
    torch._check(dtype in _KERNEL_DTYPES, lambda: f"{name}[0] must be float32, bfloat16 or float16, got {dtype}")
    for i, t in enumerate(ts):
        torch._check(t.dtype == dtype, lambda: f"{name}[{i}] has dtype {t.dtype} but {name}[0] has {dtype}")
    return dtype


def _check_like(ts, lead, dtype: torch.dtype, name: str, lead_name: str) -> None:
    torch._check(
        len(ts) == len(lead), lambda: f"{name} must hold {len(lead)} tensors (one per {lead_name}), got {len(ts)}"
    )
    for i, (t, ref) in enumerate(zip(ts, lead)):
        torch._check(
            t.shape == ref.shape,
            lambda: f"{name}[{i}] must have the shape of {lead_name}[{i}] {ref.shape}, got {t.shape}",
        )
        torch._check(t.dtype == dtype, lambda: f"{name}[{i}] must be {dtype}, got {t.dtype}")


def _check_vector(t, n, dtype: torch.dtype, name: str) -> None:
    """``n`` values of ``dtype`` in any shape, as the real ops accept their per-tensor vectors."""
    torch._check(t is not None, lambda: f"{name} must be a tensor, got None")
    torch._check(
        t.numel() == n and t.dtype == dtype,
        lambda: f"{name} must be a {dtype} tensor of {n} elements, got {t.dtype} {t.shape}",
    )


def _check_moments(params, grads, exp_avgs, exp_avg_sqs, bias_corr) -> torch.dtype:
    """The lists and bias corrections of the LAMB and AdamP stages; returns the accumulation dtype."""
    acc = acc_dtype(_check_lead(params, "params"))
    if grads is not None:
        _check_like(grads, params, params[0].dtype, "grads", "params")
    _check_like(exp_avgs, params, acc, "exp_avgs", "params")
    _check_like(exp_avg_sqs, params, acc, "exp_avg_sqs", "params")
    torch._check(bias_corr is not None, lambda: "bias_corr must be a tensor, got None")
    torch._check(
        bias_corr.shape == (len(params), 2) and bias_corr.dtype == acc,
        lambda: f"bias_corr must be a {acc} tensor of shape ({len(params)}, 2), got {bias_corr.shape}",
    )
    return acc


@register_fake("multi_tensor_sq_norm")
def _sq_norm_fake(tensors, others=None, weight_decay=0.0, grad_scale=None):
    dtype = _check_lead(tensors, "tensors")
    if others:
        _check_like(others, tensors, dtype, "others", "tensors")
    return tensors[0].new_empty((len(tensors),), dtype=acc_dtype(dtype))


@register_fake("dog_update_")
def _dog_update_fake(params, grads, x0, eta, dist2, weight_decay=0.0, maximize=False, grad_scale=None, found_inf=None):
    acc = acc_dtype(_check_lead(params, "params"))
    _check_like(grads, params, params[0].dtype, "grads", "params")
    _check_like(x0, params, acc, "x0", "params")
    _check_vector(eta, len(params), acc, "eta")
    torch._check(len(dist2) == len(params), lambda: f"dist2 must hold {len(params)} tensors, got {len(dist2)}")
    for i, d in enumerate(dist2):
        _check_vector(d, 1, acc, f"dist2[{i}]")
    return None


@register_fake("lion_update_")
def _lion_update_fake(
    params, grads, exp_avgs, lr, beta1, beta2, weight_decay=0.0, maximize=False, grad_scale=None, found_inf=None
):
    acc = acc_dtype(_check_lead(params, "params"))
    _check_like(grads, params, params[0].dtype, "grads", "params")
    _check_like(exp_avgs, params, acc, "exp_avgs", "params")
    _check_vector(lr, 1, acc, "lr")
    return None


@register_fake("multi_tensor_lerp_")
def _lerp_fake(avg, x, weight):
    _check_like(x, avg, _check_lead(avg, "avg"), "x", "avg")
    return None


@register_fake("lamb_stage1_")
def _lamb_stage1_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    bias_corr,
    beta1,
    beta2,
    eps,
    weight_decay,
    maximize=False,
    grad_scale=None,
    found_inf=None,
):
    acc = _check_moments(params, grads, exp_avgs, exp_avg_sqs, bias_corr)
    return params[0].new_empty((len(params), 2), dtype=acc)


@register_fake("lamb_stage2_")
def _lamb_stage2_fake(params, exp_avgs, exp_avg_sqs, bias_corr, lr, beta1, beta2, eps, weight_decay, found_inf=None):
    acc = _check_moments(params, None, exp_avgs, exp_avg_sqs, bias_corr)
    _check_vector(lr, len(params), acc, "lr")
    return None


@register_fake("momentum_update_")
def _momentum_update_fake(
    params,
    grads,
    momentum_buffers,
    scale,
    lr,
    momentum,
    weight_decay=0.0,
    maximize=False,
    grad_scale=None,
    found_inf=None,
):
    acc = acc_dtype(_check_lead(params, "params"))
    _check_like(grads, params, params[0].dtype, "grads", "params")
    _check_like(momentum_buffers, params, acc, "momentum_buffers", "params")
    _check_vector(scale, len(params), acc, "scale")
    _check_vector(lr, 1, acc, "lr")
    return None


@register_fake("adamp_stage1_")
def _adamp_stage1_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    bias_corr,
    beta1,
    beta2,
    eps,
    nesterov=False,
    maximize=False,
    grad_scale=None,
    found_inf=None,
):
    acc = _check_moments(params, grads, exp_avgs, exp_avg_sqs, bias_corr)
    return params[0].new_empty((_rows(params), 4), dtype=acc)


@register_fake("adamp_stage2_")
def _adamp_stage2_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    bias_corr,
    coef,
    decay,
    lr,
    beta1,
    beta2,
    eps,
    nesterov=False,
    maximize=False,
    grad_scale=None,
    found_inf=None,
):
    acc = _check_moments(params, grads, exp_avgs, exp_avg_sqs, bias_corr)
    _check_vector(coef, _rows(params), acc, "coef")
    _check_vector(decay, len(params), acc, "decay")
    _check_vector(lr, 1, acc, "lr")
    return None
