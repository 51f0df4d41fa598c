"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
ICLR 2020), fused: Adam moments and a per-tensor trust ratio.

    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * x
    x = x - lr * phi(||x||) / ||u|| * u,   phi(z) = min(z, clamp_value)   (phi = identity if None)

The trust ratio is 1 when ||x|| or ||u|| is 0. Two fused passes per (device, dtype) bucket:
stage 1 updates m, v and measures ||x||^2 and ||u||^2 per tensor; stage 2 recomputes u from
m, v and applies it (u is never stored).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import optim as _ops
from ._base import (
    FusedOptimizer,
    acc_dtype,
    advance_steps,
    all_reduce_,
    bias_corrections,
    buckets,
    check_betas,
    check_number,
    local,
    on,
    params_with_grad,
    shard_groups,
)

__all__ = ["LAMB"]


def _lr_on(lr, device, dtype) -> Tensor:
    return lr.to(device, dtype).reshape(()) if isinstance(lr, Tensor) else torch.tensor(lr, dtype=dtype, device=device)


class LAMB(FusedOptimizer):
    """LAMB: Adam's direction (with decoupled weight decay) scaled per tensor by ``||x|| / ||u||``.

    Args:
        params: parameters or parameter groups.
        lr (float or Tensor, default 1e-3): a one-element tensor may be given (capturable).
        betas (tuple, default (0.9, 0.999)): the paper's values.
        eps (float, default 1e-6): the paper's value (added to sqrt(v_hat)).
        weight_decay (float, default 0.01): the paper's BERT value; decoupled (inside the trust ratio).
        bias_correction (bool, default True): divide m, v by 1 - beta^t (the paper's Algorithm 2).
        clamp_value (float or None, default None): if given, the scaling function
            ``phi(||x||) = min(||x||, clamp_value)`` (the paper's phi with gamma_u = clamp_value);
            None keeps the identity.
        maximize (bool, default False): ascend instead of descend.

    State per parameter: ``step`` (float32 tensor: the steps in which the parameter had a
    gradient), ``exp_avg``, ``exp_avg_sq`` (float32 for float32/bf16/fp16 parameters). GradScaler
    is supported as in :class:`slab.optim.DoG`. Hyperparameters (also edited ``param_groups``) are
    checked at every step.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        clamp_value: Optional[float] = None,
        *,
        maximize: bool = False,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                bias_correction=bias_correction,
                clamp_value=clamp_value,
                maximize=maximize,
            ),
        )

    def _check_group(self, group: dict, *, read_tensor: bool = False) -> None:
        check_number("lr", group["lr"], allow_tensor=True, read_tensor=read_tensor)
        check_betas(group["betas"])
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        if group["clamp_value"] is not None:
            check_number("clamp_value", group["clamp_value"], positive=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss, grad_scale, found_inf = self._begin_step(closure)
        for group in self.param_groups:
            ps = params_with_grad("LAMB", group)
            self._zero_states(ps, "exp_avg", "exp_avg_sq")
            b1, b2 = group["betas"]
            args = (b1, b2, group["eps"], group["weight_decay"])
            groups = shard_groups(ps)
            xs = [local(p) for p in ps]
            for idx in buckets(xs):
                bp = [xs[i] for i in idx]
                sts = [self.state[ps[i]] for i in idx]
                d, acc = bp[0].device, acc_dtype(bp[0].dtype)
                steps = advance_steps(sts, d, found_inf)
                ms = [local(st["exp_avg"]) for st in sts]
                vs = [local(st["exp_avg_sq"]) for st in sts]
                gs, fi = on(grad_scale, d), on(found_inf, d)
                bc = bias_corrections(steps, b1, b2, group["bias_correction"], acc)
                grads = [local(ps[i].grad) for i in idx]
                norms = all_reduce_(_ops.lamb_stage1_(bp, grads, ms, vs, bc, *args, group["maximize"], gs, fi), groups)
                x_norm, u_norm = norms[:, 0].sqrt(), norms[:, 1].sqrt()
                phi = x_norm if group["clamp_value"] is None else x_norm.clamp(max=group["clamp_value"])
                trust = torch.where((x_norm > 0) & (u_norm > 0), phi / u_norm, torch.ones_like(u_norm))
                lr = _lr_on(group["lr"], d, acc)
                _ops.lamb_stage2_(bp, ms, vs, bc, (lr * trust).contiguous(), *args, fi)
        return loss
