"""PRepBN ops (SLAB): wrappers over ``torch.ops.slab.*`` plus their fake tensors and autograd.

Schemas and kernels live in C++ (csrc/prepbn/prepbn_ops.cpp); this module registers what
torch.compile (fake tensors) and autograd need, next to the public wrappers, and the kernels that
are compositions of other ops: the public ``slab::rep_bn`` / ``slab::prep_bn``
(CompositeImplicitAutograd: ``prep_bn_forward`` with autograd, then the in-place running-stat update)
and ``slab::bn_update_running_stats`` (CompositeExplicitAutograd: one ``_foreach_lerp_``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._dtypes import acc_dtype
from ._fake import register_fake

__all__ = ["rep_bn", "prep_bn"]

_lib = torch.ops.slab


# ---- PRepBN -----------------------------------------------------------------------------------


def rep_bn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    alpha: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """RepBN (SLAB): ``y = BatchNorm(x) + alpha * x`` over the last dimension of ``x`` (..., C).

    Training normalises with the batch statistics of the tokens where ``mask`` is True (all tokens
    when ``mask`` is None) and updates ``running_mean``/``running_var`` in place as
    ``torch.nn.BatchNorm1d`` does (unbiased variance). Eval uses the running statistics:
    ``y = x * (weight / sqrt(running_var + eps) + alpha) + bias - running_mean * weight / sqrt(running_var + eps)``.
    """
    return _lib.rep_bn(x, weight, bias, alpha, running_mean, running_var, training, momentum, eps, mask)


def prep_bn(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Optional[Tensor],
    bn_weight: Tensor,
    bn_bias: Tensor,
    alpha: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    lam: float,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    norm_eps: float = 1e-6,
    norm: str = "layer",
    mask: Optional[Tensor] = None,
) -> Tensor:
    """PRepBN (SLAB): ``y = lam * Norm1(x) + (1 - lam) * RepBN(x)`` in one fused kernel.

    ``Norm1`` is LayerNorm (``norm="layer"``, ``norm_bias`` optional) or RMSNorm (``norm="rms"``,
    ``norm_bias`` None) with ``norm_eps``; RepBN as :func:`rep_bn`. The statistics of both norms
    and the mixed output take two passes over ``x`` (the batch statistics must be complete before
    any output), the backward two passes over ``x`` and ``dy``.
    """
    return _lib.prep_bn(
        x,
        norm_weight,
        norm_bias,
        bn_weight,
        bn_bias,
        alpha,
        running_mean,
        running_var,
        lam,
        training,
        momentum,
        eps,
        norm_eps,
        norm,
        mask,
    )


def _row_stat_len(x: Tensor, norm: str) -> int:
    return 0 if norm == "none" else x.numel() // x.shape[-1]


@register_fake("prep_bn_forward")
def _(
    x,
    norm_weight,
    norm_bias,
    bn_weight,
    bn_bias,
    alpha,
    running_mean,
    running_var,
    lam,
    training,
    eps,
    norm_eps,
    norm,
    mask,
):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    c, acc = x.shape[-1], acc_dtype(x.dtype)
    torch._check(bn_weight.shape == (c,), lambda: f"bn_weight must have shape ({c},)")
    rows = _row_stat_len(x, norm)
    stat = lambda n: x.new_empty((n,), dtype=acc)  # noqa: E731
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        stat(rows),
        stat(rows),
        stat(c),
        stat(c),
        stat(c),
    )


@register_fake("prep_bn_backward")
def _(dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, lam, training, norm, mask):
    c, acc = x.shape[-1], acc_dtype(x.dtype)
    stat = lambda n: x.new_empty((n,), dtype=acc)  # noqa: E731
    return (torch.empty_like(x, memory_format=torch.contiguous_format), stat(c), stat(c), stat(c), stat(c), stat(1))


@register_fake("prep_bn_stats")
def _(x, mask):
    c, acc = x.shape[-1], acc_dtype(x.dtype)
    return x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc), x.new_empty((1,), dtype=acc)


@register_fake("prep_bn_apply")
def _(x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, bn_mean, bn_rstd, lam, norm_eps, norm):
    rows, acc = _row_stat_len(x, norm), acc_dtype(x.dtype)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((rows,), dtype=acc),
        x.new_empty((rows,), dtype=acc),
    )


@register_fake("prep_bn_backward_reduce")
def _(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm, mask):
    c, acc = x.shape[-1], acc_dtype(x.dtype)
    return x.new_empty((3, c), dtype=acc), x.new_empty((1,), dtype=acc)


@register_fake("prep_bn_backward_apply")
def _(
    dy, x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, sums, count, lam, training, norm, mask
):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _prep_bn_fwd_setup_context(ctx, inputs, output):
    (x, norm_weight, norm_bias, bn_weight, bn_bias, alpha, _rm, _rv, lam, training, _eps, _neps, norm, mask) = inputs
    _y, row_mean, row_rstd, bn_mean, bn_rstd, bn_var = output
    # Statistics are outputs for the backward and the running-stat update, never differentiated:
    # marking them keeps the in-place update of running_mean/running_var out of the graph.
    ctx.mark_non_differentiable(row_mean, row_rstd, bn_mean, bn_rstd, bn_var)
    ctx.save_for_backward(x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, mask)
    ctx.lam, ctx.training, ctx.norm = lam, training, norm
    ctx.param_dtypes = [None if t is None else t.dtype for t in (norm_weight, norm_bias, bn_weight, bn_bias, alpha)]
    ctx.alpha_shape = alpha.shape


def _prep_bn_fwd_backward(ctx, dy, *_unused_stat_grads):
    x, norm_weight, bn_weight, alpha, row_mean, row_rstd, bn_mean, bn_rstd, mask = ctx.saved_tensors
    dx, d_nw, d_nb, d_bw, d_bb, d_alpha = _lib.prep_bn_backward(
        dy,
        x,
        norm_weight,
        bn_weight,
        alpha,
        row_mean,
        row_rstd,
        bn_mean,
        bn_rstd,
        ctx.lam,
        ctx.training,
        ctx.norm,
        mask,
    )
    grads = [None if dt is None else g.to(dt) for g, dt in zip((d_nw, d_nb, d_bw, d_bb, d_alpha), ctx.param_dtypes)]
    grads[4] = grads[4].reshape(ctx.alpha_shape)
    return (dx.view_as(x), *grads, None, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "slab::prep_bn_forward", _prep_bn_fwd_backward, setup_context=_prep_bn_fwd_setup_context
)


class _PrepBNForward(torch.autograd.Function):
    """The same autograd as the registration above, for the eager path of the public ops.

    torch.library's autograd wrapper rebuilds the 14-argument schema's argument list on every call
    (``fill_defaults``), about 0.4 ms per training step on a CPU -- as much as the kernels take for
    a small batch. Traced calls (torch.compile, opcheck) still go through the registered op."""

    @staticmethod
    def forward(*inputs):
        with torch._C._AutoDispatchBelowAutograd():  # skip the registered autograd kernel, too
            return _lib.prep_bn_forward.default(*inputs)

    setup_context = staticmethod(_prep_bn_fwd_setup_context)
    backward = staticmethod(_prep_bn_fwd_backward)


@register_fake("bn_update_running_stats")
def _(running_mean, running_var, mean, var, momentum):
    return None


# ---- kernels composed of other ops -------------------------------------------------------------
# Their checks name the arguments as the C++ binding layer does (same messages, RuntimeError; the
# hyperparameter and norm checks of the public ops stay ValueErrors).

_impl_lib = torch.library.Library("slab", "IMPL")  # the registrations live as long as the module

# c10's names of the dtypes, as the C++ checks print them.
_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.float8_e4m3fn: "Float8_e4m3fn",
    torch.float8_e5m2: "Float8_e5m2",
    torch.float8_e4m3fnuz: "Float8_e4m3fnuz",
    torch.float8_e5m2fnuz: "Float8_e5m2fnuz",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _is_concrete(t) -> bool:
    """A plain tensor with real memory: not None, not meta, not one of the fake / functional
    tensors a composite kernel sees under torch.compile or opcheck tracing (whose fakes check
    shapes). Only such tensors get the composite kernels' own size and memory checks."""
    if not isinstance(t, Tensor) or t.device.type == "meta":
        return False
    keys = torch._C._dispatch_keys(t)
    return not (keys.has(torch._C.DispatchKey.Python) or keys.has(torch._C.DispatchKey.Functionalize))


def _check_unit_interval(v: float, name: str) -> None:
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise ValueError(f"{name} must be in [0, 1], got {v:g}")


def _check_defined(t, name: str) -> None:
    if t is None:
        raise RuntimeError(f"{name} must be a tensor, got None")


def _check_same_device(t, ref: Tensor, name: str, ref_name: str = "x") -> None:
    _check_defined(t, name)
    if t.device != ref.device:
        raise RuntimeError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device"
        )


def _check_x(x: Tensor, name: str = "x") -> int:
    """Channels of x (..., C), checked as the C++ kernels check it."""
    _check_defined(x, name)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise RuntimeError(
            f"{name} must be float32, bfloat16 or float16 (float64 for gradcheck), got {_dtype_name(x.dtype)}"
        )
    if x.dim() < 1:
        raise RuntimeError(f"{name} must have at least one dimension (..., C), got a scalar")
    channels = x.shape[-1]
    if channels <= 0:
        raise RuntimeError(f"{name} must have a non-empty last (channel) dimension, got shape {_shape_str(x.shape)}")
    return channels


def _check_channel_vector(t, x: Tensor, channels: int, name: str) -> None:
    """A per-channel vector: 1-D of ``channels`` elements, dtype that of x or the accumulation dtype."""
    _check_same_device(t, x, name)
    if t.dim() != 1 or t.shape[0] != channels:
        raise RuntimeError(
            f"{name} must have shape ({channels},) to match the last dimension of x, got {_shape_str(t.shape)}"
        )
    acc = acc_dtype(x.dtype)
    if x.dtype == acc:
        if t.dtype != acc:
            raise RuntimeError(f"{name} must be {_dtype_name(acc)} to match x, got {_dtype_name(t.dtype)}")
    elif t.dtype not in (x.dtype, acc):
        raise RuntimeError(
            f"{name} must be {_dtype_name(x.dtype)} or {_dtype_name(acc)} to match x, got {_dtype_name(t.dtype)}"
        )


class _AliasCheck:
    """In-place ops: every written tensor must own its elements (no stride-0 / expanded view) and
    share no memory with any other argument, as torch's own in-place ops require; checked before
    anything is written. The same test as the C++ ``AliasCheck`` (core/binding.h): two tensors
    overlap when the byte ranges their elements span intersect. Tensors without real memory
    (None, empty, meta, fake) are left out."""

    def __init__(self):
        self._entries = []  # (lo, hi, name, written)

    def written(self, t, name: str) -> "_AliasCheck":
        return self._add(t, name, True)

    def read(self, t, name: str) -> "_AliasCheck":
        return self._add(t, name, False)

    def _add(self, t, name: str, written: bool) -> "_AliasCheck":
        if not _is_concrete(t) or t.numel() == 0:
            return self
        base, item = t.data_ptr(), t.element_size()
        if t.is_contiguous():  # the common case, without a Python loop over the dims
            self._entries.append((base, base + t.numel() * item, name, written))
            return self
        lo = hi = 0  # element offsets from data_ptr that the tensor reaches
        for size, stride in zip(t.shape, t.stride()):
            if size <= 1:
                continue
            if written and stride == 0:
                raise RuntimeError(
                    f"unsupported operation: {name} is written in place, but more than one of its elements refer "
                    "to a single memory location (an expanded or stride-0 view); pass a tensor that owns its "
                    f"elements (e.g. {name}.clone())"
                )
            reach = (size - 1) * stride
            if reach < 0:
                lo += reach
            else:
                hi += reach
        self._entries.append((base + lo * item, base + (hi + 1) * item, name, written))
        return self

    def check(self) -> None:
        entries = sorted(self._entries, key=lambda e: e[0])
        for i, a in enumerate(entries):
            for b in entries[i + 1 :]:
                if b[0] >= a[1]:  # a span can only meet spans that start before it ends
                    break
                if not a[3] and not b[3]:
                    continue
                w, o = (a, b) if a[3] else (b, a)
                raise RuntimeError(
                    f"unsupported operation: some elements of {o[2]} and {w[2]} (written in place) refer to a "
                    f"single memory location; pass distinct tensors (e.g. {o[2]}.clone())"
                )


def _running_stats_alias_check(running_mean, running_var) -> _AliasCheck:
    """The running statistics are written in place: they must own their elements and share memory
    with no other argument."""
    return _AliasCheck().written(running_mean, "running_mean").written(running_var, "running_var")


def _check_stat(t, ref: Tensor, name: str) -> None:
    """A running statistic (updated in place) or a batch statistic: a real floating tensor shaped like ``ref``."""
    _check_same_device(t, ref, name, "running_mean")
    if not t.dtype.is_floating_point:
        raise RuntimeError(f"{name} must be a floating-point (real) tensor, got {_dtype_name(t.dtype)}")
    if t.shape != ref.shape:
        raise RuntimeError(
            f"{name} must have the shape {_shape_str(ref.shape)} of running_mean, got {_shape_str(t.shape)}"
        )


def _bn_update_running_stats(running_mean, running_var, mean, var, momentum):
    _check_unit_interval(momentum, "momentum")
    _check_stat(running_mean, running_mean, "running_mean")  # the module's buffers set the shape
    _check_stat(running_var, running_mean, "running_var")
    _check_stat(mean, running_mean, "mean")
    _check_stat(var, running_mean, "var")
    _running_stats_alias_check(running_mean, running_var).read(mean, "mean").read(var, "var").check()
    # One multi-tensor launch on CUDA for both (the same lerp, element for element, as two lerp_).
    torch._foreach_lerp_(
        [running_mean, running_var], [mean.to(running_mean.dtype), var.to(running_var.dtype)], momentum
    )


def _prep_bn_composite(
    x,
    norm_weight,
    norm_bias,
    bn_weight,
    bn_bias,
    alpha,
    running_mean,
    running_var,
    lam,
    training,
    momentum,
    eps,
    norm_eps,
    norm,
    mask,
    weight_name,
    bias_name,
):
    """The public ops: ``prep_bn_forward`` (with autograd) and, in training, the in-place running-stat update."""
    _check_unit_interval(momentum, "momentum")
    eager = _is_concrete(x) and not torch.compiler.is_compiling()
    if eager:
        # The stage ops name the affine bn_weight / bn_bias; check it here under the caller's names.
        channels = _check_x(x)
        _check_channel_vector(bn_weight, x, channels, weight_name)
        _check_channel_vector(bn_bias, x, channels, bias_name)
        if training:
            (
                _running_stats_alias_check(running_mean, running_var)
                .read(x, "x")
                .read(norm_weight, "norm_weight")
                .read(norm_bias, "norm_bias")
                .read(bn_weight, weight_name)
                .read(bn_bias, bias_name)
                .read(alpha, "alpha")
                .read(mask, "mask")
                .check()
            )
    forward = _PrepBNForward.apply if eager else _lib.prep_bn_forward.default
    outs = forward(
        x,
        norm_weight,
        norm_bias,
        bn_weight,
        bn_bias,
        alpha,
        running_mean,
        running_var,
        lam,
        training,
        eps,
        norm_eps,
        norm,
        mask,
    )
    if training:
        _lib.bn_update_running_stats.default(running_mean, running_var, outs[3], outs[5], momentum)
    return outs[0]


def _prep_bn_kernel(
    x,
    norm_weight,
    norm_bias,
    bn_weight,
    bn_bias,
    alpha,
    running_mean,
    running_var,
    lam,
    training,
    momentum=0.1,
    eps=1e-5,
    norm_eps=1e-6,
    norm="layer",
    mask=None,
):
    if norm not in ("layer", "rms"):
        raise ValueError(f'norm must be "layer" or "rms", got "{norm}"')
    return _prep_bn_composite(
        x,
        norm_weight,
        norm_bias,
        bn_weight,
        bn_bias,
        alpha,
        running_mean,
        running_var,
        lam,
        training,
        momentum,
        eps,
        norm_eps,
        norm,
        mask,
        "bn_weight",
        "bn_bias",
    )


def _rep_bn_kernel(x, weight, bias, alpha, running_mean, running_var, training, momentum=0.1, eps=1e-5, mask=None):
    return _prep_bn_composite(
        x,
        None,
        None,
        weight,
        bias,
        alpha,
        running_mean,
        running_var,
        0.0,
        training,
        momentum,
        eps,
        0.0,
        "none",
        mask,
        "weight",
        "bias",
    )


_impl_lib.impl("rep_bn", _rep_bn_kernel, "CompositeImplicitAutograd")
_impl_lib.impl("prep_bn", _prep_bn_kernel, "CompositeImplicitAutograd")
_impl_lib.impl("bn_update_running_stats", _bn_update_running_stats, "CompositeExplicitAutograd")
