"""slab: hand-written C++/CUDA kernels for efficient transformers.

Importing slab loads the op library, which registers ``torch.ops.slab.*``; the Python API is
``slab.ops`` (functional ops with autograd), ``slab.nn`` (modules), ``slab.optim`` (fused
optimizers), ``slab.sparse`` (activation-sparsity calibration) and ``slab.deploy``.
"""

__version__ = "0.1.0"

import os as _os

import torch as _torch


def _load_library() -> None:
    # The op library is a plain shared library (no Python bindings): loading it runs the static
    # TORCH_LIBRARY registrations. $SLAB_LIBRARY points at a development build instead.
    path = _os.environ.get("SLAB_LIBRARY") or _os.path.join(_os.path.dirname(__file__), "libslab_ops.so")
    if not _os.path.exists(path):
        raise ImportError(
            f"slab: op library not found at {path}; install slab with pip (which builds it), "
            "or set SLAB_LIBRARY to a built libslab_ops.so"
        )
    _torch.ops.load_library(path)


_load_library()


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled into this build and a CUDA device is present."""
    return bool(_torch.ops.slab._compiled_with_cuda()) and _torch.cuda.is_available()


from . import ops  # noqa: E402  (registers fake tensors and autograd for the ops)
from . import nn  # noqa: E402
from . import optim  # noqa: E402
from . import sparse  # noqa: E402
from . import quant  # noqa: E402
from .deploy import deploy  # noqa: E402

__all__ = ["__version__", "cuda_available", "ops", "nn", "optim", "sparse", "quant", "deploy"]
