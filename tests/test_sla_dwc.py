"""The SLA depthwise-convolution branch (slab.ops.dwc2d / causal_dwc1d / causal_dwc1d_step)
against float64 F.conv2d / F.conv1d references: outputs and all gradients, gradcheck, the decode
step against the full causal call, opcheck, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

import slab
from slab.ops.dwc import dwc_cache_from_prefill
from slab.reference import sla as RS

from conftest import DEVICES, FLOAT_DTYPES, assert_close, ref_copy

OPS = torch.ops.slab


def ref_dwc2d(v, weight, bias, grid, residual):
    """float64 SLAB formula (slab.reference.sla.dwc2d): a depthwise conv2d over the token grid."""
    return RS.dwc2d(v, weight, bias, grid, residual)


ref_causal1d = RS.causal_dwc1d


def make_inputs(device, dtype, b, h, n, c, kernel_shape, strided, with_bias=True, with_residual=True, scale=1.0):
    if strided:  # the v view of a fused qkv projection: (B, N, 3, H, C) -> (B, H, N, C)
        v = (torch.randn(b, n, 3, h, c, device=device) * scale).to(dtype)[:, :, 2].transpose(1, 2)
    else:
        v = (torch.randn(b, h, n, c, device=device) * scale).to(dtype)
    weight = torch.randn(c, 1, *kernel_shape, device=device) / kernel_shape[0]
    bias = torch.randn(c, device=device) if with_bias else None
    residual = (torch.randn(b, h, n, c, device=device) * scale).to(dtype) if with_residual else None
    return v, weight, bias, residual


SHAPES_2D = [  # (B, H, grid, C, kernel)
    (2, 3, (5, 7), 19, 5),
    (1, 1, (1, 1), 8, 5),
    (2, 2, (14, 14), 64, 5),
    (1, 2, (4, 4), 3, 3),
    (1, 1, (3, 6), 9, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES_2D, ids=lambda s: f"{s[0]}x{s[1]}x{s[2][0]}x{s[2][1]}x{s[3]}k{s[4]}")
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "qkv_view"])
def test_dwc2d_forward_backward(device, dtype, shape, strided):
    b, h, grid, c, k = shape
    v, weight, bias, residual = make_inputs(device, dtype, b, h, grid[0] * grid[1], c, (k, k), strided)
    leaves = [t.requires_grad_() for t in (v, weight, bias, residual)]
    out = slab.ops.dwc2d(v, weight, bias, grid=grid, residual=residual)
    assert out.dtype == dtype and out.shape == v.shape
    # Memory order (B, N, H, C): merging the heads is a view.
    assert out.transpose(1, 2).is_contiguous()
    refs = [ref_copy(t, requires_grad=True) for t in leaves]
    expected = ref_dwc2d(refs[0], refs[1], refs[2], grid, refs[3])
    assert_close(out, expected, dtype, name="out")

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(ref_copy(grad))
    for name, t, r in zip(("v", "weight", "bias", "residual"), leaves, refs):
        # weight/bias grads sum over every token: bound them by the 16-bit inputs' rounding.
        assert_close(t.grad, r.grad, dtype, name=f"grad_{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,kernel", [(11, 4), (1, 4), (3, 4), (37, 2), (5, 1)])
def test_causal_dwc1d_forward_backward(device, dtype, n, kernel):
    v, weight, bias, residual = make_inputs(device, dtype, 2, 3, n, 13, (kernel,), strided=True)
    leaves = [t.requires_grad_() for t in (v, weight, bias, residual)]
    out = slab.ops.causal_dwc1d(v, weight, bias, residual=residual)
    refs = [ref_copy(t, requires_grad=True) for t in leaves]
    expected = ref_causal1d(refs[0], refs[1], refs[2], refs[3])
    assert_close(out, expected, dtype, name="out")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(ref_copy(grad))
    for name, t, r in zip(("v", "weight", "bias", "residual"), leaves, refs):
        assert_close(t.grad, r.grad, dtype, name=f"grad_{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_no_residual(device):
    v, weight, _, _ = make_inputs(device, torch.float32, 2, 2, 9, 5, (3, 3), False, False, False)
    assert_close(slab.ops.dwc2d(v, weight), ref_dwc2d(ref_copy(v), ref_copy(weight), None, (3, 3), None))
    w1 = torch.randn(5, 1, 4, device=device)
    assert_close(slab.ops.causal_dwc1d(v, w1), ref_causal1d(ref_copy(v), ref_copy(w1), None, None))


@pytest.mark.parametrize("device", DEVICES)
def test_large_values_bf16(device):
    v, weight, bias, residual = make_inputs(device, torch.bfloat16, 1, 2, 16, 8, (5, 5), False, scale=3e4)
    out = slab.ops.dwc2d(v, weight, bias, residual=residual)
    assert torch.isfinite(out).all()
    assert_close(out, ref_dwc2d(ref_copy(v), ref_copy(weight), ref_copy(bias), (4, 4), ref_copy(residual)))


def test_gradcheck_float64():
    v, weight, bias, residual = make_inputs("cpu", torch.float64, 1, 2, 6, 3, (3, 3), True)
    for t in (v, weight, bias, residual):
        t.requires_grad_()
    args = (v, weight.double(), bias.double(), residual)
    assert torch.autograd.gradcheck(lambda a, w, b, r: slab.ops.dwc2d(a, w, b, grid=(2, 3), residual=r), args)
    w1 = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: slab.ops.causal_dwc1d(a, w, b), (v, w1, args[2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("prefill", [0, 1, 5])
def test_step_matches_full_causal(device, dtype, prefill):
    n, kernel = 9, 4
    v, weight, bias, residual = make_inputs(device, dtype, 2, 3, n, 12, (kernel,), strided=False)
    full = slab.ops.causal_dwc1d(v, weight, bias, residual=residual)
    cache = dwc_cache_from_prefill(v[:, :, :prefill], kernel)
    v_before = v.clone()
    outs = [
        slab.ops.causal_dwc1d_step(v[:, :, t], cache, weight, bias, residual=residual[:, :, t])
        for t in range(prefill, n)
    ]
    assert torch.equal(v, v_before)
    # The step does the same fp32 arithmetic in the same tap order as the full call.
    assert_close(torch.stack(outs, 2), full[:, :, prefill:], dtype, name="steps")
    assert_close(cache, v[:, :, n - kernel + 1 :], dtype, rtol=0, atol=0, name="cache")


def test_opcheck():
    v, weight, bias, residual = make_inputs("cpu", torch.float32, 2, 2, 9, 5, (3, 3), True)
    torch.library.opcheck(OPS.sla_dwc.default, (v, weight, bias, residual, 3, 3, 1, 1))
    torch.library.opcheck(OPS.sla_dwc.default, (v, weight[..., 0], None, None, 9, 1, 2, 0))
    torch.library.opcheck(OPS.sla_dwc_backward.default, (torch.randn(2, 2, 9, 5), v, weight, 3, 3, 1, 1))
    cache = torch.randn(2, 2, 2, 5)
    torch.library.opcheck(OPS.sla_dwc_step.default, (v[:, :, 0], cache, weight[..., 0], bias, None))


def test_compile_fullgraph():
    v, weight, bias, residual = make_inputs("cpu", torch.float32, 2, 2, 16, 8, (5, 5), True)
    v.requires_grad_()

    def f(v, residual):
        return slab.ops.dwc2d(v, weight, bias, residual=residual).transpose(1, 2).reshape(2, 16, 16).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(v, residual), f(v, residual).detach())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda v, w: slab.ops.dwc2d(v, torch.randn(8, 1, 4, 4)), "odd"),
        (lambda v, w: slab.ops.dwc2d(v, w, grid=(3, 4)), "grid"),
        (lambda v, w: slab.ops.dwc2d(v[:, :, :15], w), "square"),
        (lambda v, w: slab.ops.dwc2d(v, torch.randn(7, 1, 5, 5)), "weight"),
        (lambda v, w: slab.ops.dwc2d(v, w, bias=torch.randn(7)), "bias"),
        (lambda v, w: slab.ops.dwc2d(v, w, residual=torch.randn(2, 2, 16, 8, dtype=torch.float64)), "residual"),
        (lambda v, w: slab.ops.dwc2d(v.to(torch.int32), w), "v must be float"),
        (lambda v, w: slab.ops.dwc2d(v[0], w), "v must have shape"),
        (lambda v, w: slab.ops.causal_dwc1d(v, w), "Conv1d"),
        (lambda v, w: slab.ops.causal_dwc1d_step(v[:, :, 0], torch.zeros(2, 2, 2, 8), torch.randn(8, 1, 4)), "cache"),
        (
            lambda v, w: slab.ops.causal_dwc1d_step(
                v[:, :, 0], torch.zeros(2, 2, 3, 8, dtype=torch.float64), torch.randn(8, 1, 4)
            ),
            "cache",
        ),
        (
            lambda v, w: slab.ops.causal_dwc1d_step(
                v[:, :, 0], torch.zeros(2, 2, 8, 3).transpose(2, 3), torch.randn(8, 1, 4)
            ),
            "contiguous",
        ),
        (lambda v, w: slab.ops.causal_dwc1d_step(v[:, :, 0], torch.zeros(2, 2, 4, 8), w), "Conv1d"),
    ],
)
def test_bad_inputs(call, match):
    v = torch.randn(2, 2, 16, 8)
    w = torch.randn(8, 1, 5, 5)
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(v, w)
