"""Dtype rules shared by the op wrappers and the optimizers."""

from __future__ import annotations

import torch

__all__ = ["acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype slab accumulates, keeps statistics and optimizer states in for tensors of
    ``dtype``: float64 for float64 (the references' dtype), else float32 (float32, bfloat16,
    float16 inputs alike)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
