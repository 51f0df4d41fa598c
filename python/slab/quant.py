"""slab.quant: W4A8 quantization (docs/w4a8.md).

Weights (offline, once):

* :func:`quantize_w4` -- int4 values with one float32 scale per (output row, group of
  ``group_size`` input columns), ``scale = absmax / 7``, ``q = clamp(round(w / scale), -8, 7)``
  (round half to even, as ``torch.round``; computed in float32). An all-zero group gets scale 1
  (its codes are 0 either way), like :func:`quantize_fp8`'s zero rows; a nonzero scale below the
  smallest normal float32 (``torch.finfo(torch.float32).tiny``) is raised to it, so a group of
  tiny weights never divides by an underflowed 0. Packed two per byte:
  two's-complement nibbles, the LOW nibble holds the even column.
* :func:`dequantize_w4` -- the exact inverse map ``int4 * scale`` to float32.
* :func:`prepack_w4` -- the kernel layout for one device (:class:`PackedW4`). Done once, offline,
  e.g. when a model is converted or loaded: the CPU kernels read the row-major ``quantize_w4``
  codes as they are; the CUDA kernels read 16 x 64 tiles interleaved so that every lane of a warp
  issues one 16-byte load per tile and turns its nibbles into e4m3 mma fragments in registers.

Activations (per call):

* :func:`quantize_fp8` -- float8_e4m3fn codes with one float32 scale per row (last dimension),
  ``scale = absmax / 448`` (a zero or empty row gets scale 1; a nonzero scale is at least the
  smallest normal float32), codes ``(x.float() / scale)`` cast with round-to-nearest-even exactly
  like ``.to(torch.float8_e4m3fn)``. One fused kernel.

Models: :func:`convert` swaps ``nn.Linear`` layers for :class:`slab.nn.W4A8Linear`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .nn._args import check_choice
from .ops.w4a8 import GROUP_SIZES, PackedW4, group_columns

__all__ = [
    "quantize_w4",
    "dequantize_w4",
    "unpack_int4",
    "prepack_w4",
    "quantize_fp8",
    "convert",
    "PackedW4",
    "GROUP_SIZES",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _group_columns(group_size: int, k: int) -> int:
    # group_columns takes 128.0 for 128; a float group size would then fail in a reshape
    return group_columns(check_choice("group_size", group_size, GROUP_SIZES), k)


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
    g = _group_columns(group_size, k)
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
    g = _group_columns(group_size, k)
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

    ``layout`` defaults to the device's: ``"rowmajor"`` on the CPU (the ``quantize_w4`` codes as
    they are), ``"tiled"`` on CUDA (16 x 64 tiles, rows padded to 16 and columns to 64 with zero
    codes). Do this once (offline / at load time), not per call. ``layout="tiled"`` on the CPU
    only serves to inspect the CUDA layout (the CPU kernels need ``"rowmajor"``).
    """
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor (N, K/2), got {getattr(packed, 'dtype', type(packed))}")
    n, k = packed.shape[0], 2 * packed.shape[1]
    g = _group_columns(group_size, k)
    _check_scales(scales, n, k, g)
    device = torch.device(device) if device is not None else packed.device
    if layout is None:
        layout = "tiled" if device.type == "cuda" else "rowmajor"
    if layout not in ("rowmajor", "tiled"):
        raise ValueError(f"layout must be 'rowmajor' or 'tiled', got {layout!r}")
    codes = packed.contiguous()
    if layout == "tiled":
        codes = torch.ops.slab.w4a8_tile_weights(codes)  # on packed's device (CPU or CUDA)
    return PackedW4(codes.to(device), scales.to(device).contiguous(), int(group_size), n, k, device, layout)


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


SkipSpec = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _skip_fn(skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, mod: False
    if callable(skip):
        return skip
    names = list(skip) if isinstance(skip, Iterable) and not isinstance(skip, str) else [skip]
    if not all(isinstance(s, str) for s in names):
        raise ValueError(
            f"skip must be None, a module name, an iterable of names or a callable(name, module) -> bool, got {skip!r}"
        )
    return lambda name, mod: any(name == s or name.startswith(s + ".") for s in names)


def convert(model: nn.Module, skip: SkipSpec = None, group_size: int = 128) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (exactly that type: subclasses, e.g. the output
    projection that ``nn.MultiheadAttention`` reads directly, are left alone) by
    :class:`slab.nn.W4A8Linear` quantized with ``group_size``, in place; returns ``model`` (or the
    new module when ``model`` itself is an ``nn.Linear``).

    ``skip``: layers to keep in float -- a qualified module name as in ``model.named_modules()``
    (``"head"``, ``"blocks.0.fc1"``; a name also skips everything under it), a list of such names,
    or a predicate ``skip(name, module) -> bool`` called for every Linear. A Linear whose
    ``in_features`` the group size does not divide raises a ValueError naming it (skip it).
    """
    from .nn.w4a8 import W4A8Linear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice("group_size", group_size, GROUP_SIZES)  # also when no layer reaches the quantizer
    should_skip = _skip_fn(skip)
    if type(model) is nn.Linear:
        return model if should_skip("", model) else W4A8Linear.from_linear(model, group_size)
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear and name]
    for name, mod in targets:
        if should_skip(name, mod):
            continue
        try:
            new = W4A8Linear.from_linear(mod, group_size)
        except ValueError as e:
            raise ValueError(f"convert: layer {name!r}: {e}") from e
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model
