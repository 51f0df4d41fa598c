"""slab-bench entry of the Conv-BN fold (SPEC section 1, Efficient ConvBN): fold_conv_bn."""

from __future__ import annotations

import torch

from slab.bench import CHECK_DTYPES, BenchContext, Entry, elem_size, register, run_cases, speed_row


def _inputs(device, dtype, o, i, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, k, k, generator=g).to(device, dtype)
    b = torch.randn(o, generator=g).to(device, dtype)
    gamma = (torch.rand(o, generator=g) + 0.5).to(device, dtype)
    beta = torch.randn(o, generator=g).to(device, dtype)
    mean = torch.randn(o, generator=g).to(device, dtype)
    var = (torch.rand(o, generator=g) + 0.5).to(device, dtype)
    return w, b, gamma, beta, mean, var


def _case(device, dtype):
    import slab.ops
    from slab.reference import convbn as R

    args = _inputs(device, dtype, 19, 6, 3)
    leaves = [a.clone().requires_grad_(i < 4) for i, a in enumerate(args)]
    refs = [a.detach().double().requires_grad_(i < 4) for i, a in enumerate(args)]
    w, b = slab.ops.fold_conv_bn(*leaves, eps=1e-5)
    wr, br = R.fold_conv_bn(*refs, eps=1e-5)
    if w.dtype != dtype:
        raise AssertionError(f"folded weight dtype {w.dtype}, expected {dtype}")
    g = torch.Generator().manual_seed(1)
    gw, gb = torch.randn(w.shape, generator=g).to(device, dtype), torch.randn(b.shape, generator=g).to(device, dtype)
    got = torch.autograd.grad((w, b), leaves[:4], (gw, gb))
    exp = torch.autograd.grad((wr, br), refs[:4], (gw.double(), gb.double()))
    return [("w'", w, wr), ("b'", b, br)] + [
        (f"d{n}", a, e) for n, a, e in zip(("weight", "bias", "bn_weight", "bn_bias"), got, exp)
    ]


def _bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    from slab.reference import convbn as R

    rows = []
    o, i, k = (256, 256, 3) if ctx.quick else (512, 512, 3)
    for dtype in ctx.dtypes:
        args = _inputs(ctx.device, dtype, o, i, k)
        with torch.no_grad():
            timings = ctx.time_many(
                {"slab": lambda: slab.ops.fold_conv_bn(*args), "eager": lambda: R.fold_conv_bn(*args)}
            )
        floor = 2.0 * args[0].numel() * elem_size(dtype)
        rows.append(
            speed_row(
                ctx,
                op="fold_conv_bn",
                case="fold",
                shape=tuple(args[0].shape),
                dtype=dtype,
                timings=timings,
                bytes_floor=floor,
            )
        )
    return rows


register(
    Entry(
        "fold_conv_bn",
        "convbn",
        "Conv + eval-BN weight fold (Tune mode / deploy), fwd+bwd checked",
        lambda device: run_cases("fold_conv_bn", [("19x6x3x3", _case)], CHECK_DTYPES, device),
        _bench,
    )
)
