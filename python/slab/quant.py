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
  codes as they are, and their AVX-512 VNNI kernels fastest in 16-row panels (``"panel"``,
  :func:`cpu_layout` says which this CPU runs); the CUDA kernels read 16 x 64 tiles interleaved so
  that every lane of a warp issues one 16-byte load per tile and turns its nibbles into e4m3 mma
  fragments in registers.

Activations (per call):

* :func:`quantize_fp8` -- float8_e4m3fn codes with one float32 scale per row (last dimension),
  ``scale = absmax / 448`` (a zero or empty row gets scale 1; a nonzero scale is at least the
  smallest normal float32), codes ``(x.float() / scale)`` cast with round-to-nearest-even exactly
  like ``.to(torch.float8_e4m3fn)``. One fused kernel.

Models: :func:`convert` swaps ``nn.Linear`` layers for :class:`slab.nn.W4A8Linear`.

The quantizers live with the ops (:mod:`slab.ops.w4a8`) and are re-exported here, so the imports
run one way: ``slab.ops`` <- ``slab.nn`` <- ``slab.quant.convert``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Union

from torch import nn

from .nn._args import check_choice
from .nn.w4a8 import W4A8Linear
from .ops.w4a8 import (
    GROUP_SIZES,
    LAYOUTS,
    PackedW4,
    cpu_layout,
    dequantize_w4,
    prepack_w4,
    quantize_fp8,
    quantize_w4,
    unpack_int4,
)

__all__ = [
    "quantize_w4",
    "dequantize_w4",
    "unpack_int4",
    "prepack_w4",
    "cpu_layout",
    "quantize_fp8",
    "convert",
    "PackedW4",
    "GROUP_SIZES",
    "LAYOUTS",
]


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
