"""Deploy-time re-parameterization: fold eval-mode norms into the neighbouring layers.

``deploy(model)`` rewrites an eval-mode model so that its normalisations cost nothing at inference:

* every eval-mode :class:`slab.nn.RepBN` / :class:`slab.nn.PRepBN` whose output feeds only
  ``nn.Linear`` layers (one, or several such as a gated MLP's gate and up projections) is folded
  into each of them (the eval norm is the per-channel affine ``y = x * s + t``; a Linear becomes
  ``W' = W * s`` (per input column), ``b' = b + W @ t``);
* every ``Conv{1,2,3}d -> BatchNorm{1,2,3}d`` and ``Linear -> BatchNorm1d`` pair (eval BN after the
  layer) is folded into the layer (Efficient ConvBN): ``W' = W * g``, ``b' = (b - mean) * g + beta``
  with ``g = gamma / sqrt(var + eps)`` per output channel -- but only where the BN normalises the
  layer's output channels (see :func:`deploy`);
* an eval-mode RepBN/PRepBN that cannot fold (it feeds a residual add or anything else but
  Linears) becomes a single :class:`slab.nn.ChannelAffine`.

All fold arithmetic runs in float64 and is cast back to the layer's dtype, so the deployed model
equals the unfolded eval model up to float rounding. Every decision is recorded in a
:class:`DeployReport` (``deploy(..., return_report=True)``).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from .nn._args import check_flag
from .nn.prepbn import ChannelAffine, PRepBN, RepBN, norm_affine
from .nn.sla import SimplifiedLinearAttention

__all__ = [
    "deploy",
    "DeployReport",
    "Folded",
    "Left",
    "register_conv_bn_block",
    "register_bn_act",
    "fold_norm_into_linear",
]

_BatchNorm = nn.modules.batchnorm._BatchNorm
_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
# BatchNorm2d/3d accept only 4-D/5-D input, so after a Conv2d/3d their dim 1 is the conv's output
# channels. BatchNorm1d (2-D or 3-D) and SyncBatchNorm (any rank) also accept outputs whose dim 1
# is something else: an unbatched conv's (C, L) or a Linear's (N, L, C).
_RANK_CHECKING_BN = (nn.BatchNorm2d, nn.BatchNorm3d)
# Modules whose output has the rank of their input (used to prove a Linear's output is 2-D).
_SAME_RANK = (nn.Identity, nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU, _BatchNorm, RepBN, PRepBN, ChannelAffine)
# Ends the reason of every pair left only because its rank is unknown (deploy warns about those).
_NEED_SHAPES = "pass example_inputs (to a model torch.fx can trace) to fold such pairs"


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
class Folded(NamedTuple):
    """A norm that disappeared into a neighbouring layer (qualified module names)."""

    norm: str
    into: str


class Left(NamedTuple):
    """A norm that was not folded (qualified module name), and why."""

    norm: str
    reason: str


@dataclass
class DeployReport:
    """What :func:`deploy` did with every norm it met.

    ``folded``: norms folded into a layer; ``converted``: eval RepBN/PRepBN that became a
    :class:`slab.nn.ChannelAffine`, with the reason they could not fold; ``left``: norms kept as
    they were (training mode, a BatchNorm with no Conv/Linear producer whose channels it
    normalises, ...), with the reason.
    """

    folded: list[Folded] = field(default_factory=list)
    converted: list[Left] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {f.norm} into {f.into}" for f in self.folded]
        lines += [f"{c.norm} -> ChannelAffine: {c.reason}" for c in self.converted]
        lines += [f"left {k.norm}: {k.reason}" for k in self.left]
        return "\n".join(lines) or "no norms"

    def summary(self) -> str:
        """One line: how many BatchNorms/norms were folded, converted and left."""
        return f"{len(self.folded)} folded, {len(self.converted)} converted to ChannelAffine, {len(self.left)} left"


# ----------------------------------------------------------------------------------------------
# The registry: modules that hold a Conv -> BN(-activation) pair as attributes, and BatchNorm
# subclasses that apply more after normalising. Keyed by qualified class name, so that slab never
# imports the libraries that define them; a subclass matches when it keeps the registered forward.
# ----------------------------------------------------------------------------------------------
class _Block(NamedTuple):
    conv: str  # attribute names of the pair
    bn: str


_BLOCKS: dict[str, _Block] = {}
_BN_ACTS: dict[str, Callable[[nn.Module], nn.Module]] = {}
_INPUT_LINEARS: dict[str, tuple[str, ...]] = {}  # class -> the Linears (attribute names) that alone read its input


def _qualname(cls: Union[type, str]) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_conv_bn_block(cls: Union[type, str], conv: str = "conv", bn: str = "bn") -> None:
    """Declares that modules of class ``cls`` (a class or its qualified name) feed the output of
    their ``conv`` attribute only to their ``bn`` attribute, whatever else their forward does
    (ultralytics' ``Conv``: ``act(bn(conv(x)))``). :func:`deploy` then folds such a BN into the conv
    in place (the BN becomes ``nn.Identity``, or the tail of a :func:`register_bn_act` class), and
    :func:`slab.tune` computes the pair as one convolution, even in models torch.fx cannot trace.
    Subclasses match as long as they keep ``cls.forward``. Registered by default: ultralytics
    ``Conv`` (and ``DWConv``), timm ``ConvNormAct``."""
    for attr, value in (("conv", conv), ("bn", bn)):
        if not isinstance(value, str) or not value.isidentifier():
            raise ValueError(f"register_conv_bn_block: {attr} must be an attribute name, got {value!r}")
    _BLOCKS[_qualname(cls)] = _Block(conv, bn)


def register_bn_act(cls: Union[type, str], tail: Callable[[nn.Module], nn.Module]) -> None:
    """Declares a BatchNorm subclass (a class or its qualified name) whose forward normalises as
    its BatchNorm base does and then applies ``tail(bn)`` (a module built from the BN's own
    submodules). Folding such a BN leaves ``tail(bn)`` in its place. Registered by default: timm's
    ``BatchNormAct2d`` (``tail = Sequential(bn.drop, bn.act)``)."""
    if not callable(tail):
        raise ValueError(f"register_bn_act: tail must be callable, got {type(tail).__name__}")
    _BN_ACTS[_qualname(cls)] = tail


def register_input_linear(cls: Union[type, str], linear: str, *more: str) -> None:
    """Declares that modules of class ``cls`` (a class or its qualified name) read their first
    input only through their ``nn.Linear`` attributes ``linear`` (and ``more``): an attention
    layer's fused qkv projection, a gated MLP's gate and up projections. :func:`deploy` then
    keeps such a module as one call (so later module swaps, e.g. :func:`slab.sparse.convert`,
    still reach it) and folds a norm in front of it into those Linears. Registered by default:
    :class:`slab.nn.SimplifiedLinearAttention` (``qkv``)."""
    names = (linear, *more)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register_input_linear: linear names must be attribute names, got {name!r}")
    _INPUT_LINEARS[_qualname(cls)] = names


register_input_linear(SimplifiedLinearAttention, "qkv")
register_conv_bn_block("ultralytics.nn.modules.conv.Conv")
register_conv_bn_block("timm.layers.conv_bn_act.ConvNormAct")
register_bn_act("timm.layers.norm_act.BatchNormAct2d", lambda bn: nn.Sequential(bn.drop, bn.act))

_TORCH_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _registered(m: nn.Module, table: dict):
    """The entry of the first class in type(m)'s MRO registered in ``table`` whose forward m keeps."""
    for base in type(m).__mro__:
        entry = table.get(_qualname(base))
        if entry is not None:
            return entry if type(m).forward is base.forward else None
    return None


def _block_of(m: nn.Module) -> Optional[_Block]:
    return _registered(m, _BLOCKS)


def _bn_tail(bn: nn.Module) -> Optional[nn.Module]:
    """What replaces a folded BN: None (nothing) for torch's BNs, ``tail(bn)`` for a registered one."""
    tail = _registered(bn, _BN_ACTS)
    return None if tail is None else tail(bn)


def _bn_kind(bn: nn.Module) -> Optional[type]:
    """The torch BatchNorm class whose normalisation ``bn`` computes: its own type, or the torch
    base of a registered BN-with-activation; None for other BatchNorm subclasses."""
    if type(bn) in _TORCH_BNS:
        return type(bn)
    if _registered(bn, _BN_ACTS) is not None:
        return next((c for c in type(bn).__mro__ if c in _TORCH_BNS), None)
    return None


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
    return isinstance(m, _BatchNorm) and not m.training and m.running_mean is not None and m.running_var is not None


def _not_eval(m: nn.Module) -> str:
    """Why a norm that is not an eval-mode affine stays as it is."""
    if m.training or getattr(m, "norm2", m).training:
        return "in training mode (it normalises with batch statistics)"
    return "it has no running statistics"


def _output_layout(layer: nn.Module) -> Optional[tuple[int, int, tuple[type, ...]]]:
    """``(output channels, rank of a batched output, BN types over those channels)`` of a Conv or
    Linear that deploy may rewrite; None for any other module."""
    if _is_linear(layer):
        return layer.out_features, 2, (nn.BatchNorm1d, nn.SyncBatchNorm)
    conv = _conv_type(layer)
    if conv is None:
        return None
    return layer.out_channels, len(layer.kernel_size) + 2, (_CONV_BN[conv], nn.SyncBatchNorm)


def _pair_problem(name: str, layer: nn.Module, bn: nn.Module, rank: Optional[int]) -> Optional[str]:
    """Why eval ``bn`` applied to the output of ``layer`` (called ``name``) cannot fold into it;
    None if it can. A BN normalises dim 1, the layer's output channels only on a batched output
    ((N, C) for a Linear, (N, C, ...) for a conv); ``rank`` is that output's rank where known."""
    layout = _output_layout(layer)
    if layout is None:
        return f"it follows {name} ({type(layer).__name__}), not a Conv or Linear"
    channels, batched, bns = layout
    what = f"{type(bn).__name__} after {name} ({type(layer).__name__})"
    kind = _bn_kind(bn)
    if kind is None:
        return f"{what}: {type(bn).__name__} overrides BatchNorm's forward (register_bn_act declares such classes)"
    if kind not in bns:
        return f"{what}: this BN type does not normalise the layer's output channels"
    if bn.num_features != channels:
        return f"{what}: num_features {bn.num_features} != the layer's {channels} output channels"
    if rank is None and not isinstance(bn, _RANK_CHECKING_BN):
        return (
            f"{what}: the layer output's rank is unknown, and only a {batched}-D output has its "
            f"channels in dim 1; {_NEED_SHAPES}"
        )
    if rank is not None and rank != batched:
        return f"{what}: the layer output is {rank}-D, so the BN normalises its dim 1, not the {channels} channels"
    return None


# ----------------------------------------------------------------------------------------------
# Ranks deploy can prove: from shape propagation on example inputs, else from the graph
# ----------------------------------------------------------------------------------------------
def _keeps_rank(m: Optional[nn.Module]) -> bool:
    return m is not None and (_is_linear(m) or _conv_type(m) is not None or isinstance(m, _SAME_RANK))


def _flatten_rank(start_dim, end_dim) -> Optional[int]:
    return 2 if (start_dim, end_dim) == (1, -1) else None  # flatten(x, 1) of any x is (N, rest)


def _reshape_rank(sizes: tuple) -> Optional[int]:
    """The rank ``view``/``reshape`` produces: one int-like argument per dimension, or a tuple."""
    if len(sizes) == 1:  # a tuple of sizes; one int or graph value (a size, torch.Size, dtype) proves nothing
        sizes = sizes[0] if isinstance(sizes[0], (tuple, list)) else ()
    ok = sizes and all(isinstance(s, (int, fx.Node)) and not isinstance(s, bool) for s in sizes)
    return len(sizes) if ok else None


_FLATTEN = {("call_function", torch.flatten), ("call_method", "flatten")}
_RESHAPE = {("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)}


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _op_rank(node: fx.Node, m: Optional[nn.Module]) -> Optional[int]:
    """The output rank of a flatten / view / reshape node, None for anything else."""
    if isinstance(m, nn.Flatten):
        return _flatten_rank(m.start_dim, m.end_dim)
    if (node.op, node.target) in _FLATTEN:
        return _flatten_rank(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
    if (node.op, node.target) in _RESHAPE:
        return _reshape_rank(tuple(node.args[1:]))
    return None


def _rank(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[int]:
    """The rank of ``node``'s output where it is known, else None."""
    while True:
        meta = node.meta.get("tensor_meta")
        if hasattr(meta, "shape"):  # shape propagation ran
            return len(meta.shape)
        m = modules.get(node.target) if node.op == "call_module" else None
        if not _keeps_rank(m) or not node.args or not isinstance(node.args[0], fx.Node):
            return _op_rank(node, m)
        node = node.args[0]


def _prefix_rank(mods: list[nn.Module]) -> Optional[int]:
    """The output rank of the last of ``mods`` (an nn.Sequential's children up to it), if they prove it."""
    for m in reversed(mods):
        if isinstance(m, nn.Flatten):
            return _flatten_rank(m.start_dim, m.end_dim)
        if not _keeps_rank(m):
            return None
    return None


def _propagate_shapes(gm: fx.GraphModule, example_inputs: Union[Tensor, tuple, list]) -> None:
    """Records every node's output shape (``node.meta["tensor_meta"]``) from a run on fake copies of
    the model and inputs (no real compute), else from a real run on a copy of the model: the
    model's buffers never change (a submodule left in training mode would take a statistics step)."""
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    try:
        ShapeProp(gm, fake_mode=FakeTensorMode()).propagate(*args)
        return
    except Exception:  # noqa: BLE001 - e.g. a module reading a buffer's value (data-dependent under fakes)
        pass
    # A real run on a copy (older torch's fake tensors refuse reading a buffer's value, which a
    # training-mode PRepBN does for its schedule): the model's own buffers stay unchanged.
    shadow = copy.deepcopy(gm)
    try:
        with torch.no_grad():
            ShapeProp(shadow).propagate(*args)
    except Exception as exc:  # noqa: BLE001 - whatever the model raised, the inputs do not fit it
        raise ValueError(f"example_inputs: running the model on them failed: {type(exc).__name__}: {exc}") from exc
    for node, twin in zip(gm.graph.nodes, shadow.graph.nodes):
        if "tensor_meta" in twin.meta:
            node.meta["tensor_meta"] = twin.meta["tensor_meta"]


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
def fold_norm_into_linear(norm: nn.Module, linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` that computes ``linear(norm(x))`` for an eval-mode RepBN/PRepBN or a
    ChannelAffine ``norm`` (``W' = W * scale``, ``b' = b + W @ shift``, in float64); ``linear`` and
    ``norm`` are left as they are. :func:`deploy` uses it wherever a norm feeds one Linear; a caller
    that knows a norm feeds several Linears can fold it into each."""
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
        # Registered BN-with-activation classes stay one call, so that the BN is seen after its conv.
        if isinstance(m, (RepBN, PRepBN, ChannelAffine)) or _registered(m, _BN_ACTS) is not None:
            return True
        if _registered(m, _INPUT_LINEARS) is not None:  # its input reaches only its Linear
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


def _describe(node) -> str:
    """A graph value as a report names it."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "placeholder":
        return f"the input {node.target!r}"
    name = getattr(node.target, "__name__", node.target)
    return {"call_function": f"{name}()", "call_method": f".{name}()"}.get(node.op, f"{node.op} {name}")


class _GraphFolder:
    """Folds the norms of one traced model, recording every decision in ``report``."""

    def __init__(self, gm: fx.GraphModule, report: DeployReport, write_back: bool = False) -> None:
        self.gm, self.graph, self.report = gm, gm.graph, report
        self.modules = dict(gm.named_modules())
        self.calls = Counter(n.target for n in self.graph.nodes if n.op == "call_module")
        self.attrs = [n.target for n in self.graph.nodes if n.op == "get_attr"]
        self.why_not: dict[str, str] = {}  # norm -> why one of its calls did not fold
        # write_back: the changes are also applied, by module path, to the module that was traced
        # (see _write_back), so a norm must then be called exactly once (its module becomes the
        # Identity that its dropped call was).
        self.write_back = write_back
        self.replaced: dict[str, nn.Module] = {}  # module path -> what takes its place

    def mod(self, node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None

    def read_directly(self, target: str) -> bool:
        return any(a.startswith(target + ".") for a in self.attrs)

    def problem_rewriting(self, node: fx.Node) -> Optional[str]:
        # A layer is rewritten only when it is called once and none of its tensors is read elsewhere.
        if self.calls[node.target] != 1 or self.read_directly(node.target):
            return f"{node.target} is called more than once or its weights are read directly"
        return None

    def replace(self, target: str, new: nn.Module) -> None:
        self.gm.add_submodule(target, new)  # replaces the module at that path
        self.modules[target] = new
        self.replaced[target] = new

    def fold_into(
        self,
        node: fx.Node,
        into: list[str],
        new: list[nn.Module],
        keep: fx.Node,
        tail: Optional[nn.Module] = None,
    ) -> None:
        """Replaces the modules at the paths ``into`` by ``new`` and drops the norm call ``node`` (its
        uses read ``keep`` instead), or, for a BN with an activation tail, makes ``node`` call the tail."""
        for target, layer in zip(into, new):
            self.replace(target, layer)
        if tail is not None:
            self.replace(node.target, tail)
        else:
            node.replace_all_uses_with(keep)
            self.graph.erase_node(node)
            self.calls[node.target] -= 1
            self.replaced[node.target] = nn.Identity()
        self.report.folded.append(Folded(node.target, ", ".join(into)))

    def problem_dropping(self, node: fx.Node) -> Optional[str]:
        if self.write_back and (self.calls[node.target] != 1 or self.read_directly(node.target)):
            return f"{node.target} is called more than once or its parameters are read directly"
        return None

    # 1. layer -> eval BN (Efficient ConvBN): the BN disappears into the layer.
    def fold_bns(self) -> None:
        for node in list(self.graph.nodes):
            bn = self.mod(node)
            if not isinstance(bn, _BatchNorm):
                continue
            src = _input_of(node, "input")
            why = self.bn_problem(node, bn, src)
            if why is not None:
                self.report.left.append(Left(node.target, why))
            else:
                self.fold_into(node, [src.target], [_fold_bn_into_layer(self.mod(src), bn)], src, _bn_tail(bn))

    def bn_problem(self, node: fx.Node, bn: nn.Module, src) -> Optional[str]:
        if not _is_eval_bn(bn):
            return _not_eval(bn)
        if src is None:
            return "it is not called with one tensor"
        layer = self.mod(src)
        if layer is None:
            return f"its input is {_describe(src)}, not the output of a Conv or Linear"
        why = _pair_problem(src.target, layer, bn, _rank(src, self.modules))
        if why is None and _data_users(src) != [node]:
            why = f"the output of {src.target} is also used elsewhere"
        return why or self.problem_rewriting(src) or self.problem_dropping(node)

    def bn_pairs(self) -> tuple[list[tuple[str, str]], list[Left]]:
        """``(layer path, BN path)`` of every pair fold_bns would fold (write-back rules), and the
        BNs it would leave, changing nothing."""
        pairs, left = [], []
        for node in self.graph.nodes:
            bn = self.mod(node)
            if isinstance(bn, _BatchNorm):
                src = _input_of(node, "input")
                why = self.bn_problem(node, bn, src)
                if why is None:
                    pairs.append((src.target, node.target))
                else:
                    left.append(Left(node.target, why))
        return pairs, left

    # 2. eval norm -> Linear (its only consumer): the norm disappears into the Linear.
    def fold_norms(self) -> None:
        for node in list(self.graph.nodes):
            norm = self.mod(node)
            if not isinstance(norm, (RepBN, PRepBN, ChannelAffine)):
                continue
            if not _is_norm(norm):
                self.report.left.append(Left(node.target, _not_eval(norm)))
                continue
            x = node.args[0] if node.args else node.kwargs.get("x")
            users = _data_users(node)
            why = self.norm_problem(node, x, users)
            if why is not None:
                self.why_not.setdefault(node.target, why)
            else:  # every Linear reading it (a gated MLP's gate and up projections) takes the affine
                targets = [t for u in users for t in self.input_linear_paths(u)]
                folded = [fold_norm_into_linear(norm, self.modules[t]) for t in targets]
                self.fold_into(node, targets, folded, x)  # shape reads read x (the norm keeps its shape)

    def norm_problem(self, node: fx.Node, x, users: list[fx.Node]) -> Optional[str]:
        if not isinstance(x, fx.Node):
            return "its input is not a graph tensor"
        if not users:
            return "its output is not used"
        for user in users:
            why = self.linear_user_problem(node, user)
            if why is not None:
                return why
        return self.problem_dropping(node)

    def input_linear_paths(self, user: fx.Node) -> list[str]:
        """The module paths of the Linears that read ``user``'s input: ``user`` itself, or the
        registered input Linears of a module such as an attention layer (register_input_linear)."""
        inner = _registered(self.mod(user), _INPUT_LINEARS)
        return [user.target] if inner is None else [f"{user.target}.{name}" for name in inner]

    def linear_user_problem(self, node: fx.Node, user: fx.Node) -> Optional[str]:
        """Why the norm ``node`` cannot fold into its consumer ``user`` (None: it can)."""
        mod = self.mod(user)
        if mod is None:
            return f"it feeds {_describe(user)}, not an nn.Linear"
        inner = _registered(mod, _INPUT_LINEARS)
        if inner is not None:
            if not user.args or user.args[0] is not node or node in (*user.args[1:], *user.kwargs.values()):
                return f"{user.target} is called with more than its output as its first input"
            for name in inner:
                if not _is_linear(getattr(mod, name, None)):
                    return f"{user.target}.{name} is not an nn.Linear"
        elif not _is_linear(mod):
            return f"it feeds {user.target} ({type(mod).__name__}), not an nn.Linear"
        elif _input_of(user, "input") is not node:
            return f"{user.target} is called with more than its output"
        return self.problem_rewriting(user)

    # 3. every remaining eval norm becomes one per-channel affine.
    def convert_rest(self) -> None:
        for target, n_calls in self.calls.items():
            m = self.modules.get(target)
            if n_calls == 0 or not _is_norm(m):
                continue
            why = self.why_not[target]
            if isinstance(m, ChannelAffine):
                self.report.left.append(Left(target, why))
            elif self.read_directly(target):
                self.report.left.append(Left(target, f"{why}; its parameters are read directly"))
            else:
                self.replace(target, _to_affine(m))
                self.report.converted.append(Left(target, why))

    def run(self) -> fx.GraphModule:
        self.fold_bns()
        self.fold_norms()
        self.convert_rest()
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
        return self.gm


def _traced(model: nn.Module, warn: bool = True) -> Optional[fx.GraphModule]:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure selects the fallback
        if warn:
            warnings.warn(
                f"slab.deploy: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
                f"{exc}); folding its registered Conv-BN blocks, inside its traceable submodules and "
                "between adjacent nn.Sequential children, and converting the other RepBN/PRepBN to "
                "ChannelAffine",
                stacklevel=3,
            )
        return None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# ----------------------------------------------------------------------------------------------
# Models torch.fx cannot trace as a whole: registered blocks, then every traceable submodule
# (folded in its graph, the changes written back by module path so the model keeps its classes
# and forward), then nn.Sequential adjacency for what is left.
# ----------------------------------------------------------------------------------------------
def _held_pair_problem(name: str, layer: nn.Module, bn: nn.Module, rank: Optional[int], uses: Counter) -> Optional[str]:
    """:func:`_pair_problem` for a pair found by module structure (a registered block, adjacent
    nn.Sequential children), where no graph shows other uses: both modules must be used once."""
    why = _pair_problem(name, layer, bn, rank)
    if why is None and (uses[id(layer)] > 1 or uses[id(bn)] > 1):
        why = f"{name} or the BN is used more than once"
    return why


def _block_pairs(model: nn.Module):
    """``(block, entry, conv name, BN name, why)`` for every registered Conv-BN block of ``model``
    whose BN is in eval mode; ``why`` is None where the pair may fold."""
    names = {id(m): name for name, m in model.named_modules()}
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for name, m in list(model.named_modules()):
        block = _block_of(m)
        bn = getattr(m, block.bn, None) if block else None
        if not isinstance(bn, _BatchNorm) or not _is_eval_bn(bn):
            continue  # no BN (built without one), or one that the report describes elsewhere
        conv = getattr(m, block.conv, None)
        conv_name = names.get(id(conv), f"{name}.{block.conv}")
        yield m, block, conv_name, names[id(bn)], _held_pair_problem(conv_name, conv, bn, None, uses)


def _fold_blocks(model: nn.Module, report: DeployReport) -> dict[int, str]:
    """Folds the BN of every registered Conv-BN block in place; returns id(BN) -> why it was left."""
    why_not: dict[int, str] = {}
    for m, block, conv_name, bn_name, why in _block_pairs(model):
        conv, bn = getattr(m, block.conv), getattr(m, block.bn)
        if why is not None:
            why_not[id(bn)] = why
            continue
        setattr(m, block.conv, _fold_bn_into_layer(conv, bn))
        tail = _bn_tail(bn)
        setattr(m, block.bn, tail if tail is not None else nn.Identity())
        report.folded.append(Folded(bn_name, conv_name))
    return why_not


def conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[Left]]:
    """``(layer name, BN name)`` of every eval BN that :func:`deploy` would fold into the Conv or
    Linear before it (registered blocks, the graph of the model or of its traceable submodules,
    nn.Sequential adjacency), and the BNs it would leave with the reason; changes nothing."""
    pairs: list[tuple[str, str]] = []
    left: dict[str, str] = {}
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for _, _, conv_name, bn_name, why in _block_pairs(model):
        if why is None:
            pairs.append((conv_name, bn_name))
        else:
            left[bn_name] = why
    claimed = {b for _, b in pairs}

    def search(module: nn.Module, prefix: str) -> None:
        gm = _traced(module, warn=False)
        if gm is not None:
            found, why_not = _GraphFolder(gm, DeployReport(), write_back=True).bn_pairs()
            pairs.extend((prefix + a, prefix + b) for a, b in found if prefix + b not in claimed)
            left.update((prefix + k.norm, k.reason) for k in why_not if prefix + k.norm not in claimed)
            return
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            kids = list(module.named_children())
            for i, ((a, layer), (b, bn)) in enumerate(zip(kids, kids[1:])):
                if _is_eval_bn(bn) and _output_layout(layer) is not None and prefix + b not in claimed:
                    rank = _prefix_rank([m for _, m in kids[: i + 1]])
                    why = _held_pair_problem(prefix + a, layer, bn, rank, uses)
                    if why is None:
                        pairs.append((prefix + a, prefix + b))
                    else:
                        left[prefix + b] = why
        for name, child in module.named_children():
            if _has_foldable(child) and not isinstance(child, (_BatchNorm, RepBN, PRepBN)):
                search(child, f"{prefix}{name}.")

    search(model, "")
    found = {b for _, b in pairs}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and name not in found and name not in left:
            left[name] = _not_eval(m) if not _is_eval_bn(m) else "it follows no Conv or Linear that deploy can prove"
    return pairs, [Left(k, v) for k, v in left.items() if k not in found]


def _has_foldable(m: nn.Module) -> bool:
    return any(isinstance(x, (_BatchNorm, RepBN, PRepBN)) for x in m.modules())


def _fold_parts(module: nn.Module, prefix: str, report: DeployReport, why_not: dict[int, str]) -> None:
    """Folds inside every maximal traceable submodule of ``module`` (the children that trace, and
    the same search inside those that do not)."""
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, (_BatchNorm, RepBN, PRepBN, ChannelAffine)) or not _has_foldable(child):
            continue  # a norm called by the untraceable parent is the adjacency pass's
        gm = _traced(child, warn=False)
        if gm is None:
            _fold_parts(child, path + ".", report, why_not)
            continue
        part = DeployReport()
        folder = _GraphFolder(gm, part, write_back=True)
        folder.run()
        for k in part.left:
            why_not[id(child.get_submodule(k.norm))] = k.reason
        for target, new in folder.replaced.items():
            child.set_submodule(target, new)
        report.folded += [Folded(f"{path}.{f.norm}", f"{path}.{f.into}") for f in part.folded]
        report.converted += [Left(f"{path}.{c.norm}", c.reason) for c in part.converted]


# ----------------------------------------------------------------------------------------------
# Fallback without a graph: nn.Sequential adjacency
# ----------------------------------------------------------------------------------------------
_UNTRACED_NORM = "torch.fx could not trace the model, and no nn.Linear follows it in an nn.Sequential"
_UNTRACED_BN = "torch.fx could not trace the model, and it follows no Conv or Linear in an nn.Sequential"


class _SequentialFolder:
    """Folds adjacent children of the plain nn.Sequential containers of an untraceable model."""

    def __init__(self, model: nn.Module, report: DeployReport, why_not: dict[int, str]) -> None:
        self.model, self.report = model, report
        self.names = {id(m): name for name, m in model.named_modules()}
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.seqs = [
            m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
        ]
        self.why_not = why_not  # id(BN) -> why it did not fold (here or in an earlier pass)

    def pairs(self, seq: nn.Sequential) -> list[tuple[str, str, list[nn.Module]]]:
        """``(name, next name, the children up to name)`` for each adjacent pair of children."""
        keys, mods = list(seq._modules), list(seq._modules.values())
        return [(keys[i], keys[i + 1], mods[: i + 1]) for i in range(len(keys) - 1)]

    def folded(self, norm: nn.Module, layer: nn.Module, new: nn.Module) -> nn.Module:
        self.names[id(new)] = self.names[id(layer)]
        self.uses[id(new)] = 1
        self.report.folded.append(Folded(self.names[id(norm)], self.names[id(layer)]))
        return new

    def fold_bns(self) -> None:
        for seq in self.seqs:
            for a, b, upto_a in self.pairs(seq):
                layer, bn = seq._modules[a], seq._modules[b]
                if not _is_eval_bn(bn) or _output_layout(layer) is None:
                    continue
                why = _held_pair_problem(self.names[id(layer)], layer, bn, _prefix_rank(upto_a), self.uses)
                if why is not None:
                    self.why_not[id(bn)] = why
                    continue
                seq._modules[a] = self.folded(bn, layer, _fold_bn_into_layer(layer, bn))
                seq._modules[b] = nn.Identity()

    def fold_norms(self) -> None:
        for seq in self.seqs:
            for a, b, _ in self.pairs(seq):
                norm, linear = seq._modules[a], seq._modules[b]
                if self.uses[id(norm)] == 1 and self.uses[id(linear)] == 1 and _is_norm(norm) and _is_linear(linear):
                    seq._modules[b] = self.folded(norm, linear, fold_norm_into_linear(norm, linear))
                    seq._modules[a] = nn.Identity()

    def convert_rest(self) -> None:
        """Whatever norm is left: its own per-channel affine (exact wherever it is used)."""
        affines: dict[int, nn.Module] = {}

        def convert_below(parent: nn.Module) -> None:  # top-down: a converted norm's own parts are gone
            for name, child in list(parent._modules.items()):
                if child is None or isinstance(child, ChannelAffine):
                    continue
                if not _is_norm(child):
                    convert_below(child)
                    continue
                if id(child) not in affines:
                    affines[id(child)] = _to_affine(child)
                    self.report.converted.append(Left(self.names[id(child)], _UNTRACED_NORM))
                parent._modules[name] = affines[id(child)]

        convert_below(self.model)

    def report_left(self) -> None:
        inside = None  # the name prefix of a reported RepBN/PRepBN, whose own BatchNorm is part of it
        for name, m in self.model.named_modules():
            if inside is not None and name.startswith(inside):
                continue
            if isinstance(m, (RepBN, PRepBN)):  # still here after convert_rest: not in eval mode
                self.report.left.append(Left(name, _not_eval(m)))
                inside = name + "."
            elif isinstance(m, _BatchNorm):
                why = self.why_not.get(id(m)) or (_UNTRACED_BN if _is_eval_bn(m) else _not_eval(m))
                self.report.left.append(Left(name, why))

    def run(self) -> nn.Module:
        self.fold_bns()
        self.fold_norms()
        self.convert_rest()
        self.report_left()
        return self.model


# ----------------------------------------------------------------------------------------------
def _check_args(model, inplace, example_inputs, return_report) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"slab.deploy: expected an nn.Module, got {type(model).__name__}")
    check_flag("inplace", inplace)
    check_flag("return_report", return_report)
    if example_inputs is not None and not isinstance(example_inputs, (Tensor, tuple, list)):
        raise ValueError(
            "example_inputs must be None, a tensor or a tuple of the model's positional inputs, "
            f"got {type(example_inputs).__name__}"
        )
    if model.training:
        raise RuntimeError(
            "slab.deploy: the model is in training mode; call model.eval() first "
            "(deploy folds the running statistics of eval-mode norms)"
        )


def _warn_if_shapes_missing(report: DeployReport) -> None:
    # Leaving such a pair costs speed, not correctness; say once how to get it folded.
    n = sum(k.reason.endswith(_NEED_SHAPES) for k in report.left)
    if n:
        warnings.warn(
            f"slab.deploy: {n} BatchNorm(s) left unfolded because the rank of the layer output they "
            f"normalise is unknown; {_NEED_SHAPES} (return_report=True lists them)",
            stacklevel=3,
        )


def deploy(
    model: nn.Module,
    inplace: bool = False,
    example_inputs: Union[Tensor, tuple, list, None] = None,
    return_report: bool = False,
) -> Union[nn.Module, tuple[nn.Module, DeployReport]]:
    """Returns ``model`` with its eval-mode norms folded away, for inference.

    * Eval-mode ``slab.nn.RepBN``/``PRepBN`` whose output feeds only ``nn.Linear`` layers (one, or
      several: a gated MLP's gate and up projections) are folded into each of them: with the eval
      affine ``s = w / sqrt(rv + eps) + alpha``, ``t = b - rm * w / sqrt(rv + eps)``, a Linear
      becomes ``W' = W * s`` (per input column) and ``b' = b + W @ t`` (a bias is added if it had
      none). A module registered with :func:`register_input_linear` (by default
      :class:`slab.nn.SimplifiedLinearAttention`, whose input only its ``qkv`` Linear reads) counts
      as that Linear.
    * ``Conv1d/2d/3d -> BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) and ``Linear -> BatchNorm1d``
      pairs with the BN in eval mode after the layer are folded into the layer (Efficient ConvBN),
      where the BN normalises the layer's output channels. A BN normalises dim 1, so the layer's
      output must be batched: ``(N, C)`` for a Linear (on a ``(N, L, C)`` Linear output
      BatchNorm1d normalises L), ``(N, C, ...)`` for a conv (an unbatched Conv1d's ``(C, L)``
      is normalised over L). BatchNorm2d/3d only accept the batched rank; for a BatchNorm1d or
      SyncBatchNorm deploy must know the rank: from ``example_inputs``, or from the graph (a
      Linear fed by ``flatten(x, 1)``, ``nn.Flatten()``, ``x.view(n, -1)``). Pairs it cannot
      prove are left (a warning says so) and listed in the report.
    * An eval-mode RepBN/PRepBN that cannot fold (feeds a residual add or another non-Linear)
      becomes a :class:`slab.nn.ChannelAffine` (``x * scale + shift``).

    Fold arithmetic is done in float64 and cast back to the layer dtype; the result equals the
    unfolded eval model within float rounding. Folded layers get new Parameter objects, so weights
    tied to other modules are never modified.

    How the pairs are found: the model is traced with ``torch.fx`` (RepBN/PRepBN/ChannelAffine and
    registered input-Linear modules as leaf modules) and a ``torch.fx.GraphModule`` is returned; a layer is only rewritten when it is
    called once in the graph. If the model does not trace (data-dependent control flow, ...), a
    warning is issued and the fallback folds adjacent children of plain ``nn.Sequential``
    containers only (``example_inputs`` unused), then turns every remaining eval-mode
    RepBN/PRepBN into a ChannelAffine; the model keeps its class. (The fallback cannot see a
    module that a custom ``forward`` also calls outside its Sequential; such a model should be
    made traceable.)

    Training mode: like ``torch.jit.freeze`` and ``torch.fx``'s conv-bn fusion, deploy is an
    inference transform and raises ``RuntimeError`` when ``model.training`` is True (call
    ``model.eval()`` first). Submodules that are deliberately left in training mode inside an
    eval model (e.g. a BatchNorm kept adapting) still compute batch statistics, so they are left
    exactly as they are.

    Args:
        model: the model, in eval mode.
        inplace: if False (default) ``model`` is deep-copied first and left untouched; if True its
            modules may be reused and changed — always use the returned model.
        example_inputs: the model's positional inputs (a tensor or a tuple) for shape propagation
            (``torch.fx.passes.shape_prop.ShapeProp`` on fake tensors: nothing is computed or
            changed); only their ranks matter.
        return_report: also return a :class:`DeployReport` of what was folded, what was left
            and why.

    Returns:
        the deployed model, or ``(model, report)`` with ``return_report=True``.
    """
    _check_args(model, inplace, example_inputs, return_report)
    if not inplace:
        model = copy.deepcopy(model)
    report = DeployReport()
    if _is_norm(model):  # a bare norm is its affine
        out = _to_affine(model)
        report.converted.append(Left("", "the model is a bare norm: there is no layer to fold it into"))
    else:
        gm = _traced(model)
        if gm is None:
            why_not = _fold_blocks(model, report)
            _fold_parts(model, "", report, why_not)
            out = _SequentialFolder(model, report, why_not).run()
        else:
            if example_inputs is not None:
                _propagate_shapes(gm, example_inputs)
            out = _GraphFolder(gm, report).run()
    _warn_if_shapes_missing(report)
    return (out, report) if return_report else out
