"""slab-bench entries of the SLA family (SPEC section 2): sla (causal / non-causal), sla_step, and
the depthwise convolutions of V (dwc2d, causal_dwc1d, causal_dwc1d_step)."""

from __future__ import annotations

import torch

from slab.bench import CHECK_DTYPES, BenchContext, Entry, elem_size, register, run_cases, speed_row


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- sla ---------------------------------------------------------------------------------------
def _sla_case(causal: bool):
    def case(device, dtype):
        import slab.ops
        from slab.reference import sla as R

        g = _gen(3)
        q, k = (torch.randn(2, 3, 131, 32, generator=g).to(device, dtype) for _ in range(2))
        v = torch.randn(2, 3, 131, 48, generator=g).to(device, dtype)
        go = torch.randn(2, 3, 131, 48, generator=g).to(device, dtype)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        out = slab.ops.sla(*leaves, causal=causal)
        if out.dtype != dtype:
            raise AssertionError(f"output dtype {out.dtype}, expected {dtype}")
        expected = R.sla(*refs, causal=causal)
        got_g = torch.autograd.grad(out, leaves, go)
        ref_g = torch.autograd.grad(expected, refs, go.double())
        return [("o", out, expected)] + [(f"d{n}", a, b) for n, a, b in zip("qkv", got_g, ref_g)]

    return case


def _sla_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    from slab.reference import sla as R

    rows = []
    shapes = [(1, 4, 512, 64)] if ctx.quick else [(4, 16, 1024, 64), (1, 16, 4096, 64)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    compiled = torch.compile(R.sla) if ctx.compile else None
    for dtype in ctx.dtypes:
        for b, h, n, d in shapes:
            q, k, v, go = (torch.randn(b, h, n, d, device=ctx.device, dtype=dtype) for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))

            def train(fn):
                return lambda: torch.autograd.grad(fn(), (q, k, v), go)

            providers = {
                "slab": train(lambda: slab.ops.sla(q, k, v, causal=True)),
                "eager": train(lambda: R.sla(q, k, v, True)),
                "library": train(lambda: sdpa(q, k, v, is_causal=True)),  # softmax attention
            }
            if compiled is not None:
                providers["compile"] = train(lambda: compiled(q, k, v, True))
            floor = elem_size(dtype) * b * h * n * d * 8  # read q, k, v, do; write o, dq, dk, dv
            rows.append(
                speed_row(
                    ctx,
                    op="sla",
                    case="causal fwd+bwd",
                    shape=(b, h, n, d),
                    dtype=dtype,
                    timings=ctx.time_many(providers),
                    bytes_floor=floor,
                )
            )
            with torch.no_grad():
                providers = {
                    "slab": lambda: slab.ops.sla(q, k, v, causal=False),
                    "eager": lambda: R.sla(q, k, v, False),
                    "library": lambda: sdpa(q, k, v),
                }
                floor = elem_size(dtype) * b * h * n * d * 4
                rows.append(
                    speed_row(
                        ctx,
                        op="sla",
                        case="non-causal fwd",
                        shape=(b, h, n, d),
                        dtype=dtype,
                        timings=ctx.time_many(providers),
                        bytes_floor=floor,
                    )
                )
    return rows


# ---- sla_step ----------------------------------------------------------------------------------
def _step_case(device, dtype):
    import slab.ops
    from slab.reference import sla as R

    g = _gen(5)
    b, h, n, d, dv = 2, 3, 17, 24, 40
    q, k = (torch.randn(b, h, n + 3, d, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(b, h, n + 3, dv, generator=g).to(device, dtype)
    s64, z64 = R.sla_state(k[:, :, :n].double(), v[:, :, :n].double())
    state, z = s64.float().to(device), z64.float().to(device)
    st_ref, z_ref = state.double(), z.double()
    pairs = []
    for t in range(n, n + 3):  # three decode tokens after the prefix
        o = slab.ops.sla_step(q[:, :, t], k[:, :, t], v[:, :, t], state, z)
        o_ref, st_ref, z_ref = R.sla_step(q[:, :, t].double(), k[:, :, t].double(), v[:, :, t].double(), st_ref, z_ref)
        pairs.append((f"o[{t}]", o, o_ref))
    # the float32 state, judged at float32
    return pairs + [("state", state, st_ref, torch.float32), ("z", z, z_ref, torch.float32)]


def _step_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    from slab.reference import sla as R

    rows = []
    b, h, d = (1, 16, 64) if ctx.quick else (8, 32, 128)
    for dtype in ctx.dtypes:
        q, k, v = (torch.randn(b, h, d, device=ctx.device, dtype=dtype) for _ in range(3))
        state = torch.zeros(b, h, d, d, device=ctx.device)
        z = torch.zeros(b, h, d, device=ctx.device)
        s2, z2 = state.clone(), z.clone()
        with torch.no_grad():
            timings = ctx.time_many(
                {
                    "slab": lambda: slab.ops.sla_step(q, k, v, state, z),
                    "eager": lambda: R.sla_step(q.float(), k.float(), v.float(), s2, z2),
                }
            )
        floor = 3 * b * h * d * elem_size(dtype) + 2 * (b * h * d * d + b * h * d) * 4 + b * h * d * elem_size(dtype)
        rows.append(
            speed_row(
                ctx,
                op="sla_step",
                case="decode 1 token",
                shape=(b, h, d, d),
                dtype=dtype,
                timings=timings,
                bytes_floor=floor,
            )
        )
    return rows


# ---- depthwise convolutions --------------------------------------------------------------------
def _dwc_case(kind: str):
    def case(device, dtype):
        import slab.ops
        from slab.reference import sla as R

        g = _gen(7)
        b, h, c = 2, 3, 12
        n = 35 if kind == "dwc2d" else 29
        v = torch.randn(b, h, n, c, generator=g).to(device, dtype)
        res = torch.randn(b, h, n, c, generator=g).to(device, dtype)
        w = (
            torch.randn(c, 1, 3, 5, generator=g) * 0.3 if kind == "dwc2d" else torch.randn(c, 1, 4, generator=g) * 0.3
        ).to(device, dtype)
        bias = torch.randn(c, generator=g).to(device, dtype)
        go = torch.randn(b, h, n, c, generator=g).to(device, dtype)
        leaves = [t.clone().requires_grad_() for t in (v, w, bias, res)]
        refs = [t.detach().double().requires_grad_() for t in (v, w, bias, res)]
        if kind == "dwc2d":
            out = slab.ops.dwc2d(leaves[0], leaves[1], leaves[2], (5, 7), leaves[3])
            exp = R.dwc2d(refs[0], refs[1], refs[2], (5, 7), refs[3])
        else:
            out = slab.ops.causal_dwc1d(*leaves)
            exp = R.causal_dwc1d(*refs)
        if out.dtype != dtype:
            raise AssertionError(f"output dtype {out.dtype}, expected {dtype}")
        got_g = torch.autograd.grad(out, leaves, go)
        ref_g = torch.autograd.grad(exp, refs, go.double())
        return [("y", out, exp)] + [
            (f"d{nm}", a, e) for nm, a, e in zip(("v", "weight", "bias", "residual"), got_g, ref_g)
        ]

    return case


def _dwc_step_case(device, dtype):
    import slab.ops
    from slab.ops.dwc import dwc_cache_from_prefill
    from slab.reference import sla as R

    g = _gen(9)
    b, h, c, kk, n = 2, 3, 12, 4, 6
    v = torch.randn(b, h, n + 3, c, generator=g).to(device, dtype)
    w = (torch.randn(c, 1, kk, generator=g) * 0.3).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    cache = dwc_cache_from_prefill(v[:, :, :n], kk)
    cache_ref = cache.double()
    pairs = []
    for t in range(n, n + 3):
        y = slab.ops.causal_dwc1d_step(v[:, :, t], cache, w, bias)
        y_ref, cache_ref = R.causal_dwc1d_step(v[:, :, t].double(), cache_ref, w.double(), bias.double())
        pairs.append((f"y[{t}]", y, y_ref))
    full = R.causal_dwc1d(v.double(), w.double(), bias.double())[:, :, n:]
    pairs.append(("y == causal_dwc1d", torch.stack([p[1] for p in pairs], 2), full))
    return pairs + [("cache", cache, cache_ref)]


def _dwc_bench(kind: str):
    def bench(ctx: BenchContext) -> list[dict]:
        import slab.ops
        from slab.reference import sla as R

        rows = []
        if kind == "dwc2d":
            b, h, side, c = (8, 6, 14, 64) if ctx.quick else (64, 6, 14, 64)
            n = side * side
        else:
            b, h, n, c = (2, 8, 512, 64) if ctx.quick else (4, 16, 2048, 64)
        for dtype in ctx.dtypes:
            v = torch.randn(b, h, n, c, device=ctx.device, dtype=dtype)
            res = torch.randn_like(v)
            if kind == "dwc2d":
                w = torch.randn(c, 1, 5, 5, device=ctx.device, dtype=dtype) * 0.2
            else:
                w = torch.randn(c, 1, 4, device=ctx.device, dtype=dtype) * 0.2
            bias = torch.randn(c, device=ctx.device, dtype=dtype)
            with torch.no_grad():
                if kind == "dwc2d":
                    fns = {
                        "slab": lambda: slab.ops.dwc2d(v, w, bias, None, res),
                        "eager": lambda: R.dwc2d(v, w, bias, None, res),
                    }
                else:
                    fns = {
                        "slab": lambda: slab.ops.causal_dwc1d(v, w, bias, res),
                        "eager": lambda: R.causal_dwc1d(v, w, bias, res),
                    }
                timings = ctx.time_many(fns)
            floor = 3.0 * v.numel() * elem_size(dtype)  # read v, residual; write y
            rows.append(
                speed_row(ctx, op=kind, case="fwd", shape=(b, h, n, c), dtype=dtype, timings=timings, bytes_floor=floor)
            )
        return rows

    return bench


def _dwc_step_bench(ctx: BenchContext) -> list[dict]:
    import slab.ops
    from slab.reference import sla as R

    rows = []
    b, h, c, kk = (4, 16, 64, 4) if ctx.quick else (32, 32, 128, 4)
    for dtype in ctx.dtypes:
        v = torch.randn(b, h, c, device=ctx.device, dtype=dtype)
        cache = torch.zeros(b, h, kk - 1, c, device=ctx.device, dtype=dtype)
        cache2 = cache.clone()
        w = torch.randn(c, 1, kk, device=ctx.device, dtype=dtype)
        with torch.no_grad():
            timings = ctx.time_many(
                {
                    "slab": lambda: slab.ops.causal_dwc1d_step(v, cache, w),
                    "eager": lambda: R.causal_dwc1d_step(v, cache2, w),
                }
            )
        floor = (2 * v.numel() + 2 * cache.numel()) * elem_size(dtype)
        rows.append(
            speed_row(
                ctx,
                op="causal_dwc1d_step",
                case="decode 1 token",
                shape=(b, h, kk, c),
                dtype=dtype,
                timings=timings,
                bytes_floor=floor,
            )
        )
    return rows


register(
    Entry(
        "sla",
        "sla",
        "simplified linear attention, causal fwd+bwd and non-causal fwd (library: SDPA softmax attention)",
        lambda device: run_cases(
            "sla",
            [("causal 2x3x131 D=32 Dv=48", _sla_case(True)), ("non-causal 2x3x131 D=32 Dv=48", _sla_case(False))],
            CHECK_DTYPES,
            device,
        ),
        _sla_bench,
    )
)
register(
    Entry(
        "sla_step",
        "sla",
        "SLA decode step (state, z updated in place) after a prefill",
        lambda device: run_cases("sla_step", [("3 tokens after 17, D=24 Dv=40", _step_case)], CHECK_DTYPES, device),
        _step_bench,
    )
)
register(
    Entry(
        "dwc2d",
        "sla",
        "depthwise conv2d of V over the token grid + residual, fwd+bwd checked",
        lambda device: run_cases("dwc2d", [("5x7 grid, 3x5 kernel", _dwc_case("dwc2d"))], CHECK_DTYPES, device),
        _dwc_bench("dwc2d"),
    )
)
register(
    Entry(
        "causal_dwc1d",
        "sla",
        "causal depthwise conv1d of V + residual, fwd+bwd checked",
        lambda device: run_cases(
            "causal_dwc1d", [("29 tokens, kernel 4", _dwc_case("causal_dwc1d"))], CHECK_DTYPES, device
        ),
        _dwc_bench("causal_dwc1d"),
    )
)
register(
    Entry(
        "causal_dwc1d_step",
        "sla",
        "causal depthwise conv1d decode step (cache updated in place)",
        lambda device: run_cases(
            "causal_dwc1d_step", [("3 tokens after 6, kernel 4", _dwc_step_case)], CHECK_DTYPES, device
        ),
        _dwc_step_bench,
    )
)
