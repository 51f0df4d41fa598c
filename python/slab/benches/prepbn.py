"""slab-bench entries of the PRepBN family (SPEC section 1): rep_bn, prep_bn (train and eval)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from slab.bench import CHECK_DTYPES, BenchContext, Entry, elem_size, register, run_cases, speed_row

CHECK_SHAPE = (3, 37, 67)  # odd token count and channel count


def check_case(device, dtype, *, norm: str, training: bool, masked: bool, lam: float = 0.3, seed: int = 0):
    """rep_bn (norm="none") or prep_bn once against slab.reference in float64: the output, every
    gradient and (training) the running statistics."""
    import slab.ops
    import slab.reference as ref

    g = torch.Generator().manual_seed(seed)
    c = CHECK_SHAPE[-1]

    def rnd(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift

    x = rnd(*CHECK_SHAPE, scale=2.0, shift=0.5).to(dtype).to(device)
    dy = rnd(*CHECK_SHAPE).to(dtype).to(device)
    p64 = {
        "norm_weight": rnd(c, scale=0.2, shift=1.0),
        "norm_bias": rnd(c, scale=0.2),
        "bn_weight": rnd(c, scale=0.2, shift=1.0),
        "bn_bias": rnd(c, scale=0.2),
        "alpha": torch.tensor([0.7], dtype=torch.float64),
    }
    if norm == "rms":
        p64["norm_bias"] = None
    if norm == "none":
        p64["norm_weight"] = p64["norm_bias"] = None
    running = {"running_mean": rnd(c, scale=0.1), "running_var": rnd(c, scale=0.1).abs() + 0.8}
    mask = None
    if masked:
        mask = torch.rand(CHECK_SHAPE[:-1], generator=g) > 0.3
        mask.view(-1)[:2] = True
        mask = mask.to(device)

    def run(xx, dyy, params, stats, impl):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items() if v is not None}
        xl = xx.detach().clone().requires_grad_()
        if norm == "none":
            y = impl.rep_bn(
                xl,
                leaves["bn_weight"],
                leaves["bn_bias"],
                leaves["alpha"],
                stats["running_mean"],
                stats["running_var"],
                training,
                0.1,
                1e-5,
                mask,
            )
        else:
            y = impl.prep_bn(
                xl,
                leaves["norm_weight"],
                leaves.get("norm_bias"),
                leaves["bn_weight"],
                leaves["bn_bias"],
                leaves["alpha"],
                stats["running_mean"],
                stats["running_var"],
                lam,
                training,
                0.1,
                1e-5,
                1e-6,
                norm,
                mask,
            )
        grads = torch.autograd.grad(y, [xl] + list(leaves.values()), dyy)
        return y, dict(zip(["x"] + list(leaves), grads)), stats

    ours = run(
        x,
        dy,
        {k: (v.to(device, torch.float32) if v is not None else None) for k, v in p64.items()},
        {k: v.to(device, torch.float32) for k, v in running.items()},
        slab.ops,
    )
    theirs = run(
        x.double(),
        dy.double(),
        {k: (v.to(device) if v is not None else None) for k, v in p64.items()},
        {k: v.to(device) for k, v in running.items()},
        ref,
    )
    pairs: list[tuple] = [("y", ours[0], theirs[0])]
    if ours[0].dtype != dtype:
        raise AssertionError(f"output dtype {ours[0].dtype}, expected {dtype}")
    # parameters are float32 on our side: their gradients are judged at the input's tolerance
    pairs += [(f"d{k}", ours[1].get(k), theirs[1][k]) for k in theirs[1]]
    if training:  # float32 statistics
        pairs += [(k, ours[2][k], theirs[2][k], torch.float32) for k in ("running_mean", "running_var")]
    return pairs


def _cases(spec):
    return [(name, (lambda device, dtype, kw=kw: check_case(device, dtype, **kw))) for name, kw in spec]


BENCH_SHAPES = [(64, 196, 384), (8, 512, 1024)]  # DeiT-S tokens, an LM batch
QUICK_SHAPES = [(16, 196, 384)]


def train_step(forward: Callable, x: torch.Tensor, params: Sequence[torch.Tensor], dy: torch.Tensor):
    """One training forward + backward (torch.autograd.grad: no accumulation into .grad)."""
    inputs = [x, *params]

    def step():
        return torch.autograd.grad(forward(x), inputs, dy)

    return step


def bytes_train(shape, dtype) -> tuple[float, float]:
    """(bytes slab's training fwd+bwd moves: 8 tensor passes, the floor: 5 passes)."""
    n = 1
    for s in shape:
        n *= s
    return 8.0 * n * elem_size(dtype), 5.0 * n * elem_size(dtype)


def bench_train(kind: str):
    def bench(ctx: BenchContext) -> list[dict]:
        import slab.nn
        import slab.reference as ref

        rows = []
        for shape in QUICK_SHAPES if ctx.quick else BENCH_SHAPES:
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
                    ours, eager = slab.nn.RepBN(c), ref.SlabRepBN(c)
                ours.to(ctx.device).train()
                eager.load_state_dict(ours.state_dict())  # SLAB-compatible keys
                eager.to(ctx.device).train()
                fns: dict[str, Callable[[], Any]] = {
                    "slab": train_step(ours, x, list(ours.parameters()), dy),
                    "eager": train_step(eager, x, list(eager.parameters()), dy),
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
                    fns["compile"] = train_step(fn, x, list(comp.parameters()), dy)
                ln = torch.nn.LayerNorm(c, eps=1e-6).to(ctx.device)
                fns["library"] = train_step(ln, x, list(ln.parameters()), dy)
                moved, floor = bytes_train(shape, dtype)
                rows.append(
                    speed_row(
                        ctx,
                        op=kind,
                        case="train fwd+bwd",
                        shape=shape,
                        dtype=dtype,
                        timings=ctx.time_many(fns),
                        bytes_moved=moved,
                        bytes_floor=floor,
                    )
                )
        return rows

    return bench


def bench_eval(ctx: BenchContext) -> list[dict]:
    """RepBN in eval mode (the per-channel affine) against the eager SLAB module."""
    import slab.nn
    import slab.reference as ref

    rows = []
    for shape in QUICK_SHAPES if ctx.quick else BENCH_SHAPES:
        for dtype in ctx.dtypes:
            c = shape[-1]
            x = torch.randn(shape, device=ctx.device).to(dtype)
            ours = slab.nn.RepBN(c).to(ctx.device).eval()
            eager = ref.SlabRepBN(c)
            eager.load_state_dict(ours.state_dict())
            eager.to(ctx.device, dtype).eval()
            ours.to(ctx.device)
            with torch.no_grad():
                fns = {"slab": lambda: ours(x), "eager": lambda: eager(x)}
                if ctx.compile:
                    comp = torch.compile(eager, fullgraph=True, dynamic=False)
                    fns["compile"] = lambda: comp(x)
                timings = ctx.time_many(fns)
            floor = 2.0 * x.numel() * elem_size(dtype)
            rows.append(
                speed_row(
                    ctx, op="rep_bn", case="eval fwd", shape=shape, dtype=dtype, timings=timings, bytes_floor=floor
                )
            )
    return rows


def _bench_rep_bn(ctx):
    return bench_train("rep_bn")(ctx) + bench_eval(ctx)


register(
    Entry(
        "rep_bn",
        "prepbn",
        "RepBN: BatchNorm over the last dim + alpha * x, train (+mask) and eval (library: nn.LayerNorm fwd+bwd)",
        lambda device: run_cases(
            "rep_bn",
            _cases(
                [
                    ("train", dict(norm="none", training=True, masked=False)),
                    ("train+mask", dict(norm="none", training=True, masked=True)),
                    ("eval", dict(norm="none", training=False, masked=False)),
                ]
            ),
            CHECK_DTYPES,
            device,
        ),
        _bench_rep_bn,
    )
)
register(
    Entry(
        "prep_bn",
        "prepbn",
        "PRepBN: lam * LayerNorm/RMSNorm + (1 - lam) * RepBN, train and eval (library: nn.LayerNorm fwd+bwd)",
        lambda device: run_cases(
            "prep_bn",
            _cases(
                [
                    ("layer train", dict(norm="layer", training=True, masked=False)),
                    ("layer train+mask", dict(norm="layer", training=True, masked=True)),
                    ("layer eval", dict(norm="layer", training=False, masked=False)),
                    ("rms train+mask", dict(norm="rms", training=True, masked=True)),
                ]
            ),
            CHECK_DTYPES,
            device,
        ),
        bench_train("prep_bn"),
    )
)
