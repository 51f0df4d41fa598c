"""Functional ops: thin wrappers over ``torch.ops.slab.*`` with fake tensors and autograd.

One module per kernel family (the same families as csrc/); importing it registers what
torch.compile (fake tensors) and autograd need for that family's ops.
"""

from .prepbn import prep_bn, rep_bn
from .cats import cats, cats_mlp, token_scatter, token_select
from .dwc import causal_dwc1d, causal_dwc1d_step, dwc2d
from .sla import sla, sla_step
from .w4a8 import PackedW4, w4a8_gemm, w4a8_linear
from .convbn import fold_conv_bn
from . import optim  # noqa: F401  (fused optimizer ops: wrappers + fakes; used by slab.optim)
from ._fake import register_missing_tensor_errors

register_missing_tensor_errors()

__all__ = [
    "rep_bn",
    "prep_bn",
    "cats",
    "cats_mlp",
    "token_select",
    "token_scatter",
    "dwc2d",
    "causal_dwc1d",
    "causal_dwc1d_step",
    "sla",
    "sla_step",
    "w4a8_gemm",
    "w4a8_linear",
    "PackedW4",
    "fold_conv_bn",
]
