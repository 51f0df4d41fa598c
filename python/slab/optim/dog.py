"""DoG and LDoG (Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend", ICML 2023), fused.

Semantics of the public formll/dog implementation (docs/optim.md):

    rbar_0 = reps_rel * (1 + ||x_0||)
    rbar_t = max(rbar_{t-1}, ||x_t - x_0||)        (current iterate, before the update)
    G_t    = G_{t-1} + ||g_t||^2                   (g_t includes weight_decay * x_t)
    eta_t  = lr * rbar_t / sqrt(G_t + eps)          (eps once under the root)
    x_{t+1} = x_t - eta_t * g_t

Norms run over the whole parameter group (DoG) or per tensor (LDoG). A step is two fused passes
per (device, dtype) bucket: the squared gradient norms (reads g, and x when weight_decay > 0), and
the update, which also measures ||x_{t+1} - x_0||^2 for the next step's rbar (reads x, g, x_0,
writes x): 20 bytes per float32 parameter without weight decay. The scalar rule in between runs
as a few tensor ops on the device: ``step()`` never synchronises with the host.
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

__all__ = ["DoG", "LDoG"]


def _scalar_dtype(tensors: list[Tensor]) -> torch.dtype:
    """dtype of the scalar rule: float32, float64 when a tensor is float64 (float64 runs stay exact)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _gather(scalars: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The per-parameter state scalars as one vector on ``device``."""
    if all(t.device == device and t.dtype == dtype for t in scalars):
        return torch.stack(scalars)
    return torch.stack([t.to(device, dtype) for t in scalars])


class DoG(FusedOptimizer):
    r"""DoG, "distance over gradients": SGD whose step size needs no tuning.

    Args:
        params: parameters or parameter groups.
        lr (float or Tensor, default 1.0): the constant ``c`` multiplying the DoG step size; the
            paper and reference recommend leaving it at 1. A one-element tensor (on the parameters'
            device) may be given so a CUDA graph can capture ``step()`` and the value can change.
        reps_rel (float, default 1e-6): the initial distance is ``reps_rel * (1 + ||x_0||)``
            (``r_epsilon`` of the paper; the reference suggests 1e-4 for models with batch norm).
            Ignored (set to 0, as in the reference) when ``init_eta`` is given.
        eps (float, default 1e-8): added once to the running sum of squared gradient norms under
            the square root.
        weight_decay (float, default 0.0): L2 penalty; ``weight_decay * x`` is added to the
            gradient before its norm is taken (the caller's ``.grad`` is not modified).
        init_eta (float or None, default None): when given, the first step size is exactly
            ``init_eta`` and ``rbar_0 = 0`` (the reference's behaviour); afterwards
            ``rbar_t = ||x_t - x_0||`` takes over.
        maximize (bool, default False): ascend instead of descend.

    State per parameter (``self.state[p]``, float32 for float32/bf16/fp16 parameters): ``x0``,
    ``dist2`` (``||x_t - x_0||^2`` of the current iterate), ``rbar`` and ``G`` (for DoG the group
    values, held identically in every parameter's state of the group and rewritten there at every
    step; for LDoG the tensor's own). ``x_0`` is every parameter's value at the group's first
    ``step()`` that has a gradient (before it nothing moves), also for parameters without a
    gradient then, as the reference records it for the whole group at its first step. A parameter
    without a gradient in a step does not move and adds nothing to ``G``, but it still belongs to
    the group: its distance and its ``||x_0||`` count in DoG's group norms.
    Hyperparameters (also edited ``param_groups``) are checked at every step.
    GradScaler: the gradients may be left scaled; ``scaler.step(opt)`` passes ``grad_scale`` and
    ``found_inf`` and an inf/NaN step leaves parameters and state unchanged.

    torch.distributed: with parameters sharded by FSDP2 (DTensors), the kernels run on the local
    shards and the squared norms (of gradients, of x0, of x - x0) are all-reduced over the
    sharded mesh dimensions, so every rank takes the unsharded run's step; ``dist2`` then holds
    the rank's partial sum.

    For best results the reference combines DoG with iterate averaging
    (:class:`slab.optim.PolynomialDecayAverager`).
    """

    _layerwise = False

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        reps_rel: float = 1e-6,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        init_eta: Optional[float] = None,
        *,
        maximize: bool = False,
    ):
        if init_eta is not None:
            reps_rel = 0.0
        defaults = dict(
            lr=lr, reps_rel=reps_rel, eps=eps, weight_decay=weight_decay, init_eta=init_eta, maximize=maximize
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict, *, read_tensor: bool = False) -> None:
        check_number("lr", group["lr"], positive=True, allow_tensor=True, read_tensor=read_tensor)
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])
        if group["init_eta"] is not None:
            check_number("init_eta", group["init_eta"], positive=True)
        else:
            check_number("reps_rel", group["reps_rel"], positive=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss, grad_scale, found_inf = self._begin_step(closure)
        for group in self.param_groups:
            self._group_step(group, grad_scale, found_inf)
        return loss

    # ---- one parameter group --------------------------------------------------------------

    def _init_state(self, group: dict) -> bool:
        """x0, dist2 and the initial rbar and G of the group's parameters that have no state yet;
        True when that is the whole group (its first step)."""
        params = group["params"]
        new = [p for p in params if "x0" not in self.state[p]]
        if not new:
            return False
        started = next((self.state[p] for p in params if "x0" in self.state[p]), None)
        for p in new:
            acc = acc_dtype(p.dtype)
            z = torch.zeros((), dtype=acc, device=p.device)
            # x0 keeps the parameter's layout (a DTensor under FSDP2); dist2 holds this rank's
            # partial sum of ||x - x0||^2 (all-reduced when used).
            self.state[p].update(x0=p.detach().to(acc, copy=True), dist2=z.clone(), rbar=z.clone(), G=z.clone())
        if started is not None and not self._layerwise:
            # a parameter the state does not cover (added to the group, or a state saved without
            # it) starts from here and joins the group's running values
            torch._foreach_copy_([self.state[p]["rbar"] for p in new], [started["rbar"]] * len(new))
            torch._foreach_copy_([self.state[p]["G"] for p in new], [started["G"]] * len(new))
            return False
        x0sq = all_reduce_(self._sq_norms([local(self.state[p]["x0"]) for p in new]), shard_groups(new))
        reps = group["reps_rel"]
        rbar0 = reps * (1 + x0sq.sqrt()) if self._layerwise else (reps * (1 + x0sq.sum().sqrt())).expand(len(new))
        torch._foreach_copy_([self.state[p]["rbar"] for p in new], list(rbar0.unbind()))
        return started is None

    @staticmethod
    def _sq_norms(tensors: list[Tensor], others=None, weight_decay=0.0, grad_scale=None) -> Tensor:
        """Per-tensor squared norms in list order, one fused pass per (device, dtype) bucket."""
        device = tensors[0].device
        dtype = _scalar_dtype(tensors)
        out = torch.empty(len(tensors), dtype=dtype, device=device)
        parts = []
        for idx in buckets(tensors):
            ts = [tensors[i] for i in idx]
            os_ = None if others is None else [others[i] for i in idx]
            sq = _ops.multi_tensor_sq_norm(ts, os_, weight_decay, on(grad_scale, ts[0].device))
            parts.append((idx, sq.to(device=device, dtype=dtype)))
        if len(parts) == 1 and parts[0][0] == list(range(len(tensors))):
            return parts[0][1]
        for idx, sq in parts:
            out[torch.tensor(idx, device=device)] = sq
        return out

    def _scalar_rule(self, group: dict, states: list[dict], gsq: Tensor, device, sdt, groups: list):
        """(rbar_t, G_t) before this step and their new values: per tensor of ``states`` (LDoG), or
        the group's (DoG: G adds the gradients of this step, the distance covers every parameter
        of the group; one without a gradient did not move, so its dist2 is still current)."""
        if self._layerwise:
            rbar, G, dist2 = (_gather([s[k] for s in states], device, sdt) for k in ("rbar", "G", "dist2"))
            return rbar, G, torch.maximum(rbar, all_reduce_(dist2, groups).sqrt()), G + gsq
        every = [self.state[p] for p in group["params"]]
        rbar, G = every[0]["rbar"].to(device, sdt), every[0]["G"].to(device, sdt)
        dist2 = all_reduce_(_gather([s["dist2"] for s in every], device, sdt), groups)
        return rbar, G, torch.maximum(rbar, dist2.sum().sqrt()), G + gsq.sum()

    def _group_step(self, group: dict, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        ps = params_with_grad(type(self).__name__, group)
        if not ps:
            return
        first = self._init_state(group)
        groups = shard_groups(group["params"])
        xs = [local(p) for p in ps]
        device = xs[0].device
        states = [self.state[p] for p in ps]
        wd = group["weight_decay"]
        grads = [local(p.grad) for p in ps]
        gsq = all_reduce_(self._sq_norms(grads, xs if wd != 0 else None, wd, grad_scale), groups)
        sdt = _scalar_dtype(group["params"])
        rbar, G, rbar_new, G_new = self._scalar_rule(group, states, gsq, device, sdt, groups)
        lr = group["lr"]
        lr = lr.to(device, sdt) if isinstance(lr, Tensor) else lr
        eta = (lr * rbar_new / torch.sqrt(G_new + group["eps"])).expand(len(ps))
        if first and group["init_eta"] is not None:
            eta = torch.full_like(eta, group["init_eta"])
        if found_inf is not None:  # a skipped step leaves the DoG state as it was
            skip = on(found_inf, device).reshape(()) != 0
            G_new = torch.where(skip, G, G_new)
            rbar_new = torch.where(skip, rbar, rbar_new)
        for idx in buckets(xs):
            bp = [xs[i] for i in idx]
            d = bp[0].device
            sel = torch.tensor(idx, device=device) if len(idx) != len(ps) else None
            eta_b = (eta if sel is None else eta[sel]).to(d, acc_dtype(bp[0].dtype)).contiguous()
            _ops.dog_update_(
                bp,
                [grads[i] for i in idx],
                [local(states[i]["x0"]) for i in idx],
                eta_b,
                [states[i]["dist2"] for i in idx],
                wd,
                group["maximize"],
                on(grad_scale, d),
                on(found_inf, d),
            )
        if not self._layerwise:  # the group's values go to every parameter's state
            states = [self.state[p] for p in group["params"]]
            rbar_new, G_new = rbar_new.expand(len(states)), G_new.expand(len(states))
        torch._foreach_copy_([s["rbar"] for s in states], list(rbar_new.unbind()))
        torch._foreach_copy_([s["G"] for s in states], list(G_new.unbind()))


class LDoG(DoG):
    r"""Layer-wise DoG: the DoG rule with ``rbar``, ``G`` and the step size per parameter tensor
    (``rbar_0 = reps_rel * (1 + ||x_0||)`` of that tensor). Same arguments and defaults as
    :class:`DoG`: lr=1.0, reps_rel=1e-6, eps=1e-8, weight_decay=0.0, init_eta=None, maximize=False.
    """

    _layerwise = True
