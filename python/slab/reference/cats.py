"""CATS references (SPEC section 3): the thresholded SiLU, its gradient, the sparse gated MLP, and
LeMo-style token select / scatter. Plain PyTorch (no slab ops), any float dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cats", "cats_grad", "cats_mlp", "dense_mlp", "token_index", "token_select", "token_scatter"]


def cats(x: torch.Tensor, t: float) -> torch.Tensor:
    """``s = silu(x)``; ``s`` where ``|s| > t`` (strict), else 0."""
    s = F.silu(x)
    return torch.where(s.abs() > t, s, torch.zeros_like(s))


def cats_grad(x, dy, t):
    """``dy * silu'(x)`` where kept, 0 elsewhere."""
    sig = torch.sigmoid(x)
    d = dy * sig * (1 + x * (1 - sig))
    return torch.where(F.silu(x).abs() > t, d, torch.zeros_like(d))


def cats_mlp(x, w_gate, w_up, w_down_t, t):
    """Dense gated MLP with the CATS threshold: ``(cats(x W_gate^T) * (x W_up^T)) W_down_t``."""
    return (cats(x @ w_gate.t(), t) * (x @ w_up.t())) @ w_down_t


def dense_mlp(x, w_gate, w_up, w_down):
    """The dense gated MLP without threshold (``w_down`` (D, F) as in ``nn.Linear``)."""
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


def token_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k per row of ``scores`` (B, N) (NaN lowest), ties to the earlier token, ascending (B, k) int64."""
    s = torch.nan_to_num(scores.double().cpu(), nan=float("-inf"))
    n = s.shape[1]
    out = []
    for row in s:
        vals = row.tolist()
        order = sorted(range(n), key=lambda i: (-vals[i], i))
        out.append(sorted(order[:k]))
    return torch.tensor(out, dtype=torch.int64).reshape(s.shape[0], k)


def token_select(x, scores, k: int):
    """``(kept, index)``: the rows :func:`token_index` picks from ``x`` (B, N, C)."""
    index = token_index(scores, k).to(x.device)
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[2])), index


def token_scatter(x, y, index):
    """``x`` with row ``index[b, j]`` replaced by ``y[b, j]`` (differentiable in x and y)."""
    return x.scatter(1, index[:, :, None].expand(-1, -1, x.shape[2]).to(x.device), y)
