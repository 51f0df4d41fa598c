"""Op-level tests of the CATS family (SPEC section 3): slab.ops.cats (forward, backward,
gradcheck) and slab.ops.cats_mlp against float64 plain-torch references, plus opcheck,
torch.compile and the errors on bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slab
import slab.ops
from slab.reference import cats as R

from conftest import DEVICES, FLOAT_DTYPES, assert_close, ref_copy, param_id

OPS = torch.ops.slab
ALL_DTYPES = FLOAT_DTYPES + [torch.float64]


# ---- float64 references ------------------------------------------------------------------------


ref_cats = R.cats  # slab.reference.cats: s = silu(x) where |s| > t
ref_cats_grad = R.cats_grad


def ref_mlp(x, wg, wu, wd_t, t):
    """Dense gated MLP with the CATS threshold, float64, on the values the kernel sees."""
    return R.cats_mlp(*(ref_copy(a, False) for a in (x, wg, wu, wd_t)), t)


def away_from_threshold(x64: torch.Tensor, t: float, margin: float) -> torch.Tensor:
    """x with every |silu(x)| at least `margin` (relative) away from t, so the keep decision does
    not depend on the rounding of a 16-bit input or of the float32 silu."""
    s = F.silu(x64).abs()
    near = (s - t).abs() <= margin * max(t, 1e-3)
    return torch.where(near, x64 + 0.5 * torch.sign(x64 + 1e-9) + 0.25, x64)


def make_x(shape, dtype, device, t, scale=2.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    for _ in range(4):  # a couple of rounds, since the shift may land near t again
        x = away_from_threshold(x, t, 0.02)
    return x.to(dtype).to(device)


# ---- cats forward / backward -------------------------------------------------------------------

SHAPES = [(1,), (7,), (3, 5, 37), (2, 129), (4, 1, 1000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 2.0])
def test_cats_forward_backward(device, dtype, shape, t):
    x = make_x(shape, dtype, device, t).requires_grad_()
    y = slab.ops.cats(x, t)
    x64 = ref_copy(x, True)
    y64 = ref_cats(x64, t)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, name="y")
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert_close(dx, ref_cats_grad(x64.detach(), ref_copy(dy, False), t), name="dx")
    # the threshold does something here: some values are dropped at t > 0
    if t >= 0.5 and x.numel() > 100:
        assert int((y == 0).sum()) > 0 and int((y != 0).sum()) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=param_id)
def test_cats_ties_at_threshold(device, dtype):
    """|silu(x)| == threshold is dropped (strict test); just above is kept; negatives too."""
    x = torch.tensor([-3.0, -1.5, -0.7, -0.2, 0.0, 0.2, 0.7, 1.5, 3.0], dtype=dtype, device=device)
    s = slab.ops.cats(x, -1.0)  # a negative threshold keeps everything: plain silu
    assert_close(s, F.silu(ref_copy(x)), name="silu")
    for i in range(x.numel()):
        t = float(s[i].abs())
        y = slab.ops.cats(x, t)
        assert float(y[i]) == 0.0, f"tie at x={float(x[i])} (|s| == t) must be dropped"
        expect_kept = s.abs() > t
        assert torch.equal(y != 0, expect_kept), (y, t)
        # a threshold one ulp below |s| keeps it
        below = float(torch.nextafter(torch.tensor(t, dtype=dtype), torch.tensor(-1.0, dtype=dtype)))
        if t > 0:
            assert float(slab.ops.cats(x, below)[i]) == float(s[i])


@pytest.mark.parametrize("device", DEVICES)
def test_cats_negative_values_and_large(device):
    # silu is negative with minimum -0.278 at x = -1.278: negative values are tested by magnitude.
    x = torch.tensor([-1.278, -5.0, -40.0, -100.0, 100.0, 40.0, 0.5], dtype=torch.float32, device=device)
    y = slab.ops.cats(x, 0.2)
    assert_close(y, ref_cats(ref_copy(x), 0.2), name="y")
    assert float(y[0]) < 0  # |silu(-1.278)| = 0.278 > 0.2: kept, negative
    assert float(y[1]) == 0  # |silu(-5)| = 0.033: dropped
    assert float(y[4]) == 100.0


@pytest.mark.parametrize("device", DEVICES)
def test_cats_nan_propagates(device):
    x = torch.tensor([0.0, float("nan"), 3.0], device=device)
    y = slab.ops.cats(x, 0.5)
    assert torch.isnan(y[1]) and y[0] == 0 and y[2] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_cats_noncontiguous_and_tensor_threshold(device):
    t = 0.3
    base = make_x((6, 40), torch.float32, device, t)
    x = base[:, ::3]  # strided view
    assert not x.is_contiguous()
    before = base.clone()
    y = slab.ops.cats(x, torch.tensor(t))
    assert_close(y, ref_cats(ref_copy(x), t), name="y")
    assert torch.equal(base, before), "input written"
    assert_close(slab.ops.cats(x, torch.tensor([t])), y, name="1-element threshold")


def test_cats_gradcheck():
    t = 0.25
    x = make_x((5, 9), torch.float64, "cpu", t).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: slab.ops.cats(v, t), (x,), eps=1e-6, atol=1e-7)


def test_cats_empty():
    x = torch.empty(0, 5)
    assert slab.ops.cats(x, 0.1).shape == (0, 5)


def test_cats_opcheck():
    x = torch.randn(3, 17, requires_grad=True)
    torch.library.opcheck(OPS.cats.default, (x, 0.3))
    torch.library.opcheck(OPS.cats_backward.default, (torch.randn(3, 17), x.detach(), 0.3))


def test_cats_compile():
    x = torch.randn(4, 33, requires_grad=True)

    def f(v):
        return slab.ops.cats(v * 2, 0.4).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(x)
    (g,) = torch.autograd.grad(out, x)
    x64 = ref_copy(x, True)
    ref = ref_cats(x64 * 2, 0.4).sum()
    (g64,) = torch.autograd.grad(ref, x64)
    assert_close(out, ref, name="out")
    assert_close(g, g64, name="grad")


def test_cats_errors():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="threshold"):
        slab.ops.cats(x, float("nan"))
    with pytest.raises(RuntimeError, match="threshold"):
        slab.ops.cats(x, float("inf"))
    with pytest.raises(ValueError, match="threshold"):
        slab.ops.cats(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="threshold"):
        slab.ops.cats(x, "0.1")
    with pytest.raises(RuntimeError, match="x must be float32"):
        slab.ops.cats(torch.ones(3, dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="grad must have the shape"):
        OPS.cats_backward(torch.randn(4, 4), x, 0.1)


# ---- cats_mlp ----------------------------------------------------------------------------------


def make_mlp(m, d, f, dtype, device, scale=1.0):
    x = (torch.randn(m, d, dtype=torch.float64)).to(dtype).to(device)
    wg = (torch.randn(f, d, dtype=torch.float64) * scale / d**0.5 * 3).to(dtype).to(device)
    wu = (torch.randn(f, d, dtype=torch.float64) / d**0.5).to(dtype).to(device)
    wd_t = (torch.randn(f, d, dtype=torch.float64) / f**0.5).to(dtype).to(device)
    return x, wg, wu, wd_t


def quantile_threshold(x, wg, q):
    """The threshold dropping a fraction q of |silu(gate)| over these tokens (float64)."""
    s = F.silu(ref_copy(x, False) @ ref_copy(wg, False).t()).abs().reshape(-1)
    return float(torch.quantile(s, q))


def snap_gates_away(x, wg, t, dtype):
    """Rows of wg whose gate lands within a relative 3% of t (where the float32 vs float64 keep
    decision could differ) are rescaled so the test compares the same kept sets."""
    for _ in range(4):
        s = F.silu(ref_copy(x, False) @ ref_copy(wg, False).t()).abs()  # (M, F)
        near = ((s - t).abs() <= 0.03 * max(t, 1e-3)).any(0)
        if not bool(near.any()):
            break
        wg = wg.clone()
        wg[near] = (ref_copy(wg[near], False) * 1.37).to(dtype)
    return wg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_cats_mlp_matches_dense(device, dtype, m, sparsity):
    d, f = 67, 131  # odd D and F: vector tails everywhere
    x, wg, wu, wd_t = make_mlp(m, d, f, dtype, device)
    t = quantile_threshold(x, wg, sparsity) if sparsity > 0 else 0.0
    wg = snap_gates_away(x, wg, t, dtype)
    y = slab.ops.cats_mlp(x, wg, wu, wd_t, t)
    expect = ref_mlp(x, wg, wu, wd_t, t)
    assert y.dtype == dtype and y.shape == (m, d)
    # 16-bit outputs: the reference sees the same rounded inputs, accumulation is fp32.
    rtol, atol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 2e-5)}.get(dtype, (None, None))
    assert_close(y, expect, rtol=rtol, atol=atol, name="y")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_cats_mlp_all_and_none_masked(device, dtype):
    x, wg, wu, wd_t = make_mlp(4, 33, 70, dtype, device)
    y = slab.ops.cats_mlp(x, wg, wu, wd_t, 1e9)  # nothing passes
    assert torch.equal(y, torch.zeros_like(y))
    y = slab.ops.cats_mlp(x, wg, wu, wd_t, -1.0)  # everything passes: the plain SwiGLU MLP
    x64, wg64, wu64, wd64 = (ref_copy(a, False) for a in (x, wg, wu, wd_t))
    dense = (F.silu(x64 @ wg64.t()) * (x64 @ wu64.t())) @ wd64
    assert_close(y, dense, name="y")


@pytest.mark.parametrize("device", DEVICES)
def test_cats_mlp_skips_dropped_rows(device):
    """Rows of w_up / w_down_t of neurons no token keeps are never read: NaN there cannot leak."""
    m, d, f = 3, 40, 64
    x, wg, wu, wd_t = make_mlp(m, d, f, torch.float32, device)
    t = quantile_threshold(x, wg, 0.6)
    wg = snap_gates_away(x, wg, t, torch.float32)
    s = F.silu(ref_copy(x, False) @ ref_copy(wg, False).t()).abs()
    dropped = ~(s > t).any(0)
    assert int(dropped.sum()) > 0
    wu_nan, wd_nan = wu.clone(), wd_t.clone()
    wu_nan[dropped.to(device)] = float("nan")
    wd_nan[dropped.to(device)] = float("nan")
    y = slab.ops.cats_mlp(x, wg, wu_nan, wd_nan, t)
    assert_close(y, ref_mlp(x, wg, wu, wd_t, t), name="y")


@pytest.mark.parametrize("device", DEVICES)
def test_cats_mlp_union_of_masks(device):
    """A neuron kept by one token only contributes 0 for the tokens that drop it."""
    d, f = 16, 8
    x = torch.zeros(2, d, device=device)
    x[0, 0], x[1, 1] = 1.0, 1.0
    wg = torch.zeros(f, d, device=device)
    wg[0, 0] = 4.0  # neuron 0: token 0 keeps (silu(4) = 3.93), token 1 gate 0
    wg[1, 1] = 4.0  # neuron 1: token 1 keeps
    wu = torch.ones(f, d, device=device)
    wd_t = torch.arange(f * d, dtype=torch.float32, device=device).reshape(f, d) / 100
    y = slab.ops.cats_mlp(x, wg, wu, wd_t, 0.5)
    s4 = float(F.silu(torch.tensor(4.0)))
    assert_close(y[0], s4 * wd_t[0], name="token 0")
    assert_close(y[1], s4 * wd_t[1], name="token 1")


@pytest.mark.parametrize("device", DEVICES)
def test_cats_mlp_shapes_and_noncontiguous(device):
    d, f = 24, 50
    x, wg, wu, wd_t = make_mlp(6, d, f, torch.float32, device)
    t = 0.1
    wg = snap_gates_away(x, wg, t, torch.float32)
    x3 = x.reshape(2, 3, d)
    y = slab.ops.cats_mlp(x3, wg, wu, wd_t, t)
    assert y.shape == (2, 3, d)
    expect = ref_mlp(x, wg, wu, wd_t, t).reshape(2, 3, d)
    assert_close(y, expect, name="(..., D) input")
    # strided x and a W_down.t() view in place of the transposed copy
    xs = torch.cat([x, x], dim=1)[:, ::2]
    w_down = wd_t.t().contiguous()
    before = [a.clone() for a in (wg, wu, w_down)]
    y2 = slab.ops.cats_mlp(xs, wg, wu, w_down.t(), t)
    assert_close(y2, ref_mlp(xs, wg, wu, wd_t, t), name="strided")
    assert all(torch.equal(a, b) for a, b in zip((wg, wu, w_down), before))


def test_cats_mlp_large_values():
    x, wg, wu, wd_t = make_mlp(2, 50, 90, torch.float32, "cpu")
    x = x * 1e3
    wg = snap_gates_away(x, wg, 30.0, torch.float32)
    y = slab.ops.cats_mlp(x, wg, wu, wd_t, 30.0)
    assert_close(y, ref_mlp(x, wg, wu, wd_t, 30.0), name="y")


def test_cats_mlp_opcheck():
    x, wg, wu, wd_t = make_mlp(3, 20, 31, torch.float32, "cpu")
    torch.library.opcheck(OPS.cats_mlp.default, (x, wg, wu, wd_t, 0.2))


def test_cats_mlp_compile():
    x, wg, wu, wd_t = make_mlp(2, 20, 31, torch.float32, "cpu")
    wg = snap_gates_away(x, wg, 0.2, torch.float32)
    cf = torch.compile(lambda a: slab.ops.cats_mlp(a + 0, wg, wu, wd_t, 0.2), fullgraph=True)
    assert_close(cf(x), ref_mlp(x, wg, wu, wd_t, 0.2), name="compiled")


def test_cats_mlp_errors():
    x, wg, wu, wd_t = make_mlp(2, 20, 31, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="1 to 16 tokens"):
        slab.ops.cats_mlp(torch.randn(17, 20), wg, wu, wd_t, 0.1)
    with pytest.raises(RuntimeError, match="w_up must have shape"):
        slab.ops.cats_mlp(x, wg, wu[:, :5], wd_t, 0.1)
    with pytest.raises(RuntimeError, match="w_down_t must have shape"):
        slab.ops.cats_mlp(x, wg, wu, wd_t.t().contiguous(), 0.1)
    with pytest.raises(RuntimeError, match="w_gate must have shape"):
        slab.ops.cats_mlp(x, wg[:, :7], wu, wd_t, 0.1)
    with pytest.raises(RuntimeError, match="w_up must have the dtype"):
        slab.ops.cats_mlp(x, wg, wu.double(), wd_t, 0.1)
    with pytest.raises(RuntimeError, match="x must have shape"):
        OPS.cats_mlp(x.reshape(1, 2, 20), wg, wu, wd_t, 0.1)
    with pytest.raises(RuntimeError, match="threshold"):
        slab.ops.cats_mlp(x, wg, wu, wd_t, float("nan"))
    with pytest.raises(RuntimeError, match="x must be float32"):
        slab.ops.cats_mlp(x.to(torch.int8), wg, wu, wd_t, 0.1)
