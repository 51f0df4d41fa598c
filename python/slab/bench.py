"""``slab-bench``: check every implemented op against its reference, then time it.

On the current device (``cuda`` when a GPU is present and slab's CUDA kernels are built, else
``cpu``; ``--device`` chooses), every registered entry first runs its correctness check -- the op
on float32/bfloat16/float16 inputs against the plain-PyTorch reference (:mod:`slab.reference`) run
in float64 on the same (rounded) inputs, outputs, every gradient and in-place state compared with a
per-dtype tolerance -- and prints PASS/FAIL per op. Then it prints one speed table: slab against
the eager reference composite, ``torch.compile`` of that composite and the best known library
(plain ``nn.LayerNorm`` for the norms), with achieved bandwidth against the machine's measured copy
bandwidth. The exit status is 1 when any check fails (2 when the op library cannot be used).

Kernel families add rows by registering an :class:`Entry` (name, check function, bench function)
with :func:`register`; see the PRepBN entries at the end of this file.

The full benchmarks with more shapes, dtypes and flags live in ``bench/`` of the source tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

from slab import _bench

__all__ = ["CheckResult", "BenchContext", "Entry", "register", "REGISTRY", "main"]


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckResult:
    """One correctness comparison: ``case`` of op ``op`` in ``dtype``; ``detail`` says the worst error."""

    op: str
    case: str
    dtype: str
    ok: bool
    detail: str


@dataclasses.dataclass
class BenchContext:
    """What a bench function gets: where and how much to measure."""

    device: torch.device
    dtypes: list[torch.dtype]
    quick: bool
    compile: bool
    budget_s: float
    copy_bw: float  # measured copy bandwidth of the device, bytes/s (read + write)

    def time(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of ``fn`` (see :func:`slab._bench.time_fn`)."""
        return _bench.time_fn(fn, self.device, warmup=3, min_reps=5 if self.quick else 10,
                              budget_s=self.budget_s).median_ms

    def time_many(self, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
        """Median milliseconds of several providers, timed interleaved (:func:`slab._bench.time_fns`),
        so a busy moment of a shared machine does not land on one provider only."""
        timings = _bench.time_fns(fns, self.device, warmup=3, min_reps=5 if self.quick else 10,
                                  budget_s=self.budget_s)
        return {k: v.median_ms for k, v in timings.items()}


@dataclasses.dataclass
class Entry:
    """A row group of slab-bench.

    ``check(device) -> list[CheckResult]``: correctness against the reference on ``device``.
    ``bench(ctx) -> list[dict]``: speed rows with keys of :data:`SPEED_COLUMNS` (missing keys print "-").
    """

    name: str
    description: str
    check: Callable[[torch.device], list[CheckResult]]
    bench: Optional[Callable[[BenchContext], list[dict]]] = None


REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in REGISTRY:
        raise ValueError(f"slab-bench: entry {entry.name!r} registered twice")
    REGISTRY[entry.name] = entry
    return entry


SPEED_COLUMNS = [
    _bench.Column("op", align="<"),
    _bench.Column("pass", align="<"),
    _bench.Column("shape", align="<"),
    _bench.Column("dtype", align="<"),
    _bench.Column("slab_ms", "slab ms", ".3f"),
    _bench.Column("eager_ms", "eager ms", ".3f"),
    _bench.Column("compile_ms", "compile ms", ".3f"),
    _bench.Column("library_ms", "library ms", ".3f"),
    _bench.Column("vs_eager", "x eager", ".2f"),
    _bench.Column("vs_compile", "x compile", ".2f"),
    _bench.Column("gbps", "GB/s", ".1f"),
    _bench.Column("frac_bw", "of copy BW", ".0%"),
    _bench.Column("x_floor", "x floor", ".2f"),
]


def speed_row(ctx: BenchContext, *, op: str, pass_: str, shape: Sequence[int], dtype: torch.dtype,
              times: dict[str, Optional[float]], bytes_moved: float, bytes_floor: float) -> dict:
    """Fills a row of :data:`SPEED_COLUMNS` from provider times (ms; keys slab, eager, compile,
    library) and the byte counts of slab's algorithm (``bytes_moved``) and of the absolute floor
    (``bytes_floor``: every input read once, every output written once)."""
    t = times.get("slab")
    row = {
        "op": op, "pass": pass_, "shape": "x".join(map(str, shape)), "dtype": _bench.dtype_name(dtype),
        "slab_ms": t, "eager_ms": times.get("eager"), "compile_ms": times.get("compile"),
        "library_ms": times.get("library"),
        "bytes_moved": bytes_moved, "bytes_floor": bytes_floor, "copy_gbps": ctx.copy_bw / 1e9,
        "device": str(ctx.device),
    }
    if t:
        if times.get("eager"):
            row["vs_eager"] = times["eager"] / t
        if times.get("compile"):
            row["vs_compile"] = times["compile"] / t
        row["gbps"] = bytes_moved / (t * 1e-3) / 1e9
        row["frac_bw"] = row["gbps"] * 1e9 / ctx.copy_bw
        row["x_floor"] = t / (bytes_floor / ctx.copy_bw * 1e3)
    return row


# ----------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------
# (atol, rtol) of a result in `dtype` against the float64 reference on the same rounded inputs;
# atol is relative to max(1, max |ref|) so gradients of any scale are judged alike.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (4e-3, 1.6e-2),  # about 1 ulp of the largest value, 2 ulp of each value
    torch.float16: (5e-4, 2e-3),
    torch.float64: (1e-9, 1e-9),
}


def compare(got: Optional[torch.Tensor], ref: Optional[torch.Tensor], dtype: torch.dtype) -> tuple[bool, str]:
    """``got`` (any dtype/device) against ``ref`` in float64; returns (ok, worst-error text)."""
    if got is None or ref is None:
        return (got is None) == (ref is None), "" if (got is None) == (ref is None) else "one side is None"
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return False, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    nonfinite = int((~torch.isfinite(got)).sum())
    if nonfinite:
        return False, f"{nonfinite} non-finite value(s)"
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = (got - ref).abs()
    bound = atol * scale + rtol * ref.abs()
    if err.numel() == 0:
        return True, "empty"
    excess = err - bound
    i = int(excess.argmax())
    nbad = int((excess > 0).sum())
    where = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
    used = float((err / bound).max())
    detail = f"max err {float(err.max()):.2e} ({100 * used:.0f}% of tol)"
    if nbad:
        detail += (f"; {nbad}/{err.numel()} beyond tol, worst at {where}: got {float(got.flatten()[i]):.6g}, "
                   f"expected {float(ref.flatten()[i]):.6g}")
    return nbad == 0, detail


# ----------------------------------------------------------------------------------------------
# PRepBN family (SPEC section 1)
# ----------------------------------------------------------------------------------------------
_CHECK_SHAPE = (3, 37, 67)  # odd token count and channel count
_CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _prepbn_check_case(device: torch.device, dtype: torch.dtype, *, norm: str, training: bool,
                       masked: bool, lam: float = 0.3, seed: int = 0) -> list[tuple[str, bool, str]]:
    """Runs rep_bn (norm="none") or prep_bn once against slab.reference in float64; returns
    (quantity, ok, detail) for the output, every gradient and the running statistics."""
    import slab.ops
    import slab.reference as ref

    g = torch.Generator().manual_seed(seed)
    shape = _CHECK_SHAPE
    c = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift

    x = (rnd(*shape, scale=2.0, shift=0.5)).to(dtype).to(device)
    dy = rnd(*shape).to(dtype).to(device)
    p32 = {
        "norm_weight": rnd(c, scale=0.2, shift=1.0), "norm_bias": rnd(c, scale=0.2),
        "bn_weight": rnd(c, scale=0.2, shift=1.0), "bn_bias": rnd(c, scale=0.2),
        "alpha": torch.tensor([0.7], dtype=torch.float64),
    }
    if norm == "rms":
        p32["norm_bias"] = None
    if norm == "none":
        p32["norm_weight"] = p32["norm_bias"] = None
    running = {"running_mean": rnd(c, scale=0.1), "running_var": rnd(c, scale=0.1).abs() + 0.8}
    mask = None
    if masked:
        mask = torch.rand(shape[:-1], generator=g) > 0.3
        mask.view(-1)[:2] = True
        mask = mask.to(device)

    def run(xx, dyy, params, stats, impl):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items() if v is not None}
        xl = xx.detach().clone().requires_grad_()
        if norm == "none":
            y = impl.rep_bn(xl, leaves["bn_weight"], leaves["bn_bias"], leaves["alpha"],
                            stats["running_mean"], stats["running_var"], training, 0.1, 1e-5, mask)
        else:
            y = impl.prep_bn(xl, leaves["norm_weight"], leaves.get("norm_bias"), leaves["bn_weight"],
                             leaves["bn_bias"], leaves["alpha"], stats["running_mean"], stats["running_var"],
                             lam, training, 0.1, 1e-5, 1e-6, norm, mask)
        names = ["x"] + list(leaves)
        grads = torch.autograd.grad(y, [xl] + list(leaves.values()), dyy)
        return y, dict(zip(names, grads)), stats

    ours = run(x, dy, {k: (v.to(device, torch.float32) if v is not None else None) for k, v in p32.items()},
               {k: v.to(device, torch.float32) for k, v in running.items()}, slab.ops)
    theirs = run(x.double(), dy.double(), {k: (v.to(device) if v is not None else None) for k, v in p32.items()},
                 {k: v.to(device) for k, v in running.items()}, ref)

    out = [("y", *compare(ours[0], theirs[0], dtype))]
    if ours[0].dtype != dtype:
        out.append(("y.dtype", False, f"output dtype {ours[0].dtype}, expected {dtype}"))
    for k in theirs[1]:
        # parameters are float32 on our side: their gradients are judged at the input's tolerance
        out.append((f"d{k}", *compare(ours[1].get(k), theirs[1][k], dtype)))
    if training:
        for k in ("running_mean", "running_var"):
            out.append((k, *compare(ours[2][k], theirs[2][k], torch.float32 if dtype != torch.float64 else dtype)))
    return out


def _prepbn_checks(op: str, cases: Sequence[tuple[str, dict]]) -> Callable[[torch.device], list[CheckResult]]:
    def check(device: torch.device) -> list[CheckResult]:
        results = []
        for case, kw in cases:
            for dtype in _CHECK_DTYPES:
                name = _bench.dtype_name(dtype)
                try:
                    parts = _prepbn_check_case(device, dtype, **kw)
                except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported
                    results.append(CheckResult(op, case, name, False, f"raised {type(exc).__name__}: {exc}"))
                    continue
                bad = [f"{q}: {d}" for q, ok, d in parts if not ok]
                if bad:
                    results.append(CheckResult(op, case, name, False, "; ".join(bad)))
                else:
                    worst = max(parts, key=lambda p: _err_of(p[2]))
                    results.append(CheckResult(op, case, name, True, f"{len(parts)} tensors, worst {worst[0]} {worst[2]}"))
        return results

    return check


def _err_of(detail: str) -> float:
    """The share of the tolerance used, parsed back from :func:`compare`'s detail text."""
    try:
        return float(detail.split("(")[1].split("% of tol")[0])
    except (IndexError, ValueError):
        return 0.0


# ---- speed ------------------------------------------------------------------------------------
_BENCH_SHAPES = [(64, 196, 384), (8, 512, 1024)]  # DeiT-S tokens, an LM batch
_QUICK_SHAPES = [(16, 196, 384)]


def _prepbn_bytes(shape: Sequence[int], dtype: torch.dtype) -> tuple[float, float]:
    """(bytes slab's training fwd+bwd moves, absolute floor). Forward reads x twice (statistics,
    then output) and writes y; backward reads x and dy twice (reduction, then dx) and writes dx:
    8 tensor passes. Floor: forward reads x and writes y, backward reads x, dy and writes dx: 5."""
    n = 1
    for s in shape:
        n *= s
    e = torch.empty((), dtype=dtype).element_size()
    return 8.0 * n * e, 5.0 * n * e


def _train_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
                dy: torch.Tensor) -> Callable[[], Any]:
    """One training forward + backward; torch.autograd.grad returns the gradients without
    accumulating them into .grad (no extra pass over dx)."""
    inputs = [x, *params]

    def step():
        y = forward(x)
        return torch.autograd.grad(y, inputs, dy)

    return step


def _prepbn_bench(kind: str) -> Callable[[BenchContext], list[dict]]:
    def bench(ctx: BenchContext) -> list[dict]:
        import slab.nn
        import slab.reference as ref

        rows = []
        for shape in (_QUICK_SHAPES if ctx.quick else _BENCH_SHAPES):
            for dtype in ctx.dtypes:
                c = shape[-1]
                torch.manual_seed(0)
                x = torch.randn(shape, device=ctx.device).to(dtype).requires_grad_()
                dy = torch.randn(shape, device=ctx.device).to(dtype)
                if kind == "prep_bn":
                    ours = slab.nn.PRepBN(c, step=300000)
                    ours.iter.fill_(150000)  # lam = 0.5: both branches live
                    eager = ref.SlabLinearNorm(c, step=300000)
                else:
                    ours = slab.nn.RepBN(c)
                    eager = ref.SlabRepBN(c)
                ours.to(ctx.device).train()
                eager.load_state_dict(ours.state_dict())  # SLAB-compatible keys
                eager.to(ctx.device).train()
                fns: dict[str, Callable[[], Any]] = {
                    "slab": _train_step(ours, x, list(ours.parameters()), dy),
                    "eager": _train_step(eager, x, list(eager.parameters()), dy),
                }
                if ctx.compile:
                    comp = ref.SlabLinearNorm(c) if kind == "prep_bn" else ref.SlabRepBN(c)
                    comp.load_state_dict(eager.state_dict())
                    comp.to(ctx.device).train()
                    if kind == "prep_bn":
                        n1, n2 = comp.norm1, comp.norm2

                        def mixed(t, n1=n1, n2=n2):  # SLAB's training branch, lam fixed
                            return 0.5 * n1(t) + 0.5 * n2(t)

                        fn = torch.compile(mixed, fullgraph=True, dynamic=False)
                    else:
                        fn = torch.compile(comp, fullgraph=True, dynamic=False)
                    fns["compile"] = _train_step(fn, x, list(comp.parameters()), dy)
                ln = torch.nn.LayerNorm(c, eps=1e-6).to(ctx.device)
                fns["library"] = _train_step(ln, x, list(ln.parameters()), dy)
                times: dict[str, Optional[float]] = dict(ctx.time_many(fns))
                moved, floor = _prepbn_bytes(shape, dtype)
                rows.append(speed_row(ctx, op=kind, pass_="train fwd+bwd", shape=shape, dtype=dtype,
                                      times=times, bytes_moved=moved, bytes_floor=floor))
        return rows

    return bench


register(Entry(
    "rep_bn", "RepBN: BatchNorm over the last dim + alpha * x (SLAB)",
    _prepbn_checks("rep_bn", [
        ("train", dict(norm="none", training=True, masked=False)),
        ("train+mask", dict(norm="none", training=True, masked=True)),
        ("eval", dict(norm="none", training=False, masked=False)),
    ]),
    _prepbn_bench("rep_bn"),
))
register(Entry(
    "prep_bn", "PRepBN: lam * LayerNorm/RMSNorm + (1 - lam) * RepBN (SLAB)",
    _prepbn_checks("prep_bn", [
        ("layer train", dict(norm="layer", training=True, masked=False)),
        ("layer train+mask", dict(norm="layer", training=True, masked=True)),
        ("layer eval", dict(norm="layer", training=False, masked=False)),
        ("rms train+mask", dict(norm="rms", training=True, masked=True)),
    ]),
    _prepbn_bench("prep_bn"),
))


# ---- CATS: sparse gated-MLP decode ------------------------------------------------------------


def _cats_mlp_reference(x, w_gate, w_up, w_down_t, threshold):
    s = torch.nn.functional.silu(x @ w_gate.T)
    return (torch.where(s.abs() > threshold, s, torch.zeros_like(s)) * (x @ w_up.T)) @ w_down_t


def _cats_mlp_inputs(device, dtype, tokens, d, f, sparsity):
    gen = torch.Generator().manual_seed(tokens * 1000 + d)
    x, wg, wu, wd = (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
                     for shape in ((tokens, d), (f, d), (f, d), (f, d)))
    # The threshold lies midway between two activations, so float32 and float64 agree on every keep decision.
    s = torch.nn.functional.silu(x @ wg.T).abs().flatten().sort().values
    k = int(sparsity * s.numel())
    threshold = float(s[k - 1] + s[k]) / 2 if k > 0 else 0.0
    return [t.to(device, dtype) for t in (x, wg, wu, wd)], threshold


def _cats_mlp_check(device: torch.device) -> list[CheckResult]:
    import slab.ops
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1, 4, 16):
            args, t = _cats_mlp_inputs(device, dtype, tokens, 96, 257, 0.5)
            ok, detail = compare(slab.ops.cats_mlp(*args, t), _cats_mlp_reference(*(a.double() for a in args), t), dtype)
            results.append(CheckResult("cats_mlp", f"{tokens} tokens, 50% sparse", _bench.dtype_name(dtype), ok, detail))
    return results


def _cats_mlp_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    rows = []
    d, f = (1024, 2816) if ctx.quick else (4096, 11008)
    for dtype in ctx.dtypes:
        for sparsity in (0.5, 0.9):
            args, t = _cats_mlp_inputs(ctx.device, dtype, 1, d, f, sparsity)
            x, wg, wu, wd_t = args
            wd = wd_t.T.contiguous()
            times = ctx.time_many({
                "slab": lambda: slab.ops.cats_mlp(x, wg, wu, wd_t, t),
                "library": lambda: (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T,  # dense MLP
            })
            weight_bytes = 3 * f * d * torch.finfo(dtype).bits // 8
            kept_bytes = weight_bytes * (1 + 2 * (1 - sparsity)) / 3  # gate dense, up/down kept rows only
            rows.append(speed_row(ctx, op=f"cats_mlp s={sparsity}", pass_="decode M=1", shape=(1, d, f),
                                  dtype=dtype, times=times, bytes_moved=kept_bytes, bytes_floor=kept_bytes))
    return rows


register(Entry("cats_mlp", "CATS sparse gated MLP for decoding (library column: the dense MLP)",
               _cats_mlp_check, _cats_mlp_bench))


# ---- SLA: simplified linear attention ---------------------------------------------------------


def _sla_reference(q, k, v, causal, eps=1e-6):
    """SLAB's formula, quadratic form (causal: the lower-triangular scores)."""
    q, k = torch.relu(q), torch.relu(k)
    scores = q @ k.transpose(-1, -2)
    if causal:
        scores = torch.tril(scores)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def _sla_check(device: torch.device) -> list[CheckResult]:
    import slab.ops
    results = []
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            q, k = (torch.randn(2, 3, 131, 32, generator=gen).to(device, dtype) for _ in range(2))
            v = torch.randn(2, 3, 131, 48, generator=gen).to(device, dtype)
            grad = torch.randn(2, 3, 131, 48, generator=gen).to(device, dtype)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
            out = slab.ops.sla(*leaves, causal=causal)
            expected = _sla_reference(*refs, causal)
            out.backward(grad)
            expected.backward(grad.double())
            case = f"{'causal' if causal else 'non-causal'} 2x3x131, D=32, Dv=48"
            for name, got, ref in [("o", out, expected)] + [(f"d{n}", a.grad, b.grad)
                                                             for n, a, b in zip("qkv", leaves, refs)]:
                ok, detail = compare(got, ref, dtype)
                results.append(CheckResult("sla", f"{case}: {name}", _bench.dtype_name(dtype), ok, detail))
    return results


def _sla_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    rows = []
    shapes = [(1, 4, 1024, 64)] if ctx.quick else [(4, 16, 1024, 64), (1, 16, 4096, 64)]
    compiled = torch.compile(_sla_reference) if ctx.compile else None
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for dtype in ctx.dtypes:
        for b, h, n, d in shapes:
            q, k, v, grad = (torch.randn(b, h, n, d, device=ctx.device, dtype=dtype) for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))

            def train(fn):
                return lambda: fn().backward(grad)

            providers = {
                "slab": train(lambda: slab.ops.sla(q, k, v, causal=True)),
                "eager": train(lambda: _sla_reference(q, k, v, True)),
                "library": train(lambda: sdpa(q, k, v, is_causal=True)),  # softmax attention
            }
            if compiled is not None:
                providers["compile"] = train(lambda: compiled(q, k, v, True))
            times = ctx.time_many(providers)
            elem = torch.finfo(dtype).bits // 8
            floor = elem * b * h * n * d * 8  # read q, k, v, do; write o, dq, dk, dv
            rows.append(speed_row(ctx, op="sla causal", pass_="fwd+bwd", shape=(b, h, n, d), dtype=dtype,
                                  times=times, bytes_moved=floor, bytes_floor=floor))
    return rows


register(Entry("sla", "SLA causal linear attention, forward+backward (library column: SDPA causal softmax attention)",
               _sla_check, _sla_bench))


# ---- INT4 x FP8 GEMM ---------------------------------------------------------------------------


def _w4a8_inputs(device, dtype, m, n, k, group_size):
    import slab.quant
    gen = torch.Generator().manual_seed(m * 7 + n)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    packed, scales = slab.quant.quantize_w4(w, group_size)
    return x, w.to(device, dtype), packed, scales, slab.quant.prepack_w4(packed, scales, group_size, device)


def _w4a8_check(device: torch.device) -> list[CheckResult]:
    import slab.ops
    import slab.quant
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 16, 67):
            for group_size in (128, -1):
                x, _w, packed, scales, weights = _w4a8_inputs(device, dtype, m, 257, 256, group_size)
                x_fp8, x_scale = slab.quant.quantize_fp8(x)
                w_ref = slab.quant.dequantize_w4(packed, scales, group_size).double()
                expected = (x_fp8.double() * x_scale.double()[:, None]) @ w_ref.T.to(device)
                ok, detail = compare(slab.ops.w4a8_linear(x, weights), expected, dtype)
                results.append(CheckResult("w4a8_linear", f"M={m}, 257x256, group {group_size}",
                                           _bench.dtype_name(dtype), ok, detail))
    return results


def _w4a8_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    import slab.quant
    rows = []
    n = k = 2048 if ctx.quick else 4096
    group_size = 128
    for dtype in ctx.dtypes:
        for m in (1, 16):
            x, w, packed, scales, weights = _w4a8_inputs(ctx.device, dtype, m, n, k, group_size)

            def dequant_matmul(x=x):  # the reference: dequantize, then a float matmul
                x_fp8, x_scale = slab.quant.quantize_fp8(x)
                w_deq = slab.quant.dequantize_w4(packed, scales, group_size).to(x.device, x.dtype)
                return ((x_fp8.to(x.dtype) * x_scale[:, None].to(x.dtype)) @ w_deq.T)

            providers = {
                "slab": lambda: slab.ops.w4a8_linear(x, weights),
                "eager": dequant_matmul,
                "library": lambda: x @ w.T,  # torch matmul with float weights of x's dtype
            }
            if ctx.compile:
                compiled = torch.compile(dequant_matmul)
                providers["compile"] = lambda: compiled(x)
            times = ctx.time_many(providers)
            elem = torch.finfo(dtype).bits // 8
            floor = n * k / 2 + n * (k // group_size) * 4 + (m * k + m * n) * elem
            rows.append(speed_row(ctx, op="w4a8_linear", pass_=f"M={m}", shape=(m, n, k), dtype=dtype,
                                  times=times, bytes_moved=floor, bytes_floor=floor))
    return rows


register(Entry("w4a8", "INT4 weights x FP8 activations linear (library column: torch matmul with float weights)",
               _w4a8_check, _w4a8_bench))


# ---- fused optimizers: DoG ---------------------------------------------------------------------


def _dog_reference(xs, grads, lr=1.0, reps_rel=1e-6, eps=1e-8):
    """DoG in float64 over one group (formll/dog): returns the iterates after each gradient."""
    x = [t.double().clone() for t in xs]
    x0 = [t.clone() for t in x]
    norm = lambda ts: sum(float((t * t).sum()) for t in ts) ** 0.5  # noqa: E731
    rbar, g2 = reps_rel * (1 + norm(x0)), 0.0
    for g in grads:
        rbar = max(rbar, norm([a - b for a, b in zip(x, x0)]))
        g2 += norm(g) ** 2
        eta = lr * rbar / (g2 + eps) ** 0.5
        x = [a - eta * b.double() for a, b in zip(x, g)]
    return x


def _dog_check(device: torch.device) -> list[CheckResult]:
    import slab.optim
    gen = torch.Generator().manual_seed(0)
    shapes = ((37, 5), (129,), (1,))
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(device)) for s in shapes]
    steps = [[torch.randn(*s, generator=gen).to(device) for s in shapes] for _ in range(6)]
    ref = _dog_reference([p.detach() for p in params], steps)
    opt = slab.optim.DoG(params)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    ok, detail = compare(torch.cat([p.detach().flatten() for p in params]), torch.cat([r.flatten() for r in ref]),
                         torch.float32)
    return [CheckResult("dog", "6 steps, 3 tensors", "fp32", ok, detail)]


def _dog_bench(ctx: BenchContext) -> list[dict]:
    import slab.optim
    rows = []
    numel = 1_000_000 if ctx.quick else 10_000_000
    sizes = [numel // 100] * 100
    for dtype in ctx.dtypes:
        if dtype == torch.float16:
            continue
        params = [torch.nn.Parameter(torch.randn(n, device=ctx.device, dtype=dtype)) for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        dog = slab.optim.DoG(params)
        adamw = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], fused=True)
        for q, p in zip(adamw.param_groups[0]["params"], params):
            q.grad = p.grad.clone()
        times = ctx.time_many({"slab": dog.step, "library": adamw.step})  # library: AdamW(fused=True)
        elem = torch.finfo(dtype).bits // 8
        moved = numel * (4 * elem + 4)  # g read twice (norm pass, update pass), x, x0 (fp32) read, x written
        floor = numel * (3 * elem + 4)  # each once
        rows.append(speed_row(ctx, op="DoG step", pass_="100 tensors", shape=(numel,), dtype=dtype,
                              times=times, bytes_moved=moved, bytes_floor=floor))
    return rows


register(Entry("dog", "DoG optimizer step, one fused multi-tensor pass (library column: AdamW(fused=True))",
               _dog_check, _dog_bench))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="slab-bench",
        description="Check every slab op against its reference on this device, then print a speed table.",
    )
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if slab's CUDA kernels and a GPU "
                                    "are available, else cpu)")
    p.add_argument("--only", nargs="+", metavar="OP", help="run only these entries (see --list)")
    p.add_argument("--list", action="store_true", help="list the registered entries and exit")
    p.add_argument("--check-only", action="store_true", help="correctness checks only, no timing")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated dtypes of the speed table (default float32; e.g. float32,bfloat16)")
    p.add_argument("--quick", action="store_true", help="one small shape, fewer repetitions")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per provider and shape (default 0.5, --quick 0.2)")
    p.add_argument("--csv", metavar="PATH", help="also write the speed rows as CSV")
    p.add_argument("--json", metavar="PATH", help="also write checks and speed rows as JSON")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    if args.list:
        for e in REGISTRY.values():
            print(f"{e.name:12s} {e.description}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import slab
    except Exception as exc:  # noqa: BLE001
        print(f"slab-bench: cannot load slab: {exc}", file=sys.stderr)
        return 2
    device = _bench.pick_device(args.device)
    if device.type == "cuda" and not slab.cuda_available():
        print("slab-bench: --device cuda, but this slab build has no CUDA kernels "
              "(rebuild with SLAB_CUDA=1 on a machine with nvcc)", file=sys.stderr)
        return 2
    entries = list(REGISTRY.values())
    if args.only:
        unknown = [n for n in args.only if n not in REGISTRY]
        if unknown:
            print(f"slab-bench: unknown entries {unknown}; known: {list(REGISTRY)}", file=sys.stderr)
            return 2
        entries = [REGISTRY[n] for n in args.only]

    print(f"slab {slab.__version__}, torch {torch.__version__}, device {device}: "
          f"{_bench.device_description(device)}", flush=True)
    busy = None if args.check_only else _bench.busy_warning(device)
    if busy:
        print(busy, file=sys.stderr)

    # ---- correctness
    t0 = time.perf_counter()
    checks: list[CheckResult] = []
    for e in entries:
        try:
            checks.extend(e.check(device))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            checks.append(CheckResult(e.name, "(check)", "-", False, f"raised {type(exc).__name__}: {exc}"))
    table = _bench.Table(["op", "case", "dtype", "result", "detail"],
                         title=f"\nCorrectness against slab.reference in float64 ({time.perf_counter() - t0:.1f} s)")
    for r in checks:
        table.add(op=r.op, case=r.case, dtype=r.dtype, result="PASS" if r.ok else "FAIL", detail=r.detail)
    table.print()
    failed_ops = sorted({r.op for r in checks if not r.ok})
    for e in entries:
        ok = e.name not in failed_ops
        print(f"{'PASS' if ok else 'FAIL'}  {e.name}")

    # ---- speed
    rows: list[dict] = []
    if not args.check_only:
        dtypes = [_bench.parse_dtype(d) for d in args.dtype.split(",") if d.strip()]
        budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)
        t0 = time.perf_counter()
        bw = _bench.copy_bandwidth(device)
        ctx = BenchContext(device, dtypes, args.quick, not args.no_compile, budget, bw)
        for e in entries:
            if e.bench is None:
                continue
            try:
                rows.extend(e.bench(ctx))
            except Exception as exc:  # noqa: BLE001 - a broken benchmark must not hide the others
                traceback.print_exc()
                print(f"slab-bench: benchmark {e.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        speed = _bench.Table(
            SPEED_COLUMNS,
            title=f"\nSpeed on {device} (median ms; measured copy bandwidth {bw / 1e9:.1f} GB/s)",
            notes=[
                "eager: the plain-PyTorch reference (SLAB's modules, the quadratic SLA formula, "
                "dequantize-then-matmul for w4a8); compile: torch.compile of the same; library: nn.LayerNorm "
                "fwd+bwd for the norms, SDPA causal softmax attention for sla, the dense MLP for cats_mlp, torch "
                "matmul with float weights for w4a8, AdamW(fused=True) for DoG.",
                "x eager / x compile: their time / slab's. GB/s: bytes slab's passes move (PRepBN: fwd 3, bwd 5 "
                "tensor passes; others: the floor's bytes) / time; of copy BW: that rate / measured copy bandwidth.",
                "x floor: slab's time / (one read of every input + one write of every output at copy "
                f"bandwidth). Took {time.perf_counter() - t0:.0f} s.",
            ],
        )
        for r in rows:
            speed.add(r)
        speed.print()
        if args.csv:
            _bench.write_results(args.csv, rows)
    if args.json:
        _bench.write_results(args.json, rows + [dataclasses.asdict(c) | {"kind": "check"} for c in checks],
                             meta={"slab": slab.__version__, "torch": torch.__version__, "device": str(device),
                                   "hardware": _bench.device_description(device)})
    if failed_ops:
        print(f"\nslab-bench: FAILED: {', '.join(failed_ops)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
