"""INT4 x FP8 references (SPEC section 4), bit by bit and in float64, independent of slab's codecs."""

from __future__ import annotations

import torch

__all__ = ["int4_of", "quantize_w4", "dequantize_w4", "quantize_fp8", "w4a8_gemm", "w4a8_linear", "FLT_MIN"]

FLT_MIN = torch.finfo(torch.float32).tiny


def int4_of(packed: torch.Tensor) -> torch.Tensor:
    """int4 values (int64, (N, K)) of row-major packed codes (two's complement nibbles, low nibble =
    even column), decoded bit by bit."""
    p = packed.cpu().to(torch.int64)
    lo, hi = p % 16, p // 16
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], -1).reshape(p.shape[0], -1)


def quantize_w4(w: torch.Tensor, group_size: int = 128):
    """SPEC weights: ``(codes int64 (N, K) in [-8, 7], scales float32 (N, K / g))``,
    ``scale = absmax / 7`` per row and group, round half to even."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    wg = w.double().reshape(n, k // g, g)
    scale = (wg.abs().amax(-1) / 7).float()
    s = scale.double().clamp(min=FLT_MIN).unsqueeze(-1)
    codes = torch.where(scale.unsqueeze(-1) == 0, torch.zeros_like(wg), torch.round(wg / s)).clamp(-8, 7)
    return codes.reshape(n, k).to(torch.int64), scale


def dequantize_w4(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float64 (N, K) weights ``codes * scale`` of int4 values (or packed uint8 codes)."""
    if codes.dtype == torch.uint8:
        codes = int4_of(codes)
    n, k = codes.shape
    g = k if group_size == -1 else group_size
    return (codes.double().reshape(n, k // g, g) * scales.cpu().double().unsqueeze(-1)).reshape(n, k)


def quantize_fp8(x):
    """The SPEC activation quantization with torch's own float8 cast; a nonzero scale below the
    smallest normal float is raised to it (absmax / 448 would underflow to 0 below ~6e-43)."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = torch.where(amax == 0, torch.ones_like(amax), (amax / 448).clamp(min=FLT_MIN))
    return (xf / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def w4a8_gemm(x_fp8, x_scale, packed, scales, group_size, bias=None):
    """``y = x_scale[m] * sum_g w_scale[n, g] * sum_{k in g} fp8(x)[m, k] * int4(w)[n, k]`` (+ bias), float64."""
    x = x_fp8.cpu().double()
    m, k = x.shape
    g = k if group_size == -1 else group_size
    w = int4_of(packed).double() if packed.dtype == torch.uint8 else packed.cpu().double()
    n = w.shape[0]
    inner = torch.einsum("mgk,ngk->mng", x.reshape(m, k // g, g), w.reshape(n, k // g, g))  # exact sums
    y = (inner * scales.cpu().double().unsqueeze(0)).sum(-1) * x_scale.cpu().double().reshape(m, 1)
    if bias is not None:
        y = y + bias.cpu().double()
    return y


def w4a8_linear(x, packed, scales, group_size, bias=None):
    """:func:`quantize_fp8` of x (rows), then :func:`w4a8_gemm`; float64 (M, N)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_fp8(x2)
    return w4a8_gemm(xq, xs, packed, scales, group_size, bias).reshape(*x.shape[:-1], -1)
