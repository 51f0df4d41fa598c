"""slab-bench entries of the fused optimizers (SPEC section 5): DoG, LDoG, Lion, LAMB, LARS, AdamP
and PolynomialDecayAverager, each stepped side by side with its float64 reference
(:mod:`slab.reference.optim`), float32 and bfloat16 parameters."""

from __future__ import annotations

import torch

from slab.bench import OPTIM_DTYPES, BenchContext, Entry, elem_size, register, run_cases, speed_row

SHAPES = ((37, 5), (129,), (1,), (16, 24))
STEPS = 6

# name -> (slab class name, reference class name, hyperparameters for both)
RULES = {
    "dog": ("DoG", "RefDoG", dict(reps_rel=0.05)),
    "ldog": ("LDoG", "RefDoG", dict(reps_rel=0.05)),
    "lion": ("Lion", "RefLion", dict(lr=1e-2, weight_decay=0.1)),
    "lamb": ("LAMB", "RefLAMB", dict(lr=1e-2)),
    "lars": ("LARS", "RefLARS", dict(lr=0.5)),
    "adamp": ("AdamP", "RefAdamP", dict(lr=1e-2, weight_decay=0.1)),
}


def _tensors(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g).to(device, dtype)) for s in SHAPES]
    grads = [[torch.randn(*s, generator=g).to(device, dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _rule_case(name):
    def case(device, dtype):
        import slab.optim
        from slab.reference import optim as R

        cls_name, ref_name, hyper = RULES[name]
        params, grads = _tensors(device, dtype)
        kw = dict(hyper)
        ref_kw = dict(hyper, layerwise=True) if name == "ldog" else dict(hyper)
        ref = getattr(R, ref_name)([p.detach().cpu() for p in params], R.rounding(dtype), **ref_kw)
        opt = getattr(slab.optim, cls_name)(params, **kw)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            ref.step([g.cpu() for g in gs])
        for p in params:
            if p.dtype != dtype:
                raise AssertionError(f"parameter dtype changed to {p.dtype}")
        return [(f"x[{i}] after {STEPS} steps", p.detach(), r) for i, (p, r) in enumerate(zip(params, ref.x))]

    return case


def _averager_case(device, dtype):
    import slab.optim
    from slab.reference import optim as R

    g = torch.Generator().manual_seed(3)
    model = torch.nn.Linear(7, 5).to(device, dtype)
    avg = slab.optim.PolynomialDecayAverager(model, gamma=8.0)
    ref = R.RefAverager([p.detach().cpu() for p in model.parameters()], gamma=8.0)
    with torch.no_grad():
        for _ in range(STEPS):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(device, dtype) * 0.1)
            avg.step()
            ref.step([p.cpu() for p in model.parameters()])
    got = list(avg.averaged_model.parameters())
    # the average is kept in the parameter dtype
    return [(f"avg[{i}]", a.detach(), r) for i, (a, r) in enumerate(zip(got, ref.avg))]


def _rule_bench(name):
    def bench(ctx: BenchContext) -> list[dict]:
        import slab.optim

        cls_name, _ref, hyper = RULES[name]
        rows = []
        numel = 1_000_000 if ctx.quick else 10_000_000
        sizes = [numel // 100] * 100
        for dtype in ctx.dtypes:
            if dtype not in OPTIM_DTYPES:
                continue
            params = [torch.nn.Parameter(torch.randn(n, device=ctx.device, dtype=dtype)) for n in sizes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opt = getattr(slab.optim, cls_name)(params, **hyper)
            twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for q, p in zip(twins, params):
                q.grad = p.grad.clone()
            try:
                adamw = torch.optim.AdamW(twins, fused=True)
                adamw.step()
            except (RuntimeError, TypeError):
                adamw = torch.optim.AdamW(twins, foreach=True)
            timings = ctx.time_many({"slab": opt.step, "library": adamw.step})
            e = elem_size(dtype)
            states = {"dog": 1, "ldog": 1, "lion": 1, "lamb": 2, "lars": 1, "adamp": 2}[name]
            floor = numel * (3 * e + 2 * 4 * states)  # x read + written, g read, float32 states read + written
            rows.append(
                speed_row(
                    ctx,
                    op=name,
                    case="step, 100 tensors",
                    shape=(numel,),
                    dtype=dtype,
                    timings=timings,
                    bytes_floor=floor,
                )
            )
        return rows

    return bench


def _averager_bench(ctx: BenchContext) -> list[dict]:
    import slab.optim

    rows = []
    width = 512 if ctx.quick else 2048
    for dtype in ctx.dtypes:
        if dtype not in OPTIM_DTYPES:
            continue
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(ctx.device, dtype)
        avg = slab.optim.PolynomialDecayAverager(model)
        ps = list(model.parameters())
        copies = [p.detach().clone() for p in ps]
        with torch.no_grad():
            timings = ctx.time_many({"slab": avg.step, "library": lambda: torch._foreach_lerp_(copies, ps, 0.1)})
        numel = sum(p.numel() for p in ps)
        rows.append(
            speed_row(
                ctx,
                op="averager",
                case="step",
                shape=(numel,),
                dtype=dtype,
                timings=timings,
                bytes_floor=3.0 * numel * elem_size(dtype),
            )
        )
    return rows


_NAMES = {
    "dog": "DoG",
    "ldog": "LDoG (per-tensor norms)",
    "lion": "Lion",
    "lamb": "LAMB",
    "lars": "LARS",
    "adamp": "AdamP",
}
for _name in RULES:
    register(
        Entry(
            _name,
            "optim",
            f"{_NAMES[_name]} optimizer step, {STEPS} steps vs the float64 rule (library: AdamW fused/foreach)",
            (
                lambda device, n=_name: run_cases(
                    n, [(f"{STEPS} steps, {len(SHAPES)} tensors", _rule_case(n))], OPTIM_DTYPES, device
                )
            ),
            _rule_bench(_name),
        )
    )
register(
    Entry(
        "averager",
        "optim",
        "PolynomialDecayAverager step (library: torch._foreach_lerp_)",
        lambda device: run_cases("averager", [(f"{STEPS} steps, Linear(7, 5)", _averager_case)], OPTIM_DTYPES, device),
        _averager_bench,
    )
)
