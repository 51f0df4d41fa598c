"""Argument checks shared by the constructors and conversion helpers of ``slab.nn``, ``slab.quant``,
``slab.sparse`` and ``slab.deploy``.

Bad sizes and hyperparameters would otherwise reach torch (or a kernel, or a division) and fail
far from the call with a message that names nothing; these raise at once
``ValueError("<argument> must be ..., got <value>")``. Booleans are rejected where a number is
expected (``True`` is an ``int`` to Python, never a meaningful size).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

__all__ = ["check_size", "check_number", "check_choice", "check_flag"]


def _is_int(value: Any) -> bool:
    # torch.SymInt: a size read from a tensor while torch.compile traces
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_size(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """``value`` as an int, which must be >= ``minimum`` (default: a positive size) and at most
    ``maximum`` if one is given."""
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def _bounds(ge, gt, le, lt) -> str:
    parts = [f"{op} {v}" for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if v is not None]
    return " and ".join(parts)


def check_number(
    name: str,
    value: Any,
    *,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
) -> float:
    """``value`` as a float, which must be a finite real number within the given bounds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt)
    ok = ok and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        bounds = _bounds(ge, gt, le, lt)
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    return float(value)


def _same_kind(a: Any, b: Any) -> bool:
    return (_is_int(a) and _is_int(b)) or type(a) is type(b)


def check_choice(name: str, value: Any, options: Sequence[Any]) -> Any:
    """``value``, which must be one of ``options`` and of the same kind (``128.0`` or ``True`` is
    not the group size 128, ``1`` is not ``True``)."""
    if not any(_same_kind(value, o) and value == o for o in options):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value``, which must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
