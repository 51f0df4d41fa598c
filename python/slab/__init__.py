"""slab: hand-written C++/CUDA kernels for efficient transformers.

Importing slab loads the op library, which registers ``torch.ops.slab.*``; the Python API is
``slab.ops`` (functional ops with autograd), ``slab.nn`` (modules), ``slab.optim`` (fused
optimizers), ``slab.sparse`` (activation-sparsity calibration), ``slab.deploy`` (fold norms away for
inference) and ``slab.tune`` / ``slab.untune`` (Tune mode: Conv + frozen BN as one convolution). ``slab info``
(also ``python -m slab info``) prints the build and runtime facts a bug report needs.
"""

__version__ = "0.1.0"

import torch as _torch

from . import _loader

# torch >= 2.11 (else a one-line ImportError), then libslab_ops.so (every schema and the CPU
# kernels; $SLAB_LIBRARY overrides its path), then libslab_cuda.so when torch is a CUDA build
# ($SLAB_CUDA_LIBRARY overrides it). Without the CUDA kernels, a CUDA tensor gets a clear
# RuntimeError saying why. `slab info` prints what happened (slab._loader.STATE).
_loader.load(__version__)


def cuda_available() -> bool:
    """True when slab's CUDA kernels are loaded and torch sees a CUDA device."""
    return _loader.STATE.cuda_loaded and _torch.cuda.is_available()


from . import ops  # noqa: E402  (registers fake tensors and autograd for the ops)
from . import nn  # noqa: E402
from . import optim  # noqa: E402
from . import sparse  # noqa: E402
from . import quant  # noqa: E402
from .deploy import deploy, register_bn_act, register_conv_bn_block, register_input_linear  # noqa: E402
from .tune import tune, tuned, untune  # noqa: E402

__all__ = [
    "__version__",
    "cuda_available",
    "ops",
    "nn",
    "optim",
    "sparse",
    "quant",
    "deploy",
    "tune",
    "untune",
    "tuned",
    "register_conv_bn_block",
    "register_input_linear",
    "register_bn_act",
]
