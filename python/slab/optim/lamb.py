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
    all_reduce_,
    buckets,
    check_number,
    local,
    on,
    params_with_grad,
    shard_groups,
)

__all__ = ["LAMB"]


def _lr_on(lr, device, dtype) -> Tensor:
    return lr.to(device, dtype).reshape(()) if isinstance(lr, Tensor) else torch.tensor(lr, dtype=dtype, device=device)


def check_betas(betas) -> tuple[float, float]:
    if len(betas) != 2:
        raise ValueError(f"betas must hold two values, got {betas}")
    for i, b in enumerate(betas):
        check_number(f"betas[{i}]", b)
        if b >= 1:
            raise ValueError(f"Invalid betas[{i}]: {b} (expected a value in [0, 1))")
    return float(betas[0]), float(betas[1])


def bias_corrections(step: Tensor, beta1: float, beta2: float, enabled: bool, dtype: torch.dtype) -> Tensor:
    """[1 / (1 - beta1^t), 1 / sqrt(1 - beta2^t)] from the device step counter, computed in float64
    (1 - beta2^t cancels badly in float32 for small t), as ``dtype``; ones when disabled."""
    if not enabled:
        return torch.ones(2, dtype=dtype, device=step.device)
    t = step.to(torch.float64).reshape(1)
    betas = torch.cat([torch.full_like(t, beta1), torch.full_like(t, beta2)])  # fills: capturable, no copy
    bc = 1 - betas.pow(t)
    return torch.stack([1 / bc[0], bc[1].rsqrt()]).to(dtype)


def advance_step(state: dict, device, found_inf: Optional[Tensor]) -> Tensor:
    """state['step'] += 1 on the device (not when found_inf): a float32 tensor, never read on the host."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
    if found_inf is None:
        state["step"].add_(1)
    else:
        state["step"].add_((on(found_inf, device).reshape(()) == 0).to(torch.float32))
    return state["step"]


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

    State per parameter: ``step`` (float32 tensor), ``exp_avg``, ``exp_avg_sq`` (float32 for
    float32/bf16/fp16 parameters). GradScaler is supported as in :class:`slab.optim.DoG`.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True, clamp_value: Optional[float] = None, *,
                 maximize: bool = False):
        check_number("lr", lr, allow_tensor=True)
        check_number("eps", eps)
        check_number("weight_decay", weight_decay)
        if clamp_value is not None:
            check_number("clamp_value", clamp_value, positive=True)
        betas = check_betas(betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, clamp_value=clamp_value, maximize=maximize))

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
                # one step counter per bucket (torch keeps one per parameter; all advance together)
                step = advance_step(sts[0], d, found_inf)
                for st in sts[1:]:
                    st["step"] = step
                ms = [local(st["exp_avg"]) for st in sts]
                vs = [local(st["exp_avg_sq"]) for st in sts]
                gs, fi = on(grad_scale, d), on(found_inf, d)
                bc = bias_corrections(step, b1, b2, group["bias_correction"], acc)
                grads = [local(ps[i].grad) for i in idx]
                norms = all_reduce_(_ops.lamb_stage1_(bp, grads, ms, vs, bc, *args, group["maximize"], gs, fi), groups)
                x_norm, u_norm = norms[:, 0].sqrt(), norms[:, 1].sqrt()
                phi = x_norm if group["clamp_value"] is None else x_norm.clamp(max=group["clamp_value"])
                trust = torch.where((x_norm > 0) & (u_norm > 0), phi / u_norm, torch.ones_like(u_norm))
                lr = _lr_on(group["lr"], d, acc)
                _ops.lamb_stage2_(bp, ms, vs, bc, (lr * trust).contiguous(), *args, fi)
        return loss
