"""Fake (meta) kernels with the real op's device rule.

A call that mixes a ``meta`` tensor with CPU tensors dispatches to the fake kernel, which would
otherwise build its outputs on whichever device its first argument has (or, for an in-place op,
skip the update) without a word. :func:`register_fake` checks first, as every C++ kernel does,
that all tensor arguments (lists included) are on one device, and names the one that is not.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from .._loader import namespace_overloads

__all__ = ["register_fake", "check_one_device", "register_missing_tensor_errors"]


def _tensors(name: str, value):
    if isinstance(value, Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, t in enumerate(value):
            if isinstance(t, Tensor):
                yield f"{name}[{i}]", t


def check_one_device(op: str, arg_names: list[str], args: tuple, kwargs: dict) -> None:
    """RuntimeError unless every tensor among ``args``/``kwargs`` is on the first one's device."""
    named = list(zip(arg_names, args)) + list(kwargs.items())
    first = None
    for name, value in named:
        for label, t in _tensors(name, value):
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise RuntimeError(
                    f"slab::{op}: {label} is on {t.device} but {first[0]} is on {first[1]}; "
                    "all tensors must be on one device"
                )


def register_fake(op: str) -> Callable:
    """``torch.library.register_fake("slab::<op>")`` with the device check of the real op first."""

    def decorate(fn: Callable) -> Callable:
        arg_names = [a.name for a in getattr(torch.ops.slab, op).default._schema.arguments]

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            check_one_device(op, arg_names, args, kwargs)
            return fn(*args, **kwargs)

        torch.library.register_fake(f"slab::{op}")(checked)
        return fn

    return decorate


def _missing_tensor_kernel(op: str, schema):
    """The kernel of a call that reaches no backend: no tensor among the arguments (None for every
    required tensor, or empty tensor lists). Names the first missing argument instead of the
    dispatcher's "There were no tensor arguments to this function"."""

    def kernel(*args, **kwargs):
        values = dict(zip([a.name for a in schema.arguments], args), **kwargs)
        for a in schema.arguments:
            kind = str(a.type)
            value = values.get(a.name)
            if kind == "Tensor" and value is None:
                raise ValueError(f"slab::{op}: {a.name} must be a tensor, got None")
            if kind == "List[Tensor]" and not value:
                raise ValueError(f"slab::{op}: {a.name} must hold at least one tensor")
        raise ValueError(f"slab::{op}: got no tensor arguments")

    return kernel


def _sparse_tensor_kernel(op: str, schema):
    """The kernel of a call with a sparse tensor argument: slab's kernels take dense tensors."""

    def kernel(*args, **kwargs):
        values = dict(zip([a.name for a in schema.arguments], args), **kwargs)
        for a in schema.arguments:
            for label, t in _tensors(a.name, values.get(a.name)):
                if t.layout != torch.strided:
                    raise RuntimeError(f"slab::{op}: {label} must be a dense (strided) tensor, got layout {t.layout}")
        raise RuntimeError(f"slab::{op}: sparse tensors are not supported")

    return kernel


_fallbacks = torch.library.Library("slab", "IMPL")  # the registrations live as long as the module


def register_missing_tensor_errors() -> None:
    """Registers :func:`_missing_tensor_kernel` (and :func:`_sparse_tensor_kernel` for the sparse
    dispatch keys) for every slab op with backend kernels only. CompositeExplicitAutograd is reached
    only when no argument carries a dispatch key: CPU, CUDA and Meta kernels take precedence."""
    for qualified, overload in namespace_overloads("slab"):
        op, schema = qualified.split(".")[0], overload._schema
        if not any(str(a.type) in ("Tensor", "List[Tensor]") for a in schema.arguments):
            continue  # no tensor to miss
        if any(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"slab::{qualified}", key)
            for key in ("CompositeImplicitAutograd", "CompositeExplicitAutograd")
        ):
            continue  # a composite kernel (ops/prepbn.py) runs anyway and checks its arguments itself
        _fallbacks.impl(qualified, _missing_tensor_kernel(op, schema), "CompositeExplicitAutograd")
        for key in ("SparseCPU", "SparseCUDA"):
            _fallbacks.impl(qualified, _sparse_tensor_kernel(op, schema), key)
