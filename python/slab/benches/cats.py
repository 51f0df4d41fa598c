"""slab-bench entries of the CATS family (SPEC section 3): cats, cats_mlp, token_select, token_scatter."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slab.bench import CHECK_DTYPES, BenchContext, Entry, elem_size, register, run_cases, speed_row


def _away(x64, t, margin=0.02):
    """x with every |silu(x)| at least ``margin`` (relative) away from t, so the keep decision does
    not depend on rounding."""
    s = F.silu(x64).abs()
    near = (s - t).abs() <= margin * max(t, 1e-3)
    return torch.where(near, x64 + 0.5 * torch.sign(x64 + 1e-9) + 0.25, x64)


def _cats_case(device, dtype):
    import slab.ops
    from slab.reference import cats as R

    g = torch.Generator().manual_seed(11)
    t = 0.3
    x64 = _away(torch.randn(7, 131, generator=g, dtype=torch.float64) * 2, t).to(dtype).double()
    x = x64.to(device, dtype).requires_grad_()
    dy = torch.randn(7, 131, generator=g).to(device, dtype)
    y = slab.ops.cats(x, t)
    if y.dtype != dtype:
        raise AssertionError(f"output dtype {y.dtype}, expected {dtype}")
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    yr = R.cats(xr, t)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    return [("y", y, yr), ("dx", dx, dxr), ("dx == cats_grad", dx, R.cats_grad(xr.detach(), dy.double(), t))]


def mlp_inputs(device, dtype, tokens, d, f, sparsity, seed=0):
    """Random gated-MLP weights (1/sqrt(fan-in)) and a threshold midway between two activations
    (so float32 and float64 agree on every keep decision)."""
    g = torch.Generator().manual_seed(seed + tokens * 1000 + d)
    x, wg, wu, wd = (torch.randn(*s, generator=g) / s[-1] ** 0.5 for s in ((tokens, d), (f, d), (f, d), (f, d)))
    x, wg, wu, wd = (t.to(dtype).float() for t in (x, wg, wu, wd))
    s = F.silu(x.double() @ wg.double().T).abs().flatten().sort().values
    k = int(sparsity * s.numel())
    threshold = float(s[k - 1] + s[k]) / 2 if k > 0 else 0.0
    return [t.to(device, dtype) for t in (x, wg, wu, wd)], threshold


def _mlp_case(tokens):
    def case(device, dtype):
        import slab.ops
        from slab.reference import cats as R

        args, t = mlp_inputs(device, dtype, tokens, 96, 257, 0.5)
        y = slab.ops.cats_mlp(*args, t)
        if y.dtype != dtype:
            raise AssertionError(f"output dtype {y.dtype}, expected {dtype}")
        return [("y", y, R.cats_mlp(*(a.double() for a in args), t))]

    return case


def _token_case(device, dtype):
    import slab.ops
    from slab.reference import cats as R

    g = torch.Generator().manual_seed(13)
    b, n, c, k = 3, 41, 9, 17
    x = torch.randn(b, n, c, generator=g).to(device, dtype).requires_grad_()
    scores = torch.randn(b, n, generator=g).to(device)
    kept, index = slab.ops.token_select(x, scores, k)
    xr = x.detach().double().requires_grad_()
    kept_r, index_r = R.token_select(xr, scores, k)
    dk = torch.randn(b, k, c, generator=g).to(device, dtype)
    (dx,) = torch.autograd.grad(kept, x, dk)
    (dxr,) = torch.autograd.grad(kept_r, xr, dk.double())
    return [("index", index, index_r.to(device), torch.float64), ("kept", kept, kept_r), ("dx", dx, dxr)]


def _scatter_case(device, dtype):
    import slab.ops
    from slab.reference import cats as R

    g = torch.Generator().manual_seed(17)
    b, n, c, k = 3, 41, 9, 17
    x = torch.randn(b, n, c, generator=g).to(device, dtype).requires_grad_()
    y = torch.randn(b, k, c, generator=g).to(device, dtype).requires_grad_()
    index = R.token_index(torch.randn(b, n, generator=g), k).to(device)
    out = slab.ops.token_scatter(x, y, index)
    xr, yr = (t.detach().double().requires_grad_() for t in (x, y))
    out_r = R.token_scatter(xr, yr, index)
    go = torch.randn(b, n, c, generator=g).to(device, dtype)
    got = torch.autograd.grad(out, (x, y), go)
    exp = torch.autograd.grad(out_r, (xr, yr), go.double())
    return [("out", out, out_r), ("dx", got[0], exp[0]), ("dy", got[1], exp[1])]


def _cats_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    from slab.reference import cats as R

    rows = []
    shape = (16, 2816) if ctx.quick else (64, 11008)
    for dtype in ctx.dtypes:
        x = torch.randn(shape, device=ctx.device, dtype=dtype).requires_grad_()
        dy = torch.randn(shape, device=ctx.device, dtype=dtype)
        fns = {
            "slab": lambda: torch.autograd.grad(slab.ops.cats(x, 0.2), x, dy),
            "eager": lambda: torch.autograd.grad(R.cats(x, 0.2), x, dy),
            "library": lambda: torch.autograd.grad(F.silu(x), x, dy),
        }
        if ctx.compile:
            comp = torch.compile(R.cats)
            fns["compile"] = lambda: torch.autograd.grad(comp(x, 0.2), x, dy)
        floor = 5.0 * x.numel() * elem_size(dtype)  # fwd: x -> y; bwd: x, dy -> dx
        rows.append(
            speed_row(
                ctx, op="cats", case="fwd+bwd", shape=shape, dtype=dtype, timings=ctx.time_many(fns), bytes_floor=floor
            )
        )
    return rows


def _mlp_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    from slab.reference import cats as R

    rows = []
    d, f = (1024, 2816) if ctx.quick else (4096, 11008)
    for dtype in ctx.dtypes:
        for sparsity in (0.5,) if ctx.quick else (0.5, 0.9):
            (x, wg, wu, wd_t), t = mlp_inputs(ctx.device, dtype, 1, d, f, sparsity)
            wd = wd_t.T.contiguous()
            with torch.no_grad():
                timings = ctx.time_many(
                    {
                        "slab": lambda: slab.ops.cats_mlp(x, wg, wu, wd_t, t),
                        "eager": lambda: R.cats_mlp(x, wg, wu, wd_t, t),
                        "library": lambda: R.dense_mlp(x, wg, wu, wd),  # the dense MLP
                    }
                )
            weight_bytes = 3 * f * d * elem_size(dtype)
            kept = weight_bytes * (1 + 2 * (1 - sparsity)) / 3  # gate dense, up/down kept rows only
            rows.append(
                speed_row(
                    ctx,
                    op="cats_mlp",
                    case=f"decode M=1 sparsity {sparsity}",
                    shape=(1, d, f),
                    dtype=dtype,
                    timings=timings,
                    bytes_floor=kept,
                    size=f * d,
                )
            )
    return rows


def _token_bench(kind: str):
    def bench(ctx: BenchContext) -> list[dict]:
        import slab.ops

        rows = []
        b, n, c = (8, 196, 384) if ctx.quick else (64, 196, 768)
        k = n // 2
        for dtype in ctx.dtypes:
            x = torch.randn(b, n, c, device=ctx.device, dtype=dtype)
            scores = torch.randn(b, n, device=ctx.device)
            _, index = slab.ops.token_select(x, scores, k)
            y = torch.randn(b, k, c, device=ctx.device, dtype=dtype)
            idx3 = index[:, :, None].expand(-1, -1, c)

            def eager_select():  # torch.topk, sorted back to token order, then gather
                i = scores.topk(k, dim=1).indices.sort(dim=1).values
                return torch.gather(x, 1, i[:, :, None].expand(-1, -1, c))

            with torch.no_grad():
                if kind == "token_select":
                    fns = {"slab": lambda: slab.ops.token_select(x, scores, k), "eager": eager_select}
                    floor = (b * k * c * 2) * elem_size(dtype) + b * n * 4
                else:
                    fns = {"slab": lambda: slab.ops.token_scatter(x, y, index), "eager": lambda: x.scatter(1, idx3, y)}
                    floor = (2 * x.numel() + y.numel()) * elem_size(dtype)
                timings = ctx.time_many(fns)
            rows.append(
                speed_row(
                    ctx, op=kind, case=f"keep {k}/{n}", shape=(b, n, c), dtype=dtype, timings=timings, bytes_floor=floor
                )
            )
        return rows

    return bench


register(
    Entry(
        "cats",
        "cats",
        "CATS thresholded SiLU, fwd+bwd (library: plain SiLU)",
        lambda device: run_cases("cats", [("7x131, t=0.3", _cats_case)], CHECK_DTYPES, device),
        _cats_bench,
    )
)
register(
    Entry(
        "cats_mlp",
        "cats",
        "CATS sparse gated MLP for decoding (library: the dense MLP)",
        lambda device: run_cases(
            "cats_mlp", [(f"{m} tokens, 96x257, 50% sparse", _mlp_case(m)) for m in (1, 4, 16)], CHECK_DTYPES, device
        ),
        _mlp_bench,
    )
)
register(
    Entry(
        "token_select",
        "cats",
        "LeMo token select: top-k tokens per sequence in order, fwd+bwd checked (eager: topk + sort + gather)",
        lambda device: run_cases("token_select", [("3x41x9 keep 17", _token_case)], CHECK_DTYPES, device),
        _token_bench("token_select"),
    )
)
register(
    Entry(
        "token_scatter",
        "cats",
        "LeMo token scatter back into the residual stream, fwd+bwd checked",
        lambda device: run_cases("token_scatter", [("3x41x9, 17 rows", _scatter_case)], CHECK_DTYPES, device),
        _token_bench("token_scatter"),
    )
)
