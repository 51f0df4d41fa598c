"""slab.nn.RepBN / PRepBN / convert_sync: modules against a float64 reference written here with plain
torch ops, against SLAB's own eager composite (BatchNorm1d over (B, C, N) + alpha * x; LinearNorm),
and for SLAB state-dict compatibility."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

import slab  # noqa: F401  (loads the op library)
from slab.nn import PRepBN, RepBN, convert_sync
from slab.reference import prepbn as R

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# float64 reference (functional; returns the new running stats instead of mutating)
# ------------------------------------------------------------------------------------------------
def ref_rep_bn(x, w, b, alpha, rm, rv, training, momentum=0.1, eps=1e-5, mask=None):
    """slab.reference.rep_bn in float64 on copies of the running stats; returns (y, new_rm, new_rv)."""
    x, w, b, alpha = (t.to(F64) for t in (x, w, b, alpha))
    rm, rv = rm.detach().to(F64).clone(), rv.detach().to(F64).clone()
    y = R.rep_bn(x, w, b, alpha, rm, rv, training, momentum, eps, mask)
    return y, rm, rv


def ref_norm1(x, w, b, eps, norm):
    """slab.reference.norm1 (LayerNorm / RMSNorm) in float64."""
    return R.norm1(x.to(F64), w.to(F64), b.to(F64) if norm == "layer" else None, eps, norm)


def ref_prep(mod: PRepBN, x, lam, training=True, mask=None, momentum=0.1):
    """Reference of one PRepBN forward from the module's current parameters (no mutation)."""
    bn = mod.norm2.bn
    y2, rm, rv = ref_rep_bn(
        x, bn.weight, bn.bias, mod.norm2.alpha, bn.running_mean, bn.running_var, training, momentum, bn.eps, mask
    )
    if not training:
        return y2, rm, rv
    y1 = ref_norm1(x, mod.norm1.weight, getattr(mod.norm1, "bias", None), mod.norm1.eps, mod.norm)
    return lam * y1 + (1 - lam) * y2, rm, rv


# ------------------------------------------------------------------------------------------------
# SLAB's public modules, re-expressed with plain torch (the checkpoint format to stay compatible with)
# ------------------------------------------------------------------------------------------------
class SlabRepBN(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x):  # x: (B, N, C)
        x = x.transpose(1, 2)
        return (self.bn(x) + self.alpha * x).transpose(1, 2)


class SlabLinearNorm(nn.Module):
    def __init__(self, dim, norm1, norm2, warm=0, step=300000, r0=1.0):
        super().__init__()
        self.register_buffer("warm", torch.tensor(warm))
        self.register_buffer("iter", torch.tensor(step))
        self.register_buffer("total_step", torch.tensor(step))
        self.r0 = r0
        self.norm1 = norm1(dim)
        self.norm2 = norm2(dim)

    def forward(self, x):
        if self.training:
            if self.warm > 0:
                self.warm.copy_(self.warm - 1)
                return self.norm1(x)
            lamda = self.r0 * self.iter / self.total_step
            if self.iter > 0:
                self.iter.copy_(self.iter - 1)
            return lamda * self.norm1(x) + (1 - lamda) * self.norm2(x)
        return self.norm2(x)


def slab_layernorm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


def slab_rmsnorm(dim):
    return nn.RMSNorm(dim, eps=1e-6)


@torch.no_grad()
def randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random affine params and running stats (variances positive) for every norm inside."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)):
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        if hasattr(m, "alpha") and isinstance(m.alpha, nn.Parameter):
            m.alpha.copy_(torch.rand(1, generator=gen) + 0.25)
    return module


def close(actual, expected, atol=2e-5, rtol=2e-5, **kw):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol, **kw)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ------------------------------------------------------------------------------------------------
# RepBN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 7, 13), (3, 2, 5, 6), (9, 5)])
@pytest.mark.parametrize("alpha_init", [1.0, 0.0])
def test_repbn_train_matches_reference(shape, alpha_init, gen):
    C = shape[-1]
    m = randomize(RepBN(C, alpha_init=alpha_init), gen)
    if alpha_init == 0.0:
        with torch.no_grad():
            m.alpha.zero_()
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    bn = m.bn
    y_ref, rm_ref, rv_ref = ref_rep_bn(x, bn.weight, bn.bias, m.alpha, bn.running_mean, bn.running_var, True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    close(y, y_ref)
    close(bn.running_mean, rm_ref)
    close(bn.running_var, rv_ref)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_repbn_matches_slab_batchnorm1d_over_steps(momentum, gen):
    """Side by side with SLAB's RepBN (nn.BatchNorm1d): outputs, running stats, num_batches_tracked."""
    C = 11
    ours = randomize(RepBN(C, momentum=momentum), gen)
    theirs = SlabRepBN(C)
    theirs.bn.momentum = momentum
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for step in range(3):
        x = torch.randn(3, 10, C, generator=gen) * (1 + step) + step
        close(ours(x), theirs(x))
        close(ours.bn.running_mean, theirs.bn.running_mean)
        close(ours.bn.running_var, theirs.bn.running_var)
        assert int(ours.bn.num_batches_tracked) == int(theirs.bn.num_batches_tracked) == step + 1
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 5, C, generator=gen)
    close(ours(x), theirs(x))


def test_repbn_eval_uses_running_stats_only(gen):
    C = 8
    m = randomize(RepBN(C), gen).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 6, C, generator=gen)
    bn = m.bn
    y_ref, _, _ = ref_rep_bn(x, bn.weight, bn.bias, m.alpha, bn.running_mean, bn.running_var, False)
    close(m(x), y_ref)
    # per-token: one token alone gives the same answer (no batch statistics in eval)
    close(m(x[:1, :1]), y_ref[:1, :1])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"eval forward changed {k}"


def test_repbn_mask_excludes_padding(gen):
    C = 6
    m = randomize(RepBN(C), gen)
    m2 = RepBN(C)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 9, C, generator=gen)
    mask = torch.rand(3, 9, generator=gen) > 0.4
    mask[0, :2] = True  # at least two kept tokens
    bn = m.bn
    y_ref, rm_ref, rv_ref = ref_rep_bn(x, bn.weight, bn.bias, m.alpha, bn.running_mean, bn.running_var, True, mask=mask)
    y = m(x, mask)
    close(y, y_ref)
    close(bn.running_mean, rm_ref)
    close(bn.running_var, rv_ref)
    # garbage in the padding changes neither the kept outputs nor the statistics
    x2 = x.clone()
    x2[~mask] = 1e3
    y2 = m2(x2, mask)
    close(y2[mask], y[mask])
    close(m2.bn.running_mean, bn.running_mean)
    close(m2.bn.running_var, bn.running_var)
    # and the padding tokens are normalised with the same (kept-token) statistics
    close(y[~mask], y_ref[~mask])


def test_repbn_too_few_tokens_raises():
    m = RepBN(4)
    with pytest.raises(RuntimeError):
        m(torch.randn(1, 1, 4))
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# PRepBN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_prepbn_train_and_eval_match_reference(norm, gen):
    C = 13
    m = randomize(PRepBN(C, norm=norm, step=10, r0=0.7), gen)
    assert isinstance(m.norm1, nn.LayerNorm if norm == "layer" else nn.RMSNorm)
    x = torch.randn(2, 9, C, generator=gen) * 1.5 - 0.3
    y_ref, rm_ref, rv_ref = ref_prep(m, x, lam=0.7)
    y = m(x)
    close(y, y_ref)
    close(m.norm2.bn.running_mean, rm_ref)
    close(m.norm2.bn.running_var, rv_ref)
    assert int(m.norm2.bn.num_batches_tracked) == 1
    m.eval()
    y_ref, _, _ = ref_prep(m, x, lam=None, training=False)
    close(m(x), y_ref)


def test_prepbn_schedule_over_steps(gen):
    """warm-up: norm1 only, BN untouched; then lam = r0 * iter / total_step counting down to 0."""
    C, warm, step, r0 = 10, 2, 4, 0.8
    m = randomize(PRepBN(C, warm=warm, step=step, r0=r0), gen)
    bn = m.norm2.bn
    stats0 = (bn.running_mean.clone(), bn.running_var.clone())
    for k in range(warm + step + 3):
        x = torch.randn(3, 5, C, generator=gen) + 0.1 * k
        rm_before, rv_before = bn.running_mean.clone(), bn.running_var.clone()
        if k < warm:
            y_ref = ref_norm1(x, m.norm1.weight, m.norm1.bias, m.norm1.eps, "layer")
            rm_ref, rv_ref = rm_before, rv_before
        else:
            lam = r0 * max(step - (k - warm), 0) / step
            y_ref, rm_ref, rv_ref = ref_prep(m, x, lam)
        y = m(x)
        close(y, y_ref)
        close(bn.running_mean, rm_ref)
        close(bn.running_var, rv_ref)
        assert int(m.warm) == max(warm - k - 1, 0)
        assert int(m.iter) == (step if k < warm else max(step - (k - warm) - 1, 0))
        assert int(m.total_step) == step
        assert int(bn.num_batches_tracked) == max(k - warm + 1, 0)
        if k < warm:
            assert torch.equal(bn.running_mean, stats0[0]) and torch.equal(bn.running_var, stats0[1])
    # eval: only the RepBN runs -- norm1's parameters do not matter
    m.eval()
    x = torch.randn(2, 4, C, generator=gen)
    y_eval = m(x)
    y_ref, _, _ = ref_prep(m, x, None, training=False)
    close(y_eval, y_ref)
    with torch.no_grad():
        m.norm1.weight.mul_(3.0)
        m.norm1.bias.add_(1.0)
    close(m(x), y_eval, atol=0, rtol=0)
    assert int(m.iter) == 0 and int(bn.num_batches_tracked) == step + 3


def test_schedule_follows_buffer_edits(gen):
    """The schedule reads the buffers as they are now: load_state_dict or an in-place edit between
    steps (resuming a checkpoint mid-schedule) takes effect at the next step."""
    C = 6
    m = randomize(PRepBN(C, warm=1, step=10, r0=1.0), gen)
    x = torch.randn(2, 5, C, generator=gen)
    m(x)  # warm-up step
    m(x)  # lam = 1.0, iter -> 9
    state = m.state_dict()
    state["iter"] = torch.tensor(4)
    state["warm"] = torch.tensor(0)
    m.load_state_dict(state)
    y_ref, _, _ = ref_prep(m, x, lam=0.4)
    close(m(x), y_ref)
    assert int(m.iter) == 3
    m.iter.fill_(8)
    m.total_step.fill_(16)
    y_ref, _, _ = ref_prep(m, x, lam=0.5)
    close(m(x), y_ref)
    assert int(m.iter) == 7
    m.warm.fill_(1)
    close(m(x), ref_norm1(x, m.norm1.weight, m.norm1.bias, m.norm1.eps, "layer"))
    assert int(m.warm) == 0 and int(m.iter) == 7
    m2 = copy.deepcopy(m)
    y_ref, _, _ = ref_prep(m2, x, lam=7 / 16)
    close(m2(x), y_ref)
    assert int(m2.iter) == 6 and int(m.iter) == 7


def test_prepbn_step_zero_is_pure_repbn(gen):
    C = 7
    m = randomize(PRepBN(C, step=0), gen)
    x = torch.randn(4, 3, C, generator=gen)
    y_ref, _, _ = ref_prep(m, x, lam=0.0)
    close(m(x), y_ref)
    assert int(m.iter) == 0


def test_prepbn_matches_slab_linearnorm_side_by_side(gen):
    """Same state, same inputs: our PRepBN and SLAB's LinearNorm agree at every step and in eval."""
    C = 12
    theirs = randomize(SlabLinearNorm(C, slab_layernorm, SlabRepBN, warm=1, step=3, r0=1.0), gen)
    ours = PRepBN(C, warm=1, step=3, r0=1.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for k in range(6):
        x = torch.randn(2, 8, C, generator=gen) * 2
        close(ours(x), theirs(x))
        for key, v in theirs.state_dict().items():
            close(ours.state_dict()[key], v, msg=lambda s, key=key, k=k: f"step {k}, {key}: {s}")
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 8, C, generator=gen)
    close(ours(x), theirs(x))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_prepbn_mask(norm, gen):
    C = 9
    m = randomize(PRepBN(C, norm=norm, step=5), gen)
    x = torch.randn(4, 6, C, generator=gen)
    mask = torch.arange(6).expand(4, 6) < torch.tensor([[6], [3], [1], [4]])  # right padding
    y_ref, rm_ref, rv_ref = ref_prep(m, x, lam=1.0, mask=mask)
    close(m(x, mask), y_ref)
    close(m.norm2.bn.running_mean, rm_ref)
    close(m.norm2.bn.running_var, rv_ref)
    # the unmasked statistics differ, so the mask really was used
    _, rm_all, _ = ref_prep(m, x, lam=1.0)
    assert not torch.allclose(rm_all.float(), m.norm2.bn.running_mean)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------
def _params_and_grads(mod):
    return {n: p.grad for n, p in mod.named_parameters()}


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("masked", [False, True])
def test_prepbn_gradients_match_reference(norm, masked, gen):
    C = 10
    m = randomize(PRepBN(C, norm=norm, step=4), gen).double()
    m.iter.fill_(3)  # lam = 0.75: every parameter of both branches matters
    x = (torch.randn(3, 7, C, generator=gen, dtype=F64) * 1.3 + 0.2).requires_grad_()
    mask = (torch.rand(3, 7, generator=gen) > 0.3) if masked else None
    if masked:
        mask[0, :2] = True
    dy = torch.randn(3, 7, C, generator=gen, dtype=F64)

    # reference on leaf copies of the same parameters
    p = {n: t.detach().clone().requires_grad_() for n, t in m.named_parameters()}
    xr = x.detach().clone().requires_grad_()
    bn = m.norm2.bn
    y2, _, _ = ref_rep_bn(
        xr, p["norm2.bn.weight"], p["norm2.bn.bias"], p["norm2.alpha"], bn.running_mean, bn.running_var, True, mask=mask
    )
    y1 = ref_norm1(xr, p["norm1.weight"], p.get("norm1.bias"), m.norm1.eps, norm)
    ((0.75 * y1 + 0.25 * y2) * dy).sum().backward()

    (m(x, mask) * dy).sum().backward()
    close(x.grad, xr.grad, atol=1e-9, rtol=1e-9)
    grads = _params_and_grads(m)
    assert set(grads) == set(p)
    for n, g in grads.items():
        assert g is not None, f"no gradient for {n}"
        close(g, p[n].grad, atol=1e-9, rtol=1e-9, msg=lambda s, n=n: f"{n}: {s}")
        assert g.abs().sum() > 0, n


def test_repbn_gradients_fp32(gen):
    C = 6
    m = randomize(RepBN(C), gen)
    x = torch.randn(5, 4, C, generator=gen, requires_grad=True)
    m(x).square().sum().backward()
    p = {n: t.detach().to(F64).requires_grad_() for n, t in m.named_parameters()}
    xr = x.detach().to(F64).requires_grad_()
    y, _, _ = ref_rep_bn(xr, p["bn.weight"], p["bn.bias"], p["alpha"], torch.zeros(C), torch.ones(C), True)
    y.square().sum().backward()
    close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)
    for n, prm in m.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), n
        close(prm.grad, p[n].grad, atol=1e-4, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


def test_bf16_input_with_fp32_module(gen):
    """Mixed precision: bf16 tokens through fp32 parameters give bf16 output near the fp32 result."""
    C = 16
    m = randomize(PRepBN(C, step=2), gen)
    m32 = PRepBN(C, step=2)
    m32.load_state_dict(m.state_dict())
    x = torch.randn(4, 8, C, generator=gen)
    xb = x.to(torch.bfloat16)
    y = m(xb)
    assert y.dtype == torch.bfloat16
    y_ref, rm_ref, _ = ref_prep(m32, xb.float(), lam=1.0)
    close(y, y_ref, atol=3e-2, rtol=2e-2)
    assert m.norm2.bn.running_mean.dtype == torch.float32
    close(m.norm2.bn.running_mean, rm_ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# State dicts (SLAB checkpoints)
# ------------------------------------------------------------------------------------------------
SLAB_REPBN_KEYS = {"alpha", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


def test_state_dict_keys_are_slabs():
    assert set(RepBN(5).state_dict()) == SLAB_REPBN_KEYS
    layer = set(PRepBN(5).state_dict())
    assert layer == set(SlabLinearNorm(5, slab_layernorm, SlabRepBN).state_dict())
    assert layer == {"warm", "iter", "total_step", "norm1.weight", "norm1.bias"} | {
        "norm2." + k for k in SLAB_REPBN_KEYS
    }
    assert set(PRepBN(5, norm="rms").state_dict()) == layer - {"norm1.bias"}
    for name in ("warm", "iter", "total_step"):
        b = getattr(PRepBN(5, warm=3, step=7), name)
        assert b.dtype == torch.int64 and b.dim() == 0
    assert PRepBN(5).norm2.alpha.shape == (1,)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_slab_checkpoint_round_trip(norm, gen):
    C = 14
    norm1 = slab_layernorm if norm == "layer" else slab_rmsnorm
    slab_mod = randomize(SlabLinearNorm(C, norm1, SlabRepBN, warm=0, step=100, r0=1.0), gen)
    with torch.no_grad():
        slab_mod.iter.fill_(37)
        slab_mod.norm2.bn.num_batches_tracked.fill_(63)
    ckpt = slab_mod.state_dict()

    ours = PRepBN(C, norm=norm, step=100)
    ours.load_state_dict(ckpt, strict=True)
    assert int(ours.iter) == 37 and int(ours.norm2.bn.num_batches_tracked) == 63
    for k, v in ckpt.items():
        assert torch.equal(ours.state_dict()[k], v), k

    x = torch.randn(3, 6, C, generator=gen)
    slab_mod.eval()
    ours.eval()
    close(ours(x), slab_mod(x))
    slab_mod.train()
    ours.train()
    close(ours(x), slab_mod(x))  # lam = 0.37
    close(ours.norm2.bn.running_var, slab_mod.norm2.bn.running_var)

    # and back: our state dict loads into SLAB's module
    back = SlabLinearNorm(C, norm1, SlabRepBN, step=100)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_repbn_slab_checkpoint_round_trip(gen):
    C = 5
    theirs = randomize(SlabRepBN(C), gen).eval()
    ours = RepBN(C).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, C, generator=gen)
    close(ours(x), theirs(x))


# ------------------------------------------------------------------------------------------------
# Synchronized statistics: dispatch (the all-reduce itself is tested with gloo elsewhere)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_dist(monkeypatch):
    """Pretend torch.distributed runs with 2 ranks and record prep_bn_sync calls."""
    calls = []
    fake = types.ModuleType("slab.nn._sync")

    def prep_bn_sync(*args):
        calls.append(args)
        return torch.full_like(args[0], 7.0)

    fake.prep_bn_sync = prep_bn_sync
    monkeypatch.setitem(sys.modules, "slab.nn._sync", fake)
    import slab.nn as slab_nn

    monkeypatch.setattr(slab_nn, "_sync", fake, raising=False)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    if not hasattr(dist, "group"):
        monkeypatch.setattr(dist, "group", types.SimpleNamespace(WORLD=None), raising=False)
    return calls


def test_sync_dispatch_repbn(fake_dist, gen):
    m = randomize(RepBN(6, momentum=0.2), gen)
    x = torch.randn(2, 3, 6, generator=gen)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert not torch.equal(m(x, mask), torch.full_like(x, 7.0))  # sync=False: runs locally
    assert fake_dist == []

    group = object()
    assert convert_sync(m, process_group=group) is m and m.sync and m.process_group is group
    y = m(x, mask)
    assert torch.equal(y, torch.full_like(x, 7.0))
    (args,) = fake_dist
    bn = m.bn
    assert len(args) == 15
    assert args[0] is x and args[1] is None and args[2] is None
    assert args[3] is bn.weight and args[4] is bn.bias and args[5] is m.alpha
    assert args[6] is bn.running_mean and args[7] is bn.running_var
    assert args[8] == 0.0 and args[9] == pytest.approx(0.2) and args[10] == bn.eps
    assert args[12] == "none" and args[13] is mask and args[14] is group
    assert int(bn.num_batches_tracked) == 2

    m.eval()  # eval never synchronizes
    m(x)
    assert len(fake_dist) == 1


def test_sync_dispatch_prepbn_and_convert(fake_dist, gen):
    model = nn.Sequential(PRepBN(6, norm="rms", warm=1, step=4, r0=1.0), nn.Linear(6, 6), RepBN(6))
    randomize(model, gen)
    assert convert_sync(model) is model
    p, r = model[0], model[2]
    assert p.sync and p.norm2.sync and r.sync and p.process_group is None
    x = torch.randn(2, 3, 6, generator=gen)
    p(x)  # warm-up: norm1 only, nothing to synchronize
    assert fake_dist == []
    p(x)
    (args,) = fake_dist
    assert args[1] is p.norm1.weight and args[2] is None and args[5] is p.norm2.alpha
    assert args[8] == pytest.approx(1.0) and args[12] == "rms" and args[11] == pytest.approx(1e-6)
    assert int(p.iter) == 3 and int(p.norm2.bn.num_batches_tracked) == 1


def test_sync_without_process_group_runs_locally(gen):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized")
    a = randomize(PRepBN(5, step=3), gen)
    b = PRepBN(5, step=3, sync=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4, 5, generator=gen)
    close(b(x), a(x), atol=0, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        PRepBN(4, norm="batch")
    with pytest.raises(ValueError):
        PRepBN(4, step=-1)
