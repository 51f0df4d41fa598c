"""PRepBN / RepBN references (SPEC section 1), plain PyTorch (no slab ops).

Used by the tests (run in float64 on float64 copies of the inputs) and by the benchmarks (the eager
composite modules below). Everything here is a composite of ordinary torch ops, so autograd
differentiates it, and it computes in the dtype of its inputs.

Functional references
---------------------
rep_bn(x, weight, bias, alpha, running_mean, running_var, training, momentum, eps, mask)
    y = BN(x) + alpha * x with BatchNorm statistics over every dim of x but the last, taken over the
    tokens where ``mask`` is True (all tokens when ``mask`` is None); every token is normalised with
    them. In training the running stats are updated in place like ``torch.nn.BatchNorm1d``
    (momentum, unbiased variance with n = number of kept tokens). In eval the running stats are used:
    y = x * (weight / sqrt(running_var + eps) + alpha) + (bias - running_mean * weight / sqrt(running_var + eps)).
prep_bn(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, running_mean, running_var, lam, training, ...)
    y = lam * Norm1(x) + (1 - lam) * RepBN(x), Norm1 = LayerNorm (norm="layer") or RMSNorm (norm="rms").

Eager modules (what SLAB's public code computes; the baseline of the benchmarks)
-----------------------------------------------------------------------------
SlabRepBN(channels, eps, momentum, alpha_init)       keys: alpha, bn.*
SlabLinearNorm(dim, norm, warm, step, r0, eps, norm_eps, alpha_init)
                                                     keys: warm, iter, total_step, norm1.*, norm2.*
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = [
    "batch_stats",
    "update_running_stats",
    "rep_bn",
    "norm1",
    "prep_bn",
    "SlabRepBN",
    "SlabLinearNorm",
]


def _check_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")


def batch_stats(x: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Per-channel statistics over the kept tokens of x (..., C).

    Returns (mean[C], biased_var[C], n) with n the number of kept tokens (a Python int).
    Two-pass (mean first, then squared deviations), so it stays accurate for large offsets.
    """
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., C)")
    _check_mask(x, mask)
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    if mask is not None:
        rows = rows[mask.reshape(-1).to(rows.device)]
    n = rows.shape[0]
    mean = rows.mean(dim=0)
    var = (rows - mean).square().mean(dim=0)
    return mean, var, n


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var_unbiased, momentum: float) -> None:
    """In place, as torch.nn.BatchNorm1d: r = (1 - momentum) * r + momentum * batch_value."""
    new_mean = (1.0 - momentum) * running_mean + momentum * mean.detach().to(running_mean.dtype)
    new_var = (1.0 - momentum) * running_var + momentum * var_unbiased.detach().to(running_var.dtype)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


def rep_bn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """RepBN: BatchNorm over the last dim of x (statistics over all other dims) plus alpha * x."""
    _check_mask(x, mask)
    if training:
        mean, var, n = batch_stats(x, mask)
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n} kept token(s)")
        if running_mean is not None and running_var is not None:
            update_running_stats(running_mean, running_var, mean, var * (n / (n - 1)), momentum)
        rstd = torch.rsqrt(var + eps)
        return (x - mean) * (rstd * weight) + bias + alpha * x
    rm = running_mean.to(x.dtype)
    rv = running_var.to(x.dtype)
    scale = weight * torch.rsqrt(rv + eps)
    return x * (scale + alpha) + (bias - rm * scale)


def norm1(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    norm: str = "layer",
) -> torch.Tensor:
    """The per-token norm of PRepBN: LayerNorm(C) or RMSNorm(C) over the last dim."""
    if norm == "layer":
        # Two-pass, spelled out (like F.layer_norm, but exact for C == 1: x - mean == 0).
        d = x - x.mean(dim=-1, keepdim=True)
        y = d * torch.rsqrt(d.square().mean(dim=-1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y
    if norm == "rms":
        if bias is not None:
            raise ValueError('norm_bias must be None for norm="rms"')
        y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
        return y * weight if weight is not None else y
    raise ValueError(f'norm must be "layer" or "rms", got {norm!r}')


def prep_bn(
    x: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    lam: float,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    norm_eps: float = 1e-6,
    norm: str = "layer",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PRepBN: lam * Norm1(x) + (1 - lam) * RepBN(x) (RepBN always runs, so training updates the running stats)."""
    if norm not in ("layer", "rms"):
        raise ValueError(f'norm must be "layer" or "rms", got {norm!r}')
    n1 = norm1(x, norm_weight, norm_bias, norm_eps, norm)
    rb = rep_bn(x, bn_weight, bn_bias, alpha, running_mean, running_var, training, momentum, eps, mask)
    return lam * n1 + (1.0 - lam) * rb


class SlabRepBN(nn.Module):
    """Eager RepBN as SLAB writes it: BatchNorm1d over the channels of a (B, N, C) tensor (transposed to
    (B, C, N)) plus a learnable scalar times the input. State-dict keys: ``alpha``, ``bn.*``.

    Other ranks are reshaped to (B, N, C) around the same computation. A padding mask (SLAB has none) falls
    back to the functional reference with the module's own parameters and buffers.
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, alpha_init: float = 1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.bn = nn.BatchNorm1d(channels, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            bn = self.bn
            if self.training:
                bn.num_batches_tracked.add_(1)
            return rep_bn(
                x,
                bn.weight,
                bn.bias,
                self.alpha,
                bn.running_mean,
                bn.running_var,
                self.training,
                bn.momentum,
                bn.eps,
                mask,
            )
        shape = x.shape
        if x.dim() == 2:  # (T, C): BatchNorm1d takes it directly
            return self.bn(x) + self.alpha * x
        x3 = x if x.dim() == 3 else x.reshape(shape[0], -1, shape[-1])
        xt = x3.transpose(1, 2)  # (B, C, N)
        y = (self.bn(xt) + self.alpha * xt).transpose(1, 2)
        return y if x.dim() == 3 else y.reshape(shape)


class SlabLinearNorm(nn.Module):
    """Eager PRepBN as SLAB's LinearNorm: Norm1 only for ``warm`` training steps, then
    ``lam * norm1(x) + (1 - lam) * norm2(x)`` with ``lam = r0 * iter / total_step``, ``iter`` counting down
    to 0 by one per training step; eval runs norm2 (the RepBN) only.
    Keys: buffers ``warm``, ``iter``, ``total_step``; ``norm1.*`` (LayerNorm or RMSNorm), ``norm2.*`` (RepBN).
    """

    def __init__(
        self,
        dim: int,
        norm: str = "layer",
        warm: int = 0,
        step: int = 300000,
        r0: float = 1.0,
        eps: float = 1e-5,
        norm_eps: float = 1e-6,
        alpha_init: float = 1.0,
    ):
        super().__init__()
        if norm == "layer":
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        elif norm == "rms":
            self.norm1 = nn.RMSNorm(dim, eps=norm_eps)
        else:
            raise ValueError(f'norm must be "layer" or "rms", got {norm!r}')
        self.norm2 = SlabRepBN(dim, eps=eps, alpha_init=alpha_init)
        self.r0 = r0
        self.register_buffer("warm", torch.tensor(int(warm), dtype=torch.long))
        self.register_buffer("iter", torch.tensor(int(step), dtype=torch.long))
        self.register_buffer("total_step", torch.tensor(int(step), dtype=torch.long))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.training:
            return self.norm2(x, mask)
        if self.warm > 0:
            self.warm.sub_(1)
            return self.norm1(x)
        lam = self.r0 * self.iter / self.total_step
        if self.iter > 0:
            self.iter.sub_(1)
        return lam * self.norm1(x) + (1 - lam) * self.norm2(x, mask)
