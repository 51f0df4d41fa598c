"""CATS ops (contextual activation sparsity): wrappers over ``torch.ops.slab.*`` plus their fake
tensors and autograd.

* :func:`cats` -- ``silu(x)`` where ``|silu(x)| > threshold``, else 0 (differentiable).
* :func:`cats_mlp` -- the sparse gated MLP for decoding (inference only).
* :func:`token_select` / :func:`token_scatter` -- token sparsity (LeMo): gather the top-scoring
  tokens of each sequence in their original order, run a block on them, scatter the results back.

Schemas and kernels live in C++ (csrc/cats/cats_ops.cpp).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ._fake import register_fake

__all__ = ["cats", "cats_mlp", "token_select", "token_scatter", "MAX_DECODE_TOKENS"]

_lib = torch.ops.slab

#: Most tokens :func:`cats_mlp` takes in one call (the decode kernel's limit).
MAX_DECODE_TOKENS = 16


def _threshold_value(threshold: Union[float, Tensor]) -> float:
    """A Python float from a float or a 0-d / 1-element tensor (read to the host: a sync on CUDA
    and a graph break under torch.compile, so prefer passing a float)."""
    if isinstance(threshold, Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a float or a 1-element tensor, got shape {tuple(threshold.shape)}")
        return float(threshold.item())
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float or a 1-element tensor, got {type(threshold).__name__}")
    return float(threshold)


def cats(x: Tensor, threshold: Union[float, Tensor]) -> Tensor:
    """CATS activation: ``s = silu(x)``; ``y = s`` where ``|s| > threshold``, else 0.

    The test is strict (a value whose magnitude equals the threshold is dropped) and is evaluated
    in float32 for 16-bit inputs (float64 for float64). NaN inputs stay NaN. ``threshold`` is a
    finite Python float (a negative one keeps everything: plain SiLU); a 0-d / 1-element tensor
    is accepted and read to the host. Backward: ``grad * silu'(x)`` where kept, 0 elsewhere.
    Any shape; float32 / bfloat16 / float16 (float64 for gradcheck).
    """
    return _lib.cats(x, _threshold_value(threshold))


def cats_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, threshold: Union[float, Tensor]) -> Tensor:
    """Sparse gated MLP for decoding: ``y = W_down (cats(W_gate x, threshold) * (W_up x))``.

    ``x`` is (..., D) holding 1 to 16 tokens in all; ``w_gate`` and ``w_up`` are (F, D) as in
    ``nn.Linear``; ``w_down_t`` is ``W_down`` transposed, an (F, D) contiguous tensor, so that a
    dropped neuron skips one contiguous row. The gate GEMV, SiLU and threshold are fused; the up
    and down projections run only over the neurons some token keeps (the union of the tokens'
    masks; a token that drops a neuron another keeps contributes 0 for it). Equal to the dense
    computation with the same threshold up to float rounding (fp32 accumulation), except that a
    NaN/Inf in a row of ``w_up`` / ``w_down_t`` of a neuron nobody keeps is never read. All
    tensors one dtype (float32 / bfloat16 / float16, float64); no bias; no autograd (inference).
    """
    t = _threshold_value(threshold)
    if x.dim() < 1:
        raise ValueError("x must have shape (..., D), got a scalar")
    lead = x.shape[:-1]
    y = _lib.cats_mlp(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down_t, t)
    return y.reshape(*lead, y.shape[-1])


def keep_count(tokens: int, keep: Union[int, float]) -> int:
    """Tokens kept per sequence: ``keep`` itself (an int in [1, tokens]) or, for a float ratio in
    (0, 1], ``max(1, round(keep * tokens))``."""
    if isinstance(keep, bool):
        raise TypeError("keep must be an int count or a float ratio, got a bool")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep as a ratio must be in (0, 1], got {keep}")
        return max(1, min(tokens, round(keep * tokens)))
    if isinstance(keep, int):
        if not 1 <= keep <= tokens:
            raise ValueError(f"keep must be in [1, {tokens}] (tokens per sequence), got {keep}")
        return keep
    raise TypeError(f"keep must be an int count or a float ratio, got {type(keep).__name__}")


def token_select(x: Tensor, scores: Tensor, keep: Union[int, float]) -> tuple[Tensor, Tensor]:
    """Keeps the ``keep`` highest-scoring tokens of every sequence, in their original order.

    ``x`` (B, N, C), ``scores`` (B, N) (any float dtype; NaN ranks lowest; ties go to the earlier
    token), ``keep`` a count or a ratio of N. Returns ``(kept, index)``: ``kept`` (B, k, C) the
    selected rows of ``x`` and ``index`` (B, k) int64, ascending, for :func:`token_scatter`. The
    selection is per sequence (one segment each: the k-th largest score, then an order-keeping
    compaction), never a permutation of the whole tensor. Differentiable in ``x`` (not in scores).
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, tokens, channels), got {tuple(x.shape)}")
    if scores.shape != x.shape[:2]:
        raise ValueError(f"scores must have shape {tuple(x.shape[:2])} = x.shape[:2], got {tuple(scores.shape)}")
    k = keep_count(x.shape[1], keep)
    index = _lib.token_select_index(scores.detach(), k)
    return _lib.token_gather(x, index), index


def token_scatter(x: Tensor, y: Tensor, index: Tensor) -> Tensor:
    """``out = x`` with row ``index[b, j]`` of sequence ``b`` replaced by ``y[b, j]``.

    ``x`` (B, N, C), ``y`` (B, k, C), ``index`` (B, k) from :func:`token_select` (distinct
    values in [0, N): CPU checks the range; CUDA skips rows outside it). Tokens not selected
    pass through from ``x`` (the residual stream). Differentiable in ``x`` and ``y``.
    """
    return _lib.token_scatter(x, y, index)


# ---- fake tensors ------------------------------------------------------------------------------


@register_fake("cats")
def _(x, threshold):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_fake("cats_backward")
def _(grad, x, threshold):
    torch._check(grad.shape == x.shape, lambda: f"grad must have the shape of x {tuple(x.shape)}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_fake("cats_mlp")
def _(x, w_gate, w_up, w_down_t, threshold):
    torch._check(x.dim() == 2, lambda: "x must have shape (tokens, dim)")
    torch._check(
        w_gate.dim() == 2 and w_up.shape == w_gate.shape and w_down_t.shape == w_gate.shape,
        lambda: "w_gate, w_up and w_down_t must all have shape (features, dim)",
    )
    torch._check(w_gate.shape[1] == x.shape[1], lambda: "w_gate must have shape (features, dim of x)")
    torch._check(
        x.shape[0] >= 1 and x.shape[0] <= MAX_DECODE_TOKENS, lambda: f"x must hold 1 to {MAX_DECODE_TOKENS} tokens"
    )
    return x.new_empty(x.shape)


@register_fake("token_select_index")
def _(scores, keep):
    torch._check(scores.dim() == 2, lambda: "scores must have shape (batch, tokens)")
    torch._check(1 <= keep <= scores.shape[1], lambda: "keep must be in [1, tokens]")
    return scores.new_empty((scores.shape[0], keep), dtype=torch.int64)


@register_fake("token_gather")
def _(x, index):
    torch._check(
        x.dim() == 3 and index.dim() == 2 and index.shape[0] == x.shape[0],
        lambda: "x must be (batch, tokens, channels) and index (batch, keep)",
    )
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


@register_fake("token_scatter")
def _(x, y, index):
    torch._check(
        y.shape == (x.shape[0], index.shape[1], x.shape[2]), lambda: "y must have shape (batch, keep, channels)"
    )
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- autograd ----------------------------------------------------------------------------------


def _cats_setup_context(ctx, inputs, output):
    x, threshold = inputs
    ctx.save_for_backward(x)
    ctx.threshold = threshold


def _cats_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _lib.cats_backward(grad, x, ctx.threshold), None


torch.library.register_autograd("slab::cats", _cats_backward, setup_context=_cats_setup_context)


def _gather_setup_context(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.x_shape = x.shape


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.x_shape)
    return _lib.token_scatter(zeros, grad.contiguous(), index), None


torch.library.register_autograd("slab::token_gather", _gather_backward, setup_context=_gather_setup_context)


def _scatter_setup_context(ctx, inputs, output):
    _x, y, index = inputs
    ctx.save_for_backward(index)
    ctx.y_shape = y.shape


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grad = grad.contiguous()
    dx = _lib.token_scatter(grad, grad.new_zeros(ctx.y_shape), index) if ctx.needs_input_grad[0] else None
    dy = _lib.token_gather(grad, index) if ctx.needs_input_grad[1] else None
    return dx, dy, None


torch.library.register_autograd("slab::token_scatter", _scatter_backward, setup_context=_scatter_setup_context)
