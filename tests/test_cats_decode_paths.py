"""cats_mlp and cats on the paths of the CUDA decode schedule (cats.h): every token bucket, the
16-byte path (rows of whole packs, aligned bases) next to the scalar one (odd dim, a base one
element off), several compaction blocks, and down splits long enough to be staged in chunks.
On the CPU they check the reference kernels on the same inputs; tests/host/cats_mlp_schedule.cpp
checks the schedule itself."""

from __future__ import annotations

import pytest
import torch

import slab
import slab.ops

from conftest import DEVICES, assert_close, param_id
from test_cats_ops import (
    make_mlp,
    make_x,
    quantile_threshold,
    ref_cats,
    ref_cats_grad,
    ref_copy,
    ref_mlp,
    snap_gates_away,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past an allocation boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def check_mlp(m, d, f, dtype, device, sparsity, shift=False):
    x, wg, wu, wd_t = make_mlp(m, d, f, dtype, device)
    t = quantile_threshold(x, wg, sparsity) if sparsity > 0 else 0.0
    wg = snap_gates_away(x, wg, t, dtype)
    args = [misaligned(a) if shift else a for a in (x, wg, wu, wd_t)]
    y = slab.ops.cats_mlp(*args, t)
    rtol, atol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 2e-5)}.get(dtype, (None, None))
    assert_close(y, ref_mlp(x, wg, wu, wd_t, t), rtol=rtol, atol=atol, name=f"y m={m} d={d} f={f}")


# every token count (each bucket, padded and full) for the two main dtypes, a few for the others
TOKEN_CASES = [(dt, m) for dt in (torch.float32, torch.bfloat16) for m in range(1, 17)] + [
    (dt, m) for dt in (torch.float16, torch.float64) for m in (1, 5, 16)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,m", TOKEN_CASES, ids=param_id)
def test_every_token_count_vector_path(device, dtype, m):
    # d = 64: whole 16-byte packs for every dtype; f = 300: two compaction blocks, a partial
    # block of gate rows
    check_mlp(m, 64, 300, dtype, device, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_misaligned_bases_take_the_scalar_path(device, dtype, m, sparsity):
    check_mlp(m, 64, 70, dtype, device, sparsity, shift=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_long_splits_and_many_tiles(device, dtype):
    # f = 2000 at 16 tokens: few splits of many kept rows (several staged chunks each);
    # d = 264: several column tiles, the last one partial
    check_mlp(16, 264, 2000, dtype, device, 0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_all_dropped_and_all_kept_vector_path(device):
    x, wg, wu, wd_t = make_mlp(3, 128, 257, torch.bfloat16, device)
    assert torch.equal(
        slab.ops.cats_mlp(x, wg, wu, wd_t, 1e9), torch.zeros(3, 128, dtype=torch.bfloat16, device=device)
    )
    y = slab.ops.cats_mlp(x, wg, wu, wd_t, -1.0)
    assert_close(y, ref_mlp(x, wg, wu, wd_t, -1.0), name="y")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("n", [1, 7, 8, 1000, 4099])
def test_cats_elementwise_packs_and_tail(device, dtype, n):
    t = 0.3
    x0 = make_x((n,), dtype, device, t)
    for x in (x0, misaligned(x0)):
        y = slab.ops.cats(x, t)
        assert_close(y, ref_cats(ref_copy(x, False), t), name="cats")
        dy = torch.randn_like(x)
        dx = torch.ops.slab.cats_backward(dy, x, t)
        assert_close(dx, ref_cats_grad(ref_copy(x, False), ref_copy(dy, False), t), name="cats_backward")
