"""Op-level tests of the Conv-BN fold (SPEC section 1, Tune mode): slab.ops.fold_conv_bn forward
and gradients against a float64 plain-torch reference of the formula, gradcheck, opcheck,
torch.compile, errors on bad input, and the Tune-mode identity: a convolution with the folded
weights equals eval-mode Conv -> BatchNorm in outputs and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slab
import slab.ops
from slab.reference import convbn as RC

from conftest import DEVICES, FLOAT_DTYPES, assert_close, param_id, ref_copy

OPS = torch.ops.slab
ALL_DTYPES = FLOAT_DTYPES + [torch.float64]
EPS = 1e-5

# conv1d/2d/3d, linear (O, I), depthwise (O, 1, k, k), O = 1, odd sizes, 1x1, empty O = 0 and k = 0
SHAPES = [
    (8, 3, 3, 3),
    (5, 4, 7),
    (6, 2, 3, 3, 3),
    (7, 13),
    (16, 1, 3, 3),
    (1, 5, 3, 3),
    (9, 17, 1, 1),
    (4, 8, 4, 4),
    (3, 1000),
    (0, 3, 3, 3),
    (3, 0, 3),
]
PRESENT = ["all", "none", "no_bias", "no_affine"]  # which optional tensors are given


def make_args(shape, dtype, device, present="all", bn_dtype=None, requires_grad=False, scale=1.0):
    """weight, bias, bn_weight, bn_bias, running_mean, running_var (positive) for an O-channel layer."""
    o = shape[0]
    bn_dtype = bn_dtype or dtype

    def t(*s, dt=dtype, shift=0.0, positive=False):
        v = torch.randn(*s, dtype=torch.float64) * scale
        v = v.abs() + 0.1 if positive else v + shift
        return v.to(dt).to(device).requires_grad_(requires_grad and not positive)

    weight = t(*shape)
    bias = t(o) if present in ("all", "no_affine") else None
    bn_weight = t(o, dt=bn_dtype, shift=1.0) if present in ("all", "no_bias") else None
    bn_bias = t(o, dt=bn_dtype) if present in ("all", "no_bias") else None
    mean = t(o, dt=bn_dtype).detach()
    var = t(o, dt=bn_dtype, positive=True).detach()
    return weight, bias, bn_weight, bn_bias, mean, var


def ref_fold(weight, bias, bn_weight, bn_bias, mean, var, eps=EPS):
    """The fold in float64 (slab.reference.convbn; float64 leaves give the reference gradients)."""
    return RC.fold_conv_bn(weight, bias, bn_weight, bn_bias, mean, var, eps)


def ref_args(args, requires_grad=False):
    return [ref_copy(a, requires_grad and a is not None and a.requires_grad) for a in args]


# ---- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("present", PRESENT)
def test_fold_forward(device, dtype, shape, present):
    args = make_args(shape, dtype, device, present)
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    assert w.dtype == dtype and b.dtype == dtype and w.shape == shape and b.shape == (shape[0],)
    assert w.is_contiguous()
    rw, rb = ref_fold(*ref_args(args))
    assert_close(w, rw, name="w'")
    assert_close(b, rb, name="b'")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("present", ["all", "no_affine"])
def test_fold_half_weight_fp32_bn(device, dtype, present):
    # a half model with float32 BatchNorm (and a conv bias in the weight's dtype)
    args = make_args((12, 5, 3, 3), dtype, device, present, bn_dtype=torch.float32)
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    assert w.dtype == dtype and b.dtype == dtype
    rw, rb = ref_fold(*ref_args(args))
    assert_close(w, rw, name="w'")
    assert_close(b, rb, name="b'")


def _noncontiguous(kind, shape, dtype, device):
    o, i = shape[0], shape[1]
    if kind == "transposed":  # (O, I, kh, kw) viewed from an (I, O, kh, kw) tensor
        return torch.randn(i, o, *shape[2:], dtype=torch.float64).to(dtype).to(device).transpose(0, 1)
    if kind == "channels_last":
        return torch.randn(shape, dtype=torch.float64).to(dtype).to(device).to(memory_format=torch.channels_last)
    # storage offset 1: a misaligned base (the CUDA kernels' scalar path)
    flat = torch.randn(int(torch.tensor(shape).prod()) + 1, dtype=torch.float64).to(dtype).to(device)
    return flat[1:].view(shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
@pytest.mark.parametrize("kind", ["transposed", "channels_last", "offset"])
def test_fold_noncontiguous_weight(device, dtype, kind):
    shape = (16, 8, 3, 3)
    args = list(make_args(shape, dtype, device))
    args[0] = _noncontiguous(kind, shape, dtype, device)
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    rw, rb = ref_fold(*ref_args(args))
    assert_close(w, rw, name="w'")
    assert_close(b, rb, name="b'")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=param_id)
def test_fold_large_values(device, dtype):
    args = list(make_args((32, 16, 3, 3), dtype, device, scale=1e4))
    args[5] = (torch.rand(32, dtype=torch.float64) * 1e-6).to(dtype).to(device)  # tiny variances: g ~ 1e6
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    rw, rb = ref_fold(*ref_args(args))
    assert torch.isfinite(w).all()
    assert_close(w, rw, name="w'")
    assert_close(b, rb, name="b'")


@pytest.mark.parametrize("device", DEVICES)
def test_fold_degenerate_variance_like_batchnorm(device):
    # var + eps = 0 gives inf, below 0 NaN, exactly as eval-mode BatchNorm computes them
    o = 4
    args = list(make_args((o, 3), torch.float64, device))  # float64: var + eps is exactly 0 in both
    args[5] = torch.tensor([-EPS, -1.0, 0.0, 1.0], dtype=torch.float64, device=device)
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    rw, rb = ref_fold(*ref_args(args))
    assert_close(w, rw, name="w'")
    assert_close(b, rb, name="b'")
    assert torch.isinf(w[0]).all() and torch.isnan(w[1]).all() and torch.isfinite(w[2:]).all()


# ---- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=param_id)
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (7, 13), (16, 1, 3, 3), (1, 5, 3, 3), (3, 1000), (0, 4)], ids=param_id)
@pytest.mark.parametrize("present", PRESENT)
def test_fold_backward(device, dtype, shape, present):
    args = make_args(shape, dtype, device, present, requires_grad=True)
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    gw, gb = torch.randn_like(w), torch.randn_like(b)
    leaves = [a for a in args[:4] if a is not None]
    # with no bias and no affine, b' depends on no input that requires grad
    outs, douts = ((w, b), (gw, gb)) if b.requires_grad else ((w,), (gw,))
    grads = torch.autograd.grad(outs, leaves, douts)
    r = ref_args(args, requires_grad=True)
    rw, rb = ref_fold(*r)
    routs = (rw, rb) if rb.requires_grad else (rw,)
    ref_grads = torch.autograd.grad(routs, [a for a in r[:4] if a is not None], [ref_copy(d) for d in douts])
    for name, g, rg, a in zip(("weight", "bias", "bn_weight", "bn_bias"), grads, ref_grads, leaves):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        assert_close(g, rg, name=f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("present", PRESENT)
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 7), (1, 2, 3)], ids=param_id)
def test_fold_gradcheck(device, present, shape):
    args = make_args(shape, torch.float64, device, present, requires_grad=True)
    idx = [i for i in range(4) if args[i] is not None]

    def f(*xs):
        a = list(args)
        for i, x in zip(idx, xs):
            a[i] = x
        return slab.ops.fold_conv_bn(*a, EPS)

    assert torch.autograd.gradcheck(f, [args[i] for i in idx])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainable", ["weight", "bn", "bn_weight", "bias"])
def test_fold_some_inputs_trainable(device, trainable):
    # frozen conv + trainable BN affine (and the other ways round): only the wanted grads exist
    args = make_args((6, 4, 3, 3), torch.float64, device)
    names = ["weight", "bias", "bn_weight", "bn_bias"]
    train = {"weight": {"weight"}, "bn": {"bn_weight", "bn_bias"}, "bn_weight": {"bn_weight"}, "bias": {"bias"}}
    for n, a in zip(names, args[:4]):
        a.requires_grad_(n in train[trainable])
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    (w.sin().sum() + b.cos().sum()).backward()
    r = ref_args(args, requires_grad=True)
    rw, rb = ref_fold(*r)
    (rw.sin().sum() + rb.cos().sum()).backward()
    for n, a, ra in zip(names, args[:4], r[:4]):
        if n in train[trainable]:
            assert_close(a.grad, ra.grad, name=f"d{n}")
        else:
            assert a.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["weight", "bias"])
def test_fold_one_output_used(device, used):
    args = make_args((5, 3, 3), torch.float64, device, requires_grad=True)
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    out = w.square().sum() if used == "weight" else b.square().sum()
    grads = torch.autograd.grad(out, args[:4], allow_unused=True)
    r = ref_args(args, requires_grad=True)
    rw, rb = ref_fold(*r)
    rout = rw.square().sum() if used == "weight" else rb.square().sum()
    rgrads = torch.autograd.grad(rout, r[:4], allow_unused=True)
    for g, rg in zip(grads, rgrads):
        assert_close(g, rg if rg is not None else torch.zeros_like(g, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_fold_backward_deterministic(device, dtype):
    # per-channel sums in a fixed order: bitwise equal results run to run (and rows long enough to
    # be split on CUDA)
    args = make_args((3, 64, 3, 3, 3, 3), dtype, device, requires_grad=True)
    w, b = slab.ops.fold_conv_bn(*args, EPS)
    gw, gb = torch.randn_like(w), torch.randn_like(b)
    first = torch.autograd.grad((w, b), args[:4], (gw, gb), retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad((w, b), args[:4], (gw, gb), retain_graph=True)
        for x, y in zip(first, again):
            assert torch.equal(x, y)


# ---- Tune mode: conv with folded weights == eval-mode conv -> BatchNorm -----------------------------


def _conv_bn(dim, cin, cout, conv_bias, device):
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dim]
    bn = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dim]
    c, n = conv(cin, cout, 3, padding=1, bias=conv_bias), bn(cout)
    with torch.no_grad():
        n.running_mean.normal_()
        n.running_var.uniform_(0.5, 2.0)
        n.weight.normal_(1.0, 0.3)
        n.bias.normal_()
    return c.double().to(device), n.double().to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_tune_mode_equals_eval_conv_bn(device, dim, conv_bias):
    conv, bn = _conv_bn(dim, 5, 7, conv_bias, device)
    x = torch.randn(2, 5, *([6] * dim), dtype=torch.float64, device=device, requires_grad=True)
    params = [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]

    y_ref = bn(conv(x))
    dy = torch.randn_like(y_ref)
    ref = torch.autograd.grad(y_ref, [x] + params, dy)

    w, b = slab.ops.fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    y = conv._conv_forward(x, w, b)
    got = torch.autograd.grad(y, [x] + params, dy)
    assert_close(y, y_ref, name="y")
    for name, g, r in zip(
        ["x", "conv.weight", "conv.bias", "bn.weight", "bn.bias"][: len(got)]
        if conv_bias
        else ["x", "conv.weight", "bn.weight", "bn.bias"],
        got,
        ref,
    ):
        assert_close(g, r, name=f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_tune_mode_equals_eval_linear_bn(device):
    lin = torch.nn.Linear(9, 6).double().to(device)
    bn = torch.nn.BatchNorm1d(6).double().to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1.0, 0.3)
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    params = [lin.weight, lin.bias, bn.weight, bn.bias]
    y_ref = bn(lin(x))
    dy = torch.randn_like(y_ref)
    ref = torch.autograd.grad(y_ref, params, dy)
    w, b = slab.ops.fold_conv_bn(lin.weight, lin.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    y = F.linear(x, w, b)
    got = torch.autograd.grad(y, params, dy)
    assert_close(y, y_ref, name="y")
    for g, r in zip(got, ref):
        assert_close(g, r)


# ---- opcheck, torch.compile ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("present", PRESENT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=param_id)
def test_fold_opcheck(device, present, dtype):
    args = make_args((6, 3, 3, 3), dtype, device, present, requires_grad=True)
    torch.library.opcheck(OPS.fold_conv_bn.default, (*args, EPS))
    gw = torch.randn(6, 3, 3, 3, dtype=dtype, device=device)
    gb = torch.randn(6, dtype=dtype, device=device)
    detached = [None if a is None else a.detach() for a in args]
    torch.library.opcheck(
        OPS.fold_conv_bn_backward.default,
        (gw, gb, detached[0], detached[1], detached[2], detached[4], detached[5], EPS, True, True),
    )
    torch.library.opcheck(
        OPS.fold_conv_bn_backward.default,
        (gw, None, detached[0], None, None, detached[4], detached[5], EPS, False, False),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_fold_compile_fullgraph(device):
    conv, bn = _conv_bn(2, 4, 6, True, device)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, device=device)

    def f(x, weight, bias, bn_weight, bn_bias, mean, var):
        w, b = slab.ops.fold_conv_bn(weight, bias, bn_weight, bn_bias, mean, var, 1e-5)
        return F.conv2d(x, w, b, padding=1)

    args = (x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(*args)
    y.sum().backward()
    compiled_grads = [p.grad.clone() for p in (conv.weight, conv.bias, bn.weight, bn.bias)]
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        p.grad = None
    y_eager = f(*args)
    y_eager.sum().backward()
    assert_close(y, y_eager)
    for g, p in zip(compiled_grads, (conv.weight, conv.bias, bn.weight, bn.bias)):
        assert_close(g, p.grad)


# ---- errors ----------------------------------------------------------------------------------------


def _valid():
    return list(make_args((4, 3, 3, 3), torch.float32, "cpu"))


def _call(args, eps=EPS):
    return slab.ops.fold_conv_bn(*args, eps)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a: a.__setitem__(0, a[0].reshape(-1)), "weight"),  # rank 1
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), "weight"),  # not floating
        (lambda a: a.__setitem__(0, a[0].to(torch.complex64)), "weight"),
        (lambda a: a.__setitem__(1, a[1][:3]), "bias"),  # not (O,)
        (lambda a: a.__setitem__(2, a[2][None]), "bn_weight"),
        (lambda a: a.__setitem__(3, torch.zeros(5)), "bn_bias"),
        (lambda a: a.__setitem__(4, a[4].to(torch.int64)), "running_mean"),
        (lambda a: a.__setitem__(5, a[5].double()), "running_var"),  # float64 stats, float32 weight
        (lambda a: a.__setitem__(5, a[5].to("meta")), "running_var|device"),  # device mix
    ],
)
def test_fold_errors(edit, match):
    a = _valid()
    edit(a)
    with pytest.raises((RuntimeError, ValueError), match=match):
        _call(a)


def test_fold_errors_half_mix():
    a = list(make_args((4, 3), torch.float16, "cpu"))
    a[2] = a[2].to(torch.bfloat16)  # neither float16 nor float32
    with pytest.raises(RuntimeError, match="bn_weight"):
        _call(a)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_fold_errors_eps(eps):
    with pytest.raises(RuntimeError, match="eps"):
        _call(_valid(), eps)


def test_fold_backward_errors():
    a = _valid()
    gw = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="grad_weight"):
        OPS.fold_conv_bn_backward(gw[:3], None, a[0], a[1], a[2], a[4], a[5], EPS, True, True)
    with pytest.raises(RuntimeError, match="grad_weight"):
        OPS.fold_conv_bn_backward(gw.double(), None, a[0], a[1], a[2], a[4], a[5], EPS, True, True)
    with pytest.raises(RuntimeError, match="grad_bias"):
        OPS.fold_conv_bn_backward(gw, torch.zeros(3), a[0], a[1], a[2], a[4], a[5], EPS, True, True)
