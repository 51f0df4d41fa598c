"""W4A8Linear: an inference drop-in for ``nn.Linear`` with int4 weights and per-token fp8
activations (docs/w4a8.md)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.w4a8 import (
    GROUP_SIZES,
    PackedW4,
    cpu_layout,
    dequantize_w4,
    group_columns,
    prepack_w4,
    quantize_w4,
    w4a8_linear,
)
from ._args import check_choice, check_flag, check_size

__all__ = ["W4A8Linear"]


def _check_args(in_features, out_features, bias, group_size, dtype) -> int:
    """Validates the constructor arguments; returns the columns per scale."""
    if check_size("in_features", in_features) % 2:
        raise ValueError(f"in_features must be even (two int4 codes per byte), got {in_features}")
    check_size("out_features", out_features)
    check_flag("bias", bias)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    check_choice("group_size", group_size, GROUP_SIZES)
    return group_columns(group_size, in_features)  # names group_size unless it divides in_features


class W4A8Linear(nn.Module):
    """``y = w4a8_linear(x, W) + bias``: int4 weights (one float32 scale per row and group of
    ``group_size`` input features), activations quantized to float8_e4m3fn per token on the fly.

    Same attributes as ``nn.Linear`` (``in_features``, ``out_features``, ``bias``) and the same
    call: ``x`` (..., in_features) -> (..., out_features) in the dtype of ``x``. State: buffers
    ``packed`` (uint8, (out, in/2), the row-major ``quantize_w4`` codes), ``scales`` (float32) and
    ``bias`` (None when built without one); they save and load with ``state_dict``. The kernel
    layout for the buffers' device (:func:`slab.quant.prepack_w4`; on the CPU
    :func:`slab.quant.cpu_layout`'s) is built on first use and again after ``load_state_dict`` or a
    device move.
    Inference only: no gradients flow to the (integer) weights or through the op.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        device=None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        g = _check_args(in_features, out_features, bias, group_size, dtype)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, in_features // g, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None
        self._kernel_w: Optional[PackedW4] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "W4A8Linear":
        """Quantizes ``linear.weight`` with :func:`slab.quant.quantize_w4` (``linear`` is unchanged)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            device=w.device,
            dtype=linear.bias.dtype if linear.bias is not None else None,
        )
        packed, scales = quantize_w4(
            w if w.dtype in (torch.float32, torch.bfloat16, torch.float16) else w.float(), group_size
        )
        mod.packed.copy_(packed)
        mod.scales.copy_(scales)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @property
    def weight(self) -> Tensor:
        """The dequantized weights (float32, (out_features, in_features)), computed on every access:
        for inspection and for code that reads ``layer.weight`` (not a parameter, not trained, not
        in the state_dict)."""
        return dequantize_w4(self.packed, self.scales, self.group_size)

    def kernel_weights(self) -> PackedW4:
        """The prepacked weights for the buffers' device (built once, cached)."""
        kw = self._kernel_w
        if kw is None or kw.device != self.packed.device:
            device = self.packed.device
            layout = cpu_layout() if device.type == "cpu" else None
            kw = prepack_w4(self.packed, self.scales, self.group_size, device, layout)
            self._kernel_w = kw
        return kw

    def forward(self, x: Tensor) -> Tensor:
        return w4a8_linear(x, self.kernel_weights(), bias=self.bias)

    # The cached kernel layout is derived state: drop it whenever the buffers may change. A dtype
    # cast (model.half(), .to(torch.bfloat16)) converts the bias but keeps the scales float32 (the
    # kernels need them exact), so only their device follows.
    def _apply(self, fn, recurse=True):
        self._kernel_w = None
        scales = self.scales
        out = super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = scales.to(self.scales.device)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_w = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )
