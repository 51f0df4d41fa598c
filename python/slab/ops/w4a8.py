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
from typing import Optional, Union

import torch
from torch import Tensor

from .. import info as _info
from .._memory import HUGE_PAGE, huge_page_empty
from ._fake import register_fake

__all__ = [
    "quantize_w4",
    "dequantize_w4",
    "unpack_int4",
    "prepack_w4",
    "quantize_fp8",
    "w4a8_gemm",
    "w4a8_linear",
    "PackedW4",
    "GROUP_SIZES",
    "LAYOUTS",
    "cpu_layout",
]

_lib = torch.ops.slab
_gemm, _linear = _lib.w4a8_gemm.default, _lib.w4a8_linear.default
# What the autograd kernel below (register_autograd) does when no input requires grad: dispatch
# past the Autograd key. The wrappers do it themselves, without that kernel's Python frame and
# second dispatch: a cold 4096 x 4096 GEMV call measured 30 us faster (0.41 -> 0.37 ms, 2 threads).
_below_autograd = torch._C._AutoDispatchBelowAutograd


# The wrappers' decode path (inlined in each, as every Python frame counts): a PackedW4, no
# optional arguments, a 2-D x, eager inference mode (no Autograd key to pass; torch.compile cannot
# trace is_inference_mode_enabled, and traces the plain call): the op takes the arguments as they
# are and checks them, with no other Python step. In a decode step every Python step runs from
# caches the weights of the previous GEMV have just swept: measured cold (after a 64 MB read), the
# general path took 25-35 us more than the op alone, this one 5-15 us.
_inference_mode = torch.is_inference_mode_enabled


def _call(op, grad_inputs: tuple, *args) -> Tensor:
    """``op(*args)``, past the Autograd key in eager mode when no output can need a gradient (grad
    mode off or none of ``grad_inputs`` requiring it); torch.compile traces the plain call."""
    if torch.compiler.is_compiling() or _inference_mode():  # inference mode: no Autograd key to pass
        return op(*args)
    if not torch.is_grad_enabled() or not any(isinstance(t, Tensor) and t.requires_grad for t in grad_inputs):
        with _below_autograd():
            return op(*args)
    return op(*args)


#: Supported weight group sizes (-1: one scale per output row).
GROUP_SIZES = (32, 64, 128, -1)

#: Weight layouts (PackedW4.layout and the ops' ``layout`` argument): ``"rowmajor"`` the
#: ``quantize_w4`` codes (N, K/2), read by the CPU kernels; ``"tiled"`` the CUDA mma.sync tiles;
#: ``"sm90"`` the sm_90a wgmma kernel's blocks; ``"panel"`` the CPU's AVX-512 VNNI layout, 16-row
#: panels (csrc/w4a8/w4a8.h documents each byte map).
LAYOUTS = ("rowmajor", "tiled", "sm90", "panel")

_PANEL_ROWS, _PANEL_COLS = 16, 8
_PANEL_DWORD = _PANEL_COLS // 2  # bytes of one row's 8 columns


# Decided at import (like the library's own choice, made once per process), so that a module that
# prepacks inside a torch.compile'd forward reads a constant rather than /proc/cpuinfo.
_CPU_LAYOUT = "panel" if _info.w4a8_vnni_kernels() else "rowmajor"


def cpu_layout() -> str:
    """The CPU weight layout this process's fastest W4A8 kernels read: ``"panel"`` where the AVX-512
    VNNI kernels run (``slab info``), else ``"rowmajor"``."""
    return _CPU_LAYOUT


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def group_columns(group_size: int, k: int) -> int:
    """Columns per scale for ``group_size`` (``k`` for -1); ValueError unless it divides an even ``k``."""
    if type(group_size) is not int or group_size not in GROUP_SIZES:  # not 128.0, not True
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


@dataclasses.dataclass(frozen=True, slots=True)
class PackedW4:
    """int4 weights in the layout one device's kernels read (made by :func:`slab.quant.prepack_w4`).

    ``packed``: uint8 codes; ``layout == "rowmajor"`` (the CPU kernels): (n, k/2) exactly as
    ``quantize_w4`` returns them; ``layout == "panel"`` (the CPU's AVX-512 VNNI kernels): (n
    rounded up to 16, k rounded up to 8 / 2), per 16 rows and 8 columns 64 bytes, the 4 row-major
    bytes of each of the 16 rows in turn; ``layout == "tiled"`` (the CUDA kernels): (n rounded up
    to 16, k rounded up to 64 / 2), 16 x 64 tiles of 512 bytes in which each lane of a warp finds
    its mma fragment nibbles in one 16-byte chunk (csrc/w4a8/w4a8.h). ``scales``: float32 (n,
    k/group) in every layout.
    """

    packed: Tensor
    scales: Tensor
    group_size: int
    n: int
    k: int
    device: torch.device
    layout: str


# ---- quantizers -----------------------------------------------------------------------------------


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_w4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """Quantizes weights ``w`` (N, K) (float32 / bfloat16 / float16) to int4 with group scales.

    Returns ``(packed, scales)``: ``packed`` uint8 (N, K/2), byte ``[n, j]`` = ``q[n, 2j] & 15 |
    (q[n, 2j+1] & 15) << 4``; ``scales`` float32 (N, K / group_size) (``group_size=-1``: (N, 1),
    one scale per row). ``K`` must be even and a multiple of ``group_size`` (ValueError otherwise);
    ``w`` must be finite. Runs on ``w``'s device with plain torch ops.
    """
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D (N, K) tensor, got {getattr(w, 'shape', type(w).__name__)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w must be float32, bfloat16 or float16, got {w.dtype}")
    n, k = w.shape
    g = group_columns(group_size, k)
    wf = w.detach().float().reshape(n, k // g, g)
    if not bool(torch.isfinite(wf).all()):
        raise ValueError("w must be finite (found NaN or Inf)")
    absmax = wf.abs().amax(-1)
    tiny = torch.finfo(torch.float32).tiny  # absmax / 7 underflows to 0 below ~1e-44: w / 0 would be NaN
    scales = torch.where(absmax == 0, torch.ones_like(absmax), (absmax / 7).clamp(min=tiny))
    q = torch.clamp(torch.round(wf / scales.unsqueeze(-1)), -8, 7).to(torch.int32).reshape(n, k)
    packed = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).to(torch.uint8)
    return packed, scales.contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """The int4 values (int8, (N, K)) of row-major packed codes (N, K/2)."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor (N, K/2), got {getattr(packed, 'dtype', type(packed))}")
    p = packed.to(torch.int16)
    nib = torch.stack([p & 15, p >> 4], dim=-1).reshape(packed.shape[0], -1)
    return (nib - ((nib & 8) << 1)).to(torch.int8)


def _check_scales(scales: Tensor, n: int, k: int, g: int) -> None:
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be a float32 tensor, got {getattr(scales, 'dtype', type(scales).__name__)}")
    if tuple(scales.shape) != (n, k // g):
        raise ValueError(f"scales must have shape {(n, k // g)} = (N, K / group_size), got {tuple(scales.shape)}")


def dequantize_w4(packed: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """float32 (N, K) weights ``int4 * scale`` from ``quantize_w4``'s ``(packed, scales)``."""
    q = unpack_int4(packed)
    n, k = q.shape
    g = group_columns(group_size, k)
    _check_scales(scales, n, k, g)
    if scales.device != packed.device:
        raise ValueError(f"scales is on {scales.device} but packed is on {packed.device}")
    return (q.float().reshape(n, k // g, g) * scales.unsqueeze(-1)).reshape(n, k)


def prepack_w4(
    packed: Tensor,
    scales: Tensor,
    group_size: int,
    device: Union[str, torch.device, None] = None,
    layout: Optional[str] = None,
) -> PackedW4:
    """The weights in the layout the kernels of ``device`` read (default: ``packed``'s device).

    ``layout`` (one of :data:`LAYOUTS`) defaults to the device's: ``"rowmajor"`` on the CPU (the
    ``quantize_w4`` codes as they are), ``"tiled"`` on CUDA (16 x 64 tiles, rows padded to 16 and
    columns to 64 with zero codes); ``"sm90"`` is the layout of the Hopper (sm_90a) wgmma kernel
    (the same tiles in 128 x 128 blocks, rows and columns padded to 128); ``"panel"`` the CPU
    layout of the AVX-512 VNNI kernels (16-row panels, rows padded to 16 and columns to 8 with zero
    codes; :func:`cpu_layout` says whether this CPU runs them: elsewhere the CPU kernels reorder it
    back on every call; on Linux the panels, and the scales from 2 MiB on (copied), go to memory
    advised for transparent huge pages, :func:`_streamed_panels`). Do this once (offline / at load
    time), not per call. A CUDA layout on the CPU only serves to inspect it (the CPU kernels read
    ``"rowmajor"`` and ``"panel"``), and ``"panel"`` is for the CPU only.
    """
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor (N, K/2), got {getattr(packed, 'dtype', type(packed))}")
    n, k = packed.shape[0], 2 * packed.shape[1]
    g = group_columns(group_size, k)
    _check_scales(scales, n, k, g)
    device = torch.device(device) if device is not None else packed.device
    if layout is None:
        layout = "tiled" if device.type == "cuda" else "rowmajor"
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    codes = packed.contiguous()
    if layout == "panel" and device.type == "cpu" and _real_eager(packed, scales):
        codes, scales = _streamed_panels(codes, scales.to(device))
    elif layout == "panel":
        codes = _panels(codes)
    elif layout != "rowmajor":
        codes = _lib.w4a8_tile_weights(codes, layout)  # on packed's device (CPU or CUDA)
    return PackedW4(codes.to(device), scales.to(device).contiguous(), int(group_size), n, k, device, layout)


def _panel_shape(n: int, kh: int) -> tuple[int, int]:
    """The "panel" codes' shape for N rows of K / 2 = ``kh`` bytes: (N rounded up to 16, ``kh``
    rounded up to 4 bytes = 8 columns)."""
    return -(-n // _PANEL_ROWS) * _PANEL_ROWS, -(-kh // _PANEL_DWORD) * _PANEL_DWORD


def _panels(codes: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Row-major codes (N, K/2) in the "panel" layout (:func:`_panel_shape`): per 16 rows and 4
    bytes (8 columns), the 16 rows' 4 bytes in turn; zero codes pad. Into ``out`` when given."""
    n, kh = codes.shape
    n_pad, kh_pad = _panel_shape(n, kh)
    padded = torch.nn.functional.pad(codes, (0, kh_pad - kh, 0, n_pad - n))
    shape = (n_pad // _PANEL_ROWS, _PANEL_ROWS, kh_pad // _PANEL_DWORD, _PANEL_DWORD)
    panels = padded.view(shape).transpose(1, 2)
    if out is None:
        return panels.contiguous().view(n_pad, kh_pad)
    out.view(panels.shape).copy_(panels)
    return out


def _real_eager(*tensors: Tensor) -> bool:
    """Whether ``tensors`` are plain tensors with real storage, outside torch.compile and any
    dispatch mode (fake tensors, tracing): only then can they be placed in memory of our own."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
        and not torch._C._is_torch_function_mode_enabled()
        and all(type(t) is Tensor for t in tensors)
    )


def _streamed_panels(codes: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """The "panel" codes in a :func:`huge_page_empty` buffer, and the scales in one of their own
    where they take 2 MiB or more (as they are otherwise): the GEMV's two streams then cross 512
    times fewer pages. On a 2-core KVM guest (guest THP "madvise", page walks through the host's
    tables too) a cold 4096 x 4096 M = 1 call took 0.77-0.80 ms on 4 KB pages and 0.60-0.61 ms on
    huge pages. Two buffers, not one: torch.save refuses one storage viewed as two dtypes."""
    n_pad, kh_pad = _panel_shape(*codes.shape)
    out = _panels(codes, huge_page_empty(n_pad * kh_pad).view(n_pad, kh_pad))
    if scales.numel() * 4 >= HUGE_PAGE:
        return out, huge_page_empty(scales.numel() * 4).view(torch.float32).view(scales.shape).copy_(scales)
    return out, scales


def quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (last dimension) float8_e4m3fn quantization: returns ``(x_fp8, scale)``, ``x_fp8``
    of ``x``'s shape, ``scale`` float32 of shape ``x.shape[:-1]`` = ``absmax / 448`` (1 for an
    all-zero or empty row; at least ``torch.finfo(torch.float32).tiny`` otherwise, where
    ``absmax / 448`` would be subnormal or underflow to 0); ``x_fp8 = (x.float() / scale)``
    rounded to nearest even, saturating at +-448,
    NaN staying NaN. ``x`` float32 / bfloat16 / float16, any strides. One fused kernel."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    return torch.ops.slab.quantize_fp8(x)


# ---- GEMM ----------------------------------------------------------------------------------------


def _arguments(fn: str, w, args, kwargs, extra: str, default):
    """(packed, scales, group_size, layout, extra) from either call form:
    ``(w: PackedW4, [extra])`` or ``(w_packed, w_scales, group_size, [extra])``, positional or by
    keyword; ``extra`` is ``out_dtype`` (w4a8_gemm) or ``bias`` (w4a8_linear)."""
    if isinstance(w, PackedW4) and not args and (not kwargs or (len(kwargs) == 1 and extra in kwargs)):
        # the decode call: no parsing (a GEMV reads its weights from DRAM in well under 1 ms, and
        # every Python step of the wrapper runs from a cache the weights have just swept)
        return w.packed, w.scales, w.group_size, w.layout, kwargs.get(extra, default)
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
        return w.packed, w.scales, w.group_size, w.layout, value
    if "w_scales" not in vals or "group_size" not in vals:
        raise TypeError(f"{fn}: with a uint8 w_packed tensor, w_scales and group_size are required")
    return w, vals["w_scales"], vals["group_size"], "rowmajor", value


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
    if (
        type(w) is PackedW4
        and not args
        and not kwargs
        and isinstance(x_fp8, Tensor)
        and x_fp8.dim() == 2
        and not torch.compiler.is_compiling()
        and _inference_mode()
    ):
        return _gemm(x_fp8, x_scale, w.packed, w.scales, w.group_size, w.layout, torch.bfloat16)
    packed, scales, group_size, layout, out_dtype = _arguments(
        "w4a8_gemm", w, args, kwargs, "out_dtype", torch.bfloat16
    )
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"w4a8_gemm: out_dtype must be a torch.dtype, got {type(out_dtype).__name__}")
    if not isinstance(x_fp8, Tensor) or x_fp8.dim() < 1:
        raise ValueError("x_fp8 must be a tensor of shape (..., K)")
    if x_fp8.dim() == 2 and isinstance(x_scale, Tensor) and x_scale.shape == x_fp8.shape[:1]:  # the op's shapes
        return _call(_gemm, (x_fp8, x_scale, scales), x_fp8, x_scale, packed, scales, group_size, layout, out_dtype)
    lead = x_fp8.shape[:-1]
    x2 = x_fp8.reshape(-1, x_fp8.shape[-1])
    xs = x_scale.reshape(-1) if isinstance(x_scale, Tensor) else x_scale
    if isinstance(xs, Tensor) and xs.numel() != x2.shape[0]:
        raise ValueError(
            f"x_scale must hold one scale per row of x_fp8 ({x2.shape[0]}), got shape {tuple(x_scale.shape)}"
        )
    y = _call(_gemm, (x2, xs, scales), x2, xs, packed, scales, group_size, layout, out_dtype)
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
    if (
        type(w) is PackedW4
        and not args
        and kwargs.keys() <= {"bias"}
        and isinstance(x, Tensor)
        and x.dim() == 2
        and not torch.compiler.is_compiling()
        and _inference_mode()
    ):
        bias = kwargs.get("bias")
        if bias is None or isinstance(bias, Tensor):
            return _linear(x, w.packed, w.scales, w.group_size, w.layout, bias)
    packed, scales, group_size, layout, bias = _arguments("w4a8_linear", w, args, kwargs, "bias", None)
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"w4a8_linear: bias must be a tensor or None, got {type(bias).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., K)")
    if x.dim() == 2:
        return _call(_linear, (x, scales, bias), x, packed, scales, group_size, layout, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _call(_linear, (x2, scales, bias), x2, packed, scales, group_size, layout, bias)
    return y.reshape(*lead, y.shape[-1])


# ---- fake tensors ------------------------------------------------------------------------------


def _fake_n(w_packed, w_scales, k, group_size, layout):
    torch._check(w_scales.dim() == 2, lambda: "w_scales must have shape (N, K / group_size)")
    torch._check(group_size in GROUP_SIZES, lambda: f"group_size must be one of {GROUP_SIZES}")
    n = w_scales.shape[0]
    g = k if group_size == -1 else group_size
    torch._check(k % g == 0 and k % 2 == 0, lambda: "group_size must divide K (even)")
    torch._check(w_scales.shape[1] == k // g, lambda: "w_scales must have shape (N, K / group_size)")
    torch._check(layout in LAYOUTS, lambda: f"layout must be one of {LAYOUTS}")
    if layout == "rowmajor":
        torch._check(
            w_packed.shape[0] == n and w_packed.shape[1] == k // 2, lambda: "w_packed must have shape (N, K / 2)"
        )
    elif layout == "panel":
        n_pad, kh_pad = _panel_shape(n, k // 2)
        torch._check(
            w_packed.shape[0] == n_pad and w_packed.shape[1] == kh_pad,
            lambda: "w_packed must have shape (N rounded up to 16, K rounded up to 8 / 2) for layout 'panel'",
        )
    return n


@register_fake("quantize_fp8")
def _(x):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1], dtype=torch.float32)


@register_fake("w4a8_tile_weights")
def _(packed, layout="tiled"):
    torch._check(packed.dim() == 2, lambda: "packed must have shape (N, K / 2)")
    torch._check(layout in ("tiled", "sm90"), lambda: "layout must be 'tiled' or 'sm90'")
    n, kh = packed.shape
    rows, cols = (16, 64) if layout == "tiled" else (128, 128)
    return packed.new_empty(((n + rows - 1) // rows * rows, (2 * kh + cols - 1) // cols * cols // 2))


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
