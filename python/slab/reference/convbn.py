"""Conv-BN fold reference (SPEC section 1, Efficient ConvBN), float64-capable and differentiable."""

from __future__ import annotations

import torch

__all__ = ["fold_conv_bn"]


def fold_conv_bn(weight, bias, bn_weight, bn_bias, mean, var, eps: float = 1e-5):
    """``(w', b')``: ``g = bn_weight / sqrt(var + eps)``, ``w' = weight * g`` per output channel (dim 0),
    ``b' = bn_bias + (bias - mean) * g``; None ``bias``/``bn_bias`` count as 0, None ``bn_weight`` as 1."""
    o = weight.shape[0]
    kw = dict(dtype=mean.dtype, device=mean.device)
    g = (bn_weight if bn_weight is not None else torch.ones(o, **kw)) / torch.sqrt(var + eps)
    b = bias if bias is not None else torch.zeros(o, **kw)
    beta = bn_bias if bn_bias is not None else torch.zeros(o, **kw)
    return weight * g.view(-1, *([1] * (weight.dim() - 1))), beta + (b - mean) * g
