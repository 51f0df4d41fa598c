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

__all__ = ["register_fake", "check_one_device"]


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
                raise RuntimeError(f"slab::{op}: {label} is on {t.device} but {first[0]} is on {first[1]}; "
                                   "all tensors must be on one device")


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
