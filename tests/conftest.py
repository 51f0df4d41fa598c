"""Shared test helpers: devices, seeds, float64 copies; tolerances and the verbose comparison come
from slab.reference.compare."""

from __future__ import annotations

import zlib

import pytest
import torch

import slab
from slab.reference import compare as _cmp


def _cuda_ok() -> bool:
    try:
        return bool(torch.cuda.is_available() and slab.cuda_available())
    except Exception:  # pragma: no cover - a broken CUDA setup counts as no CUDA
        return False


CUDA_OK = _cuda_ok()

# CPU always; CUDA only with a GPU and a CUDA build of slab. Both run the same test bodies.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and a CUDA build of slab"),
        ],
    ),
]

# dtype -> (rtol, atol) and the comparison: THE table and assert_close of slab.reference.compare
# (shared with slab-bench and bench/). |actual - expected| <= atol * scale + rtol * |expected|,
# scale = max |expected|; NaN/Inf must appear at the same places in both.
TOLERANCES = _cmp.TOLERANCES
tolerance = _cmp.tolerance
assert_close = _cmp.assert_close

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def param_id(v) -> str:
    """Readable pytest ids: dtypes without the ``torch.`` prefix, shapes as ``2x3x5``."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A fixed, different seed for every test (and every parametrization of it)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def ref_copy(t, requires_grad=None):
    """A float64 copy of ``t`` on the CPU (None stays None), optionally a fresh autograd leaf."""
    if t is None:
        return None
    c = t.detach().to("cpu", torch.float64).clone()
    if requires_grad is None:
        requires_grad = t.requires_grad
    return c.requires_grad_(requires_grad)
