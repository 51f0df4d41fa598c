"""SLA ops (simplified linear attention, SLAB): wrappers over ``torch.ops.slab.*`` plus their fake
tensors and autograd.

* :func:`sla` -- non-causal or causal linear attention with the ReLU feature map (differentiable in
  q, k, v), optionally returning the final state for decoding.
* :func:`sla_step` -- one decode token per sequence, updating the state in place (inference only).

Raw ops (csrc/sla/sla_ops.cpp): ``sla_forward(q, k, v, causal, eps, mask) -> (o, den, state, z)``,
``sla_backward(grad_o, q, k, v, o, den, causal, mask) -> (dq, dk, dv)`` and the mutable
``sla_step(q, k, v, state!, z!, eps) -> o``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._dtypes import acc_dtype
from ._fake import register_fake

__all__ = ["sla", "sla_step"]

_lib = torch.ops.slab


def sla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    eps: float = 1e-6,
    mask: Optional[Tensor] = None,
    return_state: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Simplified linear attention (SLAB): ``o_i = phi(q_i) S / (phi(q_i) . z + eps)``.

    ``phi = ReLU`` (no ``1/sqrt(d)`` scale), ``S = sum_j phi(k_j) v_j^T`` (D x Dv) and
    ``z = sum_j phi(k_j)``, the sums over every token (``causal=False``) or over ``j <= i``
    (``causal=True``). ``q``, ``k`` are (B, H, N, D), ``v`` (B, H, N, Dv) (Dv may differ from D),
    one dtype (float32 / bfloat16 / float16; float64 for gradcheck) and device; any strides with a
    contiguous last dimension are read in place (e.g. the q/k/v views
    ``qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` of a fused projection), others are copied.
    Accumulation and the state are float32 (float64 for float64 inputs); ``o`` (B, H, N, Dv) has
    the input dtype.

    ``mask`` (B, N) bool, True = real token: a masked-out token contributes nothing to S and z
    (its ``phi(k_j)`` is taken as 0), like PyTorch's key-padding masks; its own query row is still
    computed like any other (so it is well defined, but usually ignored by the caller). The mask
    is not differentiable; masked tokens get zero dk and dv.

    Non-causal: the quadratic order ``(phi(Q) phi(K)^T) V`` when ``N (D + Dv) <= 2 D Dv`` (short
    sequences), else two passes (reduce S, z; apply). Causal: chunks of tokens, masked quadratic
    inside a chunk and a float32 running state between chunks -- never an N x N matrix, never a
    per-token state. Differentiable in q, k, v (backward kernels recompute the chunk states
    instead of storing them; o and the per-row denominators are saved; no double backward).
    The CUDA kernels take D, Dv <= 256 (<= 128 for float64).

    ``return_state=True`` returns ``(o, state, z)`` with ``state`` (B, H, D, Dv) = S and ``z``
    (B, H, D), float32, over all (unmasked) tokens: for ``causal=True`` the state after the last
    token, from which :func:`sla_step` continues decoding. They carry no gradient.
    """
    o, _den, state, z = _lib.sla_forward(q, k, v, bool(causal), float(eps), mask)
    if return_state:
        return o, state, z
    return o


def sla_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, z: Tensor, eps: float = 1e-6) -> Tensor:
    """One causal decode token per sequence, O(D Dv) per head.

    ``q``, ``k`` (B, H, D) or (B, H, 1, D), ``v`` (B, H, Dv) or (B, H, 1, Dv) (same rank as q);
    ``state`` (B, H, D, Dv) and ``z`` (B, H, D), contiguous float32 (float64 also accepted for
    float64 q, which then computes in float64 throughout), are
    UPDATED IN PLACE with ``S += phi(k) v^T``, ``z += phi(k)``; then the output
    ``o = phi(q) S / (phi(q) . z + eps)`` is returned with q's dtype and rank. q, k, v are not
    written. Start from zeros, or from ``sla(..., causal=True, return_state=True)`` of a prefill.
    Inference only: raises if autograd would need gradients of q, k or v.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "sla_step is inference only (no autograd); call it under torch.no_grad() "
            "or with q, k, v that do not require grad"
        )
    return _lib.sla_step(q, k, v, state, z, float(eps))


# ---- fake tensors ------------------------------------------------------------------------------


@register_fake("sla_forward")
def _(q, k, v, causal, eps, mask):
    torch._check(q.dim() == 4, lambda: "q must have shape (B, H, N, D)")
    torch._check(k.shape == q.shape, lambda: "k must have the shape of q")
    torch._check(v.dim() == 4 and v.shape[:3] == q.shape[:3], lambda: "v must have shape (B, H, N, Dv)")
    b, h, n, d = q.shape
    dv, acc = v.shape[3], acc_dtype(q.dtype)
    return (
        q.new_empty((b, h, n, dv)),
        q.new_empty((b, h, n), dtype=acc),
        q.new_empty((b, h, d, dv), dtype=acc),
        q.new_empty((b, h, d), dtype=acc),
    )


@register_fake("sla_backward")
def _(grad_o, q, k, v, o, den, causal, mask):
    torch._check(
        q.dim() == 4 and k.shape == q.shape and grad_o.shape == v.shape,
        lambda: "q, k must be (B, H, N, D) and grad_o (B, H, N, Dv)",
    )
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


@register_fake("sla_step")
def _(q, k, v, state, z, eps):
    torch._check(q.dim() in (3, 4), lambda: "q must have shape (B, H, D) or (B, H, 1, D)")
    torch._check(state.dim() == 4, lambda: "state must have shape (B, H, D, Dv)")
    b, h = q.shape[0], q.shape[1]
    dv = v.shape[-1]
    return q.new_empty((b, h, 1, dv) if q.dim() == 4 else (b, h, dv))


# ---- autograd ----------------------------------------------------------------------------------


def _sla_setup_context(ctx, inputs, output):
    q, k, v, causal, _eps, mask = inputs
    o, den, state, z = output
    ctx.mark_non_differentiable(den, state, z)
    ctx.save_for_backward(q, k, v, o, den, mask)
    ctx.causal = causal


def _sla_backward(ctx, grad_o, _grad_den, _grad_state, _grad_z):
    q, k, v, o, den, mask = ctx.saved_tensors
    if grad_o is None or not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None
    dq, dk, dv = _lib.sla_backward(grad_o, q, k, v, o, den, ctx.causal, mask)
    need = ctx.needs_input_grad
    return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None


torch.library.register_autograd("slab::sla_forward", _sla_backward, setup_context=_sla_setup_context)
