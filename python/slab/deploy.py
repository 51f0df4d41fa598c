"""Deploy-time re-parameterization: fold eval-mode norms into the neighbouring layers.

``deploy(model)`` rewrites an eval-mode model so that its normalisations cost nothing at inference:

* every eval-mode :class:`slab.nn.RepBN` / :class:`slab.nn.PRepBN` whose output feeds only a
  ``nn.Linear`` is folded into that Linear (the eval norm is the per-channel affine
  ``y = x * s + t``; the Linear becomes ``W' = W * s`` (per input column), ``b' = b + W @ t``);
* every ``Conv{1,2,3}d -> BatchNorm{1,2,3}d`` and ``Linear -> BatchNorm1d`` pair (eval BN after the
  layer) is folded into the layer (Efficient ConvBN): ``W' = W * g``, ``b' = (b - mean) * g + beta``
  with ``g = gamma / sqrt(var + eps)`` per output channel;
* an eval-mode RepBN/PRepBN that cannot fold (it feeds a residual add, several consumers, or
  anything but a Linear) becomes a single :class:`slab.nn.ChannelAffine`.

All fold arithmetic runs in float64 and is cast back to the layer's dtype, so the deployed model
equals the unfolded eval model up to float rounding.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Optional

import torch
from torch import Tensor, fx, nn

from slab.nn.prepbn import ChannelAffine, PRepBN, RepBN, norm_affine

__all__ = ["deploy"]

_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


# ----------------------------------------------------------------------------------------------
# What may fold
# ----------------------------------------------------------------------------------------------
def _is_norm(m: nn.Module) -> bool:
    """An eval-mode norm that is a per-channel affine over the last dim."""
    if isinstance(m, ChannelAffine):
        return True
    if isinstance(m, (RepBN, PRepBN)) and not m.training:
        rep = m.norm2 if isinstance(m, PRepBN) else m  # PRepBN's eval path is its norm2
        return not rep.training and rep.bn.running_mean is not None and rep.bn.running_var is not None
    return False


def _is_linear(m: nn.Module) -> bool:
    # Subclasses that keep nn.Linear's forward (e.g. MultiheadAttention's out_proj) are fine;
    # ones that override it (LoRA, quantized, ...) are not ours to rewrite.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _conv_type(m: nn.Module) -> Optional[type]:
    for conv in _CONV_BN:
        if isinstance(m, conv) and type(m).forward is conv.forward:
            return conv
    return None


def _is_eval_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not m.training
        and m.running_mean is not None
        and m.running_var is not None
    )


def _bn_follows(layer: nn.Module, bn: nn.Module) -> bool:
    """``layer -> bn`` is a foldable pair (eval BN over the layer's output channels)."""
    if not _is_eval_bn(bn):
        return False
    if _is_linear(layer):
        # BatchNorm1d normalises dim 1: the Linear output must be (N, C) (as torch.fx's fuse).
        ok = type(bn) in (nn.BatchNorm1d, nn.SyncBatchNorm)
        return ok and layer.out_features == bn.num_features
    conv = _conv_type(layer)
    if conv is None:
        return False
    return type(bn) in (_CONV_BN[conv], nn.SyncBatchNorm) and layer.out_channels == bn.num_features


# ----------------------------------------------------------------------------------------------
# Fold arithmetic (float64, cast back to the layer dtype); always new Parameters, never in place,
# so weights tied to other modules (e.g. an embedding) are left intact.
# ----------------------------------------------------------------------------------------------
def _clone_layer(layer: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter/buffer/module/hook dicts (same class and attributes)."""
    new = copy.copy(layer)
    for k, v in vars(new).items():  # _parameters, _buffers, _modules, hook dicts
        if isinstance(v, dict):
            new.__dict__[k] = copy.copy(v)
    return new


def _set_param(layer: nn.Module, name: str, value: Tensor, like: Optional[Tensor]) -> None:
    ref = like if like is not None else layer.weight
    requires_grad = ref.requires_grad
    setattr(layer, name, nn.Parameter(value.to(ref.dtype), requires_grad=requires_grad))


@torch.no_grad()
def _fold_bn_into_layer(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    w = layer.weight.double()
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(rm)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(rm)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(rm)
    g = gamma / torch.sqrt(rv + bn.eps)
    new = _clone_layer(layer)
    _set_param(new, "weight", w * g.reshape((-1,) + (1,) * (w.dim() - 1)), layer.weight)
    _set_param(new, "bias", (b - rm) * g + beta, layer.bias)
    return new


@torch.no_grad()
def _fold_norm_into_linear(norm: nn.Module, linear: nn.Linear) -> nn.Linear:
    s, t = norm_affine(norm)
    s, t = s.to(linear.weight.device), t.to(linear.weight.device)
    w = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else w.new_zeros(w.shape[0])
    new = _clone_layer(linear)
    _set_param(new, "weight", w * s, linear.weight)
    _set_param(new, "bias", b + w @ t, linear.bias)
    return new


def _to_affine(norm: nn.Module) -> nn.Module:
    return norm if isinstance(norm, ChannelAffine) else ChannelAffine.from_norm(norm)


# ----------------------------------------------------------------------------------------------
# torch.fx path
# ----------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (RepBN, PRepBN, ChannelAffine)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _input_of(node: fx.Node, kwarg: str) -> Optional[fx.Node]:
    """The tensor input of a call_module node, if it is called with just that one input."""
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    if not node.args and set(node.kwargs) == {kwarg}:
        return node.kwargs[kwarg]
    return None


_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_META_METHODS = {"size", "dim", "ndimension", "numel"}


def _is_meta_use(user: fx.Node, node: fx.Node) -> bool:
    """``user`` only reads the shape/dtype/device of ``node`` (``B, N, C = x.shape`` and the like)."""
    if not user.args or user.args[0] is not node or any(a is node for a in user.args[1:]):
        return False
    if user.op == "call_function" and user.target is getattr:
        return user.args[1] in _META_ATTRS
    return user.op == "call_method" and user.target in _META_METHODS


def _data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _is_meta_use(u, node)]


def _fold_graph(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [n.target for n in graph.nodes if n.op == "get_attr"]

    def mod(node: fx.Node) -> Optional[nn.Module]:
        return modules.get(node.target) if node.op == "call_module" else None

    def rewritable(node: fx.Node) -> bool:
        # Called exactly once and none of its tensors read directly (get_attr) elsewhere.
        return calls[node.target] == 1 and not any(a.startswith(node.target + ".") for a in attrs)

    def replace(node: fx.Node, new: nn.Module) -> None:
        gm.add_submodule(node.target, new)  # replaces the module at that path
        modules[node.target] = new

    # 1. layer -> eval BN (Efficient ConvBN): the BN disappears into the layer.
    for node in list(graph.nodes):
        bn = mod(node)
        if bn is None or not _is_eval_bn(bn):
            continue
        src = _input_of(node, "input")
        layer = mod(src) if isinstance(src, fx.Node) else None
        if layer is None or _data_users(src) != [node] or not rewritable(src) or not _bn_follows(layer, bn):
            continue
        replace(src, _fold_bn_into_layer(layer, bn))
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        calls[node.target] -= 1

    # 2. eval norm -> Linear (its only consumer): the norm disappears into the Linear.
    for node in list(graph.nodes):
        norm = mod(node)
        if norm is None or not _is_norm(norm):
            continue
        users = _data_users(node)
        x = node.args[0] if node.args else node.kwargs.get("x")
        linear = mod(users[0]) if len(users) == 1 else None
        if not isinstance(x, fx.Node) or linear is None or not _is_linear(linear):
            continue
        user = users[0]
        if _input_of(user, "input") is not node or not rewritable(user):
            continue
        replace(user, _fold_norm_into_linear(norm, linear))
        node.replace_all_uses_with(x)  # the Linear, and shape reads (the norm keeps x's shape)
        graph.erase_node(node)
        calls[node.target] -= 1

    # 3. every remaining eval norm becomes one per-channel affine.
    for target, n_calls in calls.items():
        m = modules.get(target)
        if n_calls > 0 and _is_norm(m) and not isinstance(m, ChannelAffine):
            if not any(a.startswith(target + ".") for a in attrs):
                gm.add_submodule(target, _to_affine(m))

    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------------------------
# Fallback without a graph: nn.Sequential adjacency
# ----------------------------------------------------------------------------------------------
def _fold_sequentials(model: nn.Module) -> nn.Module:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    seqs = [
        m for m in model.modules()
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
    ]

    def pairs(seq: nn.Sequential):
        names = list(seq._modules)
        return [(names[i], names[i + 1]) for i in range(len(names) - 1)]

    for seq in seqs:  # layer -> eval BN
        for a, b in pairs(seq):
            layer, bn = seq._modules[a], seq._modules[b]
            if uses[id(layer)] == 1 and uses[id(bn)] == 1 and _bn_follows(layer, bn):
                seq._modules[a] = folded = _fold_bn_into_layer(layer, bn)
                seq._modules[b] = nn.Identity()
                uses[id(folded)] = 1
    for seq in seqs:  # eval norm -> Linear
        for a, b in pairs(seq):
            norm, linear = seq._modules[a], seq._modules[b]
            if uses[id(norm)] == 1 and uses[id(linear)] == 1 and _is_norm(norm) and _is_linear(linear):
                seq._modules[b] = _fold_norm_into_linear(norm, linear)
                seq._modules[a] = nn.Identity()

    # Whatever norm is left: its own per-channel affine (exact wherever it is used).
    affines: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and not isinstance(child, ChannelAffine) and _is_norm(child):
                if id(child) not in affines:
                    affines[id(child)] = _to_affine(child)
                parent._modules[name] = affines[id(child)]
    return model


# ----------------------------------------------------------------------------------------------
def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with its eval-mode norms folded away, for inference.

    * Eval-mode ``slab.nn.RepBN``/``PRepBN`` whose output feeds only a ``nn.Linear`` are folded into
      that Linear: with the eval affine ``s = w / sqrt(rv + eps) + alpha``,
      ``t = b - rm * w / sqrt(rv + eps)``, the Linear becomes ``W' = W * s`` (per input column)
      and ``b' = b + W @ t`` (a bias is added if it had none).
    * ``Conv1d/2d/3d -> BatchNorm1d/2d/3d`` and ``Linear -> BatchNorm1d`` pairs with the BN in eval
      mode after the layer are folded into the layer (Efficient ConvBN).
    * An eval-mode RepBN/PRepBN that cannot fold (feeds a residual add, several consumers, a
      non-Linear) becomes a :class:`slab.nn.ChannelAffine` (``x * scale + shift``).

    Fold arithmetic is done in float64 and cast back to the layer dtype; the result equals the
    unfolded eval model within float rounding. Folded layers get new Parameter objects, so weights
    tied to other modules are never modified.

    How the pairs are found: the model is traced with ``torch.fx`` (RepBN/PRepBN/ChannelAffine as
    leaf modules) and a ``torch.fx.GraphModule`` is returned; a layer is only rewritten when it is
    called once in the graph. If the model does not trace (data-dependent control flow, ...), a
    warning is issued and the fallback folds adjacent children of plain ``nn.Sequential``
    containers only, then turns every remaining eval-mode RepBN/PRepBN into a ChannelAffine; the
    model keeps its class. (The fallback cannot see a module that a custom ``forward`` also calls
    outside its Sequential; such a model should be made traceable.)

    Training mode: like ``torch.jit.freeze`` and ``torch.fx``'s conv-bn fusion, deploy is an
    inference transform and raises ``RuntimeError`` when ``model.training`` is True (call
    ``model.eval()`` first). Submodules that are deliberately left in training mode inside an
    eval model (e.g. a BatchNorm kept adapting) still compute batch statistics, so they are left
    exactly as they are.

    Args:
        model: the model, in eval mode.
        inplace: if False (default) ``model`` is deep-copied first and left untouched; if True its
            modules may be reused and changed — always use the returned model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"slab.deploy: expected an nn.Module, got {type(model).__name__}")
    if model.training:
        raise RuntimeError(
            "slab.deploy: the model is in training mode; call model.eval() first "
            "(deploy folds the running statistics of eval-mode norms)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if _is_norm(model):  # a bare norm is its affine
        return _to_affine(model)

    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure selects the fallback
        warnings.warn(
            f"slab.deploy: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
            f"{exc}); folding only adjacent nn.Sequential children and converting the other "
            "RepBN/PRepBN to ChannelAffine",
            stacklevel=2,
        )
        return _fold_sequentials(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return _fold_graph(gm)
