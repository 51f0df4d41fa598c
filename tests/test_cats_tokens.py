"""Token sparsity (LeMo, SPEC section 3): slab.ops.token_select / token_scatter and
slab.nn.TokenSparseBlock against plain-torch references (top-k by score, original order kept)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slab
import slab.nn
import slab.ops
from slab.reference import cats as R

from conftest import DEVICES, FLOAT_DTYPES, assert_close, param_id, ref_copy

OPS = torch.ops.slab


ref_index = R.token_index  # top-k per row (NaN lowest), ties to the earlier token, ascending


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize(
    "shape,keep", [((2, 9, 5), 4), ((3, 300, 7), 150), ((1, 1, 3), 1), ((4, 17, 1), 17), ((2, 33, 8), 0.3)]
)
def test_select_scatter_forward_backward(device, dtype, shape, keep):
    b, n, c = shape
    x = torch.randn(shape, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    scores = torch.randn(b, n, device=device)
    kept, index = slab.ops.token_select(x, scores, keep)
    k = index.shape[1]
    assert k == (keep if isinstance(keep, int) else round(keep * n))
    assert torch.equal(index.cpu(), ref_index(scores, k))
    assert kept.dtype == dtype and kept.shape == (b, k, c)
    x64 = ref_copy(x, True)
    ref_kept = torch.gather(x64, 1, index.cpu()[..., None].expand(b, k, c))
    assert torch.equal(kept.detach().cpu().double(), ref_kept.detach())
    y = kept * 3 + 1
    out = slab.ops.token_scatter(x, y, index)
    ref_out = x64.scatter(1, index.cpu()[..., None].expand(b, k, c), ref_kept * 3 + 1)
    assert_close(out, ref_out, name="out")
    g = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    (dx,) = torch.autograd.grad(out, x, g)
    (dx64,) = torch.autograd.grad(ref_out, x64, ref_copy(g, False))
    assert_close(dx, dx64, name="dx")


def test_ties_nan_and_order():
    scores = torch.tensor([[1.0, 5.0, 5.0, float("nan"), 5.0, 0.0, 5.0]])
    x = torch.arange(7.0).reshape(1, 7, 1)
    _, idx = slab.ops.token_select(x, scores, 3)
    assert idx.tolist() == [[1, 2, 4]]  # the earliest three of the four tied maxima
    _, idx = slab.ops.token_select(x, scores, 6)
    assert idx.tolist() == [[0, 1, 2, 4, 5, 6]]  # NaN ranks lowest
    _, idx = slab.ops.token_select(x, scores, 7)
    assert idx.tolist() == [list(range(7))]


def test_gradcheck():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(2, 6)
    index = OPS.token_select_index(scores, 3)
    assert torch.autograd.gradcheck(lambda a: OPS.token_gather(a, index), (x,))
    assert torch.autograd.gradcheck(lambda a, b: OPS.token_scatter(a, b, index), (x, y))


def test_opcheck_and_compile():
    x = torch.randn(2, 10, 4, requires_grad=True)
    scores = torch.randn(2, 10)
    index = OPS.token_select_index(scores, 4)
    torch.library.opcheck(OPS.token_select_index.default, (scores, 4))
    torch.library.opcheck(OPS.token_gather.default, (x, index))
    torch.library.opcheck(OPS.token_scatter.default, (x, torch.randn(2, 4, 4, requires_grad=True), index))

    def f(a, s):
        kept, idx = slab.ops.token_select(a, s, 4)
        return slab.ops.token_scatter(a, kept * 2, idx)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(x, scores)
    assert_close(out, f(x, scores), name="compiled")
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(f(x, scores).sum(), x)
    assert_close(g, g_ref, name="compiled grad")


def test_noncontiguous_and_no_input_writes():
    base = torch.randn(3, 12, 10)
    x = base[:, :, ::2]
    scores = torch.randn(12, 3).t()  # strided scores
    before = base.clone()
    kept, idx = slab.ops.token_select(x, scores, 5)
    out = slab.ops.token_scatter(x, kept + 1, idx)
    assert torch.equal(base, before)
    assert torch.equal(idx, ref_index(scores, 5))
    ref_out = x.clone()
    for b in range(3):
        ref_out[b, idx[b]] = x[b, idx[b]] + 1
    assert torch.equal(out, ref_out)


def test_errors():
    x = torch.randn(2, 8, 4)
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="keep must be in"):
        slab.ops.token_select(x, s, 9)
    with pytest.raises(ValueError, match="keep must be in"):
        slab.ops.token_select(x, s, 0)
    with pytest.raises(ValueError, match="ratio"):
        slab.ops.token_select(x, s, 1.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        slab.ops.token_select(x, s[:, :5], 2)
    with pytest.raises(ValueError, match="x must have shape"):
        slab.ops.token_select(x[0], s, 2)
    idx = OPS.token_select_index(s, 3)
    with pytest.raises(RuntimeError, match="y must have shape"):
        slab.ops.token_scatter(x, torch.randn(2, 4, 4), idx)
    with pytest.raises(RuntimeError, match="y must have the dtype"):
        slab.ops.token_scatter(x, torch.randn(2, 3, 4, dtype=torch.float64), idx)
    with pytest.raises(RuntimeError, match="index values must be in"):
        slab.ops.token_scatter(x, torch.randn(2, 3, 4), idx + 6)
    with pytest.raises(RuntimeError, match="index must be int64"):
        OPS.token_gather(x, idx.int())
    with pytest.raises(RuntimeError, match="scores must be float32"):
        OPS.token_select_index(s.int(), 2)


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def test_token_sparse_block():
    c = 6
    block = Residual(c)
    x = torch.randn(2, 10, c, requires_grad=True)
    tsb = slab.nn.TokenSparseBlock(block, keep=0.5)
    out = tsb(x)
    norms = x.detach().norm(dim=-1)
    idx = ref_index(norms, 5)
    ref = x.clone()
    for b in range(2):
        ref[b, idx[b]] = block(x[b, idx[b]])
    assert_close(out, ref.detach(), name="out")
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    ref.sum().backward()
    assert_close(g, x.grad, name="dx")
    # keeping every token is exactly the block
    full = slab.nn.TokenSparseBlock(block, keep=10)
    assert_close(full(x), block(x), name="keep all")
    # a learned scorer
    scored = slab.nn.TokenSparseBlock(block, keep=3, scorer=nn.Linear(c, 1))
    assert scored(x).shape == x.shape
    with pytest.raises(ValueError):
        slab.nn.TokenSparseBlock(block, keep=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.bool, torch.float8_e4m3fn, torch.bfloat16, torch.float32], ids=param_id
)
@pytest.mark.parametrize("channels", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_token_rows_any_row_bytes_and_alignment(device, dtype, channels, offset):
    """token_gather / token_scatter copy rows in the widest word the row size and both base
    pointers allow, down to single bytes: odd byte counts and views at odd storage offsets."""
    b, n = 2, 7
    top = 2 if dtype == torch.bool else 256  # a bool byte holds 0 or 1
    base = torch.randint(0, top, (b * n * channels + offset,), dtype=torch.uint8, device=device)
    x = (
        base.view(dtype)[offset:].view(b, n, channels)
        if dtype.itemsize == 1
        else (torch.randn(b * n * channels + offset, device=device).to(dtype)[offset:].view(b, n, channels))
    )
    index = torch.tensor([[6, 0, 3], [1, 2, 5]], device=device)
    raw = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731  (bitwise: NaN payloads, bool)
    expect = torch.stack([x[i][index[i]] for i in range(b)])
    assert torch.equal(raw(OPS.token_gather(x, index)), raw(expect))
    y = x[:, :3].clone()
    expect_scatter = x.clone()
    for i in range(b):
        expect_scatter[i][index[i]] = y[i]
    assert torch.equal(raw(OPS.token_scatter(x, y, index)), raw(expect_scatter))
