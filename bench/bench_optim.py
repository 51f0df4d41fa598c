#!/usr/bin/env python
"""Fused optimizer benchmarks: one DoG step over 100 tensors of mixed sizes.

Providers (all step the same parameters with the same gradients):
  slab       slab.optim.DoG: 2 fused passes per (device, dtype) bucket + a few tiny device ops
  loop       the public DoG reference's algorithm written plainly: a Python loop over tensors
             (norms, x0 distance, update), x0 kept in the parameter dtype
  foreach    the same algorithm with torch._foreach_* ops
  compile    torch.compile of the foreach step (skipped with --no-compile)
  AdamW      torch.optim.AdamW(fused=True): the best fused step PyTorch ships (memory reference)
Verification first: after 3 steps from the same state, slab's parameters are compared with the
foreach reference (max relative error printed).
--optimizer Lion / LAMB / LARS times that slab optimizer instead of DoG, against AdamW only (no
reference providers, no verification). --interleave builds every provider first and times them
round-robin (B.time_fns), so machine drift hits all alike; --repeats N does that N times and
prints every round's times with the median.

Bytes per parameter (the floor of each algorithm; reads + writes of one step):
  slab DoG   read g (norm pass) + read x, g, x0 + write x           = 20 B fp32 / 12 B bf16
             (+ x again in the norm pass when weight_decay > 0)
  loop/foreach DoG (reference algorithm, unfused): read x, x0 (distance) + read g (norm) +
             read x, g, write x (update): 24 B fp32 / 12 B bf16 at best
  AdamW      read x, g, m, v + write x, m, v                         = 28 B fp32 / 14 B bf16
GB/s = those bytes / time; "of copy" = GB/s / the MEASURED copy bandwidth (read + write).

Usage:
  python bench/bench_optim.py                    # 10M params, fp32 and bf16, CPU
  python bench/bench_optim.py --params 10e6 100e6 --dtype float32
  python bench/bench_optim.py --device cuda --json out.json --profile
  python bench/bench_optim.py --dtype float32 --threads 2 --no-compile --interleave --repeats 5
  python bench/bench_optim.py --optimizer Lion --dtype float32 --threads 2 --interleave --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Callable

import torch

import slab
import slab.optim
from slab import _bench as B


@dataclasses.dataclass(frozen=True)
class Config:
    params: int
    dtype: torch.dtype
    tensors: int = 100


def mixed_sizes(total: int, count: int, seed: int = 0) -> list[int]:
    """``count`` sizes, log-uniform over ~4 decades (biases to big matrices), summing to ``total``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.rand(count, generator=g, dtype=torch.float64) * math.log(1e4))
    sizes = [max(1, int(v)) for v in (w / w.sum() * (total - count)).tolist()]
    sizes[int(torch.argmax(w))] += total - sum(sizes)
    return sizes


# ---- the DoG reference algorithm in plain PyTorch -------------------------------------------------


class LoopDoG:
    """formll/dog's DoG, plainly: per-tensor loops, host-free (no .item()), x0 in the param dtype."""

    def __init__(self, params, lr=1.0, reps_rel=1e-6, eps=1e-8):
        self.params, self.lr, self.reps, self.eps = list(params), lr, reps_rel, eps
        self.x0 = None

    @torch.no_grad()
    def step(self):
        ps = self.params
        if self.x0 is None:
            self.x0 = [p.detach().clone() for p in ps]
            self.rbar = self.reps * (1 + torch.stack([p.norm(dtype=torch.float32) for p in ps]).norm())
            self.G = torch.stack([(p.grad.float() ** 2).sum() for p in ps]).sum() + self.eps
        else:
            d = torch.stack([torch.norm(p.float() - x0.float()) for p, x0 in zip(ps, self.x0)]).norm()
            self.rbar = torch.maximum(self.rbar, d)
            self.G = self.G + torch.stack([(p.grad.float() ** 2).sum() for p in ps]).sum()
        eta = self.lr * self.rbar / torch.sqrt(self.G)
        for p in ps:
            p.add_(-eta * p.grad)


class ForeachDoG(LoopDoG):
    """The same algorithm with torch._foreach_* kernels (one call per op over all tensors)."""

    @staticmethod
    def _step(ps, grads, x0, rbar, G, lr):
        d = torch.stack(torch._foreach_norm(torch._foreach_sub(ps, x0), 2, dtype=torch.float32)).norm()
        rbar = torch.maximum(rbar, d)
        G = G + torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2).sum()
        eta = lr * rbar / torch.sqrt(G)
        torch._foreach_add_(ps, torch._foreach_mul(grads, -eta.to(ps[0].dtype)))
        return rbar, G

    def __init__(self, params, compiled=False, **kw):
        super().__init__(params, **kw)
        self.fn = torch.compile(self._step) if compiled else self._step

    @torch.no_grad()
    def step(self):
        ps = self.params
        if self.x0 is None:
            return super().step()
        self.rbar, self.G = self.fn(ps, [p.grad for p in ps], self.x0, self.rbar, self.G, self.lr)


# ---- one config ------------------------------------------------------------------------------------


def make_params(cfg: Config, device):
    torch.manual_seed(0)
    ps = []
    for n in mixed_sizes(cfg.params, cfg.tensors):
        p = torch.nn.Parameter(torch.randn(n, device=device).to(cfg.dtype))
        p.grad = (torch.randn(n, device=device) * 1e-2).to(cfg.dtype)
        ps.append(p)
    return ps


# slab optimizers other than DoG (--optimizer); hyperparameters of a typical run.
OTHERS: dict[str, Callable[[list], Any]] = {
    "Lion": lambda ps: slab.optim.Lion(ps, lr=1e-4, weight_decay=0.1),
    "LAMB": lambda ps: slab.optim.LAMB(ps, lr=1e-3, weight_decay=0.01),
    "LARS": lambda ps: slab.optim.LARS(ps, lr=0.1),
}


def providers(
    cfg: Config, device, use_compile: bool, optimizer: str = "DoG"
) -> dict[str, Callable[[], Callable[[], Any]]]:
    """name -> factory of a step function; each provider's tensors are built only when it is timed
    (and freed after), so large configs hold one provider's memory at a time."""

    def make(build):
        def factory():
            return build(make_params(cfg, device))

        return factory

    if optimizer != "DoG":
        return {
            "slab": make(lambda ps: OTHERS[optimizer](ps).step),
            "AdamW": make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True).step),
        }
    out = {
        "slab": make(lambda ps: slab.optim.DoG(ps, reps_rel=1e-4).step),
        "loop": make(lambda ps: LoopDoG(ps, reps_rel=1e-4).step),
        "foreach": make(lambda ps: ForeachDoG(ps, reps_rel=1e-4).step),
    }
    if use_compile:
        out["compile"] = make(lambda ps: ForeachDoG(ps, compiled=True, reps_rel=1e-4).step)
    out["AdamW"] = make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True).step)
    return out


def bytes_per_param(name: str, dtype: torch.dtype, optimizer: str = "DoG") -> int:
    e = torch.empty((), dtype=dtype).element_size()
    if name == "slab" and optimizer != "DoG":
        # Lion: x, g, m + write x, m; LAMB: two passes over x, m, v (+ g, writes m, v, x); LARS: norms of
        # x and g, then x, g, buf + write x, buf (state fp32)
        return {"Lion": 3 * e + 8, "LAMB": 4 * e + 20, "LARS": 5 * e + 8}[optimizer]
    if name == "slab":
        return 3 * e + 4 + e  # g (norms), x + g + x0 (fp32) + write x
    if name == "AdamW":
        return 7 * e
    return 6 * e  # unfused reference: x, x0 | g | x, g, x


def verify(cfg: Config, device) -> float:
    a, b = make_params(cfg, device), make_params(cfg, device)
    oa, ob = slab.optim.DoG(a, reps_rel=1e-4), ForeachDoG(b, reps_rel=1e-4)
    for _ in range(3):
        oa.step()
        ob.step()
    return max(
        float((p.detach().float() - q.detach().float()).abs().max() / q.detach().float().abs().max())
        for p, q in zip(a, b)
    )


def time_each(factories, device, args) -> dict[str, float]:
    """Median ms per provider, one provider alive and timed at a time."""
    times = {}
    for name, factory in factories.items():
        fn = factory()
        times[name] = B.time_fn(fn, device, warmup=3, min_reps=5, max_reps=100, budget_s=args.budget).median_ms
        if args.profile and name == "slab":
            print(B.profile_table(fn, device))
        del fn
    return times


def time_interleaved(factories, device, args) -> dict[str, float]:
    """Median over --repeats rounds of the interleaved medians of every provider (all alive at once)."""
    fns = {name: factory() for name, factory in factories.items()}
    rounds = []
    for r in range(args.repeats):
        t = B.time_fns(fns, device, warmup=3, min_reps=5, max_reps=100, budget_s=args.budget)
        rounds.append({name: v.median_ms for name, v in t.items()})
        print(
            f"round {r}: "
            + ", ".join(f"{n} {ms:.2f} ms" for n, ms in rounds[-1].items())
            + (f"; slab / AdamW {rounds[-1]['slab'] / rounds[-1]['AdamW']:.3f}" if "AdamW" in fns else "")
        )
    return {name: sorted(x[name] for x in rounds)[len(rounds) // 2] for name in fns}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, nargs="+", default=[10e6])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per provider")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--optimizer", default="DoG", choices=["DoG", *OTHERS])
    ap.add_argument("--interleave", action="store_true", help="time the providers round-robin")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved timing rounds (with --interleave)")
    ap.add_argument("--providers", nargs="+", default=None, help="time only these providers (slab is always timed)")
    args = ap.parse_args(argv)
    device = B.start(args.threads, args.device)
    bw = B.copy_bandwidth(device)
    print(
        f"device: {B.device_description(device)}; threads {torch.get_num_threads()}; "
        f"measured copy bandwidth {bw / 1e9:.1f} GB/s (read + write)"
    )
    table = B.Table(
        [
            "params",
            "dtype",
            "provider",
            B.Column("ms", fmt=".2f"),
            B.Column("B/param", fmt="d"),
            B.Column("GB/s", fmt=".1f"),
            B.Column("of_copy", "of copy", fmt=".0%"),
            B.Column("vs_slab", "time / slab", fmt=".2f"),
        ],
        title=f"{args.optimizer} step, 100 tensors of mixed sizes",
    )
    rows = []
    for n in args.params:
        for dn in args.dtype:
            cfg = Config(int(n), B.parse_dtype(dn))
            if args.optimizer == "DoG":
                err = verify(cfg, device)
                print(
                    f"verify {cfg.params:.3g} {dn}: max relative difference slab vs foreach reference "
                    f"after 3 steps = {err:.2e}"
                )
            factories = providers(cfg, device, not args.no_compile, args.optimizer)
            if args.providers:
                factories = {k: f for k, f in factories.items() if k == "slab" or k in args.providers}
            times = time_interleaved(factories, device, args) if args.interleave else time_each(factories, device, args)
            for name, ms in times.items():
                bpp = bytes_per_param(name, cfg.dtype, args.optimizer)
                gbs = bpp * cfg.params / (ms * 1e-3) / 1e9
                rows.append(
                    dict(
                        params=f"{cfg.params / 1e6:.0f}M",
                        dtype=B.dtype_name(cfg.dtype),
                        provider=name,
                        ms=ms,
                        **{"B/param": bpp},
                        **{"GB/s": gbs},
                        of_copy=gbs * 1e9 / bw,
                    )
                )
            for r in rows[-len(times) :]:
                r["vs_slab"] = r["ms"] / times["slab"]
                table.add(r)
    table.print()
    if args.json:
        B.write_results(args.json, rows, {"copy_bandwidth": bw, "device": B.device_description(device)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
