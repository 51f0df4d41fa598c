"""Op-level tests of the PRepBN family (SPEC section 1) against the float64 plain-torch reference.

Covers slab.ops.rep_bn / slab.ops.prep_bn (forward, running-stat update, every gradient), masks,
odd channel counts, 2-D / 4-D / strided inputs, large values, gradcheck, opcheck on every raw op,
torch.compile(fullgraph=True), the stage ops against the fused ones, no writes into inputs, and the
errors on bad inputs.
"""

from __future__ import annotations

import pytest
import torch

import slab
from slab import reference as ref

from conftest import CUDA_OK, DEVICES, assert_close, ref_copy, param_id

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(2, 7, 37), (5, 123, 123), (4, 9, 3), (3, 5, 1), (6, 129), (2, 3, 4, 16)]
BIG = (5, 123, 123)
SMALL_SHAPES = [s for s in SHAPES if s != BIG]
NORMS = ["layer", "layer_nobias", "rms"]
LAMS = [0.0, 0.3, 1.0]
PARAM_NAMES = ("norm_weight", "norm_bias", "bn_weight", "bn_bias", "alpha")

OPS = torch.ops.slab


# ---- inputs ---------------------------------------------------------------------------------


def make_x(shape, dtype, device, scale=2.0, shift=0.5):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def make_params(c, dtype, device, *, norm="layer", param_dtype=None, alpha_shape=(1,), stats_dtype=None):
    """Per-channel parameters / running stats. norm: "layer", "layer_nobias", "rms" or "none"."""
    pd = dtype if param_dtype is None else param_dtype
    sd = (torch.float64 if dtype == torch.float64 else torch.float32) if stats_dtype is None else stats_dtype

    def r(n, scale, shift=0.0, dt=pd):
        return (torch.randn(n, dtype=torch.float64) * scale + shift).to(device=device, dtype=dt)

    p = {
        "norm_weight": r(c, 0.3, 1.0) if norm != "none" else None,
        "norm_bias": r(c, 0.2) if norm == "layer" else None,
        "bn_weight": r(c, 0.3, 1.0),
        "bn_bias": r(c, 0.2),
        "alpha": (torch.rand(alpha_shape, dtype=torch.float64) * 0.5 + 0.5).to(device=device, dtype=pd),
        "running_mean": r(c, 0.2, dt=sd),
        "running_var": (torch.rand(c, dtype=torch.float64) + 0.5).to(device=device, dtype=sd),
    }
    return p


def norm_kind(norm):
    return "layer" if norm in ("layer", "layer_nobias") else norm


def make_mask(lead_shape, device, kind="random"):
    if kind == "none":
        return None
    if kind == "all_true":
        return torch.ones(lead_shape, dtype=torch.bool, device=device)
    if kind == "few_masked":
        m = torch.ones(lead_shape, dtype=torch.bool)
        flat = m.view(-1)
        flat[torch.randperm(flat.numel())[: max(1, flat.numel() // 10)]] = False
        return m.to(device)
    if kind == "random":
        m = torch.rand(lead_shape) > 0.4
        flat = m.view(-1)
        flat[:2] = True  # at least two kept tokens
        return m.to(device)
    raise ValueError(kind)


# ---- running slab and the reference side by side --------------------------------------------


def _call(fn, x, p, *, op, lam, training, norm, mask, momentum=0.1, eps=1e-5, norm_eps=1e-6):
    if op == "rep_bn":
        return fn.rep_bn(
            x,
            p["bn_weight"],
            p["bn_bias"],
            p["alpha"],
            p["running_mean"],
            p["running_var"],
            training,
            momentum=momentum,
            eps=eps,
            mask=mask,
        )
    return fn.prep_bn(
        x,
        p["norm_weight"],
        p["norm_bias"],
        p["bn_weight"],
        p["bn_bias"],
        p["alpha"],
        p["running_mean"],
        p["running_var"],
        lam,
        training,
        momentum=momentum,
        eps=eps,
        norm_eps=norm_eps,
        norm=norm_kind(norm),
        mask=mask,
    )


def run_both(x, p, *, op="prep_bn", lam=0.3, training=True, norm="layer", mask=None, dy=None, **hyper):
    """Runs slab (on x's device and dtype) and the float64 CPU reference on the same values.

    Returns (slab_result, ref_result), each a dict: y, running_mean, running_var and grad_<name>
    for x and every parameter the op uses.
    """
    used = ["bn_weight", "bn_bias", "alpha"] if op == "rep_bn" else list(PARAM_NAMES)
    if dy is None:
        dy = torch.randn(x.shape, dtype=torch.float64).to(device=x.device, dtype=x.dtype)

    def leaf(t, to_ref):
        # detach() keeps the layout (strides) of non-contiguous inputs; clone() might not.
        if t is None:
            return None
        return ref_copy(t, True) if to_ref else t.detach().requires_grad_(True)

    results = []
    for to_ref in (False, True):
        xs = leaf(x, to_ref)
        ps = {k: (leaf(v, to_ref) if k in used else v) for k, v in p.items()}
        ps["running_mean"] = ref_copy(p["running_mean"], False) if to_ref else p["running_mean"].clone()
        ps["running_var"] = ref_copy(p["running_var"], False) if to_ref else p["running_var"].clone()
        m = None if mask is None else (mask.cpu() if to_ref else mask)
        y = _call(ref if to_ref else slab.ops, xs, ps, op=op, lam=lam, training=training, norm=norm, mask=m, **hyper)
        g = ref_copy(dy, False) if to_ref else dy
        y.backward(g)
        out = {"y": y.detach(), "running_mean": ps["running_mean"], "running_var": ps["running_var"], "grad_x": xs.grad}
        if to_ref:
            out["scales"] = grad_scales(
                xs.detach(),
                g,
                p,
                op=op,
                training=training,
                norm=norm,
                mask=m,
                lam=lam,
                eps=hyper.get("eps", 1e-5),
                norm_eps=hyper.get("norm_eps", 1e-6),
            )
        for k in used:
            if ps[k] is not None:
                out["grad_" + k] = ps[k].grad
        results.append(out)
    return results[0], results[1]


def grad_scales(x, dy, p, *, op, training, norm, mask, lam=0.0, eps=1e-5, norm_eps=1e-6):
    """Fair error scales for the parameter gradients, which are sums over all tokens.

    A float32 sum of T terms with random signs is accurate to a few ulps of sqrt(sum of squared
    terms), not of the (possibly heavily cancelled) result, so the gradient of each parameter is
    judged against max(|reference|, ||its summands||_2). Computed in float64 on the CPU.
    """
    c = x.shape[-1]
    xr = x.detach().to("cpu", torch.float64).reshape(-1, c)
    g = dy.detach().to("cpu", torch.float64).reshape(-1, c)
    if training:
        mean, var, _ = ref.batch_stats(xr, None if mask is None else mask.cpu().reshape(-1))
    else:
        mean, var = p["running_mean"].double().cpu(), p["running_var"].double().cpu()
    xhat_bn = (xr - mean) * torch.rsqrt(var + eps)

    def l2(t):
        return float(t.square().sum(0).sqrt().max())

    scales = {"grad_bn_bias": l2(g), "grad_bn_weight": l2(g * xhat_bn), "grad_alpha": float((g * xr).norm())}
    # dx: the size of the terms that cancel in it. Through Norm1 that is row_rstd * |norm_weight * dy|,
    # which for tiny C (row variance ~ 0, row_rstd ~ 1/sqrt(norm_eps)) dwarfs the result; float32
    # torch.nn.functional.layer_norm's own backward has that error too.
    a = lambda t: t.detach().double().cpu().abs()  # noqa: E731
    lam_ = 0.0 if op == "rep_bn" else lam
    terms = (1 - lam_) * (a(p["bn_weight"]) * torch.rsqrt(var + eps) + a(p["alpha"]).reshape(-1)[0]) * g.abs()
    if op != "rep_bn":
        xhat_n = ref.norm1(xr, None, None, norm_eps, norm_kind(norm))
        scales.update({"grad_norm_bias": l2(g), "grad_norm_weight": l2(g * xhat_n)})
        if norm_kind(norm) == "layer":
            row_rstd = torch.rsqrt(xr.var(-1, unbiased=False, keepdim=True) + norm_eps)
        else:
            row_rstd = torch.rsqrt(xr.square().mean(-1, keepdim=True) + norm_eps)
        terms = terms + lam_ * row_rstd * a(p["norm_weight"]) * g.abs()
    scales["grad_x"] = float(terms.max())
    return scales


def check_results(got, want, x, p, *, training, ctx=""):
    """Every output against the reference, each with the tolerance of its own dtype."""
    assert got["y"].dtype == x.dtype, f"{ctx}: y dtype {got['y'].dtype} != x dtype {x.dtype}"
    assert_close(got["y"], want["y"], name=f"{ctx} y")
    if training:
        assert_close(got["running_mean"], want["running_mean"], name=f"{ctx} running_mean")
        assert_close(got["running_var"], want["running_var"], name=f"{ctx} running_var")
    else:
        assert torch.equal(got["running_mean"], p["running_mean"]), f"{ctx}: eval changed running_mean"
        assert torch.equal(got["running_var"], p["running_var"]), f"{ctx}: eval changed running_var"
    scales = want.get("scales", {})
    for k, g in want.items():
        if not k.startswith("grad_"):
            continue
        assert got.get(k) is not None, f"{ctx}: slab gave no {k}"
        src = x if k == "grad_x" else p[k[5:]]
        assert got[k].dtype == src.dtype, f"{ctx}: {k} dtype {got[k].dtype} != {src.dtype}"
        assert tuple(got[k].shape) == tuple(src.shape), f"{ctx}: {k} shape {tuple(got[k].shape)}"
        scale = None
        if k in scales:
            scale = max(float(g.abs().max()), scales[k]) or None
        assert_close(got[k], g, name=f"{ctx} {k}", scale=scale)


# ---- forward + running stats + every gradient, dtype x shape x device -------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("alpha_shape", [(1,), ()], ids=["alpha1", "alpha0d"])
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
def test_rep_bn(dtype, shape, alpha_shape, training, device):
    x = make_x(shape, dtype, device)
    p = make_params(shape[-1], dtype, device, norm="none", alpha_shape=alpha_shape)
    got, want = run_both(x, p, op="rep_bn", training=training)
    check_results(got, want, x, p, training=training, ctx="rep_bn")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("lam", LAMS, ids=param_id)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
def test_prep_bn(dtype, shape, norm, lam, training, device):
    x = make_x(shape, dtype, device)
    p = make_params(shape[-1], dtype, device, norm=norm)
    got, want = run_both(x, p, op="prep_bn", lam=lam, training=training, norm=norm)
    check_results(got, want, x, p, training=training, ctx=f"prep_bn[{norm}, lam={lam}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
def test_prep_bn_5x123x123(dtype, norm, training, device):
    """The "weird" shape (5 x 123 x 123: 615 tokens, C not a multiple of any vector width)."""
    x = make_x(BIG, dtype, device)
    p = make_params(BIG[-1], dtype, device, norm=norm)
    got, want = run_both(x, p, op="prep_bn", lam=0.3, training=training, norm=norm)
    check_results(got, want, x, p, training=training, ctx=f"prep_bn[{norm}, lam=0.3]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_prep_bn_fp32_params_with_half_x(dtype, training, device):
    """Mixed precision as under autocast: float32 parameters and running stats, 16-bit tokens."""
    x = make_x((4, 33, 48), dtype, device)
    p = make_params(48, dtype, device, norm="layer", param_dtype=torch.float32)
    got, want = run_both(x, p, op="prep_bn", lam=0.3, training=training)
    check_results(got, want, x, p, training=training, ctx="prep_bn fp32 params")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rep_bn", "prep_bn"])
def test_hyperparameters_are_used(op, device):
    """Non-default momentum, eps and norm_eps reach the kernels."""
    x = make_x((3, 11, 20), torch.float32, device, scale=0.05)  # small variance: eps matters
    p = make_params(20, torch.float32, device)
    for training in (True, False):
        got, want = run_both(
            x,
            p,
            op=op,
            lam=0.4,
            training=training,
            momentum=0.35,
            eps=1e-2,
            **({} if op == "rep_bn" else {"norm_eps": 1e-2}),
        )
        check_results(got, want, x, p, training=training, ctx=f"{op} momentum/eps")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1, 3, 37, 129])
def test_one_token_eval(c, device):
    x = make_x((1, 1, c), torch.float32, device)
    p = make_params(c, torch.float32, device)
    for op in ("rep_bn", "prep_bn"):
        got, want = run_both(x, p, op=op, lam=0.3, training=False)
        check_results(got, want, x, p, training=False, ctx=f"{op} one token eval")


# ---- masks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["random", "all_true", "few_masked"])
@pytest.mark.parametrize("op", ["rep_bn", "prep_bn_layer", "prep_bn_rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=param_id)
def test_masked(dtype, op, kind, training, device):
    shape = (3, 21, 37)
    x = make_x(shape, dtype, device)
    mask = make_mask(shape[:-1], device, kind)
    # Masked tokens are far off: if they leaked into the statistics the result would be far off.
    x = torch.where(mask.unsqueeze(-1), x, x + 25.0)
    base, norm = (op, "layer") if op == "rep_bn" else ("prep_bn", op.split("_")[-1])
    p = make_params(shape[-1], dtype, device, norm=norm if base == "prep_bn" else "none")
    got, want = run_both(x, p, op=base, lam=0.3, training=training, norm=norm, mask=mask)
    check_results(got, want, x, p, training=training, ctx=f"{op} mask={kind}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rep_bn", "prep_bn"])
def test_all_true_mask_equals_no_mask(op, device):
    x = make_x((4, 10, 24), torch.float32, device)
    p = make_params(24, torch.float32, device)
    dy = torch.randn(x.shape, device=device)
    a, _ = run_both(x, p, op=op, mask=torch.ones(4, 10, dtype=torch.bool, device=device), dy=dy)
    b, _ = run_both(x, p, op=op, mask=None, dy=dy)
    for k in a:
        assert_close(a[k], b[k], name=f"{op} all-true mask vs none: {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rep_bn", "prep_bn"])
def test_noncontiguous_mask(op, device):
    shape = (4, 13, 20)
    x = make_x(shape, torch.float32, device)
    mask = (torch.rand(13, 4) > 0.4).t().to(device)  # (4, 13), not contiguous
    mask[0, :2] = True
    assert not mask.is_contiguous()
    p = make_params(20, torch.float32, device)
    got, want = run_both(x, p, op=op, mask=mask)
    check_results(got, want, x, p, training=True, ctx=f"{op} non-contiguous mask")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_tokens_do_not_change_statistics(device):
    """Changing only the masked tokens leaves the kept tokens' outputs and the running stats alone."""
    x = make_x((3, 16, 40), torch.float32, device)
    mask = make_mask((3, 16), device, "random")
    p = make_params(40, torch.float32, device)
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 100.0)
    a, _ = run_both(x, p, op="prep_bn", mask=mask)
    b, _ = run_both(x2, p, op="prep_bn", mask=mask)
    assert_close(a["y"][mask], b["y"][mask], name="kept tokens' y")
    assert_close(a["running_mean"], b["running_mean"], name="running_mean")
    assert_close(a["running_var"], b["running_var"], name="running_var")


# ---- layouts ---------------------------------------------------------------------------------


def _strided_x(kind, b, n, c, dtype, device):
    if kind == "transposed_tokens":
        return make_x((n, b, c), dtype, device).transpose(0, 1)
    if kind == "channel_stride":
        return make_x((b, c, n), dtype, device).transpose(1, 2)
    if kind == "sliced":
        return make_x((b, 2 * n, c + 5), dtype, device)[:, ::2, 2 : c + 2]
    if kind == "expanded":
        return make_x((1, n, c), dtype, device).expand(b, n, c)
    raise ValueError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["transposed_tokens", "channel_stride", "sliced", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_noncontiguous_x(dtype, kind, training, device):
    x = _strided_x(kind, 3, 17, 37, dtype, device)
    assert not x.is_contiguous()
    p = make_params(37, dtype, device)
    # Strided weights and a strided upstream gradient too.
    p["bn_weight"] = torch.stack([p["bn_weight"], torch.zeros_like(p["bn_weight"])], 1)[:, 0]
    p["norm_weight"] = torch.stack([p["norm_weight"], torch.zeros_like(p["norm_weight"])], 1)[:, 0]
    assert not p["bn_weight"].is_contiguous()
    dy = make_x((37, 17, 3), dtype, device).permute(2, 1, 0)
    for op in ("rep_bn", "prep_bn"):
        got, want = run_both(x, p, op=op, training=training, dy=dy)
        check_results(got, want, x, p, training=training, ctx=f"{op} {kind}")


# ---- large values: the statistics must stay accurate -----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["scaled_1e4", "offset_1e3"])
@pytest.mark.parametrize("op", ["rep_bn", "prep_bn"])
def test_large_values_fp32(op, kind, device):
    shape = (6, 100, 48)
    if kind == "scaled_1e4":
        x = make_x(shape, torch.float32, device, scale=1e4, shift=0.0)
    else:
        x = make_x(shape, torch.float32, device, scale=1.0, shift=1e3)
    p = make_params(48, torch.float32, device)
    got, want = run_both(x, p, op=op, lam=0.3, training=True)
    ctx = f"{op} {kind}"
    # Batch statistics (through the running-stat update: momentum 0.1 of the batch value).
    assert_close(got["running_mean"], want["running_mean"], rtol=1e-5, atol=1e-6, name=f"{ctx} running_mean")
    assert_close(got["running_var"], want["running_var"], rtol=1e-4, atol=1e-5, name=f"{ctx} running_var")
    fwd = OPS.prep_bn_forward(
        x,
        None,
        None,
        p["bn_weight"],
        p["bn_bias"],
        p["alpha"],
        p["running_mean"],
        p["running_var"],
        0.0,
        True,
        1e-5,
        0.0,
        "none",
        None,
    )
    mean, var, n = ref.batch_stats(x.double().cpu())
    # The mean is good to a few ulps of the data (|x| up to ~4e4 here), not of the mean itself.
    assert_close(fwd[3], mean, rtol=0.0, atol=1e-6, scale=float(x.abs().max()), name=f"{ctx} bn_mean")
    assert_close(fwd[5], var * n / (n - 1), rtol=1e-4, atol=1e-5, name=f"{ctx} bn_var (unbiased)")
    assert_close(fwd[4], torch.rsqrt(var + 1e-5), rtol=1e-4, atol=1e-5, name=f"{ctx} bn_rstd")
    # Outputs and gradients: the unavoidable error is a few ulps of |x| (x - mean in float32),
    # so measure it against the scale of x for the offset case.
    for k in want:
        if k in ("running_mean", "running_var", "scales"):
            continue
        if kind == "offset_1e3" and k in ("y", "grad_x"):
            assert_close(got[k], want[k], rtol=0.0, atol=2e-6, scale=float(x.abs().max()), name=f"{ctx} {k}")
        else:
            # At offset 1e3, float32 x - mean keeps ~4 of the 7 digits (the mean itself is only good to a
            # few ulps of 1e3), and the parameter gradients sum x - mean over all tokens. (Float32 torch
            # BatchNorm's backward is off by O(10) here.)
            atol = 5e-4 if kind == "offset_1e3" else 1e-5
            scale = max(float(want[k].abs().max()), want["scales"].get(k, 0.0))
            assert_close(got[k], want[k], rtol=1e-4, atol=atol, scale=scale, name=f"{ctx} {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_offset_with_zero_alpha_keeps_bn_exact(device):
    """alpha = 0 (SLAB's LM init), lam = 0: y is pure BN of data at offset 1e3; must be ~N(0, 1)."""
    x = make_x((8, 64, 32), torch.float32, device, scale=1.0, shift=1e3)
    p = make_params(32, torch.float32, device)
    p["alpha"] = torch.zeros(1, device=device)
    p["bn_weight"] = torch.ones(32, device=device)
    p["bn_bias"] = torch.zeros(32, device=device)
    got, want = run_both(x, p, op="rep_bn", training=True)
    # |error| <= a few ulp(1e3) / sigma ~ 1e-4 absolute; a one-pass E[x^2] - E[x]^2 variance is off by O(1).
    assert_close(got["y"], want["y"], rtol=0.0, atol=1e-3, scale=1.0, name="offset BN y")
    assert_close(got["running_var"], want["running_var"], rtol=1e-4, atol=1e-5, name="offset running_var")


# ---- gradcheck (float64) -----------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", ["rep_bn", "prep_bn_layer", "prep_bn_layer_nobias", "prep_bn_rms"])
def test_gradcheck(op, training, masked):
    shape = (2, 5, 6)
    x = make_x(shape, torch.float64, "cpu").requires_grad_(True)
    norm = "none" if op == "rep_bn" else op[len("prep_bn_") :]
    p = make_params(6, torch.float64, "cpu", norm=norm)
    mask = make_mask(shape[:-1], "cpu", "random") if masked else None
    rm, rv = p["running_mean"], p["running_var"]
    names = ["bn_weight", "bn_bias", "alpha"] if op == "rep_bn" else [k for k in PARAM_NAMES if p[k] is not None]
    leaves = [p[k].clone().requires_grad_(True) for k in names]

    def f(x, *ws):
        q = dict(zip(names, ws))
        q["running_mean"], q["running_var"] = rm.clone(), rv.clone()  # fresh per call
        if op == "rep_bn":
            return slab.ops.rep_bn(
                x, q["bn_weight"], q["bn_bias"], q["alpha"], q["running_mean"], q["running_var"], training, mask=mask
            )
        return slab.ops.prep_bn(
            x,
            q["norm_weight"],
            q.get("norm_bias"),
            q["bn_weight"],
            q["bn_bias"],
            q["alpha"],
            q["running_mean"],
            q["running_var"],
            0.3,
            training,
            norm=norm_kind(norm),
            mask=mask,
        )

    assert torch.autograd.gradcheck(f, (x, *leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_raw_prep_bn_fwd():
    x = make_x((3, 4, 5), torch.float64, "cpu").requires_grad_(True)
    p = make_params(5, torch.float64, "cpu")
    leaves = [p[k].clone().requires_grad_(True) for k in PARAM_NAMES]

    def f(x, nw, nb, bw, bb, al):
        return OPS.prep_bn_forward(
            x, nw, nb, bw, bb, al, p["running_mean"], p["running_var"], 0.6, True, 1e-5, 1e-6, "layer", None
        )[0]

    assert torch.autograd.gradcheck(f, (x, *leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- opcheck on every raw op ----------------------------------------------------------------------


def _opcheck_cases():
    torch.manual_seed(1234)
    c, shape = 7, (2, 5, 7)
    x = make_x(shape, torch.float32, "cpu")
    mask = make_mask(shape[:-1], "cpu", "random")
    p = make_params(c, torch.float32, "cpu")
    dy = torch.randn(shape)

    def g(t):
        return t.clone().requires_grad_(True)

    nw, nb, bw, bb, al = (p[k] for k in PARAM_NAMES)
    rm, rv = p["running_mean"], p["running_var"]
    fwd = OPS.prep_bn_forward(x, nw, nb, bw, bb, al, rm, rv, 0.3, True, 1e-5, 1e-6, "layer", mask)
    _, row_mean, row_rstd, bn_mean, bn_rstd, bn_var = fwd
    sums, count = OPS.prep_bn_backward_reduce(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, "layer", mask)
    cases = {
        "prep_bn_forward_train": (
            OPS.prep_bn_forward.default,
            (g(x), g(nw), g(nb), g(bw), g(bb), g(al), rm.clone(), rv.clone(), 0.3, True, 1e-5, 1e-6, "layer", mask),
        ),
        "prep_bn_forward_eval_rms": (
            OPS.prep_bn_forward.default,
            (g(x), g(nw), None, g(bw), g(bb), g(al), rm.clone(), rv.clone(), 0.3, False, 1e-5, 1e-6, "rms", None),
        ),
        "prep_bn_forward_none": (
            OPS.prep_bn_forward.default,
            (g(x), None, None, g(bw), g(bb), g(al), rm.clone(), rv.clone(), 0.0, True, 1e-5, 0.0, "none", None),
        ),
        "prep_bn_backward": (
            OPS.prep_bn_backward.default,
            (dy, x, nw, bw, al, row_mean, row_rstd, bn_mean, bn_rstd, 0.3, True, "layer", mask),
        ),
        "prep_bn_stats": (OPS.prep_bn_stats.default, (x, mask)),
        "prep_bn_stats_nomask": (OPS.prep_bn_stats.default, (x, None)),
        "prep_bn_apply": (OPS.prep_bn_apply.default, (x, nw, nb, bw, bb, al, bn_mean, bn_rstd, 0.3, 1e-6, "layer")),
        "prep_bn_backward_reduce": (
            OPS.prep_bn_backward_reduce.default,
            (dy, x, row_mean, row_rstd, bn_mean, bn_rstd, "layer", mask),
        ),
        "prep_bn_backward_apply": (
            OPS.prep_bn_backward_apply.default,
            (dy, x, nw, bw, al, row_mean, row_rstd, bn_mean, bn_rstd, sums, count, 0.3, True, "layer", mask),
        ),
        "bn_update_running_stats": (
            OPS.bn_update_running_stats.default,
            (rm.clone(), rv.clone(), bn_mean, bn_var, 0.1),
        ),
        "rep_bn_train": (
            OPS.rep_bn.default,
            (g(x), g(bw), g(bb), g(al), rm.clone(), rv.clone(), True, 0.1, 1e-5, mask),
        ),
        "rep_bn_eval": (
            OPS.rep_bn.default,
            (g(x), g(bw), g(bb), g(al), rm.clone(), rv.clone(), False, 0.1, 1e-5, None),
        ),
        "prep_bn_train": (
            OPS.prep_bn.default,
            (
                g(x),
                g(nw),
                g(nb),
                g(bw),
                g(bb),
                g(al),
                rm.clone(),
                rv.clone(),
                0.3,
                True,
                0.1,
                1e-5,
                1e-6,
                "layer",
                mask,
            ),
        ),
        "prep_bn_eval_rms": (
            OPS.prep_bn.default,
            (g(x), g(nw), None, g(bw), g(bb), g(al), rm.clone(), rv.clone(), 0.3, False, 0.1, 1e-5, 1e-6, "rms", None),
        ),
    }
    return cases


_OPCHECK_NAMES = [
    "prep_bn_forward_train",
    "prep_bn_forward_eval_rms",
    "prep_bn_forward_none",
    "prep_bn_backward",
    "prep_bn_stats",
    "prep_bn_stats_nomask",
    "prep_bn_apply",
    "prep_bn_backward_reduce",
    "prep_bn_backward_apply",
    "bn_update_running_stats",
    "rep_bn_train",
    "rep_bn_eval",
    "prep_bn_train",
    "prep_bn_eval_rms",
]


@pytest.mark.parametrize("case", _OPCHECK_NAMES)
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_every_contract_op_is_registered():
    for name in (
        "prep_bn_forward",
        "prep_bn_backward",
        "prep_bn_stats",
        "prep_bn_apply",
        "prep_bn_backward_reduce",
        "prep_bn_backward_apply",
        "bn_update_running_stats",
        "rep_bn",
        "prep_bn",
    ):
        assert hasattr(OPS, name), f"torch.ops.slab.{name} is missing"
    # Mutation of the running stats is declared in the schemas.
    for name in ("rep_bn", "prep_bn", "bn_update_running_stats"):
        schema = getattr(OPS, name).default._schema
        mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert mutated == {"running_mean", "running_var"}, f"{name}: mutated args {mutated}"


# ---- torch.compile ------------------------------------------------------------------------------


def _compile_case(backend):
    torch._dynamo.reset()
    shape = (3, 9, 24)
    x = make_x(shape, torch.float32, "cpu")
    mask = make_mask(shape[:-1], "cpu", "random")
    p = make_params(24, torch.float32, "cpu")
    dy = torch.randn(shape)

    def f(x, nw, nb, bw, bb, al, rm, rv, mask):
        y = slab.ops.prep_bn(x, nw, nb, bw, bb, al, rm, rv, 0.3, True, mask=mask)
        return y * 2.0 + 1.0

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    outs = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, *(p[k] for k in PARAM_NAMES))]
        rm, rv = p["running_mean"].clone(), p["running_var"].clone()
        y = fn(*leaves, rm, rv, mask)
        y.backward(dy)
        outs.append([y.detach(), rm, rv] + [t.grad for t in leaves])
    names = ["y", "running_mean", "running_var", "grad_x"] + ["grad_" + k for k in PARAM_NAMES]
    for n, a, b in zip(names, outs[1], outs[0]):
        assert_close(a, b, name=f"compiled({backend}) vs eager {n}")


def test_compile_fullgraph_aot_eager():
    _compile_case("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _compile_case("inductor")


# ---- stage ops against the fused ops ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("norm", ["none", "layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_stages_match_fused(dtype, norm, masked, training, device):
    shape = (4, 19, 45)
    c = shape[-1]
    x = make_x(shape, dtype, device)
    mask = make_mask(shape[:-1], device, "random") if masked else None
    p = make_params(c, dtype, device, norm=norm)
    lam = 0.0 if norm == "none" else 0.3
    nw, nb, bw, bb, al = (p[k] for k in PARAM_NAMES)
    rm, rv = p["running_mean"], p["running_var"]
    eps, norm_eps = 1e-5, 1e-6
    acc = torch.float32

    fwd = OPS.prep_bn_forward(x, nw, nb, bw, bb, al, rm, rv, lam, training, eps, norm_eps, norm, mask)
    y, row_mean, row_rstd, bn_mean, bn_rstd, bn_var = fwd
    rows = x.numel() // c
    assert y.shape == x.shape and y.dtype == x.dtype
    for t in (bn_mean, bn_rstd, bn_var):
        assert t.shape == (c,) and t.dtype == acc
    if norm != "none":
        assert row_mean.shape == (rows,) and row_rstd.shape == (rows,)

    xd = x.double().cpu()
    # stats -> finalize in Python -> compare with the fused forward and the reference.
    mean, m2, count = OPS.prep_bn_stats(x, mask)
    rmean, rvar, n = ref.batch_stats(xd, None if mask is None else mask.cpu())
    assert mean.shape == (c,) and m2.shape == (c,) and count.shape == (1,)
    assert float(count) == n, f"count {float(count)} != kept tokens {n}"
    assert_close(mean, rmean, name="stats mean")
    assert_close(m2, rvar * n, name="stats m2")
    if training:
        assert_close(bn_mean, mean, name="fwd bn_mean vs stats")
        assert_close(bn_rstd, torch.rsqrt(m2 / count + eps), name="fwd bn_rstd vs stats")
        assert_close(bn_var, m2 / (count - 1), name="fwd bn_var vs stats")
    else:
        assert_close(bn_mean, rm, name="eval bn_mean = running_mean")
        assert_close(bn_rstd, torch.rsqrt(rv.double() + eps), name="eval bn_rstd")
    y2, row_mean2, row_rstd2 = OPS.prep_bn_apply(x, nw, nb, bw, bb, al, bn_mean, bn_rstd, lam, norm_eps, norm)
    assert_close(y2, y, name="apply y vs fwd y")
    if norm != "none":
        assert_close(row_mean2, row_mean, name="apply row_mean vs fwd")
        assert_close(row_rstd2, row_rstd, name="apply row_rstd vs fwd")
        if norm == "layer":
            assert_close(row_mean, xd.reshape(rows, c).mean(-1), name="row_mean vs reference")
            rr = torch.rsqrt(xd.reshape(rows, c).var(-1, unbiased=False) + norm_eps)
        else:
            rr = torch.rsqrt(xd.reshape(rows, c).square().mean(-1) + norm_eps)
        assert_close(row_rstd, rr, name="row_rstd vs reference")

    # bwd_reduce + bwd_apply == bwd, and both against the float64 reference.
    dy = make_x(shape, dtype, device, scale=1.0, shift=0.0)
    if norm == "none":
        _, want = run_both(x, p, op="rep_bn", training=training, mask=mask, dy=dy)
    else:
        _, want = run_both(x, p, op="prep_bn", lam=lam, training=training, norm=norm, mask=mask, dy=dy)
    sc = want["scales"]
    sums, cnt = OPS.prep_bn_backward_reduce(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, norm, mask)
    assert sums.shape == (3, c) and sums.dtype == acc and float(cnt) == n
    dyd = dy.double().cpu().reshape(rows, c)
    xr = xd.reshape(rows, c)
    xhat_bn = (xr - bn_mean.double().cpu()) * bn_rstd.double().cpu()
    assert_close(sums[0], dyd.sum(0), name="sums[0] = sum dy", scale=sc["grad_bn_bias"])
    assert_close(sums[1], (dyd * xhat_bn).sum(0), name="sums[1] = sum dy*xhat_bn", scale=sc["grad_bn_weight"])
    if norm != "none":
        rmu = row_mean.double().cpu()[:, None] if norm == "layer" else 0.0
        xhat_n = (xr - rmu) * row_rstd.double().cpu()[:, None]
        assert_close(sums[2], (dyd * xhat_n).sum(0), name="sums[2] = sum dy*xhat_norm", scale=sc["grad_norm_weight"])
    dx_staged = OPS.prep_bn_backward_apply(
        dy, x, nw, bw, al, row_mean, row_rstd, bn_mean, bn_rstd, sums, cnt, lam, training, norm, mask
    )
    bwd = OPS.prep_bn_backward(dy, x, nw, bw, al, row_mean, row_rstd, bn_mean, bn_rstd, lam, training, norm, mask)
    dx, d_nw, d_nb, d_bw, d_bb, d_al = bwd
    assert_close(dx_staged, dx, name="bwd_apply dx vs bwd dx")
    from_sums = {
        "norm_weight": lam * sums[2],
        "norm_bias": lam * sums[0],
        "bn_weight": (1 - lam) * sums[1],
        "bn_bias": (1 - lam) * sums[0],
        "alpha": (1 - lam) * (sums[1] / bn_rstd + bn_mean * sums[0]).sum().reshape(1),
    }
    fused = {"norm_weight": d_nw, "norm_bias": d_nb, "bn_weight": d_bw, "bn_bias": d_bb, "alpha": d_al}
    for k in ("bn_weight", "bn_bias", "alpha") + (("norm_weight", "norm_bias") if norm != "none" else ()):
        assert_close(
            fused[k],
            from_sums[k].reshape(fused[k].shape),
            name=f"bwd d_{k} vs sums formula",
            scale=max(sc["grad_" + k], float(from_sums[k].abs().max())),
        )

    # Against the reference's autograd (same inputs, float64).
    assert_close(
        dx, want["grad_x"], name="bwd dx vs reference", scale=max(sc["grad_x"], float(want["grad_x"].abs().max()))
    )
    for k in (
        ("bn_weight", "bn_bias", "alpha")
        + (("norm_weight",) if norm != "none" else ())
        + (("norm_bias",) if norm == "layer" else ())
    ):
        w = want["grad_" + k]
        assert_close(
            fused[k].reshape(w.shape),
            w,
            name=f"bwd d_{k} vs reference",
            scale=max(sc["grad_" + k], float(w.abs().max())),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 0.35, 1.0, 0.0])
def test_bn_update_running_stats(momentum, device):
    c = 29
    rm = torch.randn(c, device=device)
    rv = torch.rand(c, device=device) + 0.5
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device) + 0.1
    rm0, rv0 = rm.clone(), rv.clone()
    mean0, var0 = mean.clone(), var.clone()
    ptr_m, ptr_v = rm.data_ptr(), rv.data_ptr()
    out = OPS.bn_update_running_stats(rm, rv, mean, var, momentum)
    assert out is None
    assert rm.data_ptr() == ptr_m and rv.data_ptr() == ptr_v
    assert_close(rm, (1 - momentum) * rm0.double() + momentum * mean0.double(), name="running_mean")
    assert_close(rv, (1 - momentum) * rv0.double() + momentum * var0.double(), name="running_var")
    assert torch.equal(mean, mean0) and torch.equal(var, var0)


# ---- inputs are not written ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inputs_not_written(training, device):
    shape = (3, 8, 20)
    x = make_x(shape, torch.float32, device)
    mask = make_mask(shape[:-1], device, "random")
    p = make_params(20, torch.float32, device)
    dy = torch.randn(shape, device=device)
    nw, nb, bw, bb, al = (p[k] for k in PARAM_NAMES)
    rm, rv = p["running_mean"], p["running_var"]
    fwd = OPS.prep_bn_forward(x, nw, nb, bw, bb, al, rm, rv, 0.3, training, 1e-5, 1e-6, "layer", mask)
    _, row_mean, row_rstd, bn_mean, bn_rstd, _ = fwd
    sums, cnt = OPS.prep_bn_backward_reduce(dy, x, row_mean, row_rstd, bn_mean, bn_rstd, "layer", mask)
    calls = {
        "prep_bn_forward": lambda: OPS.prep_bn_forward(
            x, nw, nb, bw, bb, al, rm, rv, 0.3, training, 1e-5, 1e-6, "layer", mask
        ),
        "prep_bn_stats": lambda: OPS.prep_bn_stats(x, mask),
        "prep_bn_apply": lambda: OPS.prep_bn_apply(x, nw, nb, bw, bb, al, bn_mean, bn_rstd, 0.3, 1e-6, "layer"),
        "prep_bn_backward_reduce": lambda: OPS.prep_bn_backward_reduce(
            dy, x, row_mean, row_rstd, bn_mean, bn_rstd, "layer", mask
        ),
        "prep_bn_backward_apply": lambda: OPS.prep_bn_backward_apply(
            dy, x, nw, bw, al, row_mean, row_rstd, bn_mean, bn_rstd, sums, cnt, 0.3, training, "layer", mask
        ),
        "prep_bn_backward": lambda: OPS.prep_bn_backward(
            dy, x, nw, bw, al, row_mean, row_rstd, bn_mean, bn_rstd, 0.3, training, "layer", mask
        ),
    }
    inputs = {
        "x": x,
        "mask": mask,
        "dy": dy,
        "running_mean": rm,
        "running_var": rv,
        "row_mean": row_mean,
        "row_rstd": row_rstd,
        "bn_mean": bn_mean,
        "bn_rstd": bn_rstd,
        "sums": sums,
        "count": cnt,
        **{k: p[k] for k in PARAM_NAMES},
    }
    for name, call in calls.items():
        before = {k: v.clone() for k, v in inputs.items()}
        call()
        for k, v in inputs.items():
            assert torch.equal(v, before[k]), f"{name} wrote into its input {k}"

    # The public ops (forward and backward) write only the running stats, and only in training.
    for op in ("rep_bn", "prep_bn"):
        leaves = {k: p[k].clone().requires_grad_(True) for k in PARAM_NAMES}
        xs = x.clone().requires_grad_(True)
        watch = {"x": xs, "mask": mask, "dy": dy, **leaves}
        before = {k: v.detach().clone() for k, v in watch.items()}
        rm2, rv2 = rm.clone(), rv.clone()
        q = {**leaves, "running_mean": rm2, "running_var": rv2}
        y = _call(slab.ops, xs, q, op=op, lam=0.3, training=training, norm="layer", mask=mask)
        y.backward(dy)
        for k, v in watch.items():
            assert torch.equal(v.detach(), before[k]), f"{op} wrote into its input {k}"
        if not training:
            assert torch.equal(rm2, rm) and torch.equal(rv2, rv), f"{op} eval changed the running stats"
        else:
            assert not torch.equal(rv2, rv), f"{op} training did not update running_var"


# ---- bad inputs -----------------------------------------------------------------------------------


def _bad_cases(device):
    c = 8
    x = make_x((2, 5, c), torch.float32, device)
    p = make_params(c, torch.float32, device)
    nw, nb, bw, bb, al, rm, rv = (p[k] for k in (*PARAM_NAMES, "running_mean", "running_var"))
    ok_mask = torch.ones(2, 5, dtype=torch.bool, device=device)

    def prep(**kw):
        a = dict(
            x=x,
            norm_weight=nw,
            norm_bias=nb,
            bn_weight=bw,
            bn_bias=bb,
            alpha=al,
            running_mean=rm.clone(),
            running_var=rv.clone(),
            lam=0.3,
            training=True,
        )
        a.update(kw)
        return lambda: slab.ops.prep_bn(**a)

    def rep(**kw):
        a = dict(x=x, weight=bw, bias=bb, alpha=al, running_mean=rm.clone(), running_var=rv.clone(), training=True)
        a.update(kw)
        return lambda: slab.ops.rep_bn(**a)

    one_kept = torch.zeros(2, 5, dtype=torch.bool, device=device)
    one_kept[1, 3] = True
    wide = torch.ones(c + 1, device=device)
    return {
        # name: (callable, exception types, regex the message must match)
        "rep_bn weight size": (rep(weight=wide), (RuntimeError, ValueError), r"weight"),
        "rep_bn bias size": (rep(bias=wide), (RuntimeError, ValueError), r"bias"),
        "rep_bn running_mean size": (rep(running_mean=wide.clone()), (RuntimeError, ValueError), r"running_mean"),
        "rep_bn running_var size": (rep(running_var=wide.clone()), (RuntimeError, ValueError), r"running_var"),
        "rep_bn alpha 2 elements": (rep(alpha=torch.ones(2, device=device)), (RuntimeError, ValueError), r"alpha"),
        "prep_bn norm_weight size": (prep(norm_weight=wide), (RuntimeError, ValueError), r"norm_weight"),
        "prep_bn norm_bias size": (prep(norm_bias=wide), (RuntimeError, ValueError), r"norm_bias"),
        "prep_bn bn_weight size": (prep(bn_weight=wide), (RuntimeError, ValueError), r"bn_weight"),
        "prep_bn bn_bias size": (prep(bn_bias=wide), (RuntimeError, ValueError), r"bn_bias"),
        "mask shape": (
            prep(mask=torch.ones(2, 4, dtype=torch.bool, device=device)),
            (RuntimeError, ValueError),
            r"mask",
        ),
        "mask with channel dim": (
            rep(mask=torch.ones(2, 5, c, dtype=torch.bool, device=device)),
            (RuntimeError, ValueError),
            r"mask",
        ),
        "mask int32 with fp32 x": (prep(mask=ok_mask.to(torch.int32)), (RuntimeError, ValueError), r"mask"),
        "mask uint8": (rep(mask=ok_mask.to(torch.uint8)), (RuntimeError, ValueError), r"mask"),
        "mask float": (rep(mask=ok_mask.float()), (RuntimeError, ValueError), r"mask"),
        "norm foo": (prep(norm="foo"), (RuntimeError, ValueError), r"norm"),
        "rms with norm_bias": (prep(norm="rms"), (RuntimeError, ValueError), r"norm_bias"),
        "x 0-dim": (rep(x=torch.tensor(1.0, device=device)), (RuntimeError, ValueError), r"\bx\b"),
        "x int": (rep(x=torch.ones(2, 5, c, dtype=torch.int32, device=device)), (RuntimeError, ValueError), r"\bx\b"),
        "x weight dtype mix": (
            prep(x=x.to(torch.bfloat16), bn_weight=bw.to(torch.float16)),
            (RuntimeError, ValueError),
            r"bn_weight",
        ),
        "training 1 token": (rep(x=make_x((1, 1, c), torch.float32, device)), (RuntimeError,), r"."),
        "training 1 token 2-D": (prep(x=make_x((1, c), torch.float32, device)), (RuntimeError,), r"."),
        "training 1 kept token": (prep(mask=one_kept), (RuntimeError,), r"."),
        "training 0 kept tokens": (rep(mask=torch.zeros(2, 5, dtype=torch.bool, device=device)), (RuntimeError,), r"."),
        "eps nan": (rep(eps=float("nan")), (RuntimeError, ValueError), r"eps"),
        "momentum inf": (rep(momentum=float("inf")), (RuntimeError, ValueError), r"momentum"),
        "lam nan": (prep(lam=float("nan")), (RuntimeError, ValueError), r"lam"),
    }


_BAD_NAMES = list(_bad_cases("cpu").keys())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", _BAD_NAMES)
def test_bad_inputs(case, device):
    if device == "cuda" and case in ("training 1 kept token", "training 0 kept tokens"):
        pytest.skip("CUDA gives NaN statistics instead of a host sync (test_prepbn_kernels.py)")
    call, exc, pattern = _bad_cases(device)[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.skipif(
    not torch.cuda.is_available() or CUDA_OK, reason="needs a GPU visible to torch and a CPU-only slab build"
)
def test_cuda_tensor_in_cpu_only_build():
    x = torch.randn(2, 5, 8, device="cuda")
    p = make_params(8, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=r"(?i)CPU"):
        slab.ops.rep_bn(x, p["bn_weight"], p["bn_bias"], p["alpha"], p["running_mean"], p["running_var"], True)


@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_device_mix_raises():
    x = torch.randn(2, 5, 8, device="cuda")
    p = make_params(8, torch.float32, "cuda")
    with pytest.raises((RuntimeError, ValueError), match=r"bn_weight|weight"):
        slab.ops.rep_bn(x, p["bn_weight"].cpu(), p["bn_bias"], p["alpha"], p["running_mean"], p["running_var"], True)


# ---- the eager composite (benchmark baseline) computes the same thing -------------------------------


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_eager_composite_matches_ops(norm):
    """slab.reference.SlabLinearNorm / SlabRepBN (the benchmarks' eager baseline) == slab.ops."""
    torch.manual_seed(7)
    c = 40
    x = make_x((4, 25, c), torch.float32, "cpu")
    dy = torch.randn(x.shape)
    m = ref.SlabLinearNorm(c, norm=norm, step=10, r0=0.8)
    with torch.no_grad():
        for t in m.parameters():
            t.add_(torch.randn_like(t) * 0.2)
    m.iter.fill_(4)
    lam = 0.8 * 4 / 10
    bn = m.norm2.bn
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    params = [m.norm1.weight, getattr(m.norm1, "bias", None), bn.weight, bn.bias, m.norm2.alpha]
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in params]
    xs, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = slab.ops.prep_bn(
        xs,
        leaves[0],
        leaves[1],
        leaves[2],
        leaves[3],
        leaves[4],
        rm,
        rv,
        lam,
        True,
        eps=bn.eps,
        norm_eps=1e-6,
        norm=norm,
    )
    ye = m(xe)
    y.backward(dy)
    ye.backward(dy)
    assert_close(y, ye, name="y")
    assert_close(rm, bn.running_mean, name="running_mean")
    assert_close(rv, bn.running_var, name="running_var")
    assert_close(xs.grad, xe.grad, name="grad_x")
    for a, b in zip(leaves, params):
        if a is not None:
            assert_close(a.grad, b.grad, name="grad param")
    # Eval: RepBN only.
    m.eval()
    ye = m(x)
    y = slab.ops.rep_bn(
        x, bn.weight, bn.bias, m.norm2.alpha, bn.running_mean.clone(), bn.running_var.clone(), False, eps=bn.eps
    )
    assert_close(y, ye, name="eval y")
