"""Op-level tests of the SLA attention ops (SPEC section 2): slab.ops.sla (non-causal / causal,
masks, D != Dv, strided views; forward and every gradient against float64 plain-torch references;
gradcheck) and slab.ops.sla_step (decode continuing a prefill state), plus opcheck, torch.compile
and the errors on bad input."""

from __future__ import annotations

import pytest
import torch

import slab
import slab.ops
from slab.reference import sla as RS

from conftest import DEVICES, FLOAT_DTYPES, assert_close, ref_copy, param_id

OPS = torch.ops.slab
ALL_DTYPES = FLOAT_DTYPES + [torch.float64]
CHUNK = 64  # the CPU kernels' causal chunk


# ---- float64 references ------------------------------------------------------------------------


ref_sla = RS.sla  # the definition, quadratic form (slab.reference.sla)
ref_state = RS.sla_state


def grad_scales(q, k, v, go, causal=False, eps=1e-6, mask=None):
    """Per-row error scales for dq and dk (float64, shapes (B, H, N, 1)): the size of the terms
    they sum. With g_i = grad_o_i / den_i, dphi(q_i) = sum_j phi(k_j) (g_i . v_j - g_i . o_i) is
    a difference of terms of size |g_i . v_j| and up to |g_i| |o_i|; where one key dominates a row
    (the first tokens of a causal sequence, N = 1) they cancel, and the rounding error of o_i (of
    the output dtype; the same in PyTorch's own backward) is relative to the terms, not to the
    small result. dk likewise, per key."""
    fq, fk = q.relu(), k.relu()
    if mask is not None:
        fk = fk * mask[:, None, :, None].to(fk.dtype)
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.tril()
    den = a.sum(-1, keepdim=True) + eps
    o = (a @ v) / den
    g = go / den
    terms = (g @ v.transpose(-1, -2)).abs() + g.norm(dim=-1, keepdim=True) * o.norm(dim=-1, keepdim=True)
    if causal:
        terms = terms.tril()
    return (terms @ fk).amax(-1, keepdim=True), (terms.transpose(-1, -2) @ fq).amax(-1, keepdim=True)


def assert_close_rows(actual, expected, row_scale, dtype, name):
    """assert_close with the atol term relative to each row's own scale instead of the tensor's
    maximum: |a - e| <= atol * row_scale + rtol * |e| (a row with scale 0 must match exactly)."""
    sc = row_scale.clamp_min(1e-300)
    assert_close(actual.detach().cpu().double() / sc, expected / sc, dtype=dtype, scale=1.0, name=name)


def quadratic(n, d, dv):
    return n * (d + dv) <= 2 * d * dv  # SLAB's rule, as the kernels apply it


def make_qkv(shape, dtype, device, scale=1.0):
    b, h, n, d, dv = shape
    q = torch.randn(b, h, n, d, dtype=torch.float64) * scale
    k = torch.randn(b, h, n, d, dtype=torch.float64) * scale
    v = torch.randn(b, h, n, dv, dtype=torch.float64) * scale
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def make_mask(b, n, device, p=0.7):
    m = torch.rand(b, n) < p
    m[:, 0] = True  # every sequence keeps its first token
    return m.to(device)


def check_against_ref(q, k, v, causal, mask, name=""):
    """Output and the three gradients of slab.ops.sla vs the float64 reference on the same values."""
    dtype = q.dtype
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = slab.ops.sla(qs, ks, vs, causal=causal, mask=mask)
    q64, k64, v64 = (ref_copy(t, True) for t in (q, k, v))
    m64 = None if mask is None else mask.cpu()
    o64 = ref_sla(q64, k64, v64, causal, mask=m64)
    assert o.dtype == dtype and o.shape == v.shape[:3] + (v.shape[3],)
    assert_close(o, o64, name=f"{name} o")
    go = torch.randn(o.shape, dtype=torch.float64).to(dtype).to(o.device)
    grads = torch.autograd.grad(o, (qs, ks, vs), go)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), ref_copy(go, False))
    sq, sk = grad_scales(*(ref_copy(t, False) for t in (q, k, v, go)), causal, mask=m64)
    for g in grads:
        assert g.dtype == dtype
    assert_close_rows(grads[0], grads64[0], sq, dtype, f"{name} dq")
    assert_close_rows(grads[1], grads64[1], sk, dtype, f"{name} dk")
    assert_close(grads[2], grads64[2], name=f"{name} dv")
    return o, grads


# (B, H, N, D, Dv): N = 1; D != Dv; N below / above the non-causal quadratic switch; N not a
# multiple of the causal chunk (and below / above it); odd D and Dv; LM-sized heads (D = 128).
SHAPES = [
    (1, 1, 1, 8, 8),
    (2, 3, 37, 16, 24),
    (1, 2, 20, 32, 32),
    (1, 2, 130, 32, 32),
    (2, 1, 200, 64, 48),
    (1, 1, 65, 5, 3),
    (1, 2, 100, 128, 96),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_forward_backward(device, dtype, shape, causal):
    q, k, v = make_qkv(shape, dtype, device)
    check_against_ref(q, k, v, causal, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=param_id)
@pytest.mark.parametrize("shape", [(2, 2, 20, 32, 32), (2, 2, 150, 16, 24)], ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_mask(device, dtype, shape, causal):
    q, k, v = make_qkv(shape, dtype, device)
    mask = make_mask(shape[0], shape[2], device)
    assert not bool(mask.all())
    _, (dq, dk, dv) = check_against_ref(q, k, v, causal, mask)
    # masked-out tokens contribute nothing: no gradient reaches their keys and values ...
    dropped = ~mask
    assert bool((dk.permute(0, 2, 1, 3)[dropped] == 0).all()) and bool((dv.permute(0, 2, 1, 3)[dropped] == 0).all())
    # ... and changing them changes nothing, even to NaN (padding is never read)
    k2, v2 = k.clone(), v.clone()
    k2.permute(0, 2, 1, 3)[dropped] = float("nan")
    v2.permute(0, 2, 1, 3)[dropped] = float("nan")
    same = slab.ops.sla(q, k2, v2, causal=causal, mask=mask)
    assert torch.equal(same, slab.ops.sla(q, k, v, causal=causal, mask=mask))
    # an all-True mask is no mask
    full = torch.ones_like(mask)
    assert torch.equal(slab.ops.sla(q, k, v, causal=causal, mask=full), slab.ops.sla(q, k, v, causal=causal))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_nan_propagates(device, causal):
    """A NaN query element makes its own output row NaN and nothing else (rows are independent
    given S and z); a NaN key of a real token reaches every row that sums over it."""
    q, k, v = make_qkv((1, 2, 90, 8, 8), torch.float32, device)
    q[0, 1, 70, 3] = float("nan")
    o = slab.ops.sla(q, k, v, causal=causal)
    assert bool(torch.isnan(o[0, 1, 70]).all())
    o[0, 1, 70] = 0
    assert bool(torch.isfinite(o).all())
    q, k, v = make_qkv((1, 1, 90, 8, 8), torch.float32, device)
    k[0, 0, 80] = float("nan")
    o = slab.ops.sla(q, k, v, causal=causal)
    if causal:
        assert bool(torch.isnan(o[0, 0, 80:]).all()) and bool(torch.isfinite(o[0, 0, :78]).all())
    else:
        assert bool(torch.isnan(o).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_fully_masked_sequence(device, causal):
    q, k, v = make_qkv((2, 2, 9, 8, 8), torch.float32, device)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1] = False  # no real token: S = 0, z = 0, so o = 0 (0 / eps), finite
    o, state, z = slab.ops.sla(q, k, v, causal=causal, mask=mask, return_state=True)
    assert bool(torch.isfinite(o).all()) and bool((o[1] == 0).all())
    assert bool((state[1] == 0).all()) and bool((z[1] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n", [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_sla_chunk_boundaries(device, causal, n):
    q, k, v = make_qkv((1, 2, n, 16, 16), torch.float32, device)
    check_against_ref(q, k, v, causal, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_quadratic_switch(device, causal):
    """N on both sides of SLAB's rule N (D + Dv) <= 2 D Dv (D = Dv = 32: N <= 32)."""
    assert quadratic(32, 32, 32) and not quadratic(33, 32, 32)
    for n in (31, 32, 33, 34):
        q, k, v = make_qkv((1, 2, n, 32, 32), torch.float32, device)
        check_against_ref(q, k, v, causal, None, name=f"N={n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_qkv_permute_view(device, dtype, causal):
    """The q/k/v views of a fused qkv Linear output are read in place (no copy, not written)."""
    b, n, h, d = 2, 70, 3, 16
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64).to(dtype).to(device)
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous() and q.stride(-1) == 1
    before = qkv.clone()
    o, grads = check_against_ref(q, k, v, causal, None)
    assert torch.equal(qkv, before), "input written"
    assert torch.equal(o, slab.ops.sla(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_strided_last_dim_and_grad(device, causal):
    """A strided last dimension (copied by the binding), sliced heads, and a non-contiguous grad_o."""
    b, h, n, d = 2, 2, 40, 12
    base = torch.randn(b, n, h, 2 * d, dtype=torch.float64).to(device).float()
    q = base[..., ::2].transpose(1, 2)  # last-dim stride 2
    k = base[..., 1::2].transpose(1, 2)
    v = torch.randn(b, 2 * h, n, d, device=device)[:, ::2]  # every other head
    assert q.stride(-1) == 2 and not v.is_contiguous()
    check_against_ref(q, k, v, causal, None)
    # the grad of o.sum() is an expanded (stride-0) tensor
    qs = q.detach().clone().requires_grad_()
    slab.ops.sla(qs, k, v, causal=causal).sum().backward()
    q64 = ref_copy(q, True)
    ref_sla(q64, ref_copy(k), ref_copy(v), causal).sum().backward()
    assert_close(qs.grad, q64.grad, name="dq from sum()")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_large_values_16bit(device, dtype, causal):
    """phi(q) . phi(k) of 16-bit inputs of size ~100 is ~1e6 (past float16's range): sums stay in
    float32, the normalised output is of the size of v."""
    q, k, v = make_qkv((1, 2, 100, 64, 32), dtype, device, scale=100.0)
    o = slab.ops.sla(q, k, v, causal=causal)
    assert bool(torch.isfinite(o).all())
    assert_close(o, ref_sla(ref_copy(q), ref_copy(k), ref_copy(v), causal), name="o")
    qs = q.detach().clone().requires_grad_()
    (dq,) = torch.autograd.grad(slab.ops.sla(qs, k, v, causal=causal).float().square().sum(), qs)
    assert bool(torch.isfinite(dq).all())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 3, 4), (1, 1, 70, 3, 2)], ids=param_id)
def test_sla_gradcheck(causal, shape):
    q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.float64, "cpu"))
    mask = make_mask(shape[0], shape[2], "cpu")
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, b, c: slab.ops.sla(a, b, c, causal=causal, mask=m), (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sla_return_state(device, dtype, causal, masked):
    shape = (2, 3, 77, 8, 5)
    q, k, v = make_qkv(shape, dtype, device)
    mask = make_mask(2, 77, device) if masked else None
    o, state, z = slab.ops.sla(q, k, v, causal=causal, mask=mask, return_state=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert state.dtype == acc and z.dtype == acc and state.shape == (2, 3, 8, 5) and z.shape == (2, 3, 8)
    s64, z64 = ref_state(ref_copy(k), ref_copy(v), None if mask is None else mask.cpu())
    tol = {torch.float64: (1e-10, 1e-10)}.get(dtype, (1e-5, 1e-5))  # fp32 sums of the (rounded) inputs
    assert_close(state, s64, rtol=tol[0], atol=tol[1], name="state")
    assert_close(z, z64, rtol=tol[0], atol=tol[1], name="z")
    assert torch.equal(o, slab.ops.sla(q, k, v, causal=causal, mask=mask))


def test_sla_state_not_differentiable():
    q, k, v = (t.requires_grad_() for t in make_qkv((1, 2, 10, 4, 4), torch.float32, "cpu"))
    o, state, z = slab.ops.sla(q, k, v, causal=True, return_state=True)
    assert o.requires_grad and not state.requires_grad and not z.requires_grad
    o.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ---- decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=param_id)
@pytest.mark.parametrize("prefill", [0, 1, 70])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sla_prefill_then_decode(device, dtype, prefill, masked):
    """A causal prefill returning its state, then one sla_step per token, equals one causal call."""
    b, h, n, d, dv = 2, 3, 80, 16, 12
    q, k, v = make_qkv((b, h, n, d, dv), dtype, device)
    mask = make_mask(b, n, device) if masked else None
    if mask is not None:
        mask[:, prefill:] = True  # decode tokens are real tokens
    full = slab.ops.sla(q, k, v, causal=True, mask=mask)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if prefill > 0:
        pm = None if mask is None else mask[:, :prefill].contiguous()
        o_pre, state, z = slab.ops.sla(
            q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], causal=True, mask=pm, return_state=True
        )
        assert torch.equal(o_pre, full[:, :, :prefill])
    else:
        state = torch.zeros(b, h, d, dv, dtype=acc, device=device)
        z = torch.zeros(b, h, d, dtype=acc, device=device)
    outs = []
    for t in range(prefill, n):
        qt, kt, vt = q[:, :, t], k[:, :, t], v[:, :, t]  # (B, H, D) strided views
        before = [x.clone() for x in (qt, kt, vt)]
        outs.append(slab.ops.sla_step(qt, kt, vt, state, z))
        assert all(torch.equal(x, y) for x, y in zip((qt, kt, vt), before)), "sla_step wrote an input"
    steps = torch.stack(outs, dim=2)
    assert steps.dtype == dtype
    expect = ref_sla(ref_copy(q), ref_copy(k), ref_copy(v), True, mask=None if mask is None else mask.cpu())
    assert_close(steps, expect[:, :, prefill:], name="decoded")
    assert_close(steps, full[:, :, prefill:].double(), dtype=dtype, name="decoded vs causal call")
    s64, z64 = ref_state(ref_copy(k), ref_copy(v), None if mask is None else mask.cpu())
    tol = {torch.float64: (1e-10, 1e-10)}.get(dtype, (1e-5, 1e-5))
    assert_close(state, s64, rtol=tol[0], atol=tol[1], name="final state")
    assert_close(z, z64, rtol=tol[0], atol=tol[1], name="final z")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dv", [19, 43])
def test_sla_step_4d_and_dv(device, dv):
    """(B, H, 1, D) tokens give (B, H, 1, Dv) outputs; Dv != D and odd (column blocks of 4 vectors,
    single vectors and a tail); the update is in place."""
    b, h, d = 3, 2, 7
    state = torch.randn(b, h, d, dv, device=device)
    z = torch.rand(b, h, d, device=device) + 1
    s0, z0 = state.clone(), z.clone()
    q, k = torch.randn(b, h, 1, d, device=device), torch.randn(b, h, 1, d, device=device)
    v = torch.randn(b, h, 1, dv, device=device)
    o = slab.ops.sla_step(q, k, v, state, z, eps=1e-3)
    assert o.shape == (b, h, 1, dv)
    fk, fq = ref_copy(k[:, :, 0]).relu(), ref_copy(q[:, :, 0]).relu()
    s1 = ref_copy(s0) + fk[..., :, None] * ref_copy(v[:, :, 0])[..., None, :]
    z1 = ref_copy(z0) + fk
    assert_close(state, s1, name="state")
    assert_close(z, z1, name="z")
    expect = (fq[..., None, :] @ s1)[..., 0, :] / ((fq * z1).sum(-1, keepdim=True) + 1e-3)
    assert_close(o[:, :, 0], expect, name="o")


def test_sla_step_float64_with_float32_state():
    """float64 tokens with a float32 state: updated in place through a float64 copy."""
    b, h, d, dv = 2, 2, 6, 5
    q, k, v = (torch.randn(b, h, n, dtype=torch.float64) for n in (d, d, dv))
    state32, z32 = torch.zeros(b, h, d, dv), torch.zeros(b, h, d)
    state64, z64 = torch.zeros(b, h, d, dv, dtype=torch.float64), torch.zeros(b, h, d, dtype=torch.float64)
    o32 = slab.ops.sla_step(q, k, v, state32, z32)
    o64 = slab.ops.sla_step(q, k, v, state64, z64)
    assert o32.dtype == torch.float64 and state32.dtype == torch.float32
    assert_close(state32, state64, dtype=torch.float32, name="state")
    assert_close(z32, z64, dtype=torch.float32, name="z")
    assert_close(o32, o64, dtype=torch.float32, name="o")
    assert bool((state32 != 0).any())


def test_sla_step_no_autograd():
    state, z = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4)
    q = torch.randn(1, 1, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        slab.ops.sla_step(q, torch.randn(1, 1, 4), torch.randn(1, 1, 4), state, z)
    with torch.no_grad():
        slab.ops.sla_step(q, torch.randn(1, 1, 4), torch.randn(1, 1, 4), state, z)


# ---- empty, opcheck, compile, errors -----------------------------------------------------------


def test_sla_empty():
    q, k, v = make_qkv((2, 3, 0, 4, 5), torch.float32, "cpu")
    o, state, z = slab.ops.sla(q, k, v, causal=True, return_state=True)
    assert o.shape == (2, 3, 0, 5) and bool((state == 0).all()) and state.shape == (2, 3, 4, 5)
    q, k, v = make_qkv((0, 3, 6, 4, 5), torch.float32, "cpu")
    assert slab.ops.sla(q, k, v).shape == (0, 3, 6, 5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_opcheck(causal):
    q, k, v = make_qkv((2, 2, 70, 8, 6), torch.float32, "cpu")
    mask = make_mask(2, 70, "cpu")
    for m in (None, mask):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal, 1e-6, m)
        torch.library.opcheck(OPS.sla_forward.default, args)
        o, den, _, _ = OPS.sla_forward(q.detach(), k.detach(), v.detach(), causal, 1e-6, m)
        go = torch.randn_like(o)
        torch.library.opcheck(OPS.sla_backward.default, (go, q.detach(), k.detach(), v.detach(), o, den, causal, m))


def test_sla_step_opcheck():
    b, h, d, dv = 2, 3, 8, 5
    for rank4 in (False, True):
        shp = (b, h, 1) if rank4 else (b, h)
        args = (
            torch.randn(*shp, d),
            torch.randn(*shp, d),
            torch.randn(*shp, dv),
            torch.randn(b, h, d, dv),
            torch.rand(b, h, d),
        )
        torch.library.opcheck(OPS.sla_step.default, args + (1e-6,))


def test_sla_compile():
    q, k, v = (t.requires_grad_() for t in make_qkv((2, 2, 70, 8, 6), torch.float32, "cpu"))
    mask = make_mask(2, 70, "cpu")
    w = torch.randn(2, 2, 70, 6)

    def f(a, b, c):
        return (slab.ops.sla(a * 2, b, c, causal=True, mask=mask) * w).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v))
    q64, k64, v64 = (ref_copy(t, True) for t in (q, k, v))
    ref = (ref_sla(q64 * 2, k64, v64, True, mask=mask) * w.double()).sum()
    grads64 = torch.autograd.grad(ref, (q64, k64, v64))
    assert_close(out, ref, name="out")
    sq, sk = grad_scales(2 * ref_copy(q, False), ref_copy(k, False), ref_copy(v, False), w.double(), True, mask=mask)
    assert_close_rows(grads[0], grads64[0], 2 * sq, torch.float32, "dq")
    assert_close_rows(grads[1], grads64[1], sk, torch.float32, "dk")
    assert_close(grads[2], grads64[2], name="dv")


def test_sla_step_compile():
    b, h, d, dv = 2, 2, 8, 6
    q, k, v = make_qkv((b, h, 5, d, dv), torch.float32, "cpu")
    state, z = torch.zeros(b, h, d, dv), torch.zeros(b, h, d)

    @torch.compile(fullgraph=True)
    def step(a, b_, c, s, zz):
        return slab.ops.sla_step(a + 0, b_, c, s, zz) * 1

    outs = [step(q[:, :, t], k[:, :, t], v[:, :, t], state, z) for t in range(5)]
    expect = ref_sla(ref_copy(q), ref_copy(k), ref_copy(v), True)
    assert_close(torch.stack(outs, 2), expect, name="compiled decode")
    assert_close(state, ref_state(ref_copy(k), ref_copy(v))[0], name="state mutated under compile")


def test_sla_errors():
    q, k, v = make_qkv((2, 3, 10, 4, 5), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="q must have shape"):
        slab.ops.sla(q[0], k[0], v[0])
    with pytest.raises(RuntimeError, match="k must have the shape of q"):
        slab.ops.sla(q, k[:, :, :9], v)
    with pytest.raises(RuntimeError, match="k must have the shape of q"):
        slab.ops.sla(q, k[..., :3], v)
    with pytest.raises(RuntimeError, match="v must have shape"):
        slab.ops.sla(q, k, v[:, :2])
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        slab.ops.sla(q, k.double(), v)
    with pytest.raises(RuntimeError, match="v must have the dtype of q"):
        slab.ops.sla(q, k, v.half())
    with pytest.raises(RuntimeError, match="q must be float32"):
        slab.ops.sla(q.int(), k.int(), v.int())
    for eps in (float("nan"), float("inf"), -1e-6):
        with pytest.raises(RuntimeError, match="eps"):
            slab.ops.sla(q, k, v, eps=eps)
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        slab.ops.sla(q, k, v, mask=torch.ones(2, 10))
    with pytest.raises(RuntimeError, match="mask must have shape"):
        slab.ops.sla(q, k, v, mask=torch.ones(2, 9, dtype=torch.bool))
    o, den, _, _ = OPS.sla_forward(q, k, v, True, 1e-6, None)
    with pytest.raises(RuntimeError, match="den must be"):
        OPS.sla_backward(o, q, k, v, o, den.double(), True, None)
    with pytest.raises(RuntimeError, match="grad_o must have the shape"):
        OPS.sla_backward(o[:, :, :5], q, k, v, o, den, True, None)


def test_sla_step_errors():
    b, h, d, dv = 2, 3, 4, 5
    q, k, v = torch.randn(b, h, d), torch.randn(b, h, d), torch.randn(b, h, dv)
    state, z = torch.zeros(b, h, d, dv), torch.zeros(b, h, d)
    with pytest.raises(RuntimeError, match="state must be"):
        slab.ops.sla_step(q, k, v, state.bfloat16(), z)
    with pytest.raises(RuntimeError, match="state must have shape"):
        slab.ops.sla_step(q, k, v, state[:, :, :3], z)
    with pytest.raises(RuntimeError, match="state must be contiguous"):
        slab.ops.sla_step(q, k, v, torch.zeros(b, h, dv, d).transpose(-1, -2), z)
    with pytest.raises(RuntimeError, match="z must have shape"):
        slab.ops.sla_step(q, k, v, state, z[..., :2])
    with pytest.raises(RuntimeError, match="z must be"):
        slab.ops.sla_step(q, k, v, state, z.double())
    with pytest.raises(RuntimeError, match="q must have shape"):
        slab.ops.sla_step(q[None, None], k[None, None], v[None, None], state, z)
    with pytest.raises(RuntimeError, match="k must have the shape of q"):
        slab.ops.sla_step(q, k[..., :3], v, state, z)
    with pytest.raises(RuntimeError, match="v must have shape"):
        slab.ops.sla_step(q, k, v[:1], state, z)
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        slab.ops.sla_step(q, k.double(), v, state, z)
    with pytest.raises(RuntimeError, match="eps"):
        slab.ops.sla_step(q, k, v, state, z, eps=float("nan"))
    assert bool((state == 0).all()) and bool((z == 0).all()), "a rejected call wrote the state"


@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
def test_sla_device_mismatch(device):
    q, k, v = make_qkv((1, 1, 4, 4, 4), torch.float32, device)
    with pytest.raises(RuntimeError, match="k is on"):
        slab.ops.sla(q, k.cpu(), v)
    with pytest.raises(RuntimeError, match="state is on"):
        slab.ops.sla_step(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, device=device)
        )


# ---- the CUDA tensor-core forward against the exact kernel (SLAB_SLA_EXACT=1) on the device ------

CUDA_ONLY = [d for d in DEVICES if d.id == "cuda"]
# (B, H, N, D, Dv) on the tensor-core path (D, Dv multiples of 16 up to 128): N = 1, N below, at
# and past the 64-token chunk, a long sequence, D != Dv, LM-sized heads.
TC_SHAPES = [
    (2, 3, 1, 16, 16),
    (1, 2, 63, 32, 32),
    (1, 2, 64, 64, 64),
    (2, 2, 200, 64, 48),
    (1, 2, 130, 128, 128),
    (1, 1, 77, 16, 128),
    (2, 4, 1500, 64, 64),
]


def sla_forward_raw(q, k, v, causal, mask, exact, monkeypatch):
    """torch.ops.slab.sla_forward -> (o, den, state, z), the tensor-core path or the exact oracle."""
    with monkeypatch.context() as m:
        if exact:
            m.setenv("SLAB_SLA_EXACT", "1")
        else:
            m.delenv("SLAB_SLA_EXACT", raising=False)
        out = OPS.sla_forward(q, k, v, causal, 1e-6, mask)
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("shape", TC_SHAPES, ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sla_tensor_core_vs_exact(device, dtype, shape, causal, masked, monkeypatch):
    q, k, v = make_qkv(shape, dtype, device)
    mask = make_mask(shape[0], shape[2], device) if masked else None
    o, den, state, z = sla_forward_raw(q, k, v, causal, mask, False, monkeypatch)
    o_x, den_x, state_x, z_x = sla_forward_raw(q, k, v, causal, mask, True, monkeypatch)
    ref = ref_sla(ref_copy(q), ref_copy(k), ref_copy(v), causal, mask=None if mask is None else mask.cpu())
    assert_close(o, ref, name="tensor-core o vs float64")
    assert_close(o, o_x.double(), dtype=dtype, name="tensor-core o vs exact kernel")
    assert_close(den, den_x, rtol=1e-4, atol=1e-5, name="den")  # fp32 sums on both paths
    assert_close(state, state_x, rtol=1e-4, atol=1e-4, name="state")
    assert_close(z, z_x, rtol=1e-4, atol=1e-4, name="z")
    o_cpu = slab.ops.sla(q.cpu(), k.cpu(), v.cpu(), causal=causal, mask=None if mask is None else mask.cpu())
    assert_close(o, o_cpu.double(), dtype=dtype, name="tensor-core o vs CPU")
    again = sla_forward_raw(q, k, v, causal, mask, False, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(again, (o, den, state, z))), "not deterministic"


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sla_tensor_core_masked_nan_and_views(device, dtype, causal, monkeypatch):
    """Masked-out keys holding NaN never reach the tensor-core path's outputs; the strided q/k/v
    views of a fused qkv projection run on it in place; the backward (exact kernel) takes its den."""
    b, n, h, d = 2, 150, 2, 64
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64).to(dtype).to(device)
    q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    mask = make_mask(b, n, device)
    k2, v2 = k.clone(), v.clone()
    k2.permute(0, 2, 1, 3)[~mask] = float("nan")
    v2.permute(0, 2, 1, 3)[~mask] = float("nan")
    o = sla_forward_raw(q, k, v, causal, mask, False, monkeypatch)[0]
    assert torch.equal(o, sla_forward_raw(q, k2, v2, causal, mask, False, monkeypatch)[0])
    check_against_ref(q, k, v, causal, mask)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("shape", TC_SHAPES[:-1] + [(1, 2, 300, 64, 64)], ids=param_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sla_tensor_core_backward_vs_exact(device, shape, causal, masked, monkeypatch):
    """bf16 backward: the chunked tensor-core kernels and the exact kernel (SLAB_SLA_EXACT=1) both
    meet the float64 reference's per-row tolerances on the same inputs and grad_o; masked keys get
    zero gradients."""
    q, k, v = make_qkv(shape, torch.bfloat16, device)
    mask = make_mask(shape[0], shape[2], device) if masked else None
    results = []
    for exact in (False, True):
        with monkeypatch.context() as m:
            if exact:
                m.setenv("SLAB_SLA_EXACT", "1")
            else:
                m.delenv("SLAB_SLA_EXACT", raising=False)
            torch.manual_seed(0)
            results.append(check_against_ref(q, k, v, causal, mask, name="exact" if exact else "tensor-core"))
    (o, grads), (o_x, _) = results
    assert_close(o, o_x.double(), dtype=torch.bfloat16, name="o vs exact")
    if mask is not None:
        dropped = ~mask
        assert bool((grads[1].permute(0, 2, 1, 3)[dropped] == 0).all())
        assert bool((grads[2].permute(0, 2, 1, 3)[dropped] == 0).all())
