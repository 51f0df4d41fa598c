"""slab.optim with parameters whose grad is None in some steps (SPEC section 5): they do not move
and add nothing to the squared-gradient sums, step counters (LAMB, AdamP) are per parameter and
count only the steps with a gradient, and DoG's group distance and ||x_0|| still cover them.
Every optimizer is stepped side by side with its float64 reference (tests/test_optim.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slab.optim import LAMB, LARS, AdamP, DoG, LDoG, Lion
from conftest import DEVICES, assert_close
from test_optim import (
    RefAdamP,
    RefDoG,
    RefLAMB,
    RefLARS,
    RefLion,
    grads_of,
    make_invariant_model,
    make_model,
    rounding,
    run_side_by_side,
)

CASES = {
    "DoG": (DoG, RefDoG, {"reps_rel": 1e-3}, {}),
    "DoG_wd": (DoG, RefDoG, {"reps_rel": 1e-3, "weight_decay": 0.01}, {}),
    "LDoG": (LDoG, RefDoG, {"reps_rel": 1e-3, "weight_decay": 0.01}, {"layerwise": True}),
    "Lion": (Lion, RefLion, {"lr": 1e-3, "weight_decay": 0.1}, {}),
    "LAMB": (LAMB, RefLAMB, {"lr": 1e-2}, {}),
    "LARS": (LARS, RefLARS, {"lr": 0.5}, {}),
    "AdamP": (AdamP, RefAdamP, {"lr": 1e-2, "weight_decay": 0.1}, {}),
}


def has_grad(i: int, t: int) -> bool:
    """The group's first parameter gets its first gradient late (step 3) and then misses every
    fourth step; the third misses every third step; the others always have one."""
    if i == 0:
        return t >= 3 and t % 4 != 1
    if i == 2:
        return t % 3 != 2
    return True


def model_for(cls, device, dtype=torch.float32):
    # AdamP's projections need scale-invariant weights to be exercised
    return make_invariant_model(device, dtype) if cls is AdamP else make_model(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_missing_grads_match_reference(device, case):
    cls, ref_cls, kw, ref_kw = CASES[case]
    model = model_for(cls, device)
    opt = cls(model.parameters(), **kw)
    ref = ref_cls(list(model.parameters()), rounding(torch.float32), **kw, **ref_kw)
    x_start = [p.detach().clone() for p in model.parameters()]
    run_side_by_side(opt, ref, model, device, torch.float32, steps=30, tol=(1e-5, 1e-5), has_grad=has_grad)
    assert not torch.equal(next(model.parameters()), x_start[0])  # the late parameter did move
    if cls in (LAMB, AdamP):  # each counter holds the steps in which its parameter had a gradient
        steps = [int(opt.state[p]["step"]) for p in model.parameters()]
        assert steps == [sum(has_grad(i, t) for t in range(30)) for i in range(len(steps))]
    if cls is DoG:  # the group's values are the same in every parameter's state, x0 is the start
        states = [opt.state[p] for p in model.parameters()]
        assert all(torch.equal(s["G"], states[0]["G"]) and torch.equal(s["rbar"], states[0]["rbar"]) for s in states)
        assert all(torch.equal(s["x0"], x) for s, x in zip(states, x_start))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["DoG", "LDoG", "LAMB", "AdamP"])
def test_state_dict_round_trip_with_missing_grads(device, case):
    """Interrupted at a step where the late parameter has no gradient and resumed from the state
    dict, a run equals the uninterrupted one (per-parameter step counters, DoG's group values)."""
    cls, _, kw, _ = CASES[case]
    model = model_for(cls, device)
    opt = cls(model.parameters(), **kw)

    def run(m, o, steps):
        for t in steps:
            grads_of(m, t, device, torch.float32)
            for i, p in enumerate(m.parameters()):
                if not has_grad(i, t):
                    p.grad = None
            o.step()

    run(model, opt, range(6))
    model2 = model_for(cls, device)
    model2.load_state_dict(copy.deepcopy(model.state_dict()))
    opt2 = cls(model2.parameters(), **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, range(6, 12))
    run(model2, opt2, range(6, 12))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", DEVICES)
def test_dog_parameter_added_to_a_started_group_joins_it(device):
    """A parameter the state does not cover (appended to a group that already stepped) starts its
    x0 at that step and takes over the group's running G and rbar."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, device=device)), nn.Parameter(torch.randn(4, device=device))
    opt = DoG([a], reps_rel=1e-2)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        opt.step()
    G_before = opt.state[a]["G"].clone()
    opt.param_groups[0]["params"].append(b)
    b_start = b.detach().clone()
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    a.grad, b.grad = ga, gb
    opt.step()
    assert torch.equal(opt.state[b]["x0"], b_start)
    assert_close(opt.state[b]["G"], G_before.double() + (ga.double() ** 2).sum() + (gb.double() ** 2).sum())
    for k in ("G", "rbar"):
        assert torch.equal(opt.state[a][k], opt.state[b][k]), k
