"""slab-bench entries of the INT4 x FP8 family (SPEC section 4): quantize_fp8, w4a8_gemm, w4a8_linear."""

from __future__ import annotations

import torch

from slab.bench import CHECK_DTYPES, BenchContext, Entry, elem_size, register, run_cases, speed_row


def weights(device, n, k, group_size, seed=0):
    """Random (N, K) float32 weights, their ``quantize_w4`` codes and scales, and the prepacked form
    (in the layout W4A8Linear prepacks: on the CPU ``cpu_layout()``'s)."""
    import slab.quant

    g = torch.Generator().manual_seed(seed + n * 7 + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    packed, scales = slab.quant.quantize_w4(w, group_size)
    layout = slab.quant.cpu_layout() if torch.device(device).type == "cpu" else None
    return w, packed, scales, slab.quant.prepack_w4(packed, scales, group_size, device, layout)


def _x(device, dtype, m, k, seed=1):
    g = torch.Generator().manual_seed(seed + m)
    return torch.randn(m, k, generator=g).to(device, dtype)


def _fp8_case(device, dtype):
    import slab.quant
    from slab.reference import w4a8 as R

    x = _x(device, dtype, 37, 300) * 3
    x[3] = 0  # a zero row gets scale 1
    q, s = slab.quant.quantize_fp8(x)
    qr, sr = R.quantize_fp8(x.cpu())
    if q.dtype != torch.float8_e4m3fn:
        raise AssertionError(f"codes dtype {q.dtype}, expected float8_e4m3fn")
    # bit for bit: judged at the float64 tolerance
    return [("codes", q.float(), qr.float(), torch.float64), ("scale", s, sr, torch.float64)]


def _gemm_case(form: str, m: int, group_size: int):
    def case(device, dtype):
        import slab.ops
        import slab.quant
        from slab.reference import w4a8 as R

        n, k = 257, 256
        w, packed, scales, pw = weights(device, n, k, group_size)
        x = _x(device, dtype, m, k)
        pairs = []
        if form == "gemm":
            xq, xs = slab.quant.quantize_fp8(x)
            y = slab.ops.w4a8_gemm(xq, xs, pw, out_dtype=dtype)
            exp = R.w4a8_gemm(xq, xs, packed, scales, group_size)
            codes, sc = R.quantize_w4(w, group_size)  # the SPEC weight quantization, independently
            pairs += [
                ("w4 codes", R.int4_of(packed).double(), codes.double(), torch.float64),
                ("w4 scales", scales, sc, torch.float32),
            ]
        else:
            bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(device, dtype)
            y = slab.ops.w4a8_linear(x, pw, bias=bias)
            exp = R.w4a8_linear(x, packed, scales, group_size, bias.double())
        if y.dtype != dtype:
            raise AssertionError(f"output dtype {y.dtype}, expected {dtype}")
        return [("y", y, exp)] + pairs

    return case


def _bench(form: str):
    def bench(ctx: BenchContext) -> list[dict]:
        import slab.ops
        import slab.quant

        rows = []
        n = k = 2048 if ctx.quick else 4096
        group_size = 128
        _w, packed, scales, pw = weights(ctx.device, n, k, group_size)
        for dtype in ctx.dtypes:
            w = _w.to(ctx.device, dtype)
            for m in (1,) if ctx.quick else (1, 16, 64):
                x = _x(ctx.device, dtype, m, k)
                xq, xs = slab.quant.quantize_fp8(x)

                def dequant_matmul(x=x):  # the eager composite: quantize, dequantize, float matmul
                    x_fp8, x_scale = slab.quant.quantize_fp8(x)
                    w_deq = slab.quant.dequantize_w4(packed, scales, group_size).to(x.device, x.dtype)
                    return (x_fp8.to(x.dtype) * x_scale[:, None].to(x.dtype)) @ w_deq.T

                with torch.no_grad():
                    if form == "gemm":
                        fns = {"slab": lambda: slab.ops.w4a8_gemm(xq, xs, pw, out_dtype=dtype)}
                    else:
                        fns = {"slab": lambda: slab.ops.w4a8_linear(x, pw)}
                    fns["eager"] = dequant_matmul
                    fns["library"] = lambda: x @ w.T  # torch matmul with float weights of x's dtype
                    if ctx.compile:
                        comp = torch.compile(dequant_matmul)
                        fns["compile"] = lambda: comp(x)
                    timings = ctx.time_many(fns)
                floor = n * k / 2 + n * (k // group_size) * 4 + (m * k + m * n) * elem_size(dtype)
                rows.append(
                    speed_row(
                        ctx,
                        op=f"w4a8_{form}",
                        case=f"M={m}",
                        shape=(m, n, k),
                        dtype=dtype,
                        timings=timings,
                        bytes_floor=floor,
                        size=m * n * k,
                    )
                )
        return rows

    return bench


def _fp8_bench(ctx: BenchContext) -> list[dict]:
    import slab.quant
    from slab.reference import w4a8 as R

    rows = []
    shape = (64, 4096) if ctx.quick else (2048, 4096)
    for dtype in ctx.dtypes:
        x = torch.randn(shape, device=ctx.device, dtype=dtype)
        timings = ctx.time_many({"slab": lambda: slab.quant.quantize_fp8(x), "eager": lambda: R.quantize_fp8(x)})
        floor = x.numel() * (elem_size(dtype) + 1) + shape[0] * 4
        rows.append(
            speed_row(
                ctx, op="quantize_fp8", case="per row", shape=shape, dtype=dtype, timings=timings, bytes_floor=floor
            )
        )
    return rows


register(
    Entry(
        "quantize_fp8",
        "w4a8",
        "per-token float8_e4m3fn quantization (codes and scales bit for bit)",
        lambda device: run_cases("quantize_fp8", [("37x300, a zero row", _fp8_case)], CHECK_DTYPES, device),
        _fp8_bench,
    )
)
register(
    Entry(
        "w4a8_gemm",
        "w4a8",
        "INT4 weights x FP8 activations GEMM on pre-quantized x "
        "(eager: dequantize + matmul; library: matmul with float weights)",
        lambda device: run_cases(
            "w4a8_gemm",
            [(f"M={m}, 257x256, group {g}", _gemm_case("gemm", m, g)) for m in (1, 16, 67) for g in (128, -1)],
            CHECK_DTYPES,
            device,
        ),
        _bench("gemm"),
    )
)
register(
    Entry(
        "w4a8_linear",
        "w4a8",
        "w4a8_gemm quantizing x on the fly, with bias",
        lambda device: run_cases(
            "w4a8_linear",
            [(f"M={m}, 257x256, group 128", _gemm_case("linear", m, 128)) for m in (1, 33)],
            CHECK_DTYPES,
            device,
        ),
        _bench("linear"),
    )
)
