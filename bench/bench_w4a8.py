#!/usr/bin/env python
"""W4A8 GEMM: slab.ops.w4a8_gemm / w4a8_linear against dense and dequantizing baselines.

y (M, N) = x (M, K) W^T with W (N, K) quantized to int4 (group scales) and x to float8_e4m3fn
(per-token scales). Providers (median times, interleaved call by call):
  slab        slab.ops.w4a8_gemm on pre-quantized x (fp8 codes + row scales), bf16 output; the
              weights prepacked as W4A8Linear does (CPU: slab.quant.cpu_layout(), "panel" where
              the AVX-512 VNNI kernels run)
  linear      slab.ops.w4a8_linear on bf16 x (per-token quantization fused / on the fly)
  bf16        torch matmul, bf16 x and bf16 dense weights
  fp32        torch matmul, fp32 x and fp32 dense weights
  deq         the reference: dequantize_w4 + dequantized x, then an fp32 matmul, every call
  deq_comp    torch.compile of deq
  scaled_mm   (GPU) torch._scaled_mm with fp8 weights (per-row scales), bf16 output
  sm90        (GPU, compute capability 9.0) slab.ops.w4a8_gemm with the weights prepacked in the
              "sm90" layout (the wgmma kernel for M > 16); `slab` then uses "tiled"
  oracle      (GPU) the first-draft mma.sync kernel (SLAB_W4A8_ORACLE=1) on the "tiled" weights
  int4        (CPU) torch's int4 weight-only kernel, aten._weight_int4pack_mm_for_cpu, on the same
              int4 codes and group scales (bf16 x): what a CPU user would pick instead; compared
              with `linear` (both take bf16 activations), column int4/linear
  same        (CPU) the sum of float32 tensors holding as many bytes as the int4 codes, on huge
              pages, cycling through cold copies as slab does: a plain stream of the same bytes
              in the same rounds (`slab/same` = slab's time over its time)
  read        the sum of a float32 tensor far larger than the last-level cache (CPU 256 MiB on
              huge pages, as slab's "panel" weights are; GPU 1 GiB): its bytes over its median
              time are the row's read bandwidth (`read GB/s`)
All calls run under torch.inference_mode(), as an inference engine runs a decode step.
Floor: the bytes the W4A8 job must move (packed weights N K / 2, fp32 scales, fp8 x, bf16 y)
divided by the MEASURED copy bandwidth (bytes read + written per second of a large copy), and
the fraction of it slab reaches; and `int4 of read BW`: the packed int4 bytes over slab's time,
as a fraction of the MEASURED read bandwidth (`read`, timed in the same rounds: the same
statistic over the same minutes as slab's time), the limit of a GEMV that streams its weights
once. Every shape is verified against a float64 reference of the SPEC formula
before it is timed.

Accuracy (--accuracy): relative error ||y - y_ref|| / ||y_ref|| of W4A8Linear against the float
nn.Linear it was made from, for normal and heavy-tailed (Student t, 3 degrees of freedom)
weights and every group size, with normal activations; plus the weight-only (int4 weights, float
activations) part of it.

Usage:
  python bench/bench_w4a8.py                    # M 1,4,16,64 x Llama-7B shapes, group 128
  python bench/bench_w4a8.py --quick --threads 1
  python bench/bench_w4a8.py --m 1 --shapes 4096x4096 --group 32,128 --no-compile
  python bench/bench_w4a8.py --shapes 8192x8192,28672x8192 --m 1    # Llama-70B (large)
  python bench/bench_w4a8.py --accuracy --no-speed
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import sys

import torch

import slab
import slab.nn
import slab.ops
from slab import _bench as B
from slab import info as slab_info
from slab import quant
from slab.reference import w4a8 as RW
from slab.reference.compare import compare

LLAMA7B = "4096x4096,11008x4096,4096x11008"


@dataclasses.dataclass(frozen=True)
class Config:
    m: int
    nk: str
    group: int


def verify(cfg, xq, xs, weights, packed, scales):
    rows = min(cfg.m, 4)
    n_chk = min(packed.shape[0], 256)
    got = (
        slab.ops.w4a8_gemm(xq[:rows], xs[:rows], packed[:n_chk], scales[:n_chk], cfg.group, out_dtype=torch.float32)
        .double()
        .cpu()
    )
    ref = RW.w4a8_gemm(xq[:rows], xs[:rows], packed[:n_chk], scales[:n_chk], cfg.group)
    full = slab.ops.w4a8_gemm(xq, xs, weights, out_dtype=torch.float32)[:rows, :n_chk].double().cpu()
    for name, y in (("w4a8_gemm (row-major)", got), ("w4a8_gemm (prepacked)", full)):
        c = compare(y, ref, torch.float32, name=name, equal_nan=False)  # the shared float32 tolerance
        if not c.ok:
            sys.exit(f"{cfg}: slab disagrees with slab.reference.w4a8: {c.message}")


def oracle_call(fn):
    """``fn`` run with SLAB_W4A8_ORACLE=1: the first-draft CUDA kernel for every M."""

    def call():
        os.environ["SLAB_W4A8_ORACLE"] = "1"
        try:
            return fn()
        finally:
            del os.environ["SLAB_W4A8_ORACLE"]

    return call


def torch_int4_weights(packed, scales, group):
    """The same int4 weights for torch's CPU int4 kernel: codes q + 8 in [0, 15] packed by
    aten._convert_weight_to_int4pack_for_cpu, scales_and_zeros (K / group, N, 2) = (scale, 0) in
    bf16 (the kernel computes (q' - 8) * scale + zero)."""
    q = quant.unpack_int4(packed).to(torch.int32) + 8
    wi = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(torch.bfloat16).contiguous()
    return wi, sz


@functools.cache
def last_level_cache_bytes():
    """The largest CPU cache this host reports (sysfs), 0 where it reports none."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(base) if os.path.isdir(base) else ():
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)


def cold_copies(make, nbytes, device):
    """Copies of one provider's weights (``make()`` builds one) to cycle through call by call on the
    CPU, so that each call finds its weights out of cache: enough to cover twice the last-level
    cache (a large shared L3, 480 MiB on one host here, otherwise holds them between calls, and a
    GEMV would read them faster than DRAM allows), at most 64 copies or 1.5 GiB. One on the GPU,
    where the timer flushes L2."""
    if device.type != "cpu":
        return [make()]
    count = max(1, min(64, -(-2 * last_level_cache_bytes() // nbytes), int(1.5 * 2**30) // nbytes))
    return [make() for _ in range(count)]


def cycling(fn, copies, start=0):
    """fn(copy) on the next copy, call by call, from copies[start]. Two providers sharing copies
    start half the list apart: one behind the other would find each copy just read (in cache)."""
    order = itertools.cycle(copies[start:] + copies[:start])
    return lambda: fn(next(order))


def run_speed(args, device):
    cols = [
        "m",
        "shape",
        B.Column("group", fmt="d"),
        B.Column("slab_ms", "slab ms", ".3f"),
        B.Column("linear_ms", "linear ms", ".3f"),
        B.Column("bf16_ms", "bf16 ms", ".3f"),
        B.Column("fp32_ms", "fp32 ms", ".3f"),
        B.Column("deq_ms", "deq ms", ".3f"),
        B.Column("comp_ms", "deq compile", ".3f"),
    ]
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    if device.type == "cuda":
        cols.append(B.Column("smm_ms", "scaled_mm ms", ".3f"))
        cols.append(B.Column("oracle_ms", "oracle ms", ".3f"))
        if sm90:
            cols += [B.Column("sm90_ms", "sm90 ms", ".3f"), B.Column("vs_smm", "smm/sm90", ".2f")]
    else:
        cols += [B.Column("int4_ms", "torch int4 ms", ".3f"), B.Column("vs_int4", "int4/linear", ".2f")]
    cols += [
        B.Column("vs_bf16", "bf16/slab", ".2f"),
        B.Column("vs_fp32", "fp32/slab", ".2f"),
        B.Column("floor_ms", "floor ms", ".3f"),
        B.Column("of_floor", "of floor", ".0%"),
        B.Column("vs_same", "slab/same", ".2f"),
        B.Column("read_gbs", "read GB/s", ".1f"),
        B.Column("of_read", "int4 of read BW", ".0%"),
    ]
    table = B.Table(cols, title=f"w4a8_gemm on {B.device_description(device)}")
    copy_bw = B.copy_bandwidth(device)
    read_fn, read_bytes = B.read_provider(device)
    deq = lambda xq, xs, p, s, g: (xq.float() * xs.unsqueeze(1)) @ quant.dequantize_w4(p, s, g).t()
    deq_comp = torch.compile(deq) if args.compile else None
    tm = dict(warmup=args.warmup, min_reps=args.reps, max_reps=args.max_reps, budget_s=args.budget)
    cache = {}
    cfgs = B.grid(
        Config,
        nk=args.shapes.split(","),
        group=[int(g) for g in args.group.split(",")],
        m=[int(m) for m in args.m.split(",")],
    )
    for c in cfgs:
        n, k = (int(v) for v in c.nk.split("x"))
        key = (c.nk, c.group)
        if key not in cache:
            cache.clear()
            gen = torch.Generator().manual_seed(0)
            w = (torch.randn(n, k, generator=gen) / k**0.5).to(device)
            packed, scales = quant.quantize_w4(w, c.group)
            w_sm90 = quant.prepack_w4(packed, scales, c.group, device, layout="sm90") if sm90 else None
            # No cache flush on the CPU: slab and torch's int4 kernel cycle through copies of their
            # weights (cold_copies), so that they come from DRAM as they would in a model far larger
            # than the cache; the dense providers stream more bytes than the quantized ones.
            w4_bytes = n * k // 2 + scales.numel() * 4
            layout = quant.cpu_layout() if device.type == "cpu" else None  # what W4A8Linear uses
            w4_copies = cold_copies(
                lambda: quant.prepack_w4(packed.clone(), scales.clone(), c.group, device, layout), w4_bytes, device
            )
            int4_copies = same_copies = None
            if device.type == "cpu" and c.group != -1:
                int4_copies = cold_copies(lambda: torch_int4_weights(packed, scales, c.group), w4_bytes, device)
            if device.type == "cpu":
                same_copies = cold_copies(lambda: B.read_provider(device, n * k // 2)[0], n * k // 2, device)
            cache[key] = (w, w.bfloat16(), packed, scales, w4_copies, int4_copies, same_copies, w_sm90)
        w, wb, packed, scales, w4_copies, int4_copies, same_copies, w_sm90 = cache[key]
        weights = w4_copies[0]
        x = torch.randn(c.m, k, device=device)
        xb = x.bfloat16()
        xq, xs = quant.quantize_fp8(x)
        verify(c, xq, xs, weights, packed, scales)
        fns = {
            "slab": cycling(lambda wc: slab.ops.w4a8_gemm(xq, xs, wc), w4_copies),
            "bf16": lambda: xb @ wb.t(),
            "linear": cycling(lambda wc: slab.ops.w4a8_linear(xb, wc), w4_copies, len(w4_copies) // 2),
            "fp32": lambda: x @ w.t(),
            "deq": lambda: deq(xq, xs, packed, scales, c.group),
            "read": read_fn,
        }
        if deq_comp is not None:
            fns["comp"] = lambda: deq_comp(xq, xs, packed, scales, c.group)
        if same_copies is not None:
            fns["same"] = cycling(lambda read: read(), same_copies)
        if int4_copies is not None:
            fns["int4"] = cycling(
                lambda wc: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wc[0], c.group, wc[1]), int4_copies
            )
        if w_sm90 is not None:
            verify(c, xq, xs, w_sm90, packed, scales)
            fns["sm90"] = lambda: slab.ops.w4a8_gemm(xq, xs, w_sm90)
        if device.type == "cuda":
            fns["oracle"] = oracle_call(lambda: slab.ops.w4a8_gemm(xq, xs, weights))
            w8, ws8 = quant.quantize_fp8(w)
            w8t, ws8r = w8.t(), ws8.reshape(1, -1)
            fns["smm"] = lambda: torch._scaled_mm(
                xq, w8t, scale_a=xs.reshape(-1, 1), scale_b=ws8r, out_dtype=torch.bfloat16
            )
        with torch.inference_mode():
            times = {name: t.median_ms for name, t in B.time_fns(fns, device, **tm).items()}
        read_bw = read_bytes / (times["read"] * 1e-3)
        g = k if c.group == -1 else c.group
        nbytes = n * k / 2 + n * (k // g) * 4 + c.m * k + c.m * 4 + c.m * n * 2
        floor_ms = nbytes / copy_bw * 1e3
        row = dict(
            m=c.m,
            shape=f"{n}x{k}",
            group=c.group,
            slab_ms=times["slab"],
            linear_ms=times["linear"],
            bf16_ms=times["bf16"],
            fp32_ms=times["fp32"],
            deq_ms=times["deq"],
            comp_ms=times.get("comp"),
            smm_ms=times.get("smm"),
            oracle_ms=times.get("oracle"),
            sm90_ms=times.get("sm90"),
            vs_smm=times["smm"] / times["sm90"] if "sm90" in times else None,
            int4_ms=times.get("int4"),
            vs_int4=times["int4"] / times["linear"] if "int4" in times else None,
            vs_bf16=times["bf16"] / times["slab"],
            vs_fp32=times["fp32"] / times["slab"],
            floor_ms=floor_ms,
            of_floor=floor_ms / times["slab"],
            vs_same=times["slab"] / times["same"] if "same" in times else None,
            read_gbs=read_bw / 1e9,
            of_read=n * k / 2 / read_bw / (times["slab"] * 1e-3),
        )
        table.add(row)
        print(table.render().splitlines()[-1], flush=True)
    print()
    table.notes.append(
        f"copy bandwidth (read + write) measured: {copy_bw / 1e9:.1f} GB/s (best run); floor = W4A8 bytes / that; "
        "read GB/s: the `read` provider's median, timed with the others"
    )
    if device.type == "cpu":
        table.notes.append(f"slab's CPU GEMM kernels: {slab_info.collect()['cpu']['w4a8_kernels']} (slab info)")
        table.notes.append(
            f"slab and torch int4 cycle through copies of their weights covering twice the last-level cache "
            f"({last_level_cache_bytes() / 2**20:.0f} MiB), at most 64 or 1.5 GiB: from DRAM where 64 copies cover it"
        )
    table.print()
    return table


def run_accuracy(args, device):
    table = B.Table(
        [
            "weights",
            B.Column("group", fmt="d"),
            B.Column("w4a8", "W4A8 rel err", ".4f"),
            B.Column("w4", "int4 weights only", ".4f"),
            B.Column("a8", "fp8 acts only", ".4f"),
        ],
        title="W4A8Linear vs the float nn.Linear (4096 -> 1024, 64 tokens): ||y - y_ref|| / ||y_ref||",
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4096, generator=gen).to(device)
    xq, xs = quant.quantize_fp8(x)
    x_a8 = xq.float() * xs.unsqueeze(1)
    for kind in ("normal", "student-t(3)"):
        if kind == "normal":
            w = torch.randn(1024, 4096, generator=gen)
        else:
            w = torch.distributions.StudentT(3.0).sample((1024, 4096))
        lin = torch.nn.Linear(4096, 1024, bias=False).to(device)
        with torch.no_grad():
            lin.weight.copy_(w / 4096**0.5)
        ref = lin(x).detach().double()
        rel = lambda y: float((y.double() - ref).norm() / ref.norm())
        a8 = rel(lin(x_a8).detach())
        for group in (32, 64, 128, -1):
            mod = slab.nn.W4A8Linear.from_linear(lin, group_size=group)
            w4 = rel(x @ quant.dequantize_w4(mod.packed, mod.scales, group).t())
            table.add(weights=kind, group=group, w4a8=rel(mod(x)), w4=w4, a8=a8)
    table.print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--m", default=None, help="comma list of M (default 1,4,16,64; GPU adds 256,4096)")
    ap.add_argument("--shapes", default=LLAMA7B, help="comma list of NxK")
    ap.add_argument("--group", default="128")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--accuracy", action="store_true", help="also print the accuracy report")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
    ap.add_argument("--json", default=None)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    device = B.start(args.threads, args.device)
    if args.m is None:
        args.m = "1,4,16,64" + (",256,4096" if device.type == "cuda" else "")
    args.warmup, args.reps, args.max_reps, args.budget = (2, 5, 20, 0.3) if args.quick else (3, 10, 100, 1.0)
    if args.speed:
        table = run_speed(args, device)
        for path in (args.json, args.csv):
            if path:
                B.write_results(
                    path,
                    table.rows,
                    {"device": B.device_description(device)},
                    fmt="csv" if path == args.csv else "json",
                )
    if args.accuracy:
        run_accuracy(args, device)


if __name__ == "__main__":
    main()
