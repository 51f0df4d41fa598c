"""One call per kernel family against a plain-torch float64 reference, on the CPU.

The smoke subset CI runs with the one built wheel under other torch releases (2.11, 2.13+cpu):
it needs nothing but torch, numpy and pytest, and proves that every family's library code loads
and computes there. The full suite covers the same ops in depth.
"""

from __future__ import annotations

import torch

import slab
import slab.nn
import slab.ops
import slab.optim
from slab import quant


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    a, e = actual.double(), expected.double()
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert not torch.isnan(a).any(), "NaN in the result"
    assert err <= tol * max(1.0, float(e.abs().max())), f"max error {err}"


def test_library_loaded():
    assert hasattr(torch.ops.slab, "cats") and isinstance(slab.cuda_available(), bool)


def test_prepbn():
    x = torch.randn(4, 7, 12)
    w, b, alpha = torch.rand(12) + 0.5, torch.randn(12), torch.tensor([0.7])
    rm, rv = torch.randn(12), torch.rand(12) + 0.5
    y = slab.ops.rep_bn(x, w, b, alpha, rm.clone(), rv.clone(), False)
    s = w.double() / (rv.double() + 1e-5).sqrt()
    close(y, x.double() * (s + 0.7) + (b.double() - rm.double() * s))


def test_sla():
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    phi_q, phi_k = q.double().relu(), k.double().relu()
    scores = (phi_q @ phi_k.transpose(-1, -2)).tril()
    expect = (scores @ v.double()) / (scores.sum(-1, keepdim=True) + 1e-6)
    close(slab.ops.sla(q, k, v, causal=True), expect)


def test_dwc():
    v, weight = torch.randn(2, 2, 16, 4), torch.randn(4, 1, 3, 3)
    got = slab.ops.dwc2d(v, weight, grid=(4, 4))
    grid = v.double().reshape(4, 4, 4, 4).permute(0, 3, 1, 2)
    ref = torch.nn.functional.conv2d(grid, weight.double(), padding=1, groups=4).permute(0, 2, 3, 1)
    close(got, ref.reshape(2, 2, 16, 4))


def test_cats():
    x = torch.randn(5, 33)
    s = torch.nn.functional.silu(x.double())
    close(slab.ops.cats(x, 0.2), torch.where(s.abs() > 0.2, s, torch.zeros_like(s)))


def test_w4a8():
    w, x = torch.randn(24, 64), torch.randn(3, 64)
    packed, scales = quant.quantize_w4(w, 32)
    y = slab.ops.w4a8_linear(x, packed, scales, 32)
    xq, xs = quant.quantize_fp8(x)
    wq = quant.dequantize_w4(packed, scales, 32).double()
    close(y, (xq.double() * xs.double().unsqueeze(-1)) @ wq.t())


def test_optim():
    p = torch.nn.Parameter(torch.randn(10))
    start = p.detach().clone()
    p.grad = torch.randn(10)
    opt = slab.optim.Lion([p], lr=0.01, betas=(0.9, 0.99), weight_decay=0.0)
    opt.step()
    close(p.detach(), start - 0.01 * torch.sign(0.1 * p.grad))
