"""LARS (You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017), fused,
with NVIDIA's LARC clipping as an option:

    local_lr = trust_coefficient * ||x|| / (||g|| + weight_decay * ||x|| + eps)   (1 if ||x|| or ||g|| is 0)
    LARC clip: local_lr = min(local_lr / lr, 1)     (the global lr then caps the step)
    buf = momentum * buf + local_lr * (g + weight_decay * x);    x = x - lr * buf

Per (device, dtype) bucket: one fused pass for ||x||^2 and ||g||^2 (two reductions) and one fused
momentum pass (reads x, g, buf; writes x, buf).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import optim as _ops
from ._base import (
    FusedOptimizer,
    acc_dtype,
    all_reduce_,
    buckets,
    check_fraction,
    check_number,
    local,
    on,
    params_with_grad,
    shard_groups,
)

__all__ = ["LARS"]


class LARS(FusedOptimizer):
    """LARS / LARC: momentum SGD with a per-tensor ("layer-wise") adaptive rate.

    Args:
        params: parameters or parameter groups (put biases / norm weights in a group of their own
            if they should be excluded from weight decay, as the paper's setups do).
        lr (float or Tensor, default 1.0): the global rate (the paper's gamma, usually scheduled);
            a one-element tensor may be given (capturable).
        momentum (float, default 0.9): the paper's value.
        weight_decay (float, default 5e-4): the paper's value (beta), L2 added to the gradient.
        trust_coefficient (float, default 1e-3): the paper's eta.
        eps (float, default 1e-8): added to the denominator of the local rate (as LARC does).
        clip (bool, default False): LARC's clipping, ``min(local_lr / lr, 1)``.
        maximize (bool, default False): ascend instead of descend.

    State per parameter: ``momentum_buffer`` (float32 for float32/bf16/fp16 parameters).
    GradScaler is supported as in :class:`slab.optim.DoG`. Hyperparameters (also edited
    ``param_groups``) are checked at every step.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        clip: bool = False,
        *,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                eps=eps,
                clip=clip,
                maximize=maximize,
            ),
        )

    def _check_group(self, group: dict, *, read_tensor: bool = False) -> None:
        check_number("lr", group["lr"], allow_tensor=True, read_tensor=read_tensor)
        check_fraction("momentum", group["momentum"])
        check_number("weight_decay", group["weight_decay"])
        check_number("trust_coefficient", group["trust_coefficient"], positive=True)
        check_number("eps", group["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss, grad_scale, found_inf = self._begin_step(closure)
        for group in self.param_groups:
            ps = params_with_grad("LARS", group)
            self._zero_states(ps, "momentum_buffer")
            wd = group["weight_decay"]
            groups = shard_groups(ps)
            xs = [local(p) for p in ps]
            for idx in buckets(xs):
                bp = [xs[i] for i in idx]
                d, acc = bp[0].device, acc_dtype(bp[0].dtype)
                gs = on(grad_scale, d)
                grads = [local(ps[i].grad) for i in idx]
                sq = torch.stack([_ops.multi_tensor_sq_norm(bp), _ops.multi_tensor_sq_norm(grads, None, 0.0, gs)])
                x_norm, g_norm = all_reduce_(sq, groups).sqrt().unbind(0)
                rate = group["trust_coefficient"] * x_norm / (g_norm + wd * x_norm + group["eps"])
                rate = torch.where((x_norm > 0) & (g_norm > 0), rate, torch.ones_like(rate))
                lr = group["lr"]
                lr = lr.to(d, acc).reshape(1) if isinstance(lr, Tensor) else torch.full((1,), lr, dtype=acc, device=d)
                if group["clip"]:
                    rate = torch.minimum(rate / lr, torch.ones_like(rate))
                _ops.momentum_update_(
                    bp,
                    grads,
                    [local(self.state[ps[i]]["momentum_buffer"]) for i in idx],
                    rate.contiguous(),
                    lr,
                    group["momentum"],
                    wd,
                    group["maximize"],
                    gs,
                    on(found_inf, d),
                )
        return loss
