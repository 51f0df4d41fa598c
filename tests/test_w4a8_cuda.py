"""W4A8 CUDA kernels on the device (skipped without a GPU): the sm_90a wgmma GEMM
(prepack_w4(..., layout="sm90")), the decode kernel (M <= 16, both tile layouts) and the tiled
mma.sync kernel (the on-device oracle for M > 16) against each other and against the CPU kernels
and the float64 reference of the SPEC formula."""

from __future__ import annotations

import pytest
import torch

import slab
import slab.ops
from slab import quant
from slab.reference import w4a8 as RW

from conftest import CUDA_OK, assert_close

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and a CUDA build of slab"),
]

GROUPS = [32, 64, 128, -1]


def _is_sm90() -> bool:
    return CUDA_OK and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not _is_sm90(), reason="the sm90 layout needs a compute capability 9.0 GPU")


def _problem(m, n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64).float()
    x = torch.randn(m, k, generator=g, dtype=torch.float64).float()
    packed, scales = quant.quantize_w4(w, group_size)
    bias = torch.randn(n, generator=g, dtype=torch.float64).float()
    return x, packed, scales, bias


def _gemm(x, packed, scales, group_size, device, layout, out_dtype=torch.float32):
    pw = quant.prepack_w4(packed.to(device), scales.to(device), group_size, device=device, layout=layout)
    xq, xs = quant.quantize_fp8(x.to(device))
    return slab.ops.w4a8_gemm(xq, xs, pw, out_dtype=out_dtype)


SHAPES = [
    (1, 4096, 4096, 128),
    (1, 130, 200, -1),
    (5, 257, 384, 64),
    (16, 64, 256, 32),
    (17, 300, 512, 128),
    (64, 129, 130, -1),
    (100, 256, 1024, 128),
    (300, 1000, 384, 64),
]


@needs_sm90
@pytest.mark.parametrize("m,n,k,group_size", SHAPES)
def test_sm90_matches_tiled_cpu_and_reference(m, n, k, group_size):
    x, packed, scales, _ = _problem(m, n, k, group_size)
    y_sm90 = _gemm(x, packed, scales, group_size, "cuda", "sm90")
    y_tiled = _gemm(x, packed, scales, group_size, "cuda", "tiled")
    y_cpu = _gemm(x, packed, scales, group_size, "cpu", "rowmajor")
    xq, xs = quant.quantize_fp8(x)
    ref = RW.w4a8_gemm(xq, xs, packed, scales, group_size)
    assert_close(y_sm90.cpu(), ref, name=f"sm90 m={m}")
    assert_close(y_tiled.cpu(), ref, name=f"tiled m={m}")
    assert_close(y_sm90.cpu(), y_cpu, name=f"sm90 vs cpu m={m}")
    assert_close(y_sm90, y_tiled, name=f"sm90 vs tiled m={m}")


@pytest.mark.parametrize("m", [1, 2, 8, 9, 16])
@pytest.mark.parametrize("group_size", GROUPS)
def test_decode_matches_cpu_and_reference(m, group_size):
    x, packed, scales, _ = _problem(m, 520, 1024, group_size, seed=m)
    ref = RW.w4a8_gemm(*quant.quantize_fp8(x), packed, scales, group_size)
    layouts = ["tiled"] + (["sm90"] if _is_sm90() else [])
    for layout in layouts:
        y = _gemm(x, packed, scales, group_size, "cuda", layout)
        assert_close(y.cpu(), ref, name=f"decode {layout} m={m}")
    assert_close(_gemm(x, packed, scales, group_size, "cpu", "rowmajor"), ref, name="cpu")


@pytest.mark.parametrize("m", [1, 16, 33, 200])
def test_deterministic(m):
    x, packed, scales, _ = _problem(m, 2048, 2048, 128, seed=3)
    layouts = ["tiled"] + (["sm90"] if _is_sm90() else [])
    for layout in layouts:
        a = _gemm(x, packed, scales, 128, "cuda", layout)
        b = _gemm(x, packed, scales, 128, "cuda", layout)
        assert torch.equal(a, b), layout


@needs_sm90
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sm90_linear_bias_and_dtypes(out_dtype):
    x, packed, scales, bias = _problem(48, 384, 256, 64, seed=5)
    x = x.to(out_dtype)
    pw = quant.prepack_w4(packed.cuda(), scales.cuda(), 64, device="cuda", layout="sm90")
    y = slab.ops.w4a8_linear(x.cuda(), pw, bias=bias.cuda())
    ref = RW.w4a8_linear(x, packed, scales, 64, bias)
    assert y.dtype == out_dtype
    assert_close(y.cpu(), ref.to(out_dtype), name="sm90 linear")


@pytest.mark.skipif(_is_sm90(), reason="checks the refusal on GPUs other than compute capability 9.0")
def test_sm90_layout_refused_elsewhere():
    """Prepacking for Hopper works anywhere (to save it for an H100); running it needs one."""
    x, packed, scales, _ = _problem(1, 64, 128, 128)
    pw = quant.prepack_w4(packed.cuda(), scales.cuda(), 128, device="cuda", layout="sm90")
    with pytest.raises(RuntimeError, match="sm90"):
        slab.ops.w4a8_linear(x.cuda(), pw)


@pytest.mark.parametrize("m", [1, 9, 16, 40])
def test_fast_kernels_agree_with_the_oracle(m, monkeypatch):
    """SLAB_W4A8_ORACLE=1 runs the first-draft mma.sync kernel for every M: the decode kernel
    (M <= 16) and the tiled GEMM agree with it on the device; sm90 weights cannot take it."""
    x, packed, scales, _ = _problem(m, 520, 1024, 128, seed=11)
    fast = _gemm(x, packed, scales, 128, "cuda", "tiled")
    monkeypatch.setenv("SLAB_W4A8_ORACLE", "1")
    oracle = _gemm(x, packed, scales, 128, "cuda", "tiled")
    assert_close(fast, oracle, name=f"fast vs oracle m={m}")
    if _is_sm90():
        with pytest.raises(RuntimeError, match="SLAB_W4A8_ORACLE"):
            _gemm(x, packed, scales, 128, "cuda", "sm90")
