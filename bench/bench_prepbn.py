#!/usr/bin/env python
"""PRepBN benchmarks (SLAB): training forward+backward and deployed inference.

Training (fwd + bwd of one PRepBN, lam = 0.5 so both branches run), providers:
  slab.ops   slab.ops.prep_bn (the fused op through its Python wrapper)
  slab.nn    slab.nn.PRepBN (the module: schedule bookkeeping + the fused op)
  eager      SLAB's own modules, slab.reference.SlabLinearNorm (LayerNorm + RepBN(BatchNorm1d) composite)
  compile    torch.compile(fullgraph=True) of that composite's training branch
  LayerNorm  plain nn.LayerNorm, the norm PRepBN replaces (best library op for a per-token norm)
Speedups are eager / slab.nn and compile / slab.nn (module against module). Bandwidth: slab's
training step moves 8 tensor passes (forward: read x for the statistics, read x again and write y;
backward: read x and dy for the reductions, read them again and write dx); GB/s is those bytes over
slab.nn's time, "of copy BW" that rate over the MEASURED copy bandwidth of the device, and
"x floor" slab.nn's time over the absolute floor (5 passes: every input read once, every output
written once, at copy bandwidth).

Inference of a ViT-style block's norm + the Linear it feeds (x (B, N, C) -> Linear(C, 4C)):
  Linear            the Linear alone: what a norm that costs nothing leaves
  LN+Linear         nn.LayerNorm + Linear (a standard ViT block)
  RepBN+Linear      slab.nn.PRepBN in eval (the RepBN kernel) + Linear, not folded
  eager+Linear      SLAB's eager modules in eval + Linear
  deployed          slab.deploy(PRepBN -> Linear): the norm folded into the Linear's weights
"norm cost" columns are (time - Linear alone) for LayerNorm and for the deployed block.

All providers of a row are timed interleaved, call by call (slab._bench.time_fns), so a busy
moment of a shared machine does not land on one provider only.

Usage:
  python bench/bench_prepbn.py                       # the issue's shapes, fp32 and bf16
  python bench/bench_prepbn.py --quick               # small shapes, quick
  python bench/bench_prepbn.py --device cuda --dtype bfloat16 --json out.json --profile
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import slab
import slab.nn
import slab.ops
import slab.reference as ref
from slab import _bench as B
from slab.benches.prepbn import bytes_train, train_step

SHAPES = [(64, 196, 384), (8, 512, 1024)]  # DeiT-S tokens; an LM batch
QUICK_SHAPES = [(8, 196, 384), (2, 256, 1024)]
LAM = 0.5


@dataclasses.dataclass(frozen=True)
class Config:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


# ----------------------------------------------------------------------------------------------
# Training: forward + backward
# ----------------------------------------------------------------------------------------------
def train_providers(cfg: Config, device: torch.device, norm: str, use_compile: bool):
    """(providers {name: step}, max |y_slab - y_eager|) for one config; all providers share x, dy
    and identical parameters (the slab module's state dict loads into SLAB's modules)."""
    c = cfg.shape[-1]
    torch.manual_seed(0)
    x = (torch.randn(cfg.shape, device=device) * 2 + 0.5).to(cfg.dtype).requires_grad_()
    dy = torch.randn(cfg.shape, device=device).to(cfg.dtype)

    ours = slab.nn.PRepBN(c, norm=norm, step=1_000_000)
    ours.iter.fill_(500_000)  # lam = 0.5, drifting by 1e-6 per step
    with torch.no_grad():  # non-trivial parameters
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.to(device).train()

    def fresh_eager() -> nn.Module:
        m = ref.SlabLinearNorm(c, norm=norm, step=1_000_000)
        m.load_state_dict(ours.state_dict())  # SLAB checkpoint keys
        return m.to(device).train()

    eager = fresh_eager()
    with torch.no_grad():  # verify before timing: one training forward each, same state
        diff = float((fresh_eager()(x).float() - copy.deepcopy(ours)(x).float()).abs().max())

    providers: dict[str, Callable[[], Any]] = {}
    n1, bn, rep = ours.norm1, ours.norm2.bn, ours.norm2
    nb = getattr(n1, "bias", None)
    op_params = [p for p in (n1.weight, nb, bn.weight, bn.bias, rep.alpha) if p is not None]

    def op_forward(t):
        return slab.ops.prep_bn(
            t,
            n1.weight,
            nb,
            bn.weight,
            bn.bias,
            rep.alpha,
            bn.running_mean,
            bn.running_var,
            LAM,
            True,
            0.1,
            bn.eps,
            1e-6,
            norm,
        )

    providers["slab.ops"] = train_step(op_forward, x, op_params, dy)
    providers["slab.nn"] = train_step(ours, x, list(ours.parameters()), dy)
    providers["eager"] = train_step(eager, x, list(eager.parameters()), dy)
    if use_compile:
        comp = fresh_eager()
        cn1, cn2 = comp.norm1, comp.norm2

        def mixed(t):  # SLAB LinearNorm's training branch with lam fixed (no tensor-valued ifs)
            return LAM * cn1(t) + (1.0 - LAM) * cn2(t)

        fn = torch.compile(mixed, fullgraph=True, dynamic=False)
        providers["compile"] = train_step(fn, x, list(comp.parameters()), dy)
    ln = nn.LayerNorm(c, eps=1e-6).to(device) if norm == "layer" else nn.RMSNorm(c, eps=1e-6).to(device)
    providers["LayerNorm" if norm == "layer" else "RMSNorm"] = train_step(ln, x, list(ln.parameters()), dy)
    return providers, diff


def run_training(args, device: torch.device, bw: float, cfgs: Sequence[Config]) -> list[dict]:
    lib = "LayerNorm" if args.norm == "layer" else "RMSNorm"
    cols = [
        B.Column("shape", align="<"),
        B.Column("dtype", align="<"),
        B.Column("slab.ops", "slab.ops ms", ".3f"),
        B.Column("slab.nn", "slab.nn ms", ".3f"),
        B.Column("eager", "eager ms", ".3f"),
        B.Column("compile", "compile ms", ".3f"),
        B.Column(lib, f"{lib} ms", ".3f"),
        B.Column("vs_eager", "x eager", ".2f"),
        B.Column("vs_compile", "x compile", ".2f"),
        B.Column("vs_lib", f"x {lib}", ".2f"),
        B.Column("gbps", "GB/s", ".1f"),
        B.Column("frac_bw", "of copy BW", ".0%"),
        B.Column("x_floor", "x floor", ".2f"),
        B.Column("noise", "noise", ".0%"),
        B.Column("check", "max|y-eager|", ".1e"),
    ]
    table = B.Table(
        cols,
        title=f"\nPRepBN training forward+backward (norm={args.norm}, lam={LAM}), median ms on {device}",
        notes=[
            f"x eager / x compile / x {lib}: their time / slab.nn's. GB/s: 8 tensor passes "
            "(fwd: x twice + y; bwd: x, dy twice + dx) / slab.nn time.",
            f"of copy BW: that rate / measured copy bandwidth ({bw / 1e9:.1f} GB/s); x floor: "
            "slab.nn time / (5 passes at copy bandwidth). noise: (p80 - p20) / median of slab.nn's "
            "runs; max|y-eager|: forward output slab vs eager.",
        ],
    )
    rows = []
    for cfg in cfgs:
        t0 = time.perf_counter()
        providers, diff = train_providers(cfg, device, args.norm, not args.no_compile)
        times = B.time_fns(providers, device, warmup=3, min_reps=args.min_reps, budget_s=args.budget)
        t = times["slab.nn"].median_ms
        moved, floor = bytes_train(cfg.shape, cfg.dtype)
        row = {
            "section": "train",
            "norm": args.norm,
            "shape": cfg.label,
            "dtype": B.dtype_name(cfg.dtype),
            **{k: v.median_ms for k, v in times.items()},
            "vs_eager": times["eager"].median_ms / t,
            "vs_compile": times["compile"].median_ms / t if "compile" in times else None,
            "vs_lib": times[lib].median_ms / t,
            "gbps": moved / (t * 1e-3) / 1e9,
            "frac_bw": moved / (t * 1e-3) / bw,
            "x_floor": t / (floor / bw * 1e3),
            "noise": times["slab.nn"].spread,
            "check": diff,
            "bytes_moved": moved,
            "bytes_floor": floor,
            "copy_gbps": bw / 1e9,
            "device": str(device),
            "reps": {k: v.n for k, v in times.items()},
        }
        row["reps"] = ",".join(f"{k}:{v}" for k, v in row["reps"].items())
        rows.append(row)
        table.add(row)
        print(
            f"  {cfg.label} {B.dtype_name(cfg.dtype)}: {time.perf_counter() - t0:.0f} s "
            f"({', '.join(f'{k} {v.median_ms:.3f}' for k, v in times.items())})",
            flush=True,
        )
        if args.profile:
            print(f"\ntorch.profiler, slab.nn training step, {cfg.label} {B.dtype_name(cfg.dtype)}:")
            print(B.profile_table(providers["slab.nn"], device))
    table.print()
    return rows


# ----------------------------------------------------------------------------------------------
# Inference: norm + the Linear it feeds, folded vs not
# ----------------------------------------------------------------------------------------------
def run_inference(args, device: torch.device, cfgs: Sequence[Config]) -> list[dict]:
    cols = [
        B.Column("shape", align="<"),
        B.Column("dtype", align="<"),
        B.Column("linear_shape", "Linear", align="<"),
        B.Column("linear", "Linear ms", ".3f"),
        B.Column("ln_linear", "LN+Linear ms", ".3f"),
        B.Column("repbn_linear", "RepBN+Linear ms", ".3f"),
        B.Column("eager_linear", "eager+Linear ms", ".3f"),
        B.Column("deployed", "deployed ms", ".3f"),
        B.Column("ln_cost", "LN cost", ".1%"),
        B.Column("deployed_cost", "deployed cost", ".1%"),
        B.Column("folded", "folded", align="<"),
        B.Column("err", "max|deployed-eval|", ".1e"),
    ]
    table = B.Table(
        cols,
        title=f"\nInference: norm + Linear(C, 4C) of a ViT-style block, median ms on {device}",
        notes=[
            "LN cost / deployed cost: (time - Linear alone) / Linear alone. folded: no "
            "PRepBN/RepBN/ChannelAffine left after slab.deploy; max|deployed-eval|: output "
            "of the deployed block vs the unfolded eval block."
        ],
    )
    rows = []
    for cfg in cfgs:
        c = cfg.shape[-1]
        torch.manual_seed(0)
        x = (torch.randn(cfg.shape, device=device) * 2 + 0.5).to(cfg.dtype)
        linear = nn.Linear(c, 4 * c)
        norm = slab.nn.PRepBN(c)
        with torch.no_grad():  # trained-looking running statistics and parameters
            bn = norm.norm2.bn
            bn.running_mean.copy_(torch.randn(c) * 0.3)
            bn.running_var.copy_(torch.rand(c) + 0.5)
            bn.weight.add_(torch.randn(c) * 0.1)
            bn.bias.add_(torch.randn(c) * 0.1)
            norm.norm2.alpha.fill_(0.8)
        block = nn.Sequential(norm, linear).to(device, cfg.dtype).eval()
        eager_norm = ref.SlabLinearNorm(c)
        eager_norm.load_state_dict(norm.state_dict())
        eager_block = nn.Sequential(eager_norm, linear).to(device, cfg.dtype).eval()
        ln_block = nn.Sequential(nn.LayerNorm(c, eps=1e-6), linear).to(device, cfg.dtype).eval()
        lin = linear.to(device, cfg.dtype).eval()
        deployed = slab.deploy(block).eval()
        leftover = [
            type(m).__name__
            for m in deployed.modules()
            if isinstance(m, (slab.nn.PRepBN, slab.nn.RepBN, slab.nn.ChannelAffine))
        ]
        with torch.inference_mode():
            err = float((deployed(x).float() - block(x).float()).abs().max())
            providers = {
                "linear": lambda: lin(x),
                "ln_linear": lambda: ln_block(x),
                "repbn_linear": lambda: block(x),
                "eager_linear": lambda: eager_block(x),
                "deployed": lambda: deployed(x),
            }
            timings = B.time_fns(providers, device, warmup=2, min_reps=args.min_reps, budget_s=args.budget)
            times = {k: v.median_ms for k, v in timings.items()}
        row = {
            "section": "inference",
            "shape": cfg.label,
            "dtype": B.dtype_name(cfg.dtype),
            "linear_shape": f"{c}->{4 * c}",
            **times,
            "ln_cost": times["ln_linear"] / times["linear"] - 1,
            "deployed_cost": times["deployed"] / times["linear"] - 1,
            "folded": not leftover,
            "err": err,
            "device": str(device),
            "linear_tflops": 2 * cfg.numel * 4 * c / (times["linear"] * 1e-3) / 1e12,
        }
        rows.append(row)
        table.add(row)
        print(
            f"  {cfg.label} {B.dtype_name(cfg.dtype)}: {', '.join(f'{k} {v:.3f}' for k, v in times.items())}",
            flush=True,
        )
    table.print()
    return rows


# ----------------------------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when slab's CUDA kernels and a GPU are there)")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument(
        "--shapes", help="comma-separated BxNxC (default 64x196x384,8x512x1024; --quick: 8x196x384,2x256x1024)"
    )
    p.add_argument("--norm", choices=["layer", "rms"], default="layer", help="Norm1 of PRepBN (default layer)")
    p.add_argument("--only", choices=["train", "inference"], help="run one section only")
    p.add_argument("--quick", action="store_true", help="small shapes and a short time budget")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--budget", type=float, help="seconds of timed calls per provider (default 1.0, quick 0.2)")
    p.add_argument("--min-reps", type=int, help="at least this many timed calls (default 10, quick 5)")
    p.add_argument("--csv", metavar="PATH", help="write all rows as CSV")
    p.add_argument("--json", metavar="PATH", help="write all rows (+ machine info) as JSON")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of slab's training step")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.budget = args.budget if args.budget is not None else (0.2 if args.quick else 1.0)
    args.min_reps = args.min_reps if args.min_reps is not None else (5 if args.quick else 10)

    device = B.pick_device(args.device)
    if device.type == "cuda" and not slab.cuda_available():
        print("bench_prepbn: --device cuda but this slab build has no CUDA kernels", file=sys.stderr)
        return 2
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else SHAPES)
    dtypes = [B.parse_dtype(d) for d in args.dtype.split(",") if d.strip()]
    cfgs = B.grid(Config, shape=shapes, dtype=dtypes)

    bw = B.copy_bandwidth(device)
    print(
        f"slab {slab.__version__}, torch {torch.__version__}, {device}: {B.device_description(device)}; "
        f"measured copy bandwidth {bw / 1e9:.1f} GB/s",
        flush=True,
    )
    busy = B.busy_warning(device)
    if busy:
        print(busy, file=sys.stderr)
    rows: list[dict] = []
    if args.only in (None, "train"):
        rows += run_training(args, device, bw, cfgs)
    if args.only in (None, "inference"):
        rows += run_inference(args, device, cfgs)
    meta = {
        "slab": slab.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "hardware": B.device_description(device),
        "copy_gbps": bw / 1e9,
        "argv": " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if args.csv:
        B.write_results(args.csv, rows, fmt="csv")
    if args.json:
        B.write_results(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
