"""W4A8 ops (docs/w4a8.md): int4 weights x float8_e4m3fn activations.

* :func:`w4a8_gemm` -- ``y = x_scale * sum_g w_scale * (fp8(x) . int4(w))`` on pre-quantized
  activations (from :func:`slab.quant.quantize_fp8`).
* :func:`w4a8_linear` -- quantizes the activations per token on the fly, then the same GEMM, plus
  an optional bias; output in the dtype of ``x``.
* :class:`PackedW4` -- weights prepacked for one device's kernels (:func:`slab.quant.prepack_w4`).

Both ops accept either a :class:`PackedW4` or the unpacked form ``(w_packed, w_scales, group_size)``
with the row-major ``quantize_w4`` output. Inference only: the ops have no gradient (quantized
weights are not trained through); a backward through them raises a RuntimeError (run them under
``torch.no_grad()``). Schemas and kernels live in C++ (csrc/w4a8/w4a8_ops.cpp).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch
from torch import Tensor

from ._fake import register_fake

__all__ = ["w4a8_gemm", "w4a8_linear", "PackedW4", "GROUP_SIZES"]

_lib = torch.ops.slab

#: Supported weight group sizes (-1: one scale per output row).
GROUP_SIZES = (32, 64, 128, -1)

_LAYOUT_IDS = {"rowmajor": 0, "tiled": 1}


def group_columns(group_size: int, k: int) -> int:
    """Columns per scale for ``group_size`` (``k`` for -1); ValueError unless it divides an even ``k``."""
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} (-1: one scale per row), got {group_size!r}")
    if k <= 0 or k % 2:
        raise ValueError(
            f"K = {k} (input features) must be even and > 0 (two int4 values per byte) for any "
            f"group_size (got group_size {group_size})"
        )
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"group_size {group_size} must divide K = {k} (the number of input features)")
    return g


@dataclasses.dataclass(frozen=True)
class PackedW4:
    """int4 weights in the layout one device's kernels read (made by :func:`slab.quant.prepack_w4`).

    ``packed``: uint8 codes; ``layout == "rowmajor"`` (the CPU kernels): (n, k/2) exactly as
    ``quantize_w4`` returns them; ``layout == "tiled"`` (the CUDA kernels): (n rounded up to 16,
    k rounded up to 64 / 2), 16 x 64 tiles of 512 bytes in which each lane of a warp finds its mma
    fragment nibbles in one 16-byte chunk (csrc/w4a8/w4a8.h). ``scales``: float32 (n, k/group).
    """

    packed: Tensor
    scales: Tensor
    group_size: int
    n: int
    k: int
    device: torch.device
    layout: str

    @property
    def layout_id(self) -> int:
        return _LAYOUT_IDS[self.layout]


def _arguments(fn: str, w, args, kwargs, extra: str, default):
    """(packed, scales, group_size, layout id, extra) from either call form:
    ``(w: PackedW4, [extra])`` or ``(w_packed, w_scales, group_size, [extra])``, positional or by
    keyword; ``extra`` is ``out_dtype`` (w4a8_gemm) or ``bias`` (w4a8_linear)."""
    if isinstance(w, PackedW4):
        names = [extra]
    elif isinstance(w, Tensor):
        names = ["w_scales", "group_size", extra]
    else:
        raise TypeError(
            f"{fn}: w must be a PackedW4 (slab.quant.prepack_w4) or the uint8 w_packed tensor, got {type(w).__name__}"
        )
    if len(args) > len(names):
        hint = " (a PackedW4 weight carries w_scales and group_size)" if isinstance(w, PackedW4) else ""
        raise TypeError(f"{fn}: too many positional arguments{hint}")
    vals = dict(zip(names, args))
    for key, v in kwargs.items():
        if key not in names:
            hint = " (a PackedW4 weight carries w_scales and group_size)" if isinstance(w, PackedW4) else ""
            raise TypeError(f"{fn}: unexpected argument {key!r}{hint}")
        if key in vals:
            raise TypeError(f"{fn}: got multiple values for {key!r}")
        vals[key] = v
    value = vals.get(extra, default)
    if isinstance(w, PackedW4):
        return w.packed, w.scales, w.group_size, w.layout_id, value
    if "w_scales" not in vals or "group_size" not in vals:
        raise TypeError(f"{fn}: with a uint8 w_packed tensor, w_scales and group_size are required")
    return w, vals["w_scales"], vals["group_size"], 0, value


def w4a8_gemm(x_fp8: Tensor, x_scale: Tensor, w: Union[PackedW4, Tensor], *args, **kwargs) -> Tensor:
    """``y[m, n] = x_scale[m] * sum_g w_scales[n, g] * sum_{k in g} fp8(x)[m, k] * int4(w)[n, k]``.

    Call forms: ``w4a8_gemm(x_fp8, x_scale, w, out_dtype=torch.bfloat16)`` with ``w`` a
    :class:`PackedW4`, or the unpacked form ``w4a8_gemm(x_fp8, x_scale, w_packed, w_scales,
    group_size, out_dtype=torch.bfloat16)`` with the row-major uint8 ``quantize_w4`` output (on
    CUDA this form re-tiles the weights on every call; prepack once). ``x_fp8`` float8_e4m3fn
    (..., K); ``x_scale`` float32 with one scale per row ((...) or (..., 1)). Accumulation in
    float32 (the group sums, then the scaled sum over groups), output ``out_dtype`` (bfloat16,
    float16 or float32), shape (..., N).
    """
    packed, scales, group_size, layout, out_dtype = _arguments(
        "w4a8_gemm", w, args, kwargs, "out_dtype", torch.bfloat16
    )
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"w4a8_gemm: out_dtype must be a torch.dtype, got {type(out_dtype).__name__}")
    if not isinstance(x_fp8, Tensor) or x_fp8.dim() < 1:
        raise ValueError("x_fp8 must be a tensor of shape (..., K)")
    lead = x_fp8.shape[:-1]
    x2 = x_fp8.reshape(-1, x_fp8.shape[-1])
    xs = x_scale.reshape(-1) if isinstance(x_scale, Tensor) else x_scale
    if isinstance(xs, Tensor) and xs.numel() != x2.shape[0]:
        raise ValueError(
            f"x_scale must hold one scale per row of x_fp8 ({x2.shape[0]}), got shape {tuple(x_scale.shape)}"
        )
    y = _lib.w4a8_gemm(x2, xs, packed, scales, group_size, layout, out_dtype)
    return y.reshape(*lead, y.shape[-1])


def w4a8_linear(x: Tensor, w: Union[PackedW4, Tensor], *args, **kwargs) -> Tensor:
    """``y = w4a8_gemm(*quantize_fp8(x), w) + bias`` in the dtype of ``x`` (float32 / bfloat16 /
    float16), ``x`` (..., K) -> (..., N).

    Call forms: ``w4a8_linear(x, w, bias=None)`` with ``w`` a :class:`PackedW4`, or
    ``w4a8_linear(x, w_packed, w_scales, group_size, bias=None)`` (bias positional or keyword).
    The per-token quantization is the one of :func:`slab.quant.quantize_fp8` (bit for bit). CPU:
    fused into the GEMM prologue (x is read once and never written out as fp8). CUDA: one small
    quantize kernel (M x K bytes written), then the GEMM. The bias is added in float32 before the
    output cast.
    """
    packed, scales, group_size, layout, bias = _arguments("w4a8_linear", w, args, kwargs, "bias", None)
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"w4a8_linear: bias must be a tensor or None, got {type(bias).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., K)")
    lead = x.shape[:-1]
    y = _lib.w4a8_linear(x.reshape(-1, x.shape[-1]), packed, scales, group_size, layout, bias)
    return y.reshape(*lead, y.shape[-1])


# ---- fake tensors ------------------------------------------------------------------------------


def _fake_n(w_packed, w_scales, k, group_size, layout):
    torch._check(w_scales.dim() == 2, lambda: "w_scales must have shape (N, K / group_size)")
    torch._check(group_size in GROUP_SIZES, lambda: f"group_size must be one of {GROUP_SIZES}")
    n = w_scales.shape[0]
    g = k if group_size == -1 else group_size
    torch._check(k % g == 0 and k % 2 == 0, lambda: "group_size must divide K (even)")
    torch._check(w_scales.shape[1] == k // g, lambda: "w_scales must have shape (N, K / group_size)")
    if layout == 0:
        torch._check(
            w_packed.shape[0] == n and w_packed.shape[1] == k // 2, lambda: "w_packed must have shape (N, K / 2)"
        )
    return n


@register_fake("quantize_fp8")
def _(x):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1], dtype=torch.float32)


@register_fake("w4a8_tile_weights")
def _(packed):
    torch._check(packed.dim() == 2, lambda: "packed must have shape (N, K / 2)")
    n, kh = packed.shape
    return packed.new_empty(((n + 15) // 16 * 16, (2 * kh + 63) // 64 * 32))


@register_fake("w4a8_int4_to_e4m3")
def _(packed):
    torch._check(packed.dim() >= 1, lambda: "packed must have an even last dimension")
    return packed.new_empty((*packed.shape[:-1], 2 * packed.shape[-1]))


@register_fake("w4a8_gemm")
def _(x_fp8, x_scale, w_packed, w_scales, group_size, layout, out_dtype):
    torch._check(x_fp8.dim() == 2, lambda: "x_fp8 must have shape (M, K)")
    torch._check(x_fp8.dtype == torch.float8_e4m3fn, lambda: "x_fp8 must be float8_e4m3fn")
    n = _fake_n(w_packed, w_scales, x_fp8.shape[1], group_size, layout)
    return x_fp8.new_empty((x_fp8.shape[0], n), dtype=out_dtype)


@register_fake("w4a8_linear")
def _(x, w_packed, w_scales, group_size, layout, bias):
    torch._check(x.dim() == 2, lambda: "x must have shape (M, K)")
    n = _fake_n(w_packed, w_scales, x.shape[1], group_size, layout)
    return x.new_empty((x.shape[0], n))


# ---- autograd: none (inference only) -------------------------------------------------------------
# Registered so that a backward through these ops fails loudly instead of torch's silent
# "no autograd kernel" fallback (which would give wrong, zero-like gradients).


def _no_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"slab::{name} is inference only: it has no gradient (int4 / fp8 quantization is not "
            "differentiated through); run it under torch.no_grad() or detach its inputs"
        )

    return backward


def _no_context(ctx, inputs, output):
    return None


for _name in ("quantize_fp8", "w4a8_gemm", "w4a8_linear"):
    torch.library.register_autograd(f"slab::{_name}", _no_backward(_name), setup_context=_no_context)
