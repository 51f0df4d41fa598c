"""Cases of the Conv-BN fold ops (fold_conv_bn and its backward) for tests/test_bad_inputs.py:
registered into bad_inputs.cases.TABLE when that module imports this one."""

from __future__ import annotations

import torch

from .cases import bad, dtype, meta, op, pos, rand, rank, shape, swap_last


def _fold():
    # a conv weight of 5 output channels, 3 input channels, 3 x 3 kernel (k = 27, odd)
    return dict(
        weight=rand(5, 3, 3, 3),
        bias=rand(5),
        bn_weight=rand(5),
        bn_bias=rand(5),
        running_mean=rand(5),
        running_var=pos(5),
        eps=1e-5,
    )


def _fold_half_fp32_bn():
    a = _fold()
    return dict(a, weight=a["weight"].to(torch.bfloat16), bias=a["bias"].to(torch.bfloat16))


def _fold_bare_linear():
    return dict(_fold(), weight=swap_last(rand(5, 7)), bias=None, bn_weight=None, bn_bias=None, eps=0.0)


op(
    "fold_conv_bn",
    _fold,
    rank("weight", lambda t: t[:, 0, 0, 0]),
    rank("weight", lambda t: t[0, 0, 0, 0], tag="=scalar"),
    shape("bias", lambda t: t[:4]),
    shape("bn_weight", lambda t: t[None]),
    shape("bn_bias", lambda t: t[:2]),
    shape("running_mean", lambda t: t[:3]),
    shape("running_var", lambda t: t[None]),
    dtype("weight", torch.int32),
    dtype("weight", torch.complex64),
    dtype("weight", torch.float8_e4m3fn),
    dtype("bn_weight", torch.int32),
    dtype("running_var", torch.float64),
    dtype("bias", torch.float16),
    bad("eps<0", "eps", eps=-1e-5),
    meta("bias"),
    meta("bn_weight"),
    meta("bn_bias"),
    variants=(
        ("valid:half_fp32_bn", _fold_half_fp32_bn),
        ("valid:bare_linear", _fold_bare_linear),
        (
            "valid:empty",
            lambda: dict(
                _fold(),
                weight=rand(0, 3, 3, 3),
                bias=None,
                bn_weight=rand(0),
                bn_bias=None,
                running_mean=rand(0),
                running_var=pos(0),
            ),
        ),
        ("valid:strided", lambda: dict(_fold(), weight=rand(3, 5, 3, 3).transpose(0, 1))),
    ),
)


def _fold_bwd():
    a = _fold()
    return dict(
        grad_weight=rand(5, 3, 3, 3),
        grad_bias=rand(5),
        weight=a["weight"],
        bias=a["bias"],
        bn_weight=a["bn_weight"],
        running_mean=a["running_mean"],
        running_var=a["running_var"],
        eps=1e-5,
        weight_grad=True,
        bn_weight_grad=True,
    )


op(
    "fold_conv_bn_backward",
    _fold_bwd,
    shape("grad_weight", lambda t: t[:4], expected="grad_weight"),
    rank("weight", lambda t: t[:, 0, 0, 0], expected=("weight", "grad_weight")),
    shape("grad_bias", lambda t: t[:4]),
    shape("running_var", lambda t: t[:4]),
    dtype("grad_weight", torch.float64),
    dtype("weight", torch.int32),
    dtype("grad_bias", torch.int64),
    bad("eps<0", "eps", eps=-1.0),
    meta("grad_bias"),
    meta("bn_weight"),
    variants=(
        (
            "valid:bare",
            lambda: dict(
                _fold_bwd(), grad_bias=None, bias=None, bn_weight=None, weight_grad=False, bn_weight_grad=False
            ),
        ),
        ("valid:strided", lambda: dict(_fold_bwd(), grad_weight=rand(3, 5, 3, 3).transpose(0, 1))),
    ),
)
