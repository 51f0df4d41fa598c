"""The case table of tests/test_bad_inputs.py: for every op under ``torch.ops.slab``, valid calls
(inputs the schema does not mark as written must come back bit for bit unchanged) and invalid
calls (each must raise a RuntimeError / ValueError whose message names the offending argument,
and must leave every tensor argument unchanged).

A call is a dict of keyword arguments for ``torch.ops.slab.<op>.default``. Each op has one valid
builder (small random float32 CPU tensors, odd sizes); an invalid case is that call with a few
arguments replaced (``bad(name, expected, arg=new value or lambda args: new value)``). Helpers
cover the common patterns (dtype, expanded in-place tensor, aliasing), and cases derived from the
schema are added for every op (:func:`schema_cases`): None for each required tensor, a ``meta``
tensor among the CPU ones for each tensor argument, NaN and inf for each float argument.

Builders run only in the worker process; importing this module builds no tensor.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Union

import torch

import slab  # noqa: F401  (loads the op library: registers torch.ops.slab.*)

NAMESPACE = "slab"

# Private helpers of the library, not ops a user calls with tensors: no table entry expected.
EXCLUDED: dict[str, str] = {}

# Exceptions an invalid call may raise. TypeError only where the case allows it (a wrong Python
# type refused by the argument parser); NotImplementedError (a RuntimeError subclass, raised by
# the dispatcher when no kernel fits) never counts as a clear error.
ACCEPTED = ("RuntimeError", "ValueError")


def registered_ops() -> list[str]:
    """Every op (overload packet) the dispatcher knows under ``slab::``."""
    prefix = NAMESPACE + "::"
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n[len(prefix) :].split(".")[0] for n in names if n.startswith(prefix)})


def schema(op: str):
    return getattr(torch.ops.slab, op).default._schema


# ---- cases ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    name: str
    build: Callable[[], dict]
    match: Optional[str] = None  # regex the error message must match (re.S); None: a valid call
    type_error: bool = False  # a TypeError is an acceptable error too
    check: Optional[Callable[[Any], Optional[str]]] = None  # valid calls: complaint about the result

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"

    @property
    def valid(self) -> bool:
        return self.match is None


@dataclasses.dataclass(frozen=True)
class Bad:
    """An invalid call: the op's valid call with ``edits`` applied in order."""

    name: str
    match: str
    edits: tuple
    type_error: bool = False


Expected = Union[str, tuple, "re.Pattern"]


def arg_re(name: str) -> str:
    """The argument name as a word (``x`` must not match inside ``max``; ``grads`` matches ``grads[1]``)."""
    return rf"(?<![\w]){re.escape(name)}(?![\w])"


def expect(expected: Expected) -> str:
    """A regex from an argument name, a tuple of names (any of them), or a compiled regex."""
    if isinstance(expected, re.Pattern):
        return expected.pattern
    if isinstance(expected, tuple):
        return "|".join(arg_re(n) for n in expected)
    return arg_re(expected)


def all_of(*patterns: str) -> str:
    return "".join(f"(?=.*?(?:{p}))" for p in patterns)


def _setter(arg: str, value):
    def edit(a):
        a[arg] = value(a) if callable(value) else value

    return edit


def bad(name: str, expected: Expected, *edits: Callable[[dict], None], type_error: bool = False, **changes) -> Bad:
    """``changes``: argument -> new value, or a function of the (partly edited) call returning it;
    ``edits``: functions that change the call dict in place (to set related arguments together)."""
    steps = tuple(edits) + tuple(_setter(k, v) for k, v in changes.items())
    return Bad(name, expect(expected), steps, type_error)


def _each(value, fn):
    return [fn(t) for t in value] if isinstance(value, list) else fn(value)


def dtype(arg: str, dt: torch.dtype, expected: Optional[Expected] = None) -> Bad:
    """``arg`` (every tensor of a list) cast to an unsupported dtype; the error names ``arg``."""
    short = str(dt).replace("torch.", "")
    return bad(f"dtype:{arg}={short}", expected or arg, **{arg: lambda a: _each(a[arg], lambda t: t.to(dt))})


def rank(arg: str, fn: Callable, expected: Optional[Expected] = None, tag: str = "") -> Bad:
    return bad(f"rank:{arg}{tag}", expected or arg, **{arg: lambda a: fn(a[arg])})


def shape(arg: str, fn: Callable, expected: Optional[Expected] = None, tag: str = "") -> Bad:
    return bad(f"shape:{arg}{tag}", expected or arg, **{arg: lambda a: fn(a[arg])})


def meta(arg: str) -> Bad:
    """``arg`` (the last tensor of a list) on the meta device, every other tensor on the CPU.
    The error must name the odd argument or at least say it is about devices."""

    def to_meta(a):
        v = a[arg]
        if isinstance(v, list):
            a[arg] = v[:-1] + [v[-1].to("meta")]
        else:
            a[arg] = v.to("meta")

    return Bad(f"meta:{arg}", f"{arg_re(arg)}|device", (to_meta,))


def none(arg: str) -> Bad:
    # torch.ops passes None for a Tensor argument on as an undefined tensor; the op must say which
    # argument is missing (not, say, "got shape [0]"); a TypeError from an argument parser would do too.
    return Bad(f"none:{arg}", all_of(arg_re(arg), "None|required|missing"), (_setter(arg, None),), type_error=True)


def wrong_type(arg: str, value) -> Bad:
    """A Python value of the wrong type: the argument parser refuses it (TypeError allowed)."""
    return Bad(f"type:{arg}={type(value).__name__}", arg_re(arg), (_setter(arg, value),), type_error=True)


ALIAS = "single memory location"


def expanded(arg: str, *, index: int = 0, also: str = "") -> Bad:
    """An in-place argument (element ``index`` of a list) that is an expanded view: several of its
    elements share one memory location. ``also``: another acceptable reason (e.g. an op that
    documents the argument as contiguous may say so instead)."""
    reason = ALIAS + (f"|{also}" if also else "")

    def expand(t):
        return t.reshape(-1)[:1].clone().expand(t.shape)

    def edit(a):
        v = a[arg]
        if isinstance(v, list):
            a[arg] = v[:index] + [expand(v[index])] + v[index + 1 :]
        else:
            a[arg] = expand(v)

    return Bad(f"expanded:{arg}", all_of(reason, arg_re(arg)), (edit,))


def alias(name: str, args: tuple, *edits: Callable[[dict], None], **changes) -> Bad:
    """Arguments that share memory where one of them is written in place: refused, naming one."""
    b = bad(name, args, *edits, **changes)
    return dataclasses.replace(b, name=f"alias:{name}", match=all_of(ALIAS, b.match))


# ---- tensors -------------------------------------------------------------------------------------


def rand(*shape) -> torch.Tensor:
    return torch.randn(*shape)


def pos(*shape) -> torch.Tensor:
    """Positive values (variances, scales, rstd)."""
    return torch.rand(*shape) + 0.5


def mask(*shape) -> torch.Tensor:
    """A bool mask with some False and at least two True (training statistics need two values)."""
    m = torch.rand(*shape) > 0.3
    m.view(-1)[:2] = True
    return m


def pick(d: dict, *names: str) -> dict:
    return {n: d[n] for n in names}


def swap_last(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed copy, viewed back)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# ---- the table -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    valid: list  # (tag, builder, check)
    bad: list


TABLE: dict[str, Entry] = {}


def op(name: str, valid: Callable[[], dict], *bad_cases: Bad, variants: tuple = ()) -> None:
    """Registers an op: its valid call, its invalid calls, and further valid calls
    ``variants = ((tag, builder[, check]), ...)`` (strided inputs, edge sizes)."""
    assert name not in TABLE, name
    more = [(v[0], v[1], v[2] if len(v) > 2 else None) for v in variants]
    TABLE[name] = Entry([("valid", valid, None)] + more, list(bad_cases))


# ---- SLA: attention -------------------------------------------------------------------------------


def _sla_fwd():
    return dict(q=rand(2, 3, 7, 5), k=rand(2, 3, 7, 5), v=rand(2, 3, 7, 3), causal=True, eps=1e-6, mask=mask(2, 7))


def _sla_fwd_strided():
    # the q/k/v views of a fused qkv projection: (B, N, 3, H, D) permuted
    qkv = rand(2, 7, 3, 3, 5).permute(2, 0, 3, 1, 4)
    return dict(q=qkv[0], k=qkv[1], v=swap_last(rand(2, 3, 7, 5)), causal=False, eps=1e-6, mask=None)


op(
    "sla_forward",
    _sla_fwd,
    rank("q", lambda t: t[0]),
    rank("v", lambda t: t[0]),
    shape("k", lambda t: t[..., :4]),
    shape("v", lambda t: t[:, :, :6]),
    shape("mask", lambda t: t[:, :6]),
    dtype("q", torch.int32),
    dtype("q", torch.complex64),
    dtype("k", torch.float8_e4m3fn),
    dtype("v", torch.float64),
    dtype("mask", torch.float32),
    bad("eps<0", "eps", eps=-1e-6),
    meta("mask"),
    wrong_type("causal", "yes"),
    variants=(("valid:strided", _sla_fwd_strided),),
)


def _sla_bwd():
    a = _sla_fwd()
    o, den, _, _ = torch.ops.slab.sla_forward(a["q"], a["k"], a["v"], True, 1e-6, a["mask"])
    return dict(grad_o=rand(*o.shape), q=a["q"], k=a["k"], v=a["v"], o=o, den=den, causal=True, mask=a["mask"])


op(
    "sla_backward",
    _sla_bwd,
    rank("q", lambda t: t[0]),
    shape("grad_o", lambda t: t[..., :2]),
    shape("o", lambda t: t[:, :, :6]),
    shape("den", lambda t: t[..., :6]),
    shape("k", lambda t: t[:, :2]),
    dtype("grad_o", torch.float64),
    dtype("den", torch.float64),
    dtype("q", torch.int32),
    dtype("mask", torch.int64),
    meta("mask"),
)


def _sla_step():
    return dict(q=rand(2, 3, 5), k=rand(2, 3, 5), v=rand(2, 3, 4), state=rand(2, 3, 5, 4), z=pos(2, 3, 5), eps=1e-6)


def _sla_step_4d():
    a = _sla_step()
    return dict(a, q=a["q"][:, :, None], k=a["k"][:, :, None], v=swap_last(rand(2, 3, 4, 1)).transpose(2, 3))


op(
    "sla_step",
    _sla_step,
    rank("q", lambda t: t[0]),
    shape("q", lambda t: torch.stack([t, t], 2), tag="=two_tokens"),
    shape("k", lambda t: t[..., :4]),
    shape("v", lambda t: t[:1]),
    shape("state", lambda t: t[..., :3]),
    shape("z", lambda t: t[..., :4]),
    bad("rank:v_vs_q", "v", v=lambda a: a["v"][:, :, None]),
    dtype("q", torch.int32),
    dtype("q", torch.complex64),
    dtype("k", torch.float64),
    dtype("state", torch.float64),
    dtype("z", torch.bfloat16),
    bad("eps<0", "eps", eps=-1.0),
    expanded("state", also="contiguous"),
    expanded("z", also="contiguous"),
    alias("z_in_state", ("state", "z"), z=lambda a: a["state"].view(-1)[:30].view(2, 3, 5)),
    alias("q_in_state", ("q", "state"), q=lambda a: a["state"].view(2, 3, 20)[..., :5]),
    alias("v_is_state_row", ("v", "state"), v=lambda a: a["state"][:, :, 0]),
    variants=(("valid:4d", _sla_step_4d),),
)


# ---- SLA: depthwise convolution branch ----------------------------------------------------------


def _sla_dwc():
    # 15 tokens on a 3 x 5 grid, 3 x 3 kernel, zero padding 1
    return dict(
        v=rand(2, 3, 15, 5),
        weight=rand(5, 1, 3, 3),
        bias=rand(5),
        residual=rand(2, 3, 15, 5),
        grid_h=3,
        grid_w=5,
        pad_top=1,
        pad_left=1,
    )


def _sla_dwc_causal():
    return dict(
        v=rand(2, 3, 15, 5).transpose(1, 2).contiguous().transpose(1, 2),
        weight=rand(5, 1, 4),
        bias=None,
        residual=None,
        grid_h=15,
        grid_w=1,
        pad_top=3,
        pad_left=0,
    )


def _twelve_tokens(a):
    a["v"], a["residual"] = a["v"][:, :, :12], None


op(
    "sla_dwc",
    _sla_dwc,
    # grid_h * grid_w wraps around int64 to exactly 12: a product check without overflow check passes
    bad("overflow:grid", re.compile("grid"), _twelve_tokens, grid_h=2**62 + 3, grid_w=4),
    bad("overflow:grid_w", re.compile("grid"), _twelve_tokens, grid_h=4, grid_w=2**62 + 3),
    bad(
        "overflow:grid_to_zero",
        re.compile("grid"),
        v=lambda a: a["v"][:, :, :0],
        residual=None,
        grid_h=2**32,
        grid_w=2**32,
    ),
    bad("negative:grid", re.compile("grid"), grid_h=-3, grid_w=-5),
    bad("mismatch:grid", re.compile("grid"), grid_h=4, grid_w=4),
    bad("pad_top>=kernel", re.compile("pad"), pad_top=3),
    bad("pad_left<0", re.compile("pad"), pad_left=-1),
    bad("huge:pad_top", re.compile("pad"), pad_top=2**63 - 1),
    rank("v", lambda t: t[0]),
    shape("weight", lambda t: t[:4], tag="=channels"),
    shape("weight", lambda t: t[:, :, :0], tag="=empty_kernel"),
    rank("weight", lambda t: t[:, 0]),
    shape("bias", lambda t: t[:4]),
    shape("residual", lambda t: t[:, :, :, :4]),
    dtype("v", torch.int32),
    dtype("v", torch.complex64),
    dtype("weight", torch.int32),
    dtype("residual", torch.float64),
    dtype("bias", torch.int64),
    meta("bias"),
    meta("residual"),
    variants=(("valid:causal", _sla_dwc_causal),),
)


def _sla_dwc_backward():
    a = _sla_dwc()
    return dict(grad=rand(2, 3, 15, 5), v=a["v"], weight=a["weight"], grid_h=3, grid_w=5, pad_top=1, pad_left=1)


op(
    "sla_dwc_backward",
    _sla_dwc_backward,
    bad(
        "overflow:grid",
        re.compile("grid"),
        grad=lambda a: a["grad"][:, :, :12],
        v=lambda a: a["v"][:, :, :12],
        grid_h=2**62 + 3,
        grid_w=4,
    ),
    bad("mismatch:grid", re.compile("grid"), grid_h=5, grid_w=5),
    bad("pad_top>=kernel", re.compile("pad"), pad_top=3),
    shape("grad", lambda t: t[:, :, :14]),
    rank("v", lambda t: t[0], expected=("v", "grad")),
    shape("weight", lambda t: t[:4]),
    dtype("grad", torch.float64),
    dtype("v", torch.int32),
    dtype("weight", torch.complex64),
)


def _sla_dwc_step():
    # kernel 4: the cache holds the 3 previous tokens
    return dict(v=rand(2, 3, 5), cache=rand(2, 3, 3, 5), weight=rand(5, 1, 4), bias=rand(5), residual=rand(2, 3, 5))


op(
    "sla_dwc_step",
    _sla_dwc_step,
    rank("v", lambda t: t[:, :, None]),
    shape("cache", lambda t: t[:, :, :2], tag="=kernel"),
    shape("cache", lambda t: t[..., :4], tag="=channels"),
    rank("weight", lambda t: t[:, :, None]),
    shape("weight", lambda t: t[:4], tag="=channels"),
    shape("bias", lambda t: t[:3]),
    shape("residual", lambda t: t[:1]),
    dtype("v", torch.int32),
    dtype("cache", torch.float64),
    dtype("weight", torch.complex64),
    dtype("residual", torch.bfloat16),
    expanded("cache", also="contiguous"),
    alias("v_in_cache", ("v", "cache"), v=lambda a: a["cache"][:, :, 0]),
    alias("residual_in_cache", ("residual", "cache"), residual=lambda a: a["cache"][:, :, 2]),
    alias("bias_in_cache", ("bias", "cache"), bias=lambda a: a["cache"][0, 0, 1]),
    meta("bias"),
    meta("residual"),
)


# ---- PRepBN ----------------------------------------------------------------------------------------


def _bn_state():
    """Every tensor the PRepBN ops take, consistent with each other (x (3, 5, 7), C = 7)."""
    c = 7
    d = dict(
        x=rand(3, 5, c),
        dy=rand(3, 5, c),
        norm_weight=rand(c),
        norm_bias=rand(c),
        bn_weight=rand(c),
        bn_bias=rand(c),
        alpha=rand(1),
        running_mean=rand(c),
        running_var=pos(c),
        mask=mask(3, 5),
        lam=0.3,
        training=True,
        momentum=0.1,
        eps=1e-5,
        norm_eps=1e-6,
        norm="layer",
    )
    outs = torch.ops.slab.prep_bn_forward(
        d["x"],
        d["norm_weight"],
        d["norm_bias"],
        d["bn_weight"],
        d["bn_bias"],
        d["alpha"],
        d["running_mean"],
        d["running_var"],
        d["lam"],
        True,
        d["eps"],
        d["norm_eps"],
        "layer",
        d["mask"],
    )
    d.update(zip(("y", "row_mean", "row_rstd", "bn_mean", "bn_rstd", "bn_var"), outs))
    d["sums"], d["count"] = torch.ops.slab.prep_bn_backward_reduce(
        d["dy"], d["x"], d["row_mean"], d["row_rstd"], d["bn_mean"], d["bn_rstd"], "layer", d["mask"]
    )
    return d


def _bn_args(*names):
    return lambda: pick(_bn_state(), *names)


def _rep_bn():
    d = _bn_state()
    return dict(
        x=d["x"],
        weight=d["bn_weight"],
        bias=d["bn_bias"],
        alpha=d["alpha"],
        running_mean=d["running_mean"],
        running_var=d["running_var"],
        training=True,
        momentum=0.1,
        eps=1e-5,
        mask=d["mask"],
    )


def _rep_bn_eval_strided():
    a = _rep_bn()
    return dict(a, x=swap_last(rand(5, 7)), training=False, mask=None)


op(
    "rep_bn",
    _rep_bn,
    rank("x", lambda t: t[0, 0, 0]),
    bad("one_row_training", "x", x=lambda a: a["x"][:1, :1], mask=None),
    shape("weight", lambda t: t[:6]),
    shape("bias", lambda t: t[None]),
    shape("alpha", lambda t: t.expand(2).clone()),
    shape("running_mean", lambda t: t[:6]),
    shape("running_var", lambda t: t[None]),
    shape("mask", lambda t: t[:, :4]),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
    dtype("weight", torch.float16),
    dtype("running_var", torch.float64),
    dtype("mask", torch.uint8),
    bad("momentum>1", "momentum", momentum=1.5),
    bad("momentum<0", "momentum", momentum=-0.1),
    bad("eps<0", "eps", eps=-1.0),
    meta("mask"),
    expanded("running_mean"),
    alias("running_var_is_running_mean", ("running_mean", "running_var"), running_var=lambda a: a["running_mean"]),
    alias("weight_is_running_mean", ("weight", "running_mean"), weight=lambda a: a["running_mean"]),
    alias("x_in_running_var", ("x", "running_var"), x=lambda a: a["running_var"].expand(3, 5, 7)),
    variants=(("valid:eval_strided", _rep_bn_eval_strided),),
)


def _prep_bn():
    return pick(
        _bn_state(),
        "x",
        "norm_weight",
        "norm_bias",
        "bn_weight",
        "bn_bias",
        "alpha",
        "running_mean",
        "running_var",
        "lam",
        "training",
        "momentum",
        "eps",
        "norm_eps",
        "norm",
        "mask",
    )


def _prep_bn_rms():
    return dict(_prep_bn(), norm="rms", norm_bias=None, mask=None)


op(
    "prep_bn",
    _prep_bn,
    rank("x", lambda t: t[0, 0, 0]),
    shape("norm_weight", lambda t: t[:6]),
    shape("norm_bias", lambda t: t[:6]),
    shape("bn_weight", lambda t: t[:6]),
    shape("bn_bias", lambda t: t[None]),
    shape("alpha", lambda t: t.expand(3).clone()),
    shape("running_mean", lambda t: t[:6]),
    shape("mask", lambda t: t[:2]),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
    dtype("norm_weight", torch.float64),
    dtype("bn_bias", torch.int32),
    dtype("running_mean", torch.float64),
    bad("norm=batch", "norm", norm="batch"),
    bad("norm=none", "norm", norm="none"),
    bad("rms_with_norm_bias", "norm_bias", norm="rms"),
    bad("momentum>1", "momentum", momentum=2.0),
    bad("momentum<0", "momentum", momentum=-1e-3),
    bad("eps<0", "eps", eps=-1e-5),
    meta("norm_bias"),
    meta("mask"),
    expanded("running_var"),
    alias("running_var_is_running_mean", ("running_mean", "running_var"), running_var=lambda a: a["running_mean"]),
    alias("bn_bias_is_running_var", ("bn_bias", "running_var"), bn_bias=lambda a: a["running_var"]),
    variants=(("valid:rms", _prep_bn_rms),),
)


def _one_true(*shape):
    m = torch.zeros(*shape, dtype=torch.bool)
    m.view(-1)[0] = True
    return m


def _prep_bn_fwd():
    return pick(
        _bn_state(),
        "x",
        "norm_weight",
        "norm_bias",
        "bn_weight",
        "bn_bias",
        "alpha",
        "running_mean",
        "running_var",
        "lam",
        "training",
        "eps",
        "norm_eps",
        "norm",
        "mask",
    )


def _prep_bn_fwd_eval_repbn():
    # RepBN alone in eval: no Norm1 parameters
    return dict(_prep_bn_fwd(), norm_weight=None, norm_bias=None, norm="none", training=False, mask=None)


op(
    "prep_bn_forward",
    _prep_bn_fwd,
    rank("x", lambda t: t[0, 0, 0]),
    bad("layer_without_norm_weight", "norm_weight", norm_weight=None),
    shape("norm_weight", lambda t: t[:6]),
    shape("bn_weight", lambda t: t[:6]),
    shape("alpha", lambda t: t.expand(2).clone()),
    shape("running_var", lambda t: t[:6]),
    shape("mask", lambda t: t[..., :4]),
    dtype("x", torch.int32),
    dtype("x", torch.float8_e4m3fn),
    dtype("bn_weight", torch.complex64),
    dtype("running_mean", torch.int32),
    dtype("mask", torch.float32),
    bad("norm=batch", "norm", norm="batch"),
    bad("eps<0", "eps", eps=-1.0),
    bad("one_row_training", "x", x=lambda a: a["x"][:1, :1], mask=None),
    # "unmasked" names the mask well enough
    bad("one_kept_token", re.compile("mask"), mask=lambda a: _one_true(3, 5)),
    meta("norm_weight"),
    meta("norm_bias"),
    meta("mask"),
    variants=(("valid:eval_repbn", _prep_bn_fwd_eval_repbn),),
)


op(
    "prep_bn_backward",
    _bn_args(
        "dy",
        "x",
        "norm_weight",
        "bn_weight",
        "alpha",
        "row_mean",
        "row_rstd",
        "bn_mean",
        "bn_rstd",
        "lam",
        "training",
        "norm",
        "mask",
    ),
    shape("dy", lambda t: t[:2]),
    rank("x", lambda t: t[0, 0, 0], expected=("x", "dy")),
    shape("row_mean", lambda t: t[:14]),
    shape("row_rstd", lambda t: t[None]),
    shape("bn_mean", lambda t: t[:6]),
    shape("norm_weight", lambda t: t[:6]),
    bad("layer_without_norm_weight", "norm_weight", norm_weight=None),
    dtype("dy", torch.float64),
    dtype("x", torch.int32),
    dtype("bn_rstd", torch.float64),
    dtype("alpha", torch.complex64),
    bad("norm=batch", "norm", norm="batch"),
    meta("norm_weight"),
    meta("mask"),
)


op(
    "prep_bn_stats",
    _bn_args("x", "mask"),
    rank("x", lambda t: t[0, 0, 0]),
    shape("mask", lambda t: t[:, :3]),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
    dtype("x", torch.float8_e4m3fn),
    dtype("mask", torch.float32),
    meta("mask"),
)


op(
    "prep_bn_apply",
    _bn_args(
        "x",
        "norm_weight",
        "norm_bias",
        "bn_weight",
        "bn_bias",
        "alpha",
        "bn_mean",
        "bn_rstd",
        "lam",
        "norm_eps",
        "norm",
    ),
    rank("x", lambda t: t[0, 0, 0]),
    bad("layer_without_norm_weight", "norm_weight", norm_weight=None),
    bad("rms_with_norm_bias", "norm_bias", norm="rms"),
    shape("norm_bias", lambda t: t[:6]),
    shape("bn_bias", lambda t: t[:6]),
    shape("bn_mean", lambda t: t[:6]),
    shape("bn_rstd", lambda t: t[None]),
    shape("alpha", lambda t: t.expand(7).clone()),
    dtype("x", torch.int32),
    dtype("bn_mean", torch.float64),
    dtype("bn_rstd", torch.float16),
    dtype("bn_weight", torch.int32),
    bad("norm=batch", "norm", norm="batch"),
    meta("norm_weight"),
    meta("norm_bias"),
)


op(
    "prep_bn_backward_reduce",
    _bn_args("dy", "x", "row_mean", "row_rstd", "bn_mean", "bn_rstd", "norm", "mask"),
    shape("dy", lambda t: t[..., :6]),
    rank("x", lambda t: t[0, 0, 0], expected=("x", "dy")),
    shape("row_mean", lambda t: t[:14]),
    shape("row_rstd", lambda t: t[:14]),
    shape("bn_rstd", lambda t: t[:6]),
    shape("mask", lambda t: t[:1]),
    dtype("dy", torch.float16),
    dtype("x", torch.complex64),
    dtype("row_mean", torch.float64),
    dtype("mask", torch.int32),
    bad("norm=batch", "norm", norm="batch"),
    meta("mask"),
)


op(
    "prep_bn_backward_apply",
    _bn_args(
        "dy",
        "x",
        "norm_weight",
        "bn_weight",
        "alpha",
        "row_mean",
        "row_rstd",
        "bn_mean",
        "bn_rstd",
        "sums",
        "count",
        "lam",
        "training",
        "norm",
        "mask",
    ),
    shape("dy", lambda t: t[:, :4]),
    shape("sums", lambda t: t[:2]),
    shape("sums", lambda t: t[:, :6], tag="=channels"),
    shape("count", lambda t: t.expand(2).clone()),
    shape("bn_weight", lambda t: t[:6]),
    shape("row_rstd", lambda t: t[:14]),
    bad("layer_without_norm_weight", "norm_weight", norm_weight=None),
    dtype("x", torch.int32),
    dtype("sums", torch.float64),
    dtype("count", torch.int64),
    dtype("norm_weight", torch.complex64),
    bad("norm=batch", "norm", norm="batch"),
    meta("norm_weight"),
    meta("mask"),
)


def _bn_update():
    return dict(running_mean=rand(7), running_var=pos(7), mean=rand(7), var=pos(7), momentum=0.1)


def _var_overlaps_running_var(a):
    buf = pos(8)
    a["running_var"], a["var"] = buf[1:], buf[:-1]


op(
    "bn_update_running_stats",
    _bn_update,
    shape("mean", lambda t: t[:6]),
    shape("var", lambda t: t[None]),
    shape("running_mean", lambda t: t[:6]),
    dtype("mean", torch.complex64),
    dtype("var", torch.complex64),
    dtype("running_mean", torch.int32),
    dtype("running_var", torch.complex64),
    bad("momentum>1", "momentum", momentum=1.5),
    bad("momentum<0", "momentum", momentum=-0.5),
    expanded("running_mean"),
    expanded("running_var"),
    alias("running_var_is_running_mean", ("running_mean", "running_var"), running_var=lambda a: a["running_mean"]),
    alias("mean_is_running_mean", ("mean", "running_mean"), mean=lambda a: a["running_mean"]),
    alias("var_overlaps_running_var", ("var", "running_var"), _var_overlaps_running_var),
)


# ---- CATS ------------------------------------------------------------------------------------------


op(
    "cats",
    lambda: dict(x=rand(3, 5, 7), threshold=0.3),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
    dtype("x", torch.float8_e4m3fn),
    dtype("x", torch.bool),
    wrong_type("threshold", "0.3"),
    wrong_type("x", [1.0, 2.0]),
    variants=(
        ("valid:strided", lambda: dict(x=rand(7, 5, 3).permute(2, 1, 0), threshold=-1.0)),
        ("valid:empty", lambda: dict(x=rand(3, 0, 7), threshold=0.3)),
    ),
)


op(
    "cats_backward",
    lambda: dict(grad=rand(3, 5, 7), x=rand(3, 5, 7), threshold=0.3),
    shape("grad", lambda t: t[:, :4]),
    rank("grad", lambda t: t[0]),
    dtype("grad", torch.float64),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
)


def _cats_mlp():
    return dict(x=rand(3, 9), w_gate=rand(13, 9), w_up=rand(13, 9), w_down_t=rand(13, 9), threshold=0.2)


op(
    "cats_mlp",
    _cats_mlp,
    rank("x", lambda t: t[None]),
    bad("tokens=17", ("x", "tokens"), x=lambda a: rand(17, 9)),
    bad("tokens=0", ("x", "tokens"), x=lambda a: a["x"][:0]),
    shape("x", lambda t: t[:, :8], expected=("x", "w_gate")),
    shape("w_gate", lambda t: t[:, :8]),
    rank("w_gate", lambda t: t[0]),
    shape("w_up", lambda t: t[:12]),
    shape("w_down_t", lambda t: t[:, :8]),
    shape("w_down_t", lambda t: t.t(), tag="=transposed"),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
    dtype("w_up", torch.float64),
    dtype("w_down_t", torch.bfloat16),
    variants=(("valid:strided", lambda: dict(_cats_mlp(), w_down_t=swap_last(rand(13, 9)))),),
)


op(
    "token_select_index",
    lambda: dict(scores=rand(3, 11), keep=4),
    bad("keep=0", "keep", keep=0),
    bad("keep>tokens", "keep", keep=12),
    bad("keep<0", "keep", keep=-1),
    bad("keep=int64_max", "keep", keep=2**63 - 1),
    rank("scores", lambda t: t[None], tag="=3d"),
    rank("scores", lambda t: t[0], tag="=1d"),
    dtype("scores", torch.int32),
    dtype("scores", torch.complex64),
    dtype("scores", torch.bool),
    wrong_type("keep", 2.5),
)


def _tokens():
    return dict(
        x=rand(3, 11, 5), y=rand(3, 4, 5), index=torch.stack([torch.randperm(11)[:4].sort().values for _ in range(3)])
    )


def _bad_index(name, fn):
    return bad(name, "index", index=lambda a: fn(a["index"]))


op(
    "token_gather",
    lambda: pick(_tokens(), "x", "index"),
    rank("x", lambda t: t[0]),
    _bad_index("index_too_big", lambda i: i.index_fill(1, torch.tensor([3]), 11)),
    _bad_index("index_negative", lambda i: i.index_fill(1, torch.tensor([0]), -1)),
    _bad_index("index_int64_max", lambda i: i.index_fill(1, torch.tensor([0]), 2**63 - 1)),
    rank("index", lambda t: t[0]),
    shape("index", lambda t: t[:2], tag="=batch"),
    dtype("index", torch.int32),
    dtype("index", torch.float32),
)


op(
    "token_scatter",
    _tokens,
    rank("x", lambda t: t[0]),
    shape("y", lambda t: t[:, :3], tag="=keep"),
    shape("y", lambda t: t[..., :4], tag="=channels"),
    rank("y", lambda t: t[0]),
    _bad_index("index_too_big", lambda i: i.index_fill(1, torch.tensor([2]), 11)),
    _bad_index("index_negative", lambda i: i.index_fill(1, torch.tensor([1]), -5)),
    shape("index", lambda t: t[:1], tag="=batch"),
    dtype("y", torch.float64),
    dtype("index", torch.int32),
)


# ---- W4A8 --------------------------------------------------------------------------------------------


def _uint8(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def _scale_is_one(out) -> Optional[str]:
    # SPEC 4: a zero row (here: an empty one) gets scale 1
    scale = out[1]
    if scale.shape == (5,) and torch.equal(scale, torch.ones(5)):
        return None
    return f"expected scales of shape (5,) all 1 for rows without elements, got {scale}"


op(
    "quantize_fp8",
    lambda: dict(x=rand(5, 33)),
    rank("x", lambda t: t[0, 0]),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
    dtype("x", torch.float8_e4m3fn),
    dtype("x", torch.uint8),
    variants=(
        ("valid:strided", lambda: dict(x=swap_last(rand(5, 33)))),
        ("valid:empty_rows", lambda: dict(x=rand(5, 0)), _scale_is_one),
    ),
)


op(
    "w4a8_tile_weights",
    lambda: dict(packed=_uint8(13, 16)),
    rank("packed", lambda t: t[0], tag="=1d"),
    rank("packed", lambda t: t[None], tag="=3d"),
    dtype("packed", torch.int8),
    dtype("packed", torch.float32),
    dtype("packed", torch.int32),
    bad("layout=rowmajor", "layout", layout="rowmajor"),
    bad("layout=panel", "layout", layout="panel"),
    bad("layout=unknown", "layout", layout="sm80"),
)


op(
    "w4a8_int4_to_e4m3",
    lambda: dict(packed=_uint8(3, 6)),
    shape("packed", lambda t: t[:, :5], tag="=odd"),
    rank("packed", lambda t: t[0, 0]),
    dtype("packed", torch.int8),
    dtype("packed", torch.float16),
)


def _w4a8_gemm():
    x_fp8, x_scale = torch.ops.slab.quantize_fp8(rand(3, 64))
    return dict(
        x_fp8=x_fp8,
        x_scale=x_scale,
        w_packed=_uint8(5, 32),
        w_scales=pos(5, 2),
        group_size=32,
        layout="rowmajor",
        out_dtype=torch.bfloat16,
    )


op(
    "w4a8_gemm",
    _w4a8_gemm,
    rank("x_fp8", lambda t: t[None]),
    shape("x_scale", lambda t: t[:2]),
    shape("w_packed", lambda t: t[:, :31]),
    shape("w_packed", lambda t: t[:4], tag="=rows"),
    shape("w_scales", lambda t: t[:, :1]),
    rank("w_scales", lambda t: t[0]),
    dtype("x_fp8", torch.float32),
    dtype("x_fp8", torch.uint8),
    dtype("x_scale", torch.float64),
    dtype("w_packed", torch.int8),
    dtype("w_scales", torch.bfloat16),
    bad("group_size=48", "group_size", group_size=48),
    bad("group_size=0", "group_size", group_size=0),
    bad("group_size>K", "group_size", group_size=128),
    bad("group_size=int64_max", "group_size", group_size=2**63 - 1),
    bad(
        "odd_K",
        ("x_fp8", "K"),
        x_fp8=lambda a: a["x_fp8"][:, :63],
        w_packed=lambda a: a["w_packed"][:, :31],
        w_scales=lambda a: a["w_scales"][:, :1],
        group_size=-1,
    ),
    bad("layout=colmajor", "layout", layout="colmajor"),
    bad("layout=tiled_on_cpu", ("layout", "w_packed"), layout="tiled"),
    bad("layout=sm90_on_cpu", ("layout", "w_packed"), layout="sm90"),
    bad("layout=panel_rowmajor_shape", ("w_packed", "panel"), layout="panel"),
    bad("out_dtype=int32", "out_dtype", out_dtype=torch.int32),
    bad("out_dtype=float64", "out_dtype", out_dtype=torch.float64),
    meta("x_scale"),
)


def _w4a8_linear():
    return dict(
        x=rand(3, 64), w_packed=_uint8(5, 32), w_scales=pos(5, 2), group_size=32, layout="rowmajor", bias=rand(5)
    )


op(
    "w4a8_linear",
    _w4a8_linear,
    rank("x", lambda t: t[None]),
    shape("x", lambda t: t[:, :62], expected=("x", "w_scales", "w_packed", "K")),
    shape("w_packed", lambda t: t[:, :16]),
    shape("w_scales", lambda t: t[:4]),
    shape("bias", lambda t: t[:4]),
    dtype("x", torch.int32),
    dtype("x", torch.complex64),
    dtype("x", torch.float8_e4m3fn),
    dtype("x", torch.float64),
    dtype("w_packed", torch.int8),
    dtype("w_scales", torch.float16),
    dtype("bias", torch.int32),
    bad("group_size=96", "group_size", group_size=96),
    bad("group_size=-2", "group_size", group_size=-2),
    bad("layout=Tiled", "layout", layout="Tiled"),
    meta("bias"),
    variants=(("valid:strided", lambda: dict(_w4a8_linear(), x=swap_last(rand(3, 64)), bias=None)),),
)


# ---- fused optimizer steps ----------------------------------------------------------------------------
# Lists of two tensors of different shapes, (5, 3) and (7,).


def plist(make=rand):
    return [make(5, 3), make(7)]


def _scalars():
    return dict(grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([0.0]))


def _noncontiguous_params(a):
    # non-contiguous in-place tensors go through a contiguous copy and are written back
    a["params"] = [swap_last(a["params"][0]), a["params"][1]]
    return a


def _optim_common(*names):
    """Cases every list-taking optimizer op shares: mismatched list lengths and shapes, mixed
    dtypes, integer tensors, an empty lead list, meta/GradScaler tensors."""
    lead = names[0]
    out = [
        bad(f"empty:{lead}", lead, **{lead: []}),
        bad(f"mixed_dtype:{lead}", lead, **{lead: lambda a: [a[lead][0], a[lead][1].double()]}),
        dtype(lead, torch.int32),
    ]
    for n in names[1:]:
        out += [
            bad(f"length:{n}", n, **{n: lambda a, n=n: a[n][:1]}),
            bad(f"shape:{n}[1]", n, **{n: lambda a, n=n: [a[n][0], a[n][1][:6]]}),
            dtype(n, torch.float64),
        ]
    return out


def _gradscaler_cases():
    return [
        shape("grad_scale", lambda t: t.expand(2).clone()),
        dtype("grad_scale", torch.float64),
        shape("found_inf", lambda t: t[:0]),
        dtype("found_inf", torch.int32),
        meta("grad_scale"),
        meta("found_inf"),
    ]


def _sq_norm():
    return dict(tensors=plist(), others=plist(), weight_decay=0.1, grad_scale=torch.tensor([2.0]))


op(
    "multi_tensor_sq_norm",
    _sq_norm,
    bad("empty:tensors", "tensors", tensors=[]),
    bad("mixed_dtype:tensors", "tensors", tensors=lambda a: [a["tensors"][0], a["tensors"][1].half()]),
    dtype("tensors", torch.int32),
    dtype("tensors", torch.complex64),
    bad("length:others", "others", others=lambda a: a["others"][:1]),
    bad("shape:others[1]", "others", others=lambda a: [a["others"][0], a["others"][1][:6]]),
    dtype("others", torch.float64),
    bad("weight_decay_without_others", ("others", "weight_decay"), others=None),
    bad("sparse:tensors", "tensors", tensors=lambda a: [a["tensors"][0], a["tensors"][1].to_sparse()]),
    shape("grad_scale", lambda t: t.expand(3).clone()),
    dtype("grad_scale", torch.float16),
    meta("others"),
    meta("grad_scale"),
    variants=(("valid:strided", lambda: dict(_sq_norm(), tensors=[swap_last(rand(5, 3)), rand(7)])),),
)


def _dog():
    params = plist()
    return dict(
        params=params,
        grads=plist(),
        x0=[p + 0.1 for p in params],
        eta=pos(2) * 0.1,
        dist2=[torch.zeros(1), torch.zeros(1)],
        weight_decay=0.01,
        maximize=False,
        **_scalars(),
    )


op(
    "dog_update_",
    _dog,
    *_optim_common("params", "grads", "x0"),
    bad("length:dist2", "dist2", dist2=lambda a: a["dist2"][:1]),
    shape("dist2", lambda d: [d[0], torch.zeros(2)]),
    dtype("dist2", torch.float64),
    shape("eta", lambda t: t[:1]),
    dtype("eta", torch.float64),
    bad("weight_decay<0", "weight_decay", weight_decay=-0.1),
    bad("sparse:grads", "grads", grads=lambda a: [a["grads"][0], a["grads"][1].to_sparse()]),
    *_gradscaler_cases(),
    expanded("params"),
    alias("params_overlap", ("params",), params=lambda a: [a["params"][0], a["params"][0].view(-1)[3:10]]),
    alias("grads_is_params", ("grads", "params"), grads=lambda a: [a["params"][0], a["grads"][1]]),
    alias("x0_is_params", ("x0", "params"), x0=lambda a: [a["x0"][0], a["params"][1]]),
    alias("dist2_twice", ("dist2",), dist2=lambda a: [a["dist2"][0], a["dist2"][0]]),
    alias("dist2_in_eta", ("dist2", "eta"), dist2=lambda a: [a["eta"][:1], a["dist2"][1]]),
    variants=(("valid:strided", lambda: _noncontiguous_params(_dog())),),
)


def _lion():
    return dict(
        params=plist(),
        grads=plist(),
        exp_avgs=plist(),
        lr=torch.tensor([1e-3]),
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.01,
        maximize=False,
        **_scalars(),
    )


op(
    "lion_update_",
    _lion,
    *_optim_common("params", "grads", "exp_avgs"),
    shape("lr", lambda t: t.expand(2).clone()),
    dtype("lr", torch.float64),
    bad("beta1=1", "beta1", beta1=1.0),
    bad("beta2<0", "beta2", beta2=-0.1),
    bad("weight_decay<0", "weight_decay", weight_decay=-1.0),
    *_gradscaler_cases(),
    expanded("exp_avgs"),
    alias("params_overlap", ("params",), params=lambda a: [a["params"][0], a["params"][0].view(-1)[5:12]]),
    alias("exp_avgs_is_params", ("exp_avgs", "params"), exp_avgs=lambda a: [a["exp_avgs"][0], a["params"][1]]),
    alias("grads_is_exp_avgs", ("grads", "exp_avgs"), grads=lambda a: [a["exp_avgs"][0], a["grads"][1]]),
    variants=(("valid:strided", lambda: _noncontiguous_params(_lion())),),
)


op(
    "multi_tensor_lerp_",
    lambda: dict(avg=plist(), x=plist(), weight=0.25),
    *_optim_common("avg", "x"),
    bad("weight>1", "weight", weight=1.5),
    bad("weight<0", "weight", weight=-0.25),
    expanded("avg", index=1),
    alias("avg_overlap", ("avg",), avg=lambda a: [a["avg"][0], a["avg"][0].view(-1)[:7]]),
    alias("x_is_avg", ("x", "avg"), x=lambda a: [a["x"][0], a["avg"][1]]),
    alias("x_shifted_into_avg", ("x", "avg"), x=lambda a: [a["x"][0], a["avg"][0].view(-1)[1:8]]),
    variants=(
        (
            "valid:strided",
            lambda: dict(avg=[swap_last(rand(5, 3)), rand(7)], x=[rand(5, 3), rand(14)[::2]], weight=1.0),
        ),
    ),
)


def _bias_corr():
    # one row [1 / (1 - beta1^t), 1 / sqrt(1 - beta2^t)] per tensor of plist() (t = 1)
    return torch.tensor([[1 / (1 - 0.9), 1 / (1 - 0.999) ** 0.5]] * 2)


def _lamb1():
    return dict(
        params=plist(),
        grads=plist(),
        exp_avgs=plist(),
        exp_avg_sqs=plist(pos),
        bias_corr=_bias_corr(),
        beta1=0.9,
        beta2=0.999,
        eps=1e-6,
        weight_decay=0.01,
        maximize=False,
        **_scalars(),
    )


def _lamb_common():
    return [
        shape("bias_corr", lambda t: t[:1]),
        dtype("bias_corr", torch.float64),
        bad("beta1=1", "beta1", beta1=1.0),
        bad("beta2<0", "beta2", beta2=-0.5),
        bad("eps<0", "eps", eps=-1e-6),
        bad("weight_decay<0", "weight_decay", weight_decay=-0.01),
    ]


op(
    "lamb_stage1_",
    _lamb1,
    *_optim_common("params", "grads", "exp_avgs", "exp_avg_sqs"),
    *_lamb_common(),
    *_gradscaler_cases(),
    expanded("exp_avg_sqs"),
    alias(
        "exp_avg_sqs_is_exp_avgs",
        ("exp_avgs", "exp_avg_sqs"),
        exp_avg_sqs=lambda a: [a["exp_avgs"][0], a["exp_avg_sqs"][1]],
    ),
    alias("grads_is_exp_avgs", ("grads", "exp_avgs"), grads=lambda a: [a["grads"][0], a["exp_avgs"][1]]),
    alias("params_in_exp_avg_sqs", ("params", "exp_avg_sqs"), params=lambda a: [a["exp_avg_sqs"][0], a["params"][1]]),
    variants=(("valid:strided", lambda: dict(_lamb1(), exp_avgs=[swap_last(rand(5, 3)), rand(7)])),),
)


def _lamb2():
    a = _lamb1()
    return dict(
        pick(a, "params", "exp_avgs", "exp_avg_sqs", "bias_corr", "beta1", "beta2", "eps", "weight_decay", "found_inf"),
        lr=torch.tensor([1e-3, 2e-3]),
    )


op(
    "lamb_stage2_",
    _lamb2,
    *_optim_common("params", "exp_avgs", "exp_avg_sqs"),
    *_lamb_common(),
    shape("lr", lambda t: t[:1]),
    dtype("lr", torch.float64),
    shape("found_inf", lambda t: t.expand(2).clone()),
    meta("found_inf"),
    expanded("params"),
    alias("params_overlap", ("params",), params=lambda a: [a["params"][0], a["params"][0].view(-1)[8:15]]),
    alias("exp_avgs_is_params", ("exp_avgs", "params"), exp_avgs=lambda a: [a["params"][0], a["exp_avgs"][1]]),
    variants=(("valid:strided", lambda: _noncontiguous_params(_lamb2())),),
)


def _momentum():
    return dict(
        params=plist(),
        grads=plist(),
        momentum_buffers=plist(),
        scale=pos(2),
        lr=torch.tensor([0.1]),
        momentum=0.9,
        weight_decay=1e-4,
        maximize=False,
        **_scalars(),
    )


op(
    "momentum_update_",
    _momentum,
    *_optim_common("params", "grads", "momentum_buffers"),
    shape("scale", lambda t: t[:1]),
    dtype("scale", torch.float64),
    shape("lr", lambda t: t.expand(2).clone()),
    bad("momentum=1", "momentum", momentum=1.0),
    bad("momentum<0", "momentum", momentum=-0.9),
    bad("weight_decay<0", "weight_decay", weight_decay=-1e-4),
    *_gradscaler_cases(),
    expanded("momentum_buffers"),
    alias("params_overlap", ("params",), params=lambda a: [a["params"][0], a["params"][0].view(-1)[2:9]]),
    alias(
        "momentum_buffers_is_params",
        ("momentum_buffers", "params"),
        momentum_buffers=lambda a: [a["params"][0], a["momentum_buffers"][1]],
    ),
    alias(
        "grads_is_momentum_buffers",
        ("grads", "momentum_buffers"),
        grads=lambda a: [a["grads"][0], a["momentum_buffers"][1]],
    ),
    variants=(("valid:strided", lambda: _noncontiguous_params(_momentum())),),
)


def _adamp1():
    return dict(
        params=plist(),
        grads=plist(),
        exp_avgs=plist(),
        exp_avg_sqs=plist(pos),
        bias_corr=_bias_corr(),
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        nesterov=True,
        maximize=False,
        **_scalars(),
    )


op(
    "adamp_stage1_",
    _adamp1,
    *_optim_common("params", "grads", "exp_avgs", "exp_avg_sqs"),
    shape("bias_corr", lambda t: t.reshape(-1)),
    dtype("bias_corr", torch.float16),
    bad("beta1<0", "beta1", beta1=-0.9),
    bad("beta2=1", "beta2", beta2=1.0),
    bad("eps<0", "eps", eps=-1e-8),
    *_gradscaler_cases(),
    expanded("exp_avgs"),
    alias(
        "exp_avgs_is_exp_avg_sqs",
        ("exp_avgs", "exp_avg_sqs"),
        exp_avgs=lambda a: [a["exp_avgs"][0], a["exp_avg_sqs"][1]],
    ),
    alias("grads_in_exp_avg_sqs", ("grads", "exp_avg_sqs"), grads=lambda a: [a["exp_avg_sqs"][0], a["grads"][1]]),
    variants=(("valid:strided", lambda: dict(_adamp1(), exp_avg_sqs=[swap_last(pos(5, 3)), pos(7)])),),
)


def _adamp2():
    # rows of AdamP's channel view: 5 for the (5, 3) tensor, 1 for the vector
    return dict(_adamp1(), coef=rand(6), decay=pos(2) * 1e-3, lr=torch.tensor([1e-3]))


op(
    "adamp_stage2_",
    _adamp2,
    *_optim_common("params", "grads", "exp_avgs", "exp_avg_sqs"),
    shape("coef", lambda t: t[:5]),
    shape("decay", lambda t: t[:1]),
    shape("lr", lambda t: t.expand(2).clone()),
    dtype("coef", torch.float64),
    dtype("decay", torch.int32),
    dtype("lr", torch.float16),
    bad("beta1=1", "beta1", beta1=1.0),
    bad("eps<0", "eps", eps=-1.0),
    *_gradscaler_cases(),
    expanded("params"),
    alias("params_overlap", ("params",), params=lambda a: [a["params"][0], a["params"][0].view(-1)[1:8]]),
    alias("grads_is_params", ("grads", "params"), grads=lambda a: [a["params"][0], a["grads"][1]]),
    alias("coef_in_params", ("coef", "params"), coef=lambda a: a["params"][1][:6]),
    variants=(("valid:strided", lambda: _noncontiguous_params(_adamp2())),),
)


# ---- cases derived from the schema --------------------------------------------------------------------


def schema_cases(op_name: str) -> list[Bad]:
    """For every op: None for each required tensor, one tensor of each required tensor (list)
    argument on the meta device, NaN and inf for each float hyperparameter."""
    args = schema(op_name).arguments
    # a meta tensor is a device mix only next to another tensor (one list holds two)
    tensor_args = [a for a in args if "Tensor" in str(a.type)]
    mixable = len(tensor_args) > 1 or any("List" in str(a.type) for a in tensor_args)
    out = []
    for a in args:
        t = a.type
        if isinstance(t, torch.TensorType):
            out += [none(a.name)] + ([meta(a.name)] if mixable else [])
        elif isinstance(t, torch.ListType) and isinstance(t.getElementType(), torch.TensorType):
            out.append(meta(a.name))
        elif isinstance(t, torch.FloatType):
            out += [
                bad(f"nan:{a.name}", a.name, **{a.name: float("nan")}),
                bad(f"inf:{a.name}", a.name, **{a.name: float("inf")}),
            ]
    return out


def _derived(valid: Callable[[], dict], edits: tuple) -> Callable[[], dict]:
    def build():
        a = valid()
        for edit in edits:
            edit(a)
        return a

    return build


def all_cases() -> list[Case]:
    """Every case of every op in the table that the dispatcher knows (ops it does not know are
    reported by the table test instead)."""
    known = set(registered_ops())
    cases = []
    for name, entry in TABLE.items():
        if name not in known:
            continue
        for tag, build, check in entry.valid:
            cases.append(Case(name, tag, build, check=check))
        base = entry.valid[0][1]
        explicit = {b.name for b in entry.bad}
        derived = [b for b in schema_cases(name) if b.name not in explicit]
        for b in entry.bad + derived:
            cases.append(Case(name, b.name, _derived(base, b.edits), b.match, b.type_error))
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return cases


# ---- further families, in files of their own -------------------------------------------------------

from . import convbn_cases  # noqa: E402,F401  (registers its ops into TABLE)
