"""Plain-PyTorch references of every slab op (no slab ops), one module per family, and THE
tolerance table with the verbose comparison (:mod:`slab.reference.compare`).

Used by the tests, by the scripts under ``bench/`` and by ``slab-bench`` alike. Everything is a
composite of ordinary torch ops, so autograd differentiates it, and it computes in the dtype of
its inputs (the tests and checks run it in float64 on float64 copies of the rounded inputs).

=============  ==================================================================================
module         references
=============  ==================================================================================
``prepbn``     ``batch_stats``, ``update_running_stats``, ``rep_bn``, ``norm1``, ``prep_bn``; the
               eager SLAB modules ``SlabRepBN``, ``SlabLinearNorm`` (the benchmarks' baseline)
``sla``        ``sla``, ``sla_state``, ``sla_step``, ``dwc2d``, ``causal_dwc1d``, ``causal_dwc1d_step``
``cats``       ``cats``, ``cats_grad``, ``cats_mlp``, ``dense_mlp``, ``token_index``,
               ``token_select``, ``token_scatter``
``w4a8``       ``int4_of``, ``quantize_w4``, ``dequantize_w4``, ``quantize_fp8``, ``w4a8_gemm``,
               ``w4a8_linear``
``optim``      ``RefDoG`` (DoG/LDoG), ``RefLion``, ``RefLAMB``, ``RefLARS``, ``RefAdamP``,
               ``RefAverager``, ``rounding``
``convbn``     ``fold_conv_bn``
``compare``    ``TOLERANCES``, ``tolerance``, ``compare``, ``assert_close``, ``Comparison``
=============  ==================================================================================

The PRepBN names are re-exported here (``slab.reference.rep_bn``, as before the split).
"""

from __future__ import annotations

from . import cats, compare, convbn, optim, prepbn, sla, w4a8  # noqa: F401
from .prepbn import (
    SlabLinearNorm,
    SlabRepBN,
    batch_stats,
    norm1,
    prep_bn,
    rep_bn,
    update_running_stats,
)

__all__ = [
    "batch_stats",
    "update_running_stats",
    "rep_bn",
    "norm1",
    "prep_bn",
    "SlabRepBN",
    "SlabLinearNorm",
    "prepbn",
    "sla",
    "cats",
    "w4a8",
    "optim",
    "convbn",
    "compare",
]
