"""Shared pieces of the fused optimizers: hyperparameter checks, (device, dtype) buckets,
GradScaler hooks and a state_dict loader that keeps float32 states of bf16 parameters float32."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..ops._dtypes import acc_dtype


def check_number(
    name: str, value: Any, *, positive: bool = False, allow_tensor: bool = False, read_tensor: bool = True
) -> None:
    """Raises ValueError unless ``value`` is a finite number >= 0 (> 0 when ``positive``).

    A tensor (``allow_tensor``, e.g. a capturable lr) must hold one floating value; its value is
    checked only when ``read_tensor``: once, at construction, never inside ``step()`` (reading a
    device tensor synchronises with the host).
    """
    if isinstance(value, Tensor):
        if not allow_tensor:
            raise ValueError(f"{name} must be a Python number, got a tensor")
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a floating tensor with one element, got {value.dtype} {tuple(value.shape)}"
            )
        if not read_tensor:
            return
        value = float(value.detach().cpu())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"Invalid {name}: {value} (expected a finite value {'> 0' if positive else '>= 0'})")


def check_fraction(name: str, value: Any) -> float:
    """Raises ValueError unless ``value`` is a number in [0, 1) (a momentum, a beta); returns it as a float."""
    check_number(name, value)
    if value >= 1:
        raise ValueError(f"Invalid {name}: {value} (expected a value in [0, 1))")
    return float(value)


def params_with_grad(opt_name: str, group: dict) -> list[Tensor]:
    """The group's parameters that have a gradient; sparse gradients are refused."""
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{opt_name} does not support sparse gradients")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise RuntimeError(f"{opt_name}: parameters must be float32, bfloat16 or float16, got {p.dtype}")
        out.append(p)
    return out


def buckets(params: list[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype): one fused launch each."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return list(groups.values())


def on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=True)


# ---- moments and step counters (LAMB, AdamP; Lion checks its betas alike) -----------------------


def check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must hold two values, got {betas}")
    return check_fraction("betas[0]", betas[0]), check_fraction("betas[1]", betas[1])


def bias_corrections(steps: list[Tensor], beta1: float, beta2: float, enabled: bool, dtype: torch.dtype) -> Tensor:
    """Per tensor [1 / (1 - beta1^t), 1 / sqrt(1 - beta2^t)], shape (len(steps), 2), from the
    tensors' own device step counters, computed in float64 (1 - beta2^t cancels badly in float32
    for small t), as ``dtype``; ones when disabled."""
    if not enabled:
        return torch.ones(len(steps), 2, dtype=dtype, device=steps[0].device)
    t = torch.stack(steps).to(torch.float64)
    betas = torch.stack([torch.full_like(t, beta1), torch.full_like(t, beta2)], 1)  # fills: capturable, no copy
    bc = 1 - betas.pow(t[:, None])
    return torch.stack([1 / bc[:, 0], bc[:, 1].rsqrt()], 1).to(dtype)


def advance_steps(states: list[dict], device, found_inf: Optional[Tensor]) -> list[Tensor]:
    """``state['step'] += 1`` on the device for every given state (not when found_inf): float32
    tensors, never read on the host. Each parameter counts its own steps, and only the steps in
    which it has a gradient (its bias corrections then match its moments, as AdamP's authors do)."""
    for st in states:
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=device)
    steps = [st["step"] for st in states]
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (on(found_inf, device).reshape(()) == 0).to(torch.float32))
    return steps


# ---- torch.distributed: DTensor (FSDP2) parameters -----------------------------------------------
# The kernels run on each rank's local shards; the norms the rules need are partial sums over the
# shard and are all-reduced over the mesh dimensions the tensor is sharded on, so every rank sees
# the norms of the whole tensor and the result equals the unsharded run.


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without torch.distributed
        return None
    return DTensor


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The rank-local tensor of a DTensor (the tensor itself otherwise)."""
    cls = _dtensor_cls()
    return t._local_tensor if cls is not None and isinstance(t, cls) else t


def shard_groups(params: list[Tensor]) -> list:
    """Process groups to all-reduce partial norms over: the mesh dimensions the (DTensor)
    parameters are sharded on. Empty for plain tensors. All parameters of a call must share them."""
    cls = _dtensor_cls()
    found = None
    for p in params:
        if cls is None or not isinstance(p, cls):
            key = ()
            groups = []
        else:
            from torch.distributed.tensor import Shard

            dims = tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))
            key = (str(p.device_mesh.mesh.tolist()), dims)  # FSDP2 may build one mesh object per module
            groups = [p.device_mesh.get_group(i) for i in dims]
        if found is None:
            found = (key, groups)
        elif found[0] != key:
            raise RuntimeError("slab.optim: all parameters of a group must share one sharding (mesh and sharded dims)")
    return [] if found is None else found[1]


def all_reduce_(t: Tensor, groups: list, op: str = "sum") -> Tensor:
    """In-place all-reduce of partial sums (or maxima) over the shard groups (no-op without)."""
    if groups:
        import torch.distributed as dist

        red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        for g in groups:
            dist.all_reduce(t, op=red, group=g)
    return t


class FusedOptimizer(Optimizer):
    """Base of slab's optimizers: GradScaler support (``grad_scale``/``found_inf`` attributes, as
    torch's fused Adam reads them) and float32 states that survive ``load_state_dict``."""

    # GradScaler.step then sets self.grad_scale / self.found_inf instead of unscaling the grads,
    # and the fused step unscales them and skips itself (on the device) when found_inf != 0.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group, read_tensor=True)

    def _check_group(self, group: dict, *, read_tensor: bool = False) -> None:
        """Raises ValueError naming a bad hyperparameter of ``group``. Runs at construction and at
        every ``step()`` (``param_groups`` may be edited in between, e.g. by a scheduler or by hand);
        ``read_tensor`` as in :func:`check_number` (False inside ``step()``)."""
        raise NotImplementedError

    def _begin_step(self, closure) -> tuple[Any, Optional[Tensor], Optional[Tensor]]:
        """Checks every group's hyperparameters, runs the closure (with grad enabled) and returns
        (loss, grad_scale, found_inf)."""
        for group in self.param_groups:
            self._check_group(group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return loss, getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    def _zero_states(self, params: list[Tensor], *names: str) -> None:
        """Creates the zero-initialised states `names` (accumulation dtype) of new parameters."""
        for p in params:
            st = self.state[p]
            for name in names:
                if name not in st:
                    st[name] = torch.zeros_like(p, dtype=acc_dtype(p.dtype), memory_format=torch.contiguous_format)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating states to the parameter dtype; ours stay in their saved dtype
        # (float32 x0 / momentum of bf16 parameters), only moved to the parameter's device.
        saved = {
            pid: {k: v.detach().clone() for k, v in st.items() if isinstance(v, Tensor)}
            for pid, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params))
        for pid, st in saved.items():
            p = by_id[pid]
            for k, v in st.items():
                self.state[p][k] = v.to(p.device)
