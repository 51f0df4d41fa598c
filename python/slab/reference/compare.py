"""THE tolerance table and the verbose comparison against a float64 reference.

Used by the tests (``tests/conftest.py`` re-exports :func:`assert_close`), by ``slab-bench``'s
checks and by the scripts under ``bench/``, so a result is judged the same way everywhere.

A result ``actual`` computed in ``dtype`` is compared with ``expected`` (a float64 reference on the
same, already rounded, inputs) element by element::

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max |expected|

(1 for an all-zero reference, unless the caller passes ``scale``): ``atol`` is relative to the
magnitude of the whole reference tensor, so the same numbers judge tensors of size 1e-3 and 1e4.

Non-finite values: a NaN or an infinity in ``actual`` passes only where ``expected`` has the same
value at the same place (``equal_nan=True``, for references that propagate NaN inputs); with
``equal_nan=False`` any NaN fails. A NaN never passes the finite comparison (the test is written
as ``not err <= bound``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["TOLERANCES", "tolerance", "Comparison", "compare", "assert_close"]

# dtype -> (rtol, atol), as explained above. float32: a few ulp of accumulated rounding.
# bfloat16 (8 significant bits, ulp 2^-7 relative) and float16 (11 bits, ulp 2^-10): about 2 ulp of
# each value (rtol) plus half an ulp of the tensor's largest value (atol), enough for an output
# rounded once from a float32 accumulation of rounded inputs. These are the tighter entries of the
# two tables this one replaces (tests/conftest.py: bf16 (1.6e-2, 1e-2), fp16 (4e-3, 2e-3);
# slab/bench.py: bf16 (1.6e-2, 4e-3), fp16 (2e-3, 5e-4), fp64 1e-9); every test passes with them.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 4e-3),
    torch.float16: (2e-3, 5e-4),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of :data:`TOLERANCES` for results in ``dtype``."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def _index(flat: int, shape) -> tuple:
    idx = []
    for s in reversed(tuple(shape)):
        idx.append(flat % s if s else 0)
        flat = flat // s if s else 0
    return tuple(reversed(idx))


@dataclasses.dataclass
class Comparison:
    """Outcome of :func:`compare`. ``bool(c)`` is ``c.ok``; ``str(c)`` is the one-line detail."""

    ok: bool
    name: str
    dtype: Optional[torch.dtype]
    numel: int = 0
    bad: int = 0  # elements out of tolerance (finite part)
    nonfinite_bad: int = 0  # NaN/Inf mismatches
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max error / scale
    used: float = 0.0  # max of err / bound: share of the tolerance used (<= 1 passes)
    worst: tuple = ()
    got: Optional[float] = None
    expected: Optional[float] = None
    message: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.message


def compare(
    actual,
    expected,
    dtype: Optional[torch.dtype] = None,
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    name: str = "tensor",
    scale: Optional[float] = None,
    equal_nan: bool = True,
) -> Comparison:
    """Compares ``actual`` (any dtype/device) with the reference ``expected``; see the module text.

    ``(rtol, atol)`` default to ``tolerance(dtype)``, ``dtype`` to ``actual.dtype``. Returns a
    :class:`Comparison` whose message names the count of mismatches, the max absolute and relative
    error, the worst index with both values, and NaN/Inf mismatches.
    """
    if not isinstance(actual, torch.Tensor):
        actual = torch.as_tensor(actual)
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected)
    dtype = actual.dtype if dtype is None else dtype
    d_rtol, d_atol = tolerance(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    label = f"{name} ({str(dtype).removeprefix('torch.')})"
    if tuple(actual.shape) != tuple(expected.shape):
        return Comparison(
            False, name, dtype, message=f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    shape = tuple(expected.shape)
    n = a.numel()

    finite_e = torch.isfinite(e)
    finite_a = torch.isfinite(a)
    if equal_nan:
        both_nan = torch.isnan(a) & torch.isnan(e)
        same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
        bad_nf = (~finite_a | ~finite_e) & ~(both_nan | same_inf)
    else:
        bad_nf = ~finite_a | (~finite_e & ~(torch.isinf(a) & (a == e)))
    if bool(bad_nf.any()):
        where = bad_nf.nonzero().reshape(-1)[:5].tolist()
        first = ", ".join(f"{_index(i, shape)}: got {a[i].item()!r}, expected {e[i].item()!r}" for i in where)
        i0 = where[0]
        return Comparison(
            False,
            name,
            dtype,
            n,
            0,
            int(bad_nf.sum()),
            worst=_index(i0, shape),
            got=a[i0].item(),
            expected=e[i0].item(),
            message=f"{label}: {int(bad_nf.sum())} NaN/Inf mismatch(es) of {n} "
            f"({int(torch.isnan(a).sum())} NaN, {int(torch.isinf(a).sum())} Inf in the "
            f"result); first: {first}",
        )
    sel = finite_e & finite_a
    pos = sel.nonzero().reshape(-1)
    af, ef = a[sel], e[sel]
    if af.numel() == 0:
        return Comparison(True, name, dtype, n, message=f"{label}: ok (no finite values to compare)")
    if scale is None:
        scale = float(ef.abs().max())
        if scale == 0.0:
            scale = 1.0
    err = (af - ef).abs()
    bound = atol * scale + rtol * ef.abs()
    bad = ~(err <= bound)
    nbad = int(bad.sum())
    ratio = err / bound.clamp(min=torch.finfo(torch.float64).tiny)
    wk = int(torch.argmax(err - bound)) if nbad else int(torch.argmax(ratio))
    wi = int(pos[wk])
    max_abs = float(err.max())
    used = float(ratio.max())
    c = Comparison(
        nbad == 0,
        name,
        dtype,
        n,
        nbad,
        0,
        max_abs,
        max_abs / scale,
        used,
        _index(wi, shape),
        a[wi].item(),
        e[wi].item(),
    )
    if nbad:
        c.message = (
            f"{label}: {nbad} of {af.numel()} elements out of tolerance "
            f"(rtol={rtol:g}, atol={atol:g} x scale {scale:.4g}); max abs err {max_abs:.4g}, "
            f"max err/scale {max_abs / scale:.4g}; worst at {c.worst}: "
            f"got {c.got!r}, expected {c.expected!r}"
        )
    else:
        c.message = f"max err {max_abs:.2e} ({100 * used:.0f}% of tol)"
    return c


def assert_close(
    actual,
    expected,
    dtype: Optional[torch.dtype] = None,
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    name: str = "tensor",
    scale: Optional[float] = None,
    equal_nan: bool = True,
) -> None:
    """:func:`compare`, raising ``AssertionError`` with its message on a mismatch."""
    c = compare(actual, expected, dtype, rtol=rtol, atol=atol, name=name, scale=scale, equal_nan=equal_nan)
    if not c.ok:
        raise AssertionError(c.message)
