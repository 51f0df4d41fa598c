#!/usr/bin/env python
"""SLA (simplified linear attention, SLAB): slab.ops.sla / sla_step against PyTorch.

Providers (forward, or forward + backward of all of q, k, v):
  slab      slab.ops.sla (chunked causal / two-pass or quadratic non-causal kernels)
  eager     the PyTorch composite: SLAB's einsum form (non-causal) or the cumsum form (causal:
            cumsum over tokens of phi(k_j) v_j^T, a (B, H, N, D, Dv) tensor)
  compile   torch.compile of the eager composite
  sdpa      softmax attention, F.scaled_dot_product_attention (is_causal for causal shapes)
  exact     CUDA only: slab.ops.sla on the exact per-token kernel (SLAB_SLA_EXACT=1), the baseline
            of the bf16/fp16 tensor-core path (timed on the full shape)
The slow baselines (eager / compile / SDPA) of the long causal shapes are timed on a slice of
`--baseline-heads` (batch x head) slices and scaled linearly to the full shape (every slice is the
same independent work; marked "*"); slab is always timed on the full shape.

GFLOP/s counts the multiply-adds slab's algorithm does (chunked causal: chunk C = 64; see
flops()); "vs mm" compares that rate with a large fp32 torch.mm on the same machine (the compute
floor as torch reaches it; above 100% where torch's BLAS is slow, e.g. MKL on AMD CPUs).
"floor ms" is the memory floor: bytes that must move (q, k, v, o; plus grad_o, dq, dk, dv
for the backward) over the measured copy bandwidth.

--memory: peak resident memory of one causal training step (forward + backward) at N = 16k, slab
vs the eager composite, each in a fresh subprocess (Linux: VmHWM, reset just before the step, above
the RSS with the inputs allocated).
--decode: sla_step (one token, state updated in place) vs an eager step and its torch.compile;
GB/s counts the whole state read + written (nominal: slab skips the rows whose phi(k_d) and phi(q_d)
are 0, so with ReLU features it can exceed the copy bandwidth).

Usage:
  python bench/bench_sla.py --quick                 # vision + LM 1k/4k causal, fwd+bwd, fp32
  python bench/bench_sla.py --shapes lm4k --mode fwd,fwdbwd --dtype fp32,bf16
  python bench/bench_sla.py --memory --decode --no-grid
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import slab
import slab.ops
from slab import _bench as B
from slab.reference import sla as RS
from slab.reference.compare import compare

CHUNK = 64  # the CPU kernels' causal chunk

# name -> (B, H, N, D, causal)
SHAPES = {
    "vision": (64, 6, 196, 64, False),
    "lm1k": (4, 16, 1024, 64, True),
    "lm2k": (4, 16, 2048, 64, True),
    "lm4k": (4, 16, 4096, 64, True),
    "lm4k-d128": (4, 16, 4096, 128, True),
    "lm16k": (4, 16, 16384, 64, True),
    "lm4k-full": (4, 16, 4096, 64, False),
}


@dataclasses.dataclass(frozen=True)
class Config:
    shape: str
    dtype: torch.dtype
    mode: str  # "fwd" or "fwdbwd"


# ---- the PyTorch composites ---------------------------------------------------------------------


def eager_sla(q, k, v, causal, eps=1e-6):
    """SLAB's formula in plain PyTorch (fp32 math as SLAB does)."""
    dtype = q.dtype
    q, k, v = q.float().relu(), k.float().relu(), v.float()
    if causal:
        kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
        num = torch.einsum("bhnd,bhnde->bhne", q, kv)
        den = (q * k.cumsum(2)).sum(-1, keepdim=True) + eps
    else:
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        num = torch.einsum("bhnd,bhde->bhne", q, kv)
        den = torch.einsum("bhnd,bhd->bhn", q, k.sum(2)).unsqueeze(-1) + eps
    return (num / den).to(dtype)


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def flops(b, h, n, d, dv, causal, mode):
    """Multiply-adds x 2 of slab's algorithm (the triangular chunk products count half)."""
    if causal:
        c = min(CHUNK, n)
        fwd = n * (c / 2 * (d + dv) + 2 * d * dv)
        bwd = n * (c / 2 * 3 * (d + dv) + 5 * d * dv)
    elif n * (d + dv) <= 2 * d * dv:
        fwd = n * n * (d + dv)
        bwd = 3 * n * n * (d + dv)
    else:
        fwd = 2 * n * d * dv
        bwd = 5 * n * d * dv
    per = fwd + (bwd if mode == "fwdbwd" else 0)
    return 2 * b * h * per


def floor_bytes(b, h, n, d, dv, elem, mode):
    fwd = b * h * n * (2 * d + 2 * dv) * elem
    bwd = b * h * n * (2 * d + 3 * dv) * elem + b * h * n * (2 * d + dv) * elem  # reads + writes
    return fwd + (bwd if mode == "fwdbwd" else 0)


def mm_rate(device):
    """fp32 multiply-add rate of a large torch.mm (FLOP/s): the compute floor of this machine."""
    a = torch.randn(2048, 2048, device=device)
    t = B.time_fn(lambda: a @ a, device, warmup=3, min_reps=5, max_reps=20, budget_s=1.0)
    return 2 * 2048**3 / (t.min_ms * 1e-3)  # the best run: the machine's rate, least disturbed


# ---- the grid -----------------------------------------------------------------------------------


def make_inputs(b, h, n, d, dtype, device, grad):
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(b, h, n, d, generator=g).to(dtype).to(device) for _ in range(3)]
    return [t.requires_grad_(grad) for t in qkv]


def step_fn(fn, q, k, v, mode):
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn(q, k, v)

        return run
    go = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    def run():
        o = fn(q, k, v)
        torch.autograd.grad(o, (q, k, v), go)

    return run


def verify(b, h, n, d, dtype, device, causal):
    """slab against the float64 quadratic formula on two heads (skipped: inputs are shared)."""
    q, k, v = make_inputs(1, min(h, 2), min(n, 1024), d, dtype, device, False)
    got = slab.ops.sla(q, k, v, causal=causal)
    c = compare(got, RS.sla(q.double(), k.double(), v.double(), causal), dtype, name="o", equal_nan=False)
    if not c.ok:
        sys.exit(f"slab disagrees with slab.reference.sla at {(b, h, n, d)} causal={causal}: {c.message}")


def time_exact(q, k, v, causal, mode, device, tm):
    """slab.ops.sla with SLAB_SLA_EXACT=1 (read per call): the exact CUDA kernel on the same inputs."""
    old = os.environ.get("SLAB_SLA_EXACT")
    os.environ["SLAB_SLA_EXACT"] = "1"
    try:
        fn = step_fn(lambda a, bb, cc: slab.ops.sla(a, bb, cc, causal=causal), q, k, v, mode)
        return B.time_fns({"exact": fn}, device, **tm)["exact"].median_ms
    finally:
        if old is None:
            del os.environ["SLAB_SLA_EXACT"]
        else:
            os.environ["SLAB_SLA_EXACT"] = old


def run_grid(cfgs, args, device):
    table = B.Table(
        [
            "shape",
            "dtype",
            "mode",
            B.Column("slab_ms", "slab ms", ".2f"),
            B.Column("eager_ms", "eager ms", ".1f"),
            B.Column("compile_ms", "compile ms", ".1f"),
            B.Column("sdpa_ms", "sdpa ms", ".1f"),
            B.Column("exact_ms", "exact ms", ".2f"),
            B.Column("vs_eager", "eager/slab", ".1f"),
            B.Column("vs_compile", "compile/slab", ".1f"),
            B.Column("vs_sdpa", "sdpa/slab", ".2f"),
            B.Column("vs_exact", "exact/slab", ".2f"),
            B.Column("gflops", "slab GFLOP/s", ".1f"),
            B.Column("of_mm", "vs mm", ".0%"),
            B.Column("floor_ms", "floor ms", ".2f"),
            "scaled",
        ],
        title=f"slab.ops.sla on {B.device_description(device)}",
    )
    rate = mm_rate(device)
    bw = B.copy_bandwidth(device)
    compiled = torch.compile(eager_sla, dynamic=False) if args.compile else None
    tm = dict(warmup=args.warmup, min_reps=args.reps, max_reps=args.max_reps, budget_s=args.budget)
    for c in cfgs:
        b, h, n, d, causal = SHAPES[c.shape]
        verify(b, h, n, d, c.dtype, device, causal)
        grad = c.mode == "fwdbwd"
        q, k, v = make_inputs(b, h, n, d, c.dtype, device, grad)
        t_slab = B.time_fns(
            {"slab": step_fn(lambda a, bb, cc: slab.ops.sla(a, bb, cc, causal=causal), q, k, v, c.mode)}, device, **tm
        )["slab"].median_ms
        t_exact = time_exact(q, k, v, causal, c.mode, device, tm) if device.type == "cuda" and args.exact else None
        del q, k, v
        # baselines: the full shape, or a slice of heads scaled up (long causal shapes)
        sub = causal and n >= 2048 and b * h > args.baseline_heads
        bh_sub = args.baseline_heads if sub else b * h
        bs, hs = (1, bh_sub) if sub else (b, h)
        qs, ks, vs = make_inputs(bs, hs, n, d, c.dtype, device, grad)
        fns = {}
        if args.eager:
            fns["eager"] = step_fn(lambda a, bb, cc: eager_sla(a, bb, cc, causal), qs, ks, vs, c.mode)
        if compiled is not None:
            fns["compile"] = step_fn(lambda a, bb, cc: compiled(a, bb, cc, causal), qs, ks, vs, c.mode)
        if args.sdpa:
            fns["sdpa"] = step_fn(lambda a, bb, cc: sdpa(a, bb, cc, causal), qs, ks, vs, c.mode)
        scale = b * h / bh_sub
        base = {k_: t.median_ms * scale for k_, t in B.time_fns(fns, device, **{**tm, "min_reps": 2}).items()}
        del qs, ks, vs
        fl = flops(b, h, n, d, d, causal, c.mode)
        elem = torch.tensor([], dtype=c.dtype).element_size()
        ratio = lambda key: base[key] / t_slab if key in base else None  # noqa: E731
        table.add(
            shape=f"{c.shape} {b}x{h}x{n}x{d}{' causal' if causal else ''}",
            dtype=B.dtype_name(c.dtype),
            mode=c.mode,
            slab_ms=t_slab,
            eager_ms=base.get("eager"),
            compile_ms=base.get("compile"),
            sdpa_ms=base.get("sdpa"),
            exact_ms=t_exact,
            vs_eager=ratio("eager"),
            vs_compile=ratio("compile"),
            vs_sdpa=ratio("sdpa"),
            vs_exact=None if t_exact is None else t_exact / t_slab,
            gflops=fl / (t_slab * 1e-3) / 1e9,
            of_mm=fl / (t_slab * 1e-3) / rate,
            floor_ms=floor_bytes(b, h, n, d, d, elem, c.mode) / bw * 1e3,
            scaled=f"* {bh_sub} of {b * h} heads" if sub else "",
        )
        print(table.render().splitlines()[-1], flush=True)
    table.notes.append(f"fp32 torch.mm rate {rate / 1e9:.1f} GFLOP/s; copy bandwidth {bw / 1e9:.1f} GB/s")
    print()
    table.print()
    return table


# ---- peak memory ----------------------------------------------------------------------------------

_MEM_CHILD = r"""
import sys, torch
sys.path.insert(0, {bench_dir!r})
import slab, slab.ops
from bench_sla import eager_sla


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


b, h, n, d = {shape}
q, k, v = [torch.randn(b, h, n, d, requires_grad=True) for _ in range(3)]
go = torch.randn(b, h, n, d)
fn = (lambda: slab.ops.sla(q, k, v, causal=True)) if {provider!r} == "slab" else (lambda: eager_sla(q, k, v, True))
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
    f.write("5")
before = status_kb("VmRSS")
torch.autograd.grad(fn(), (q, k, v), go)
print((status_kb("VmHWM") - before) * 1024)
"""


def run_memory(args):
    b, h, n, d = 1, args.memory_heads, 16384, 64
    table = B.Table(
        ["provider", "shape", B.Column("peak", "peak above inputs"), B.Column("nxn", "one N x N fp32")],
        title="peak resident memory of one causal fwd+bwd (fresh process each)",
    )
    for provider in ("slab", "eager"):
        code = _MEM_CHILD.format(
            bench_dir=os.path.dirname(os.path.abspath(__file__)), shape=(b, h, n, d), provider=provider
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            peak = f"failed ({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode})"
        else:
            peak = B.fmt_bytes(float(res.stdout.strip().splitlines()[-1]))
        table.add(provider=provider, shape=f"{b}x{h}x{n}x{d}", peak=peak, nxn=B.fmt_bytes(4.0 * n * n))
    table.print()


# ---- decode ---------------------------------------------------------------------------------------


def eager_step(q, k, v, state, z, eps=1e-6):
    fq, fk = q.float().relu(), k.float().relu()
    state.add_(fk.unsqueeze(-1) * v.float().unsqueeze(-2))
    z.add_(fk)
    num = torch.einsum("bhd,bhde->bhe", fq, state)
    return (num / ((fq * z).sum(-1, keepdim=True) + eps)).to(q.dtype)


def run_decode(args, device):
    table = B.Table(
        [
            "shape",
            "dtype",
            B.Column("slab_ms", "slab ms", ".3f"),
            B.Column("eager_ms", "eager ms", ".3f"),
            B.Column("compile_ms", "compile ms", ".3f"),
            B.Column("gbs", "slab GB/s", ".1f"),
            B.Column("of_copy", "of copy BW", ".0%"),
        ],
        title="sla_step (one decode token, state updated in place)",
    )
    bw = B.copy_bandwidth(device)
    tm = dict(warmup=args.warmup, min_reps=args.reps, max_reps=args.max_reps, budget_s=args.budget)
    b, h, d = 64, 16, 128
    compiled = torch.compile(eager_step, dynamic=False) if args.compile else None
    for dtype in args.dtypes:
        q, k, v = (torch.randn(b, h, d).to(dtype).to(device) * 0.1 for _ in range(3))
        states = {
            name: (torch.zeros(b, h, d, d, device=device), torch.zeros(b, h, d, device=device))
            for name in ("slab", "eager", "compile")
        }
        fns = {
            "slab": lambda: slab.ops.sla_step(q, k, v, *states["slab"]),
            "eager": lambda: eager_step(q, k, v, *states["eager"]),
        }
        if compiled is not None:
            fns["compile"] = lambda: compiled(q, k, v, *states["compile"])
        with torch.no_grad():
            times = {k_: t.median_ms for k_, t in B.time_fns(fns, device, **tm).items()}
        nbytes = 2 * b * h * d * d * 4
        table.add(
            shape=f"{b}x{h}x{d}x{d}",
            dtype=B.dtype_name(dtype),
            slab_ms=times["slab"],
            eager_ms=times["eager"],
            compile_ms=times.get("compile"),
            gbs=nbytes / (times["slab"] * 1e-3) / 1e9,
            of_copy=nbytes / (times["slab"] * 1e-3) / bw,
        )
    table.print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--shapes", default="vision,lm1k,lm2k,lm4k")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--mode", default="fwd,fwdbwd")
    ap.add_argument("--quick", action="store_true", help="fwd+bwd only, fewer repetitions")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-eager", dest="eager", action="store_false")
    ap.add_argument("--no-sdpa", dest="sdpa", action="store_false")
    ap.add_argument("--no-exact", dest="exact", action="store_false", help="CUDA: skip the exact-kernel baseline")
    ap.add_argument("--no-grid", dest="grid", action="store_false")
    ap.add_argument("--baseline-heads", type=int, default=4)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-heads", type=int, default=2)
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    device = B.start(args.threads, args.device)
    args.dtypes = [B.parse_dtype(s) for s in args.dtype.split(",")]
    modes = ["fwdbwd"] if args.quick and args.mode == "fwd,fwdbwd" else args.mode.split(",")
    args.warmup, args.reps, args.max_reps, args.budget = (1, 3, 10, 0.5) if args.quick else (2, 5, 30, 1.0)
    if args.grid:
        cfgs = B.grid(Config, shape=args.shapes.split(","), dtype=args.dtypes, mode=modes)
        table = run_grid(cfgs, args, device)
        for path in (args.json, args.csv):
            if path:
                B.write_results(
                    path,
                    table.rows,
                    {"device": B.device_description(device)},
                    fmt="csv" if path == args.csv else "json",
                )
    if args.memory:
        run_memory(args)
    if args.decode:
        run_decode(args, device)


if __name__ == "__main__":
    main()
