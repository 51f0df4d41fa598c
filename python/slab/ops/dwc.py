"""SLA depthwise-convolution branch: SLAB adds a depthwise convolution of V (weights shared by
all heads, over the head dimension) to the attention output. Wrappers over
``torch.ops.slab.sla_dwc*`` plus their fake tensors and autograd.

* :func:`dwc2d` -- vision: a k x k convolution over the h x w token grid, zero padding k // 2.
* :func:`causal_dwc1d` -- sequences: a causal convolution of kernel k over the tokens (token n
  reads tokens n - k + 1 .. n).
* :func:`causal_dwc1d_step` -- one decode token of :func:`causal_dwc1d` with a cache of the
  k - 1 previous tokens.

Each adds an optional ``residual`` (the attention output) in the same pass. ``v`` is
(B, H, N, C) with contiguous channels (any other strides: the v view of a fused qkv projection
is read in place). The result has shape (B, H, N, C) and memory order (B, N, H, C), so that
``out.transpose(1, 2).reshape(B, N, H * C)`` -- merging the heads for the output projection --
is a view, not a copy. Computed in float32 (float64 for float64 inputs); the output has v's
dtype. Schemas and kernels live in C++ (csrc/sla/dwc_ops.cpp).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._fake import register_fake

__all__ = ["dwc2d", "causal_dwc1d", "causal_dwc1d_step"]

_lib = torch.ops.slab


def _square_grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"dwc2d: {tokens} tokens are not a square grid; pass grid=(height, width)")
    return side, side


def dwc2d(
    v: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    grid: Optional[Sequence[int]] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """``residual + conv2d(v)`` per head over the token grid, as SLAB's ``dwc`` branch.

    ``weight`` is a depthwise ``nn.Conv2d(C, C, k, groups=C)`` weight (C, 1, k, k) with odd ``k``,
    ``bias`` (C,) or None; token n sits at row ``n // width``, column ``n % width`` of
    ``grid = (height, width)`` (default: square). Differentiable in v, weight, bias, residual.
    """
    if weight.dim() != 4 or weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"dwc2d: weight must be (C, 1, kh, kw) with odd kh, kw, got {tuple(weight.shape)}")
    if v.dim() != 4:
        raise ValueError(f"dwc2d: v must have shape (batch, heads, tokens, channels), got {tuple(v.shape)}")
    height, width = _square_grid(v.shape[2]) if grid is None else (int(grid[0]), int(grid[1]))
    kh, kw = weight.shape[2], weight.shape[3]
    return _lib.sla_dwc(v, weight, bias, residual, height, width, kh // 2, kw // 2)


def causal_dwc1d(v: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> Tensor:
    """``residual + causal_conv1d(v)`` per head over the tokens: with ``weight`` a depthwise
    ``nn.Conv1d(C, C, k, groups=C)`` weight (C, 1, k), token n gets
    ``sum_t weight[:, 0, t] * v[n - k + 1 + t]`` (tokens before the first are zero) + bias.
    Differentiable in v, weight, bias, residual.
    """
    if weight.dim() != 3:
        raise ValueError(f"causal_dwc1d: weight must be a Conv1d weight (C, 1, k), got {tuple(weight.shape)}")
    if v.dim() != 4:
        raise ValueError(f"causal_dwc1d: v must have shape (batch, heads, tokens, channels), got {tuple(v.shape)}")
    return _lib.sla_dwc(v, weight, bias, residual, v.shape[2], 1, weight.shape[2] - 1, 0)


def causal_dwc1d_step(
    v: Tensor, cache: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None
) -> Tensor:
    """One decode token of :func:`causal_dwc1d`. ``v`` (B, H, C) is the new token; ``cache``
    (B, H, k - 1, C), v's dtype, contiguous, holds the k - 1 previous tokens (oldest first, zeros
    before the sequence start) and is updated in place to end with ``v``. Returns the output
    (B, H, C). Inference only.
    """
    return _lib.sla_dwc_step(v, cache, weight, bias, residual)


def dwc_cache_from_prefill(v: Tensor, kernel: int) -> Tensor:
    """The decode cache after a prefill of ``v`` (B, H, N, C): its last ``kernel - 1`` tokens,
    zero-padded in front when N is shorter. Contiguous, v's dtype."""
    keep = kernel - 1
    cache = v.new_zeros((v.shape[0], v.shape[1], keep, v.shape[3]))
    take = min(keep, v.shape[2])
    if take > 0:
        cache[:, :, keep - take :] = v[:, :, v.shape[2] - take :]
    return cache


# ---- fake tensors ------------------------------------------------------------------------------


def _heads_interleaved(v: Tensor) -> Tensor:
    b, h, n, c = v.shape
    return v.new_empty((b, n, h, c)).permute(0, 2, 1, 3)


def _check_geometry(v, weight, grid_h, grid_w, pad_top, pad_left):
    torch._check(v.dim() == 4, lambda: "v must have shape (batch, heads, tokens, channels)")
    torch._check(
        weight.dim() in (3, 4) and weight.shape[0] == v.shape[3] and weight.shape[1] == 1,
        lambda: "weight must be a depthwise convolution weight (C, 1, kh[, kw])",
    )
    torch._check(grid_h * grid_w == v.shape[2], lambda: "grid must hold the tokens of v")


@register_fake("sla_dwc")
def _(v, weight, bias, residual, grid_h, grid_w, pad_top, pad_left):
    _check_geometry(v, weight, grid_h, grid_w, pad_top, pad_left)
    if residual is not None:
        torch._check(residual.shape == v.shape, lambda: "residual must have the shape of v")
    return _heads_interleaved(v)


@register_fake("sla_dwc_backward")
def _(grad, v, weight, grid_h, grid_w, pad_top, pad_left):
    _check_geometry(v, weight, grid_h, grid_w, pad_top, pad_left)
    torch._check(grad.shape == v.shape, lambda: "grad must have the shape of v")
    return _heads_interleaved(v), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


@register_fake("sla_dwc_step")
def _(v, cache, weight, bias, residual):
    torch._check(v.dim() == 3, lambda: "v must have shape (batch, heads, channels)")
    return v.new_empty(v.shape)


# ---- autograd ----------------------------------------------------------------------------------


def _dwc_setup_context(ctx, inputs, output):
    v, weight, bias, residual, grid_h, grid_w, pad_top, pad_left = inputs
    ctx.save_for_backward(v, weight)
    ctx.geometry = (grid_h, grid_w, pad_top, pad_left)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_residual = residual is not None


def _dwc_backward(ctx, grad):
    v, weight = ctx.saved_tensors
    grad_v, grad_weight, grad_bias = _lib.sla_dwc_backward(grad, v, weight, *ctx.geometry)
    grad_bias = None if ctx.bias_dtype is None else grad_bias.to(ctx.bias_dtype)
    grad_residual = grad if ctx.has_residual else None
    return grad_v, grad_weight, grad_bias, grad_residual, None, None, None, None


torch.library.register_autograd("slab::sla_dwc", _dwc_backward, setup_context=_dwc_setup_context)
