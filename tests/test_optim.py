"""slab.optim: fused DoG / LDoG / Lion steps and the polynomial-decay averager, checked step by step
against float64 plain-PyTorch implementations of the published rules, plus the raw engine ops.

The references take a gradient list with None for parameters that have no gradient in a step
(SPEC section 5): those do not move and add nothing to the sums, step counters are per parameter,
and DoG's distance and ||x_0|| still cover them (tests/test_optim_none_grads.py)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import slab
import slab.ops.optim as oo
from slab.optim import LAMB, LARS, AdamP, DoG, LDoG, Lion, PolynomialDecayAverager
from conftest import DEVICES, assert_close
from slab.reference.optim import RefAdamP, RefDoG, RefLAMB, RefLARS, RefLion, rounding  # noqa: F401

# The float64 references of the published rules live in slab.reference.optim.


def make_model(device, dtype=torch.float32):
    torch.manual_seed(0)
    # odd sizes, a size-1 bias, tensors of very different scales (DoG vs LDoG differ)
    m = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 1), nn.Flatten(0))
    with torch.no_grad():
        m[2].weight.mul_(5.0)
    return m.to(device=device, dtype=dtype)


def grads_of(model, step, device, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 7, generator=g).to(device, dtype)
    y = torch.randn(16, generator=g).to(device, dtype)
    model.zero_grad(set_to_none=False)  # gradients stay the same tensors (CUDA-graph replays read them)
    ((model(x) - y) ** 2).mean().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def run_side_by_side(opt, ref, model, device, dtype, steps=20, tol=None, grad_fn=None, has_grad=None):
    """Steps ``opt`` and ``ref`` with the same gradients and compares every parameter after every
    step, relative to the tensor's magnitude (max |x_t| and |x_0|: a size-1 bias crossing zero is
    compared at the scale it moves at). ``has_grad(i, t)``: whether parameter i keeps its gradient
    in step t (otherwise its grad is None for both)."""
    init = [p.detach().double().abs().max() for p in model.parameters()]
    for t in range(steps):
        grads = grads_of(model, t, device, dtype)
        if grad_fn is not None:
            grad_fn(model)
        if has_grad is not None:
            for i, p in enumerate(model.parameters()):
                if not has_grad(i, t):
                    p.grad, grads[i] = None, None
        opt.step()
        ref.step(grads)
        for i, (p, r) in enumerate(zip(model.parameters(), ref.x)):
            rtol, atol = tol if tol else (1e-6, 1e-6)
            scale = max(float(r.abs().max()), float(init[i]))
            assert_close(p, r, rtol=rtol, atol=atol, scale=scale, name=f"step {t} param {i}")


# ---- DoG / LDoG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layerwise", [False, True], ids=["DoG", "LDoG"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"reps_rel": 1e-3},
        {"reps_rel": 1e-3, "weight_decay": 0.1},
        {"init_eta": 1e-2},
        {"lr": 0.5, "reps_rel": 1e-2},
        {"reps_rel": 1e-2, "eps": 0.05},
    ],  # eps comparable to G: where eps enters the root matters
    ids=["defaults", "reps", "wd", "init_eta", "lr", "eps"],
)
def test_dog_matches_reference(device, layerwise, kw):
    model = make_model(device)
    opt = (LDoG if layerwise else DoG)(model.parameters(), **kw)
    ref = RefDoG(list(model.parameters()), rounding(torch.float32), layerwise=layerwise, **kw)
    run_side_by_side(opt, ref, model, device, torch.float32)
    # the run must actually have moved the parameters
    x0 = [opt.state[p]["x0"] for p in model.parameters()]
    assert max(float((p.detach() - a).abs().max()) for p, a in zip(model.parameters(), x0)) > 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_dog_bf16_params_fp32_state(device, cls):
    model = make_model(device, torch.bfloat16)
    opt = cls(model.parameters(), reps_rel=1e-2, weight_decay=0.01)
    ref = RefDoG(
        list(model.parameters()), rounding(torch.bfloat16), reps_rel=1e-2, weight_decay=0.01, layerwise=cls is LDoG
    )
    run_side_by_side(opt, ref, model, device, torch.bfloat16, steps=10, tol=(1.6e-2, 1e-2))
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in opt.state[p].values())


@pytest.mark.parametrize("device", DEVICES)
def test_dog_and_ldog_differ_but_agree_on_one_tensor(device):
    m1, m2 = make_model(device), make_model(device)
    o1, o2 = DoG(m1.parameters(), reps_rel=1e-2), LDoG(m2.parameters(), reps_rel=1e-2)
    for t in range(3):
        grads_of(m1, t, device, torch.float32), grads_of(m2, t, device, torch.float32)
        o1.step(), o2.step()
    assert float((m1[0].weight - m2[0].weight).detach().abs().max()) > 1e-5
    # one tensor: the global norm is the tensor's norm, so both rules coincide
    w1 = nn.Parameter(torch.randn(33, device=device))
    w2 = nn.Parameter(w1.detach().clone())
    o1, o2 = DoG([w1], reps_rel=1e-2), LDoG([w2], reps_rel=1e-2)
    for t in range(5):
        g = torch.randn(33, device=device)
        w1.grad, w2.grad = g.clone(), g.clone()
        o1.step(), o2.step()
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_group_use_one_global_norm(device):
    torch.manual_seed(3)
    a = nn.Parameter(torch.randn(40, device=device))
    b = nn.Parameter(torch.randn(5, 3, device=device).to(torch.bfloat16))
    opt = DoG([a, b], reps_rel=1e-2)
    store = [rounding(torch.float32), rounding(torch.bfloat16)]
    ref = RefDoG([a, b], None, reps_rel=1e-2)
    ref.store = lambda x: x  # rounded per tensor below
    for t in range(6):
        ga, gb = torch.randn_like(a), torch.randn_like(b)
        a.grad, b.grad = ga, gb
        opt.step()
        ref.step([ga, gb])
        ref.x = [s(x) for s, x in zip(store, ref.x)]
        assert_close(a, ref.x[0], rtol=1e-6, atol=1e-6, name="fp32 param")
        assert_close(b, ref.x[1], name="bf16 param")


@pytest.mark.parametrize("device", DEVICES)
def test_maximize_and_tensor_lr(device):
    m1, m2 = make_model(device), make_model(device)
    o1 = DoG(m1.parameters(), lr=torch.tensor(0.5, device=device), reps_rel=1e-3, maximize=True)
    ref = RefDoG(list(m2.parameters()), rounding(torch.float32), lr=0.5, reps_rel=1e-3, maximize=True)
    run_side_by_side(o1, ref, m1, device, torch.float32, steps=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [DoG, LDoG, Lion, LAMB, LARS, AdamP])
def test_state_dict_round_trip_mid_training(device, cls):
    kw = {"reps_rel": 1e-3} if cls in (DoG, LDoG) else {"lr": 1e-3}
    model = make_model(device, torch.bfloat16)
    opt = cls(model.parameters(), **kw)
    for t in range(5):
        grads_of(model, t, device, torch.bfloat16)
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2 = make_model(device, torch.bfloat16)
    model2.load_state_dict(saved_model)
    opt2 = cls(model2.parameters(), **kw)
    opt2.load_state_dict(saved_opt)
    for p in model2.parameters():  # float32 states of bf16 params stay float32
        assert all(v.dtype == torch.float32 for v in opt2.state[p].values())
    for t in range(5, 10):
        grads_of(model, t, device, torch.bfloat16), grads_of(model2, t, device, torch.bfloat16)
        opt.step(), opt2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [DoG, LDoG, Lion, LAMB, LARS, AdamP])
def test_grad_scaler_unscales_and_skips_inf_steps(device, cls):
    kw = {"reps_rel": 1e-3} if cls in (DoG, LDoG) else {"lr": 1e-3}
    m1, m2 = make_model(device), make_model(device)
    o1, o2 = cls(m1.parameters(), **kw), cls(m2.parameters(), **kw)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0, growth_interval=1000)
    for t in range(4):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 7, generator=g).to(device), torch.randn(16, generator=g).to(device)
        for m in (m1, m2):
            m.zero_grad()
        scaler.scale(((m1(x) - y) ** 2).mean()).backward()
        ((m2(x) - y) ** 2).mean().backward()
        if t == 2:  # an overflowing step: skipped by slab, skipped for the reference
            m1[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in m1.parameters()]
            state_before = copy.deepcopy(o1.state_dict())
            scaler.step(o1)
            scaler.update()
            for p, b in zip(m1.parameters(), before):
                assert torch.equal(p, b)
            for k, v in o1.state_dict()["state"].items():
                for name, val in v.items():
                    assert torch.equal(val, state_before["state"][k][name]), name
            continue
        scaler.step(o1)
        scaler.update()
        o2.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert scaler.get_scale() == 512.0


def test_bad_hyperparameters_and_sparse_grads():
    p = [nn.Parameter(torch.randn(3))]
    for kw, word in [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"reps_rel": 0.0}, "reps_rel"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"init_eta": -1.0}, "init_eta"),
    ]:
        with pytest.raises(ValueError, match=word):
            DoG(p, **kw)
    for kw, word in [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": float("nan")}, "weight_decay"),
    ]:
        with pytest.raises(ValueError, match=word):
            Lion(p, **kw)
    for kw, word in [
        ({"eps": -1.0}, "eps"),
        ({"betas": (float("nan"), 0.9)}, "betas"),
        ({"clamp_value": 0.0}, "clamp_value"),
    ]:
        with pytest.raises(ValueError, match=word):
            LAMB(p, **kw)
    for kw, word in [
        ({"momentum": 1.0}, "momentum"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"lr": float("inf")}, "lr"),
    ]:
        with pytest.raises(ValueError, match=word):
            LARS(p, **kw)
    with pytest.raises(ValueError, match="gamma"):
        PolynomialDecayAverager(nn.Linear(2, 2), gamma=-1.0)
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for kw, word in [
        ({"delta": -0.1}, "delta"),
        ({"wd_ratio": float("nan")}, "wd_ratio"),
        ({"betas": (0.9,)}, "betas"),
    ]:
        with pytest.raises(ValueError, match=word):
            AdamP(p, **kw)
    for cls in (DoG, LDoG, Lion, LAMB, LARS, AdamP):
        with pytest.raises(RuntimeError, match="sparse"):
            cls(emb.parameters()).step()


# (optimizer, constructor kwargs, [(hyperparameter, bad value)]): values set in param_groups after
# construction, each refused by the next step() before anything moves.
STEP_CHECKS = [
    (
        DoG,
        {"reps_rel": 1e-3},
        [
            ("lr", -1.0),
            ("lr", float("nan")),
            ("eps", float("inf")),
            ("weight_decay", float("nan")),
            ("reps_rel", 0.0),
            ("init_eta", -1.0),
        ],
    ),
    (LDoG, {"reps_rel": 1e-3}, [("lr", 0.0), ("weight_decay", -1.0)]),
    (
        Lion,
        {},
        [
            ("lr", -1e-3),
            ("lr", torch.tensor([1e-3, 1e-3])),
            ("betas", (0.9, 1.0)),
            ("betas", (float("nan"), 0.9)),
            ("weight_decay", -1.0),
        ],
    ),
    (
        LAMB,
        {},
        [("lr", float("nan")), ("betas", (0.9,)), ("eps", -1.0), ("weight_decay", float("nan")), ("clamp_value", 0.0)],
    ),
    (
        LARS,
        {},
        [
            ("lr", float("inf")),
            ("momentum", 1.0),
            ("weight_decay", -1.0),
            ("trust_coefficient", 0.0),
            ("eps", float("nan")),
        ],
    ),
    (
        AdamP,
        {},
        [
            ("lr", -1.0),
            ("betas", (0.9, 1.5)),
            ("eps", float("nan")),
            ("weight_decay", -0.1),
            ("delta", float("nan")),
            ("wd_ratio", -1.0),
        ],
    ),
]


@pytest.mark.parametrize("cls,kw,bad", STEP_CHECKS, ids=[c[0].__name__ for c in STEP_CHECKS])
def test_hyperparameters_checked_at_every_step(cls, kw, bad):
    model = make_model("cpu")
    opt = cls(model.parameters(), **kw)
    grads_of(model, 0, "cpu", torch.float32)
    opt.step()
    group = opt.param_groups[0]
    for name, value in bad:
        grads_of(model, 1, "cpu", torch.float32)
        good, group[name] = group[name], value
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        with pytest.raises(ValueError, match=name):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), name
        for k, st in opt.state_dict()["state"].items():
            assert all(torch.equal(v, state[k][key]) for key, v in st.items()), name
        group[name] = good
    opt.step()


def test_averager_gamma_checked_at_every_step():
    avg = PolynomialDecayAverager(nn.Linear(2, 3), gamma=8.0)
    avg.step()
    avg.gamma = float("nan")
    with pytest.raises(ValueError, match="gamma"):
        avg.step()
    assert avg.t == 2


# ---- Lion --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [{}, {"lr": 3e-3, "weight_decay": 0.5, "betas": (0.8, 0.95)}, {"lr": 1e-3, "maximize": True}],
    ids=["defaults", "wd", "maximize"],
)
def test_lion_matches_reference(device, dtype, kw):
    model = make_model(device, dtype)
    opt = Lion(model.parameters(), **kw)
    ref = RefLion(list(model.parameters()), rounding(dtype), **kw)
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (1.6e-2, 1e-2)
    run_side_by_side(opt, ref, model, device, dtype, tol=tol)


# ---- LAMB / LARS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-8},
        {"clamp_value": 0.5, "maximize": True},
        {"bias_correction": False, "lr": 3e-3},
    ],
    ids=["defaults", "no_wd", "clamp_maximize", "no_bias_correction"],
)
def test_lamb_matches_reference(device, dtype, kw):
    model = make_model(device, dtype)
    opt = LAMB(model.parameters(), **kw)
    ref = RefLAMB(list(model.parameters()), rounding(dtype), **kw)
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (1.6e-2, 1e-2)
    run_side_by_side(opt, ref, model, device, dtype, tol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"lr": 0.5, "clip": True, "trust_coefficient": 0.02},
        {"lr": 2.0, "momentum": 0.0, "weight_decay": 0.0, "maximize": True},
    ],
    ids=["defaults", "larc_clip", "no_momentum_maximize"],
)
def test_lars_matches_reference(device, dtype, kw):
    model = make_model(device, dtype)
    opt = LARS(model.parameters(), **kw)
    ref = RefLARS(list(model.parameters()), rounding(dtype), **kw)
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (1.6e-2, 1e-2)
    run_side_by_side(opt, ref, model, device, dtype, tol=tol)


def make_invariant_model(device, dtype=torch.float32):
    """Weights of three kinds: channel-wise scale invariant (Linear -> BatchNorm), layer-wise scale
    invariant (bias-free Linear -> LayerNorm), and ordinary ones; odd sizes."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(7, 13, bias=False),
        nn.LayerNorm(13),
        nn.Tanh(),
        nn.Linear(13, 9),
        nn.BatchNorm1d(9),
        nn.Tanh(),
        nn.Linear(9, 1),
        nn.Flatten(0),
    )
    return m.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"lr": 1e-2, "weight_decay": 0.1, "wd_ratio": 0.5},
        {"nesterov": True, "maximize": True, "betas": (0.8, 0.99)},
        {"delta": 0.0, "weight_decay": 0.01},
    ],
    ids=["defaults", "wd", "nesterov_maximize", "no_projection"],
)
def test_adamp_matches_reference(device, dtype, kw):
    model = make_invariant_model(device, dtype)
    opt = AdamP(model.parameters(), **kw)
    ref = RefAdamP(list(model.parameters()), rounding(dtype), **kw)
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (1.6e-2, 1e-2)
    run_side_by_side(opt, ref, model, device, dtype, tol=tol)
    if kw.get("delta", 0.1) > 0:  # both projections and the plain update were exercised
        assert ref.hits["channel"] > 0 and ref.hits["layer"] > 0 and ref.hits["none"] > 0, ref.hits
    else:
        assert ref.hits["channel"] == 0 and ref.hits["layer"] == 0


# ---- averager ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [8.0, 0.0])
def test_polynomial_decay_averager(device, gamma):
    model = nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9)).to(device)
    avg = PolynomialDecayAverager(model, gamma=gamma)
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    ref = {k: model.state_dict()[k].double().clone() for k in keys}
    opt = DoG(model.parameters(), reps_rel=1e-2)
    for t in range(1, 8):
        model.train()
        model(torch.randn(6, 5, device=device)).pow(2).mean().backward()
        opt.step()
        avg.step()
        w = (gamma + 1) / (gamma + t)
        sd = model.state_dict()
        for k in keys:
            ref[k] = (1 - w) * ref[k] + w * sd[k].double()
        av = avg.averaged_model.state_dict()
        for k in keys:
            assert_close(av[k], ref[k], name=k)
        assert torch.equal(av["1.num_batches_tracked"], sd["1.num_batches_tracked"])
    assert avg.t == 8
    other = PolynomialDecayAverager(model, gamma=gamma)
    other.load_state_dict(avg.state_dict())
    assert other.t == 8


# ---- raw engine ops ---------------------------------------------------------------------------------


def _lists(device, dtype, sizes=((5, 7), (1,), (0,), (40000,), (3, 1, 2))):
    return [torch.randn(s, device=device, dtype=dtype) for s in sizes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sq_norm_op(device, dtype):
    a, b = _lists(device, dtype), _lists(device, dtype)
    a[0] = torch.randn(7, 5, device=device, dtype=dtype).t()  # non-contiguous, shape (5, 7)
    scale = torch.tensor(4.0, device=device)
    out = oo.multi_tensor_sq_norm(a, b, 0.3, scale)
    ref = torch.stack([((x.double() / 4 + 0.3 * y.double()) ** 2).sum() for x, y in zip(a, b)])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(out, ref, rtol=rtol, atol=rtol)
    big = [torch.full((3,), 1e20, device=device, dtype=torch.float32)]
    assert torch.isinf(oo.multi_tensor_sq_norm(big)).all()  # overflow shows, is not hidden
    nan = [torch.tensor([1.0, float("nan")], device=device)]
    assert torch.isnan(oo.multi_tensor_sq_norm(nan)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dog_update_op_non_contiguous_and_odd_sizes(device, dtype):
    x = _lists(device, dtype)
    x[0] = torch.randn(7, 5, device=device, dtype=dtype).t()  # a non-contiguous parameter
    g = _lists(device, dtype)
    x0 = [t.float() + 0.01 for t in x]
    eta = torch.rand(len(x), device=device)
    dist2 = [torch.zeros((), device=device) for _ in x]
    expect = [(xi.double() - e.double() * (gi.double() + 0.1 * xi.double())) for xi, gi, e in zip(x, g, eta)]
    oo.dog_update_(x, g, x0, eta, dist2, 0.1)
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)
    for i, (xi, ei, x0i, di) in enumerate(zip(x, expect, x0, dist2)):
        assert_close(xi, ei, rtol=tol[0], atol=tol[1], name=f"x[{i}]")
        assert_close(di, ((xi.double() - x0i.double()) ** 2).sum(), rtol=1e-5, atol=1e-5, name=f"dist2[{i}]")
    before = [t.clone() for t in x]
    oo.dog_update_(x, g, x0, eta, dist2, 0.1, found_inf=torch.ones((), device=device))
    assert all(torch.equal(a, b) for a, b in zip(x, before))


@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_errors(device):
    x = [torch.randn(3, device=device)]
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have the shape"):
        oo.dog_update_(
            x,
            [torch.randn(4, device=device)],
            [torch.zeros(3, device=device)],
            torch.ones(1, device=device),
            [torch.zeros((), device=device)],
        )
    with pytest.raises(RuntimeError, match=r"x0\[0\] must be Float"):
        oo.dog_update_(
            x,
            [torch.randn(3, device=device)],
            [torch.zeros(3, device=device, dtype=torch.float64)],
            torch.ones(1, device=device),
            [torch.zeros((), device=device)],
        )
    with pytest.raises(RuntimeError, match="eta must be"):
        oo.dog_update_(
            x,
            [torch.randn(3, device=device)],
            [torch.zeros(3, device=device)],
            torch.ones(2, device=device),
            [torch.zeros((), device=device)],
        )
    with pytest.raises(RuntimeError, match="weight_decay"):
        oo.dog_update_(
            x,
            [torch.randn(3, device=device)],
            [torch.zeros(3, device=device)],
            torch.ones(1, device=device),
            [torch.zeros((), device=device)],
            float("nan"),
        )
    with pytest.raises(RuntimeError, match="one dtype"):
        oo.multi_tensor_sq_norm([torch.randn(3, device=device), torch.randn(3, device=device, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="at least one"):
        oo.multi_tensor_sq_norm([])
    with pytest.raises(RuntimeError, match="int|Long|float32"):
        oo.multi_tensor_sq_norm([torch.ones(3, dtype=torch.long, device=device)])
    with pytest.raises(RuntimeError, match="beta1"):
        oo.lion_update_(x, x, [torch.zeros(3, device=device)], torch.ones(1, device=device), 1.5, 0.9)


def _op_args(op, device):
    """Valid arguments (by schema name) of a raw optimizer op: two tensors of shapes (5, 3) and
    (17,), float32, so any two tensors of a call may be made to share memory."""

    def ts(fill=torch.randn):
        return [fill(5, 3, device=device), fill(17, device=device)]

    def vec(n):
        return torch.rand(n, device=device)

    bc = torch.ones(2, 2, device=device)
    args = {
        "multi_tensor_sq_norm": dict(tensors=ts(), others=ts(), weight_decay=0.1),
        "dog_update_": dict(
            params=ts(), grads=ts(), x0=ts(), eta=vec(2), dist2=[torch.zeros((), device=device) for _ in range(2)]
        ),
        "lion_update_": dict(params=ts(), grads=ts(), exp_avgs=ts(), lr=vec(1), beta1=0.9, beta2=0.99),
        "multi_tensor_lerp_": dict(avg=ts(), x=ts(), weight=0.25),
        "lamb_stage1_": dict(
            params=ts(),
            grads=ts(),
            exp_avgs=ts(),
            exp_avg_sqs=ts(torch.rand),
            bias_corr=bc,
            beta1=0.9,
            beta2=0.999,
            eps=1e-6,
            weight_decay=0.01,
        ),
        "lamb_stage2_": dict(
            params=ts(),
            exp_avgs=ts(),
            exp_avg_sqs=ts(torch.rand),
            bias_corr=bc,
            lr=vec(2),
            beta1=0.9,
            beta2=0.999,
            eps=1e-6,
            weight_decay=0.01,
        ),
        "momentum_update_": dict(params=ts(), grads=ts(), momentum_buffers=ts(), scale=vec(2), lr=vec(1), momentum=0.9),
        "adamp_stage1_": dict(
            params=ts(),
            grads=ts(),
            exp_avgs=ts(),
            exp_avg_sqs=ts(torch.rand),
            bias_corr=bc,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        ),
        "adamp_stage2_": dict(
            params=ts(),
            grads=ts(),
            exp_avgs=ts(),
            exp_avg_sqs=ts(torch.rand),
            bias_corr=bc,
            coef=vec(6),
            decay=vec(2),
            lr=vec(1),
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        ),
    }
    return args[op]


def _share(dst, i, src, j):
    """dst[i] becomes (a view of) src[j]: the same memory under two arguments."""

    def alias(a):
        a[dst][i] = a[src][j]

    return alias


def _expanded(name, i):
    """name[i] becomes a stride-0 view (every element one memory location)."""

    def alias(a):
        a[name][i] = a[name][i][:1].expand_as(a[name][i])

    return alias


def _overlapping(name):
    """name[0] and name[1] become overlapping views of one buffer."""

    def alias(a):
        base = torch.randn(20, device=a[name][0].device)
        a[name][0], a[name][1] = base[:15].view(5, 3), base[3:]

    return alias


def _view_of(name, src, j):
    """The one-tensor argument `name` becomes a view into src[j]."""

    def alias(a):
        a[name] = a[src][j].view(-1)[: a[name].numel()].view(a[name].shape)

    return alias


# (op, what aliases what): every in-place op, every kind of overlap it must refuse
ALIAS_CASES = [
    ("dog_update_", "params is grads", _share("grads", 0, "params", 0)),
    ("dog_update_", "params is x0", _share("x0", 1, "params", 1)),
    ("dog_update_", "dist2 twice", _share("dist2", 1, "dist2", 0)),
    ("dog_update_", "dist2 in eta", lambda a: a["dist2"].__setitem__(0, a["eta"][1])),
    ("dog_update_", "params expanded", _expanded("params", 1)),
    ("lion_update_", "params is exp_avgs", _share("exp_avgs", 0, "params", 0)),
    ("lion_update_", "exp_avgs is grads", _share("grads", 1, "exp_avgs", 1)),
    ("lion_update_", "lr in params", _view_of("lr", "params", 1)),
    ("lion_update_", "exp_avgs expanded", _expanded("exp_avgs", 1)),
    ("multi_tensor_lerp_", "avg is x", _share("x", 0, "avg", 0)),
    ("multi_tensor_lerp_", "avg overlapping", _overlapping("avg")),
    ("multi_tensor_lerp_", "avg expanded", _expanded("avg", 0)),
    ("lamb_stage1_", "exp_avgs is exp_avg_sqs", _share("exp_avg_sqs", 1, "exp_avgs", 1)),
    ("lamb_stage1_", "exp_avgs is params", _share("exp_avgs", 0, "params", 0)),
    ("lamb_stage1_", "bias_corr in exp_avg_sqs", _view_of("bias_corr", "exp_avg_sqs", 1)),
    ("lamb_stage1_", "exp_avg_sqs expanded", _expanded("exp_avg_sqs", 1)),
    ("lamb_stage2_", "params is exp_avgs", _share("exp_avgs", 1, "params", 1)),
    ("lamb_stage2_", "lr in params", _view_of("lr", "params", 0)),
    ("lamb_stage2_", "params expanded", _expanded("params", 1)),
    ("momentum_update_", "params is momentum_buffers", _share("momentum_buffers", 0, "params", 0)),
    ("momentum_update_", "scale in momentum_buffers", _view_of("scale", "momentum_buffers", 1)),
    ("momentum_update_", "momentum_buffers expanded", _expanded("momentum_buffers", 1)),
    ("adamp_stage1_", "exp_avgs is exp_avg_sqs", _share("exp_avg_sqs", 0, "exp_avgs", 0)),
    ("adamp_stage1_", "grads is exp_avgs", _share("grads", 1, "exp_avgs", 1)),
    ("adamp_stage2_", "params is grads", _share("grads", 0, "params", 0)),
    ("adamp_stage2_", "coef in params", _view_of("coef", "params", 0)),
    ("adamp_stage2_", "decay in params", _view_of("decay", "params", 1)),
    ("adamp_stage2_", "params expanded", _expanded("params", 1)),
]


def _tensors_of(args):
    return [t for v in args.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,case,alias", ALIAS_CASES, ids=[f"{c[0]}-{c[1]}" for c in ALIAS_CASES])
def test_in_place_overlap_refused_before_writing(device, op, case, alias):
    args = _op_args(op, device)
    getattr(torch.ops.slab, op)(**args)  # the arguments are valid until they overlap
    alias(args)
    before = [t.clone() for t in _tensors_of(args)]
    with pytest.raises(RuntimeError, match="single memory location"):
        getattr(torch.ops.slab, op)(**args)
    for t, b in zip(_tensors_of(args), before):
        assert torch.equal(t, b), case


def _tensor_args(op):
    return [
        a.name
        for a in getattr(torch.ops.slab, op).default._schema.arguments
        if str(a.type) in ("Tensor", "List[Tensor]", "Optional[List[Tensor]]")
    ]


OPS = [
    "multi_tensor_sq_norm",
    "dog_update_",
    "lion_update_",
    "multi_tensor_lerp_",
    "lamb_stage1_",
    "lamb_stage2_",
    "momentum_update_",
    "adamp_stage1_",
    "adamp_stage2_",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_none_for_a_tensor_is_named(device, op):
    """None for a required tensor, or inside a tensor list, gets an error naming that argument
    (and the list element), from the slab.ops wrappers and the raw op alike."""
    for name in _tensor_args(op):
        args = _op_args(op, device)
        is_list = isinstance(args[name], list)
        label = f"{name}[1]" if is_list else name
        if is_list:
            args[name][1] = None
        else:
            args[name] = None
        with pytest.raises(RuntimeError, match=rf"^{re.escape(label)} must be a tensor, got None"):
            getattr(oo, op)(**args)
        if not is_list:  # torch itself refuses a None inside a Tensor[] (naming the argument)
            with pytest.raises(RuntimeError, match=rf"^{re.escape(label)} must be a tensor, got None"):
                getattr(torch.ops.slab, op)(**args)


# (op, what is wrong): mismatches the real op refuses; its fake must refuse them too
FAKE_CASES = [
    ("multi_tensor_sq_norm", "others shape", lambda a: a["others"].__setitem__(1, a["others"][1][:16])),
    ("dog_update_", "grads length", lambda a: a["grads"].pop()),
    ("dog_update_", "x0 dtype", lambda a: a["x0"].__setitem__(0, a["x0"][0].double())),
    ("dog_update_", "eta size", lambda a: a.__setitem__("eta", a["eta"][:1])),
    ("dog_update_", "dist2 size", lambda a: a["dist2"].__setitem__(0, torch.zeros(2, device=a["eta"].device))),
    ("lion_update_", "exp_avgs shape", lambda a: a["exp_avgs"].__setitem__(0, a["exp_avgs"][0].t())),
    ("lion_update_", "lr size", lambda a: a.__setitem__("lr", a["lr"].expand(2))),
    ("multi_tensor_lerp_", "x length", lambda a: a["x"].pop()),
    ("multi_tensor_lerp_", "avg dtypes", lambda a: a["avg"].__setitem__(1, a["avg"][1].double())),
    ("lamb_stage1_", "bias_corr of one step", lambda a: a.__setitem__("bias_corr", a["bias_corr"][0])),
    ("lamb_stage1_", "exp_avg_sqs length", lambda a: a["exp_avg_sqs"].pop()),
    ("lamb_stage2_", "lr size", lambda a: a.__setitem__("lr", a["lr"][:1])),
    ("lamb_stage2_", "bias_corr rows", lambda a: a.__setitem__("bias_corr", a["bias_corr"][:1])),
    ("momentum_update_", "scale size", lambda a: a.__setitem__("scale", a["scale"][:1])),
    (
        "momentum_update_",
        "momentum_buffers shape",
        lambda a: a["momentum_buffers"].__setitem__(1, a["momentum_buffers"][1][:3]),
    ),
    ("adamp_stage1_", "grads shape", lambda a: a["grads"].__setitem__(0, a["grads"][0].reshape(3, 5))),
    ("adamp_stage2_", "coef size", lambda a: a.__setitem__("coef", a["coef"][:5])),
    ("adamp_stage2_", "decay size", lambda a: a.__setitem__("decay", a["decay"][:1])),
    ("adamp_stage2_", "bias_corr dtype", lambda a: a.__setitem__("bias_corr", a["bias_corr"].double())),
]


@pytest.mark.parametrize("op,case,spoil", FAKE_CASES, ids=[f"{c[0]}-{c[1]}" for c in FAKE_CASES])
def test_fakes_check_what_the_real_ops_check(op, case, spoil):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args(op, "cpu")
    spoil(args)
    with pytest.raises((RuntimeError, ValueError)) as real:
        getattr(torch.ops.slab, op)(**args)
    with FakeTensorMode() as mode:
        fake = {
            k: [mode.from_tensor(t) for t in v]
            if isinstance(v, list)
            else mode.from_tensor(v)
            if isinstance(v, torch.Tensor)
            else v
            for k, v in args.items()
        }
        with pytest.raises(type(real.value)):
            getattr(torch.ops.slab, op)(**fake)
    with FakeTensorMode() as mode:  # and the unspoilt arguments pass
        good = _op_args(op, "cpu")
        fake = {
            k: [mode.from_tensor(t) for t in v]
            if isinstance(v, list)
            else mode.from_tensor(v)
            if isinstance(v, torch.Tensor)
            else v
            for k, v in good.items()
        }
        getattr(torch.ops.slab, op)(**fake)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_raw_ops(device):
    def lists(dtype=torch.float32):
        return [torch.randn(5, 3, device=device, dtype=dtype), torch.randn(17, device=device, dtype=dtype)]

    x, g = lists(), lists()
    torch.library.opcheck(torch.ops.slab.multi_tensor_sq_norm.default, (x, g, 0.1, torch.tensor(2.0, device=device)))
    torch.library.opcheck(torch.ops.slab.multi_tensor_sq_norm.default, (lists(torch.bfloat16), None, 0.0, None))
    torch.library.opcheck(
        torch.ops.slab.dog_update_.default,
        (
            lists(),
            lists(),
            [t.clone() for t in lists()],
            torch.rand(2, device=device),
            [torch.zeros((), device=device) for _ in range(2)],
            0.1,
            False,
            None,
            None,
        ),
    )
    torch.library.opcheck(
        torch.ops.slab.lion_update_.default,
        (lists(), lists(), lists(), torch.full((1,), 1e-3, device=device), 0.9, 0.99, 0.1, False, None, None),
    )
    torch.library.opcheck(torch.ops.slab.multi_tensor_lerp_.default, (lists(), lists(), 0.25))

    def bias_corr(*steps):  # per tensor, as each counts its own steps
        return torch.tensor([[1 / (1 - 0.9**t), (1 - 0.999**t) ** -0.5] for t in steps], device=device)

    step = bias_corr(3, 1)
    torch.library.opcheck(
        torch.ops.slab.lamb_stage1_.default,
        (lists(), lists(), lists(), [t.abs() for t in lists()], step, 0.9, 0.999, 1e-6, 0.01, False, None, None),
    )
    torch.library.opcheck(
        torch.ops.slab.lamb_stage2_.default,
        (
            lists(),
            lists(),
            [t.abs() for t in lists()],
            step,
            torch.rand(2, device=device),
            0.9,
            0.999,
            1e-6,
            0.01,
            None,
        ),
    )
    shapes = [(4, 3, 2), (17,), (1, 5)]
    ps = [torch.randn(s, device=device) for s in shapes]
    gs = [torch.randn(s, device=device) for s in shapes]
    ms = [torch.randn(s, device=device) for s in shapes]
    vs = [torch.rand(s, device=device) for s in shapes]
    step = bias_corr(3, 7, 1)
    torch.library.opcheck(
        torch.ops.slab.adamp_stage1_.default, (ps, gs, ms, vs, step, 0.9, 0.999, 1e-8, True, False, None, None)
    )
    torch.library.opcheck(
        torch.ops.slab.adamp_stage2_.default,
        (
            ps,
            gs,
            ms,
            vs,
            step,
            torch.rand(6, device=device),
            torch.rand(3, device=device) * 1e-3,
            torch.full((1,), 1e-3, device=device),
            0.9,
            0.999,
            1e-8,
            False,
            True,
            None,
            None,
        ),
    )
    torch.library.opcheck(
        torch.ops.slab.momentum_update_.default,
        (
            lists(),
            lists(),
            lists(),
            torch.rand(2, device=device),
            torch.ones(1, device=device),
            0.9,
            1e-4,
            False,
            None,
            None,
        ),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def step(xs, gs, x0s, dist2, lr):
        gsq = torch.ops.slab.multi_tensor_sq_norm(gs)
        eta = lr * 1e-3 / torch.sqrt(gsq + 1e-8)
        torch.ops.slab.dog_update_(xs, gs, x0s, eta, dist2)
        return gsq

    def make():
        torch.manual_seed(5)
        xs = [torch.randn(4, 5, device=device), torch.randn(9, device=device)]
        dist2 = [torch.zeros((), device=device) for _ in xs]
        return xs, [torch.randn_like(x) for x in xs], [x.clone() for x in xs], dist2

    a, b = make(), make()
    lr = torch.tensor(1.0, device=device)
    out_e = step(*a, lr)
    out_c = torch.compile(step, fullgraph=True, backend="aot_eager")(*b, lr)
    assert torch.equal(out_e, out_c)
    for u, v in zip(a[0] + a[3], b[0] + b[3]):
        assert torch.equal(u, v)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not slab.cuda_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [DoG, LDoG, Lion, LAMB, LARS, AdamP])
def test_step_never_synchronises(cls):
    """After the first step (state creation), step() issues no host synchronisation."""
    model = make_invariant_model("cuda")
    opt = cls(model.parameters(), lr=torch.tensor(1e-3, device="cuda"))
    for t in range(3):
        grads_of(model, t, "cuda", torch.float32)
        if t == 0:
            opt.step()
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not slab.cuda_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [DoG, LDoG, Lion, LAMB, LARS, AdamP])
def test_step_captured_in_a_cuda_graph(cls):
    """With a tensor lr, step() (after the first, which creates the state) can be captured in a CUDA
    graph; replaying it equals stepping eagerly, including after lr changes in place."""
    m1, m2 = make_invariant_model("cuda"), make_invariant_model("cuda")
    lr1, lr2 = torch.tensor(1e-3, device="cuda"), torch.tensor(1e-3, device="cuda")
    o1, o2 = cls(m1.parameters(), lr=lr1), cls(m2.parameters(), lr=lr2)
    grads_of(m1, 0, "cuda", torch.float32), grads_of(m2, 0, "cuda", torch.float32)
    o1.step(), o2.step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as capture requires
        grads_of(m1, 1, "cuda", torch.float32), grads_of(m2, 1, "cuda", torch.float32)
        o1.step(), o2.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o1.step()
    for t in range(2, 5):
        lr1.fill_(1e-3 * t), lr2.fill_(1e-3 * t)
        grads_of(m1, t, "cuda", torch.float32)  # fills .grad in place: the graph replay reads it
        grads_of(m2, t, "cuda", torch.float32)
        graph.replay()
        o2.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert_close(p, q, rtol=1e-6, atol=1e-6)
