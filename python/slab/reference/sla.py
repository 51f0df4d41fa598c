"""SLA references (SPEC section 2): simplified linear attention, its decode step, and SLAB's
depthwise convolutions of V. Plain PyTorch (no slab ops), any float dtype (tests use float64),
differentiable by autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["sla", "sla_state", "sla_step", "dwc2d", "causal_dwc1d", "causal_dwc1d_step"]


def _phi_k(k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    fk = k.relu()
    if mask is not None:
        fk = fk * mask[:, None, :, None].to(fk.dtype)
    return fk


def sla(q, k, v, causal: bool = False, eps: float = 1e-6, mask: Optional[torch.Tensor] = None):
    """The definition, quadratic form: ``o = (A V) / (A 1 + eps)``, ``A = phi(Q) phi(K)^T``
    (causal: ``A`` lower-triangular); q, k (B, H, N, D), v (B, H, N, Dv); ``mask`` (B, N) bool:
    masked tokens contribute nothing to the sums."""
    a = q.relu() @ _phi_k(k, mask).transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def sla_state(k, v, mask: Optional[torch.Tensor] = None):
    """``(S, z)`` over all (unmasked) tokens: ``S = sum_j phi(k_j) v_j^T`` (B, H, D, Dv),
    ``z = sum_j phi(k_j)`` (B, H, D)."""
    fk = _phi_k(k, mask)
    return fk.transpose(-1, -2) @ v, fk.sum(2)


def sla_step(q, k, v, state, z, eps: float = 1e-6):
    """One decode token, functional: returns ``(o, state', z')`` with ``state' = state + phi(k) v^T``,
    ``z' = z + phi(k)``, ``o = phi(q) state' / (phi(q) . z' + eps)``; q, k (B, H, D), v (B, H, Dv)."""
    fq, fk = q.relu(), k.relu()
    state = state + fk.unsqueeze(-1) * v.unsqueeze(-2)
    z = z + fk
    o = (fq.unsqueeze(-2) @ state).squeeze(-2) / ((fq * z).sum(-1, keepdim=True) + eps)
    return o, state, z


def dwc2d(v, weight, bias=None, grid: Optional[Sequence[int]] = None, residual=None):
    """SLAB's ``dwc`` branch: per (b, h) slice, a depthwise conv2d (``weight`` (C, 1, kh, kw), odd
    sizes, 'same' padding) over the (height, width) token grid (default square) + residual."""
    b, h, n, c = v.shape
    if grid is None:
        side = int(round(n**0.5))
        grid = (side, side)
    x = v.reshape(b * h, grid[0], grid[1], c).permute(0, 3, 1, 2)
    kh, kw = weight.shape[-2], weight.shape[-1]
    y = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=c).permute(0, 2, 3, 1).reshape(b, h, n, c)
    return y if residual is None else y + residual


def causal_dwc1d(v, weight, bias=None, residual=None):
    """Causal depthwise conv1d over the tokens (``weight`` (C, 1, k); zeros before the first token)."""
    b, h, n, c = v.shape
    x = v.reshape(b * h, n, c).transpose(1, 2)
    y = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight, bias, groups=c)
    y = y.transpose(1, 2).reshape(b, h, n, c)
    return y if residual is None else y + residual


def causal_dwc1d_step(v, cache, weight, bias=None, residual=None):
    """One decode token of :func:`causal_dwc1d`, functional: ``v`` (B, H, C), ``cache``
    (B, H, k - 1, C) the previous tokens, oldest first. Returns ``(y, cache')``."""
    window = torch.cat([cache, v.unsqueeze(2)], dim=2)  # (B, H, k, C)
    y = (window * weight[:, 0, :].transpose(0, 1)).sum(2)
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    return y, window[:, :, 1:]
