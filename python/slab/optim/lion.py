"""Lion ("Symbolic Discovery of Optimization Algorithms", Chen et al. 2023), fused:

    c = beta1 * m + (1 - beta1) * g
    x = x * (1 - lr * weight_decay) - lr * sign(c)      (decoupled weight decay)
    m = beta2 * m + (1 - beta2) * g

One pass per (device, dtype) bucket: reads x, g, m, writes x, m.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import optim as _ops
from ._base import FusedOptimizer, acc_dtype, buckets, check_betas, check_number, local, on, params_with_grad

__all__ = ["Lion"]


class Lion(FusedOptimizer):
    """Lion: sign of an interpolated momentum, decoupled weight decay.

    Args:
        params: parameters or parameter groups.
        lr (float or Tensor, default 1e-4): the paper's default; it suggests a value 3-10x smaller
            than AdamW's. A one-element tensor on the parameters' device may be given (capturable).
        betas (tuple, default (0.9, 0.99)): beta1 interpolates the update direction, beta2 the
            momentum (the paper's defaults).
        weight_decay (float, default 0.0): decoupled, multiplied by lr (the paper suggests a value
            3-10x larger than AdamW's when used).
        maximize (bool, default False): ascend instead of descend.

    State per parameter: ``exp_avg`` (float32 for float32/bf16/fp16 parameters). GradScaler is
    supported as in :class:`slab.optim.DoG`. Hyperparameters (also edited ``param_groups``) are
    checked at every step.
    """

    def __init__(
        self, params, lr: float | Tensor = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *, maximize: bool = False
    ):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    def _check_group(self, group: dict, *, read_tensor: bool = False) -> None:
        check_number("lr", group["lr"], allow_tensor=True, read_tensor=read_tensor)
        check_betas(group["betas"])
        check_number("weight_decay", group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss, grad_scale, found_inf = self._begin_step(closure)
        for group in self.param_groups:
            ps = params_with_grad("Lion", group)
            self._zero_states(ps, "exp_avg")
            beta1, beta2 = group["betas"]
            xs = [local(p) for p in ps]  # Lion is element-wise: shards need no communication
            for idx in buckets(xs):
                bp = [xs[i] for i in idx]
                d, acc = bp[0].device, acc_dtype(bp[0].dtype)
                sts = [self.state[ps[i]] for i in idx]
                lr = group["lr"]
                lr = lr.to(d, acc).reshape(1) if isinstance(lr, Tensor) else torch.full((1,), lr, dtype=acc, device=d)
                _ops.lion_update_(
                    bp,
                    [local(ps[i].grad) for i in idx],
                    [local(st["exp_avg"]) for st in sts],
                    lr,
                    beta1,
                    beta2,
                    group["weight_decay"],
                    group["maximize"],
                    on(grad_scale, d),
                    on(found_inf, d),
                )
        return loss
