"""AdamP (Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021), fused.

Adam's direction p = m_hat / (sqrt(v_hat) + eps) (Nesterov: with beta1 m + (1 - beta1) g as the
numerator) is projected off the weight when the weight looks scale-invariant, judged by the
cosine between gradient and weight, for tensors with 2+ dimensions:
  1. channel view (rows = size(0)): if max_r |cos(g_r, x_r)| < delta / sqrt(cols):
       p_r -= x_r <x_r, p_r> / (||x_r|| + eps)^2   for every row r;
  2. else whole-tensor view: if |cos(g, x)| < delta / sqrt(numel): p -= x <x, p> / (||x|| + eps)^2;
  cos(a, b) = <a, b> / (max(||a||, eps) max(||b||, eps)) (torch.nn.functional.cosine_similarity).
Then x = x * (1 - lr * weight_decay * r) - lr / (1 - beta1^t) * p with r = wd_ratio when projected,
1 otherwise. Per (device, dtype) bucket: stage 1 updates m, v and reduces the four row sums
<g,x>, <g,g>, <x,x>, <x,p> in one pass; a few device ops decide the projections; stage 2 applies.
"""

from __future__ import annotations


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

__all__ = ["AdamP"]


class AdamP(FusedOptimizer):
    """AdamP: Adam with the radial component of the update removed on scale-invariant weights.

    Args:
        params: parameters or parameter groups.
        lr (float or Tensor, default 1e-3): a one-element tensor may be given (capturable).
        betas (tuple, default (0.9, 0.999)), eps (float, default 1e-8): as in Adam.
        weight_decay (float, default 0.0): decoupled (AdamW-style) decay, scaled by ``wd_ratio``
            on projected tensors.
        delta (float, default 0.1): cosine threshold; a view counts as scale-invariant when its
            |cosine| is below ``delta / sqrt(view dimension)``.
        wd_ratio (float, default 0.1): weight-decay multiplier for projected tensors.
        nesterov (bool, default False): Nesterov momentum in the direction.
        maximize (bool, default False): ascend instead of descend.
    These are the defaults of the paper's reference implementation.

    State per parameter: ``step`` (float32 tensor: the steps in which the parameter had a
    gradient, the authors' rule), ``exp_avg``, ``exp_avg_sq`` (float32 for float32/bf16/fp16
    parameters). GradScaler is supported as in :class:`slab.optim.DoG`. Hyperparameters (also
    edited ``param_groups``) are checked at every step.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
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
                delta=delta,
                wd_ratio=wd_ratio,
                nesterov=nesterov,
                maximize=maximize,
            ),
        )
        self._layout_cache: dict = {}

    def _check_group(self, group: dict, *, read_tensor: bool = False) -> None:
        check_number("lr", group["lr"], allow_tensor=True, read_tensor=read_tensor)
        check_betas(group["betas"])
        for name in ("eps", "weight_decay", "delta", "wd_ratio"):
            check_number(name, group[name])

    def _layout(self, bp: list[Tensor], full: list[Tensor], device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(row -> tensor index, cols per tensor, numel per tensor, has 2+ dims) for a bucket of
        local tensors ``bp`` (shards of ``full`` under FSDP2: rows are local, cols and numel global);
        cached so a captured step creates no host tensors."""
        key = (device, tuple(tuple(p.shape) for p in bp), tuple(tuple(p.shape) for p in full))
        if key not in self._layout_cache:
            rows = [p.shape[0] if p.dim() > 1 else 1 for p in bp]
            seg = torch.repeat_interleave(torch.arange(len(bp)), torch.tensor(rows, dtype=torch.long))
            cols = [p.numel() // p.shape[0] if p.dim() > 1 and p.shape[0] > 0 else p.numel() for p in full]
            self._layout_cache[key] = (
                seg.to(device),
                torch.tensor(cols, dtype=torch.float32, device=device),
                torch.tensor([p.numel() for p in full], dtype=torch.float32, device=device),
                torch.tensor([p.dim() > 1 for p in full], device=device),
            )
        return self._layout_cache[key]

    @staticmethod
    def _cos(dot: Tensor, aa: Tensor, bb: Tensor, eps: float) -> Tensor:
        return dot.abs() / (aa.sqrt().clamp(min=eps) * bb.sqrt().clamp(min=eps))

    def _projection(self, sums: Tensor, layout, group, groups: list) -> tuple[Tensor, Tensor]:
        """Per-row projection coefficients and per-tensor weight-decay ratios (device ops only;
        under FSDP2 the per-tensor max and sums are all-reduced over the shards)."""
        seg, cols, numel, multi = layout
        eps, delta, n = group["eps"], group["delta"], len(cols)
        gx, gg, xx, xp = sums.unbind(1)
        cos_rows = self._cos(gx, gg, xx, eps)
        cos_max = torch.zeros(n, dtype=sums.dtype, device=sums.device).scatter_reduce(
            0, seg, cos_rows, "amax", include_self=False
        )
        all_reduce_(cos_max, groups, "max")
        channel = multi & (cos_max < delta / cols.clamp(min=1).sqrt())
        tot = all_reduce_(torch.zeros(n, 4, dtype=sums.dtype, device=sums.device).index_add_(0, seg, sums), groups)
        cos_layer = self._cos(tot[:, 0], tot[:, 1], tot[:, 2], eps)
        layer = multi & ~channel & (cos_layer < delta / numel.clamp(min=1).sqrt())
        k_rows = xp / (xx.sqrt() + eps) ** 2
        k_layer = tot[:, 3] / (tot[:, 2].sqrt() + eps) ** 2
        zero = torch.zeros_like(k_rows)
        coef = torch.where(channel[seg], k_rows, torch.where(layer[seg], k_layer[seg], zero))
        ratio = torch.where(channel | layer, torch.full_like(cos_layer, group["wd_ratio"]), torch.ones_like(cos_layer))
        return coef.contiguous(), ratio

    @torch.no_grad()
    def step(self, closure=None):
        loss, grad_scale, found_inf = self._begin_step(closure)
        for group in self.param_groups:
            ps = params_with_grad("AdamP", group)
            self._zero_states(ps, "exp_avg", "exp_avg_sq")
            b1, b2 = group["betas"]
            groups = shard_groups(ps)
            xs = [local(p) for p in ps]
            for idx in buckets(xs):
                bp, full = [xs[i] for i in idx], [ps[i] for i in idx]
                sts = [self.state[p] for p in full]
                d, acc = bp[0].device, acc_dtype(bp[0].dtype)
                steps = advance_steps(sts, d, found_inf)
                ms = [local(st["exp_avg"]) for st in sts]
                vs = [local(st["exp_avg_sq"]) for st in sts]
                grads = [local(p.grad) for p in full]
                gs, fi = on(grad_scale, d), on(found_inf, d)
                common = (b1, b2, group["eps"], group["nesterov"], group["maximize"], gs, fi)
                bc = bias_corrections(steps, b1, b2, True, acc)
                sums = _ops.adamp_stage1_(bp, grads, ms, vs, bc, *common)
                coef, ratio = self._projection(sums, self._layout(bp, full, d), group, groups)
                lr = group["lr"]
                lr = lr.to(d, acc).reshape(1) if isinstance(lr, Tensor) else torch.full((1,), lr, dtype=acc, device=d)
                decay = (lr * group["weight_decay"] * ratio).to(acc).contiguous()
                _ops.adamp_stage2_(bp, grads, ms, vs, bc, coef.to(acc), decay, lr, *common)
        return loss
