"""The CPU W4A8 GEMM's kernel paths, each against the float64 reference of the SPEC formula.

On a CPU with AVX-512 VNNI and VBMI (csrc/w4a8/w4a8_vnni_cpu.cpp) one row of x takes the integer
GEMV over a 16-bit window of x's units (one shift e = 0 .. 3 per row, from its largest value, and
a remainder plane in the blocks whose values reach below the window), more rows the
transposed-panel kernel (8 tokens per pass, token tiles of 64, 16-row panels), on AMX-INT8 tiles
where the CPU has them (16 tokens per pass; SLAB_CPU_ISA=avx512 keeps the vector kernel).
Elsewhere, and with SLAB_CPU_ISA=avx2, the AVX2 kernels run (both tested here in a subprocess,
since the ISA is chosen once per process). The inputs are built to reach every branch: window
shifts (only codes given as they are reach e < 3: quantize_fp8 scales every row's largest to 448)
and remainder planes, signs, tails of rows and panels, remainder tokens, segments of long groups;
and inputs whose exact result is a float32, which every path must return bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import slab.ops
from slab import quant
from slab.reference import w4a8 as RW

from conftest import assert_close, param_id

E4M3_MAX = 448.0


def codes(n, k, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // g, generator=gen) + 0.05
    return packed, scales


def activations(m, k, kind, seed):
    """Rows of x for every plane case: values spread over every e4m3 exponent (remainder planes
    in most blocks), values within [0.22, 448] (none), and per block a random top exponent with a
    12-bit range below it and zeros between (some); signs of both kinds."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(m, k, generator=gen) < 0.5, -1.0, 1.0)
    if kind == "spread":  # every exponent, in every block
        mag = torch.exp2(torch.rand(m, k, generator=gen) * 17.8 - 9)
    elif kind == "narrow":  # every value at least 0.22 (with 448 in column 0): no remainder plane
        mag = torch.exp2(torch.rand(m, k, generator=gen) * 11 - 2.2)
    else:  # per block, a random top exponent and a 12-bit range below it, zeros between
        top = torch.randint(-2, 9, (m, (k + 127) // 128), generator=gen).repeat_interleave(128, 1)[:, :k]
        mag = torch.exp2(top - torch.rand(m, k, generator=gen) * 12)
        mag[torch.rand(m, k, generator=gen) < 0.2] = 0.0
    x = sign * mag
    x[:, 0] = E4M3_MAX  # one full-scale value per row: the per-row scale is 1
    return x


#: The CPU kernels' weight layouts: the quantize_w4 codes as they are, and the VNNI kernels' panels.
CPU_LAYOUTS = ["rowmajor", "panel"]


def gemm(xq, xs, packed, scales, group_size, layout, out_dtype=torch.float32):
    w = quant.prepack_w4(packed, scales, group_size, "cpu", layout=layout)
    return slab.ops.w4a8_gemm(xq, xs, w, out_dtype=out_dtype)


def check(m, n, k, group_size, kind, seed=0, out_dtype=torch.float32, layout="rowmajor"):
    packed, scales = codes(n, k, group_size, seed)
    x = activations(m, k, kind, seed + 1)
    xq, xs = quant.quantize_fp8(x)
    y = gemm(xq, xs, packed, scales, group_size, layout, out_dtype)
    name = f"y m={m} n={n} k={k} g={group_size} {layout}"
    assert_close(y, RW.w4a8_gemm(xq, xs, packed, scales, group_size), name=name)


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize("kind", ["spread", "narrow", "blocks"])
@pytest.mark.parametrize(
    "n,k,group_size",
    [
        (4, 128, 128),
        (9, 256, 128),
        (35, 1024, 128),
        (6, 4096, -1),
        (5, 600, -1),
        (3, 200, -1),
        (70, 11008, 128),
        (21, 6, -1),
        (33, 130, -1),
    ],
    ids=param_id,
)
def test_one_row(n, k, group_size, kind, layout):
    """The GEMV path: rows in groups of four and single ones (row-major), panels of 16 and a short
    last one, segments of 128 and 512 columns, a row's short last block (K % 128; K % 8 for
    panels), blocks with and without the remainder plane."""
    check(1, n, k, group_size, kind, layout=layout)


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize("kind", ["spread", "blocks"])
@pytest.mark.parametrize("m", [2, 3, 8, 9, 15, 16, 17, 64, 65, 130])
@pytest.mark.parametrize("group_size", [64, 128])
def test_rows_of_tokens(m, kind, layout, group_size):
    """The panel path: every remainder of 8 tokens, token tiles of 64 and their remainders, a panel
    of fewer than 16 rows; group 128 (whole 128-column blocks and segments) takes the AMX tiles
    where the CPU has them, 16 tokens a pass, and their remainders."""
    check(m, 37, 384, group_size, kind, layout=layout)


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize(
    "m,n,k,group_size",
    [(4, 16, 1024, -1), (5, 33, 1600, -1), (2, 17, 136, -1), (7, 20, 8, -1), (3, 48, 4096, 32), (3, 20, 130, -1)],
    ids=param_id,
)
def test_rows_of_tokens_shapes(m, n, k, group_size, layout):
    """Long groups in 512-column segments (and a group of 1600 = 8 x 200), K a multiple of 8 only,
    small groups; K = 130 (not a multiple of 8) takes the float kernels (panels reordered back)."""
    check(m, n, k, group_size, "spread", layout=layout)


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize("m", [1, 4])
def test_largest_sums(m, layout):
    """Every x at +-448 against weights of -8 over one group of 11008 columns: the largest segment
    sums the int32 accumulators must hold."""
    k = 11008
    packed = torch.full((5, k // 2), 0x88, dtype=torch.uint8)
    scales = torch.ones(5, 1)
    x = torch.full((m, k), E4M3_MAX)
    x[:, 1::3] = -E4M3_MAX
    xq, xs = quant.quantize_fp8(x)
    y = gemm(xq, xs, packed, scales, -1, layout)
    assert_close(y, RW.w4a8_gemm(xq, xs, packed, scales, -1), name="y")


def exact_case(m, n, k, group_size, largest, seed):
    """e4m3 codes and weights whose GEMM every kernel must reproduce bit for bit: per 128-column
    block one large value (magnitude code 0x40 .. `largest`, which is also column 0: the row's
    largest sets the GEMV's window shift, e = 3 for 0x78 and above, 0 up to 0x67) against a zero
    weight, the rest at most 120 / 512 (codes below 0x28: values below the window, the remainder
    plane), x's scales 1, weight scales 1/2 or 1. Every partial sum is then a multiple of 2^-10
    below 2^13, exact in float32. The codes go to w4a8_gemm as they are (quantize_fp8 would scale
    every row's largest to 448)."""
    gen = torch.Generator().manual_seed(seed)
    code = torch.randint(0, 0x28, (m, k), generator=gen, dtype=torch.uint8)
    code |= torch.randint(0, 2, (m, k), generator=gen, dtype=torch.uint8) << 7
    top = torch.arange(0, k, 128) + torch.randint(0, 128, ((k + 127) // 128,), generator=gen)
    top = torch.cat([top.clamp(max=k - 1), torch.tensor([0])])
    code[:, top] = torch.randint(0x40, largest + 1, (m, top.numel()), generator=gen, dtype=torch.uint8)
    code[:, 0] = largest
    nibbles = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    nibbles[:, top] = 0
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    g = k if group_size == -1 else group_size
    scales = torch.randint(1, 3, (n, k // g), generator=gen).float() / 2
    return code.view(torch.float8_e4m3fn), torch.ones(m), packed, scales


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize("largest", [0x5F, 0x6C, 0x73, 0x7E])
@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize(
    "n,k,group_size", [(9, 1024, 128), (5, 4096, -1), (6, 600, -1), (4, 1536, 64), (19, 1280, 128)], ids=param_id
)
def test_exact_integer_sums(m, n, k, group_size, largest, layout):
    """Where the exact result is a float32, every path returns it, for each GEMV window shift: an
    error of one unit in a segment's offset, shift or planes shows (the tolerances would hide it)."""
    xq, xs, packed, scales = exact_case(m, n, k, group_size, largest, seed=m * 1000 + k + largest)
    y = gemm(xq, xs, packed, scales, group_size, layout)
    expected = RW.w4a8_gemm(xq, xs, packed, scales, group_size)
    assert torch.equal(y.double(), expected), (y.double() - expected).abs().max()


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
def test_nan_falls_back_to_float_kernels(layout):
    """Integers cannot carry a NaN: with one in x the float kernels run, and only its row is NaN."""
    packed, scales = codes(20, 256, 128, 3)
    for m in (1, 5):
        x = activations(m, 256, "spread", 4)
        x[m // 2, 7] = float("nan")
        xq, xs = quant.quantize_fp8(x)
        y = gemm(xq, xs, packed, scales, 128, layout)
        others = [r for r in range(m) if r != m // 2]
        assert torch.isnan(y[m // 2]).all() and torch.isfinite(y[others]).all()
        assert_close(y[others], RW.w4a8_gemm(xq[others], xs[others], packed, scales, 128), name="y")


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_other_kernels_in_a_subprocess(isa):
    """SLAB_CPU_ISA=avx2 keeps every CPU kernel on AVX2 + FMA, =avx512 on AVX-512 VNNI without the
    AMX tiles: the same checks in a process that chose so at its first GEMM (on a CPU without AVX-512
    VNNI, or without AMX, this repeats the above)."""
    script = (
        "import sys; sys.path[:0] = sys.argv[1:]\n"
        "import test_w4a8_cpu_paths as t\n"
        "for kind in ('spread', 'blocks'):\n"
        "    for layout in t.CPU_LAYOUTS:\n"
        "        t.check(1, 35, 1024, 128, kind, layout=layout); t.check(1, 5, 600, -1, kind, layout=layout)\n"
        "        for m in (3, 9, 16, 17): t.check(m, 37, 384, 64, kind, layout=layout); t.check(m, 37, 384, 128, kind, layout=layout)\n"
        "for layout in t.CPU_LAYOUTS:\n"
        "    t.test_largest_sums(1, layout); t.test_nan_falls_back_to_float_kernels(layout)\n"
        "    for m in (1, 3, 9):\n"
        "        t.test_exact_integer_sums(m, 5, 4096, -1, 0x7E, layout)\n"
        "        t.test_exact_integer_sums(m, 9, 1024, 128, 0x6C, layout)\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SLAB_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", script, here], env=env, check=True, timeout=300)
