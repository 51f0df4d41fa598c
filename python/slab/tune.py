"""Tune mode (Efficient ConvBN): train Conv -> eval-mode BatchNorm pairs as one convolution.

In transfer learning the BatchNorms usually run in eval mode (frozen statistics) while the
convolution weights and the BN affine parameters train. :func:`tune` computes every such pair as
one convolution whose weights are folded on the fly by the fused op
:func:`slab.ops.fold_conv_bn`,

    W' = W * gamma / sqrt(var + eps),    b' = beta + (b - mean) * gamma / sqrt(var + eps),

with gradients flowing to W, b, gamma and beta through the fold: the outputs and gradients of eval
mode, without keeping the convolution's output for BatchNorm's backward (less memory and time).

The pairs are the ones :func:`slab.deploy` would fold (registered Conv-BN blocks, the graph of
the model or of its traceable submodules, nn.Sequential adjacency; see
:func:`slab.deploy.conv_bn_pairs`), restricted to plain ``nn.Conv1d/2d/3d`` layers. Tuning is in
place and keeps parameters, buffers, ``state_dict`` keys and optimizer references unchanged: the
conv and the BN switch to Tune-mode subclasses of their own classes (the BN passes its input
through, or applies its registered activation tail, and the conv folds the BN's parameters).
Both look at the BN's mode on every call, so a BN put back into training mode computes batch
statistics as usual. :func:`untune` restores the original classes. (A tuned model deep-copies,
but pickling the whole module needs :func:`untune` first; ``state_dict`` is unaffected.)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Union

from torch import Tensor, nn

from .deploy import DeployReport, Folded, Left, _bn_tail, _conv_type, conv_bn_pairs
from .nn._args import check_flag
from .ops import fold_conv_bn

__all__ = ["tune", "untune", "tuned"]


class _TunedConv:
    """Mixin ahead of an nn.ConvNd: while the paired BN is in eval mode, one convolution with the
    BN folded into the weights (gradients reach both through fold_conv_bn)."""

    def forward(self, x: Tensor) -> Tensor:
        bn = self._slab_tune_bn
        if bn.training:
            return self._slab_tune_base.forward(self, x)
        weight, bias = fold_conv_bn(self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        return self._conv_forward(x, weight, bias)


class _TunedBN:
    """Mixin ahead of a BatchNorm: in eval mode its normalisation happened in the conv before it;
    only its activation tail (registered BN-with-activation classes) remains."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self._slab_tune_base.forward(self, x)
        tail = self._slab_tune_tail
        return x if tail is None else tail(x)


_CLASSES: dict[tuple[type, type], type] = {}


def _tuned_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Tuned{base.__name__}", (mixin, base), {"__module__": __name__})
    return _CLASSES[key]


def _switch(m: nn.Module, mixin: type, **attrs) -> None:
    base = type(m)
    # Plain attributes (object.__setattr__), not submodules: state_dict and parameters stay as they were.
    for name, value in {"_slab_tune_base": base, **attrs}.items():
        object.__setattr__(m, name, value)
    m.__class__ = _tuned_class(mixin, base)


def _restore(m: nn.Module) -> None:
    m.__class__ = m._slab_tune_base
    for name in [k for k in vars(m) if k.startswith("_slab_tune_")]:
        object.__delattr__(m, name)


def _is_tuned(m: nn.Module) -> bool:
    return isinstance(m, (_TunedConv, _TunedBN))


def tune(model: nn.Module, return_report: bool = False) -> Union[nn.Module, tuple[nn.Module, DeployReport]]:
    """Switches every Conv -> eval-mode BatchNorm pair of ``model`` into Tune mode, in place.

    Returns ``model`` (and, with ``return_report=True``, a :class:`slab.deploy.DeployReport` whose
    ``folded`` lists the tuned ``(bn, conv)`` pairs and ``left`` the BatchNorms not tuned, with
    why). Pairs already tuned are kept; BNs in training mode are left (call ``.eval()`` on the BNs
    to freeze their statistics first). See :func:`untune` and the context manager :func:`tuned`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"slab.tune: expected an nn.Module, got {type(model).__name__}")
    check_flag("return_report", return_report)
    report = DeployReport()
    pairs, left = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if _is_tuned(conv) or _is_tuned(bn):
            continue
        if _conv_type(conv) is None:
            left.append(Left(bn_name, f"it follows {conv_name} ({type(conv).__name__}); Tune mode is for convolutions"))
            continue
        _switch(bn, _TunedBN, _slab_tune_tail=_bn_tail(bn))
        _switch(conv, _TunedConv, _slab_tune_bn=bn)
        report.folded.append(Folded(bn_name, conv_name))
    report.left.extend(k for k in left if not _is_tuned(model.get_submodule(k.norm)))
    return (model, report) if return_report else model


def untune(model: nn.Module) -> nn.Module:
    """Undoes :func:`tune` on every module of ``model`` (in place); returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"slab.untune: expected an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if _is_tuned(m):
            _restore(m)
    return model


@contextlib.contextmanager
def tuned(model: nn.Module) -> Iterator[nn.Module]:
    """``with slab.tuned(model): ...`` runs the block in Tune mode and restores the model after
    (only the pairs this call tuned)."""
    _, report = tune(model, return_report=True)
    try:
        yield model
    finally:
        for bn_name, conv_name in report.folded:
            for name in (conv_name, bn_name):
                m = model.get_submodule(name)
                if _is_tuned(m):
                    _restore(m)
