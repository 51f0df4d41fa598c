"""Shared test helpers: devices, per-dtype tolerances, a verbose float64-reference comparison."""

from __future__ import annotations

import zlib

import pytest
import torch

import slab


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

# dtype -> (rtol, atol). The comparison passes where
#     |actual - expected| <= atol * scale + rtol * |expected|,   scale = max |expected|,
# i.e. atol is relative to the magnitude of the whole reference tensor, so the same numbers serve
# tensors of size 1e-3 and 1e4. Expected values come from a float64 reference on the same inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (4e-3, 2e-3),
}

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def param_id(v) -> str:
    """Readable pytest ids: dtypes without the ``torch.`` prefix, shapes as ``2x3x5``."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A fixed, different seed for every test (and every parametrization of it)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def _fmt_index(flat_index: int, shape) -> tuple:
    idx = []
    for s in reversed(tuple(shape)):
        idx.append(flat_index % s if s else 0)
        flat_index = flat_index // s if s else 0
    return tuple(reversed(idx))


def assert_close(actual, expected, dtype=None, *, rtol=None, atol=None, name="tensor", scale=None):
    """Compares ``actual`` with a (float64) reference ``expected``.

    * shapes must match;
    * NaN / +Inf / -Inf must appear at exactly the same places in both;
    * finite values: ``|a - e| <= atol * scale + rtol * |e|`` with ``scale = max|e|`` (1 for an
      all-zero reference) unless ``scale`` is given; (rtol, atol) default to ``TOLERANCES[dtype]``,
      dtype defaulting to ``actual.dtype``.
    On failure the message gives the number of mismatches, the max abs and relative (to scale)
    error, and the worst index with both values.
    """
    if not isinstance(actual, torch.Tensor):
        actual = torch.as_tensor(actual)
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected)
    dtype = actual.dtype if dtype is None else dtype
    d_rtol, d_atol = TOLERANCES[dtype]
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol

    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    shape = tuple(expected.shape)

    # Non-finite values must match exactly (position and kind).
    finite = torch.isfinite(e)
    all_finite = bool(finite.all()) and bool(torch.isfinite(a).all())
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & (a != e) & ~(torch.isnan(a) | torch.isnan(e))
    bad_nonfinite = nan_mismatch | inf_mismatch
    if not all_finite and bool(bad_nonfinite.any()):
        where = bad_nonfinite.nonzero().reshape(-1)[:5].tolist()
        details = ", ".join(
            f"{_fmt_index(i, shape)}: got {a[i].item()!r}, expected {e[i].item()!r}" for i in where
        )
        raise AssertionError(
            f"{name} ({dtype}): {int(bad_nonfinite.sum())} NaN/Inf mismatch(es) of {a.numel()}; first: {details}"
        )

    if all_finite:
        af, ef = a, e
    else:
        if not bool(finite.any()):
            return
        af, ef = a[finite], e[finite]
    if scale is None:
        scale = float(ef.abs().max()) if ef.numel() else 0.0
        if scale == 0.0:
            scale = 1.0
    err = (af - ef).abs()
    bound = atol * scale + rtol * ef.abs()
    bad = err > bound
    if bool(bad.any()):
        finite_pos = finite.nonzero().reshape(-1)
        worst = int(torch.argmax(err - bound))
        wi = int(finite_pos[worst])
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {ef.numel()} elements out of tolerance "
            f"(rtol={rtol:g}, atol={atol:g} x scale {scale:.4g}); max abs err {float(err.max()):.4g}, "
            f"max err/scale {float(err.max()) / scale:.4g}; worst at {_fmt_index(wi, shape)}: "
            f"got {a[wi].item()!r}, expected {e[wi].item()!r}"
        )


def ref_copy(t, requires_grad=None):
    """A float64 copy of ``t`` on the CPU (None stays None), optionally a fresh autograd leaf."""
    if t is None:
        return None
    c = t.detach().to("cpu", torch.float64).clone()
    if requires_grad is None:
        requires_grad = t.requires_grad
    return c.requires_grad_(requires_grad)
