"""Contextual activation sparsity (CATS): threshold calibration and model conversion.

* :class:`StreamingHistogram` -- a fixed-size histogram of non-negative values whose range grows
  by doubling (merging bin pairs), so any stream fits in O(bins) memory.
* :class:`ThresholdCalibrator` / :func:`calibrate` -- forward hooks on the MLPs of a model collect
  the histogram of ``|silu(gate(x))|`` per layer; the threshold of a layer is its
  ``sparsity``-quantile (a fraction ``sparsity`` of the calibration activations fall at or below
  it and would be dropped). No activations are kept.
* :func:`convert` -- swaps those MLPs for :class:`slab.nn.CATSMLP` with the thresholds.

Supported MLPs: Hugging Face Llama/Mistral naming (``gate_proj``, ``up_proj``, ``down_proj``,
``act_fn``) and plain ``fc1``/``fc2`` MLPs with a SiLU activation (``act``/``act_fn``/``activation``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .nn._args import check_number, check_size
from .nn.cats import CATSMLP, mlp_parts
from .ops.cats import MAX_DECODE_TOKENS

__all__ = ["StreamingHistogram", "ThresholdCalibrator", "calibrate", "convert", "find_mlps"]


def _check_bins(bins) -> int:
    bins = check_size("bins", bins, minimum=2)
    if bins % 2:  # growing the range merges adjacent pairs of bins
        raise ValueError(f"bins must be even, got {bins}")
    return bins


def _check_sparsity(sparsity) -> float:
    return check_number("sparsity", sparsity, ge=0, lt=1)


class StreamingHistogram:
    """Histogram of non-negative values over ``[0, hi)`` with ``bins`` equal bins.

    ``hi`` starts just above the first maximum seen and doubles (adjacent bin pairs merged, which
    is exact) whenever a larger value arrives, so it stays below twice the largest value: a bin
    is at most ``2 * max / bins`` wide. :meth:`quantile` interpolates linearly inside the bin
    holding the requested rank, so it is within one bin width of the exact sample quantile.
    Non-finite values are counted in ``nonfinite`` and otherwise ignored.
    """

    def __init__(self, bins: int = 4096, device: Union[str, torch.device, None] = None):
        self.bins = _check_bins(bins)
        self.hi = 0.0
        self.counts: Optional[Tensor] = None  # float64, on the device of the data
        self.nonfinite = 0
        self._device = device

    @property
    def total(self) -> float:
        return 0.0 if self.counts is None else float(self.counts.sum())

    @property
    def bin_width(self) -> float:
        return self.hi / self.bins

    def _grow(self, vmax: float) -> None:
        if self.hi == 0.0:
            self.hi = vmax * (1 + 2**-10) if vmax > 0 else 1.0
            return
        while vmax >= self.hi:
            c = self.counts
            merged = c.view(-1, 2).sum(1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.hi *= 2

    def update(self, values: Tensor) -> None:
        v = values.detach().reshape(-1).float()
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            v = v[finite]
        if v.numel() == 0:
            return
        v = v.abs()
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=v.device)
        self._grow(float(v.max()))
        self.counts += torch.histc(v, bins=self.bins, min=0.0, max=self.hi).to(self.counts)

    def quantile(self, q: float) -> float:
        q = check_number("q", q, ge=0, le=1)
        if self.counts is None or self.total == 0:
            raise ValueError("the histogram is empty: no calibration data reached it")
        cum = torch.cumsum(self.counts.cpu(), 0)
        rank = q * float(cum[-1])
        b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype)).clamp(max=self.bins - 1))
        below = float(cum[b - 1]) if b > 0 else 0.0
        inside = float(self.counts[b])
        frac = 0.0 if inside == 0 else (rank - below) / inside
        return (b + min(max(frac, 0.0), 1.0)) * self.bin_width


def find_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """Every supported MLP of ``model`` by qualified name (the outermost match; CATSMLPs skipped)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, CATSMLP) or any(name.startswith(p + ".") for p in found):
            continue
        if all(hasattr(mod, n) for n in ("gate_proj", "up_proj", "down_proj")) or (
            hasattr(mod, "fc1") and hasattr(mod, "fc2")
        ):
            found[name] = mod
    return found


class ThresholdCalibrator:
    """Collects ``|silu(gate(x))|`` histograms of every supported MLP of ``model``.

    Use as a context manager (hooks are removed on exit)::

        with ThresholdCalibrator(model, sparsity=0.5) as cal:
            for batch in batches:
                model(batch)
        thresholds = cal.thresholds()   # {mlp name: threshold}
    """

    def __init__(self, model: nn.Module, sparsity: float = 0.5, bins: int = 4096):
        self.sparsity = _check_sparsity(sparsity)
        _check_bins(bins)
        self.mlps = find_mlps(model)
        if not self.mlps:
            raise ValueError("model has no supported MLP (gate_proj/up_proj/down_proj or fc1/fc2)")
        self.histograms = {name: StreamingHistogram(bins) for name in self.mlps}
        self._handles: list = []
        for name, mlp in self.mlps.items():
            gate, _, _ = mlp_parts(mlp)  # also checks the activation is SiLU
            self._handles.append(gate.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        hist = self.histograms[name]

        def hook(_module, _inputs, output):
            with torch.no_grad():
                hist.update(torch.nn.functional.silu(output.float()))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ThresholdCalibrator":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def thresholds(self, sparsity: Optional[float] = None) -> dict[str, float]:
        q = self.sparsity if sparsity is None else _check_sparsity(sparsity)
        return {name: h.quantile(q) for name, h in self.histograms.items()}


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, batches: Iterable[Any], sparsity: float = 0.5, bins: int = 4096) -> dict[str, float]:
    """Per-MLP CATS thresholds: the ``sparsity``-quantile of ``|silu(gate(x))|`` over the batches.

    Each batch is passed as ``model(batch)``, ``model(*batch)`` for a tuple/list, or
    ``model(**batch)`` for a mapping, under ``torch.no_grad()``.
    """
    with ThresholdCalibrator(model, sparsity, bins) as cal, torch.no_grad():
        for batch in batches:
            _run(model, batch)
    return cal.thresholds()


def convert(model: nn.Module, thresholds: Union[Mapping[str, float], float], decode_tokens: int = 16) -> nn.Module:
    """Replaces every supported MLP of ``model`` by a :class:`slab.nn.CATSMLP` (in place; returns
    ``model``). ``thresholds`` maps MLP names (as :func:`calibrate` returns them) to thresholds,
    or is one float for all. The replaced MLP's down projection weight is transposed into the new
    module and the old module dropped, so the model holds one copy of ``W_down``."""
    check_size("decode_tokens", decode_tokens, minimum=0, maximum=MAX_DECODE_TOKENS)
    if not isinstance(thresholds, Mapping):
        thresholds = check_number("thresholds", thresholds)
    mlps = find_mlps(model)
    if isinstance(thresholds, Mapping):
        missing = sorted(set(mlps) - set(thresholds))
        unknown = sorted(set(thresholds) - set(mlps))
        if missing or unknown:
            raise ValueError(f"thresholds must name exactly the model's MLPs; missing {missing}, unknown {unknown}")
        per = dict(thresholds)
    else:
        per = {name: thresholds for name in mlps}
    for name, mlp in mlps.items():
        new = CATSMLP.from_mlp(mlp, per[name], decode_tokens)
        if name == "":
            raise ValueError("model itself is an MLP: use slab.nn.CATSMLP.from_mlp(model, threshold)")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
