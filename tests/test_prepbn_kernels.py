"""The PRepBN kernels' work decomposition and launch structure (issue 14).

On every device: the row passes' paths (16-byte packs, the scalar path of odd C and misaligned
views, rows longer than the 4096 elements held in registers) and the column reductions over many
row splits, against the float64 reference. On CUDA only: at most 2 kernel launches for the fused
forward and backward (3 for the public training forward with its running-stat update), bitwise-deterministic results, the masked training forward captured in a
CUDA graph, and NaN statistics (not an error, which would need a host sync) for fewer than 2 kept
tokens.
"""

from __future__ import annotations

import pytest
import torch

import slab
from conftest import CUDA_OK, DEVICES, param_id

from test_prepbn_ops import PARAM_NAMES, check_results, make_mask, make_params, make_x, run_both

OPS = torch.ops.slab
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and a CUDA build of slab")]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The values of t in a contiguous view whose data starts one element past an aligned address."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


# shape: C = 384 (packs), 37 (odd: scalar), 4096 (the most held in registers), 4100 (two segments),
# 6 (fewer channels than one warp's lanes); 1200 rows give several row splits per channel tile.
PATH_CASES = [
    ((3, 7, 384), torch.bfloat16),
    ((2, 9, 37), torch.float32),
    ((2, 3, 4096), torch.float32),
    ((3, 4100), torch.float32),
    ((4, 5, 4100), torch.bfloat16),
    ((1200, 6), torch.float32),
    ((3, 400, 64), torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,dtype", PATH_CASES, ids=param_id)
def test_row_and_column_paths(shape, dtype, training, aligned, device):
    c = shape[-1]
    x = make_x(shape, dtype, device)
    if not aligned:
        x = misaligned(x)
    p = make_params(c, dtype, device, param_dtype=torch.float32)
    mask = make_mask(shape[:-1], device, "random")
    got, want = run_both(x, p, lam=0.4, training=training, mask=mask)
    check_results(got, want, x, p, training=training, ctx=f"{shape} {dtype} aligned={aligned}")


# ---- CUDA: launches, determinism, graph capture, too few kept tokens -------------------------------


def _fused_args(shape, dtype, training, mask_kind="random"):
    c = shape[-1]
    x = make_x(shape, dtype, "cuda")
    p = make_params(c, dtype, "cuda", param_dtype=torch.float32)
    mask = make_mask(shape[:-1], "cuda", mask_kind)
    return (
        x,
        p,
        mask,
        (
            x,
            p["norm_weight"],
            p["norm_bias"],
            p["bn_weight"],
            p["bn_bias"],
            p["alpha"],
            p["running_mean"],
            p["running_var"],
            0.4,
            training,
            1e-5,
            1e-6,
            "layer",
            mask,
        ),
    )


def _kernels(fn):
    """Names of the CUDA kernels `fn` runs (memsets and copies are not kernels)."""
    fn()  # warm-up: allocations and lazy initialisation stay out of the count
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memset", "Memcpy"))
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 196, 384), (2, 64, 4100)], ids=param_id)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_at_most_two_launches(shape, dtype, training, device):
    x, p, mask, args = _fused_args(shape, dtype, training)
    fwd = _kernels(lambda: OPS.prep_bn_forward(*args))
    assert len(fwd) <= (2 if training else 1), f"prep_bn_forward ran {len(fwd)} kernels: {fwd}"
    y, row_mean, row_rstd, bn_mean, bn_rstd, _ = OPS.prep_bn_forward(*args)
    dy = torch.randn_like(y)
    bwd = _kernels(
        lambda: OPS.prep_bn_backward(
            dy,
            x,
            p["norm_weight"],
            p["bn_weight"],
            p["alpha"],
            row_mean,
            row_rstd,
            bn_mean,
            bn_rstd,
            0.4,
            training,
            "layer",
            mask,
        )
    )
    assert len(bwd) <= 2, f"prep_bn_backward ran {len(bwd)} kernels: {bwd}"
    # The public op adds the in-place running-stat update in training (one _foreach_lerp_).
    params = [p[k] for k in PARAM_NAMES]
    public = _kernels(
        lambda: slab.ops.prep_bn(x, *params, p["running_mean"], p["running_var"], 0.4, training, mask=mask)
    )
    assert len(public) <= (3 if training else 1), f"slab.ops.prep_bn ran {len(public)} kernels: {public}"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_deterministic(device):
    x, p, mask, args = _fused_args((64, 196, 384), torch.bfloat16, True)
    a, b = OPS.prep_bn_forward(*args), OPS.prep_bn_forward(*args)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"prep_bn_forward output {i} differs between two runs"
    dy = torch.randn_like(a[0])
    bwd = lambda: OPS.prep_bn_backward(
        dy,
        x,
        p["norm_weight"],
        p["bn_weight"],
        p["alpha"],
        *a[1:5],
        0.4,
        True,  # noqa: E731
        "layer",
        mask,
    )
    for i, (u, v) in enumerate(zip(bwd(), bwd())):
        assert torch.equal(u, v), f"prep_bn_backward output {i} differs between two runs"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_masked_training_forward_in_cuda_graph(device):
    shape = (4, 50, 384)
    x, p, mask, _ = _fused_args(shape, torch.bfloat16, True)
    rm0, rv0 = p["running_mean"].clone(), p["running_var"].clone()
    params = [p[k] for k in PARAM_NAMES]

    def step():
        return slab.ops.prep_bn(x, *params, p["running_mean"], p["running_var"], 0.4, True, mask=mask)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises if anything syncs with the host
        y_graph = step()
    p["running_mean"].copy_(rm0), p["running_var"].copy_(rv0)
    graph.replay()
    torch.cuda.synchronize()
    rm_graph, rv_graph = p["running_mean"].clone(), p["running_var"].clone()
    p["running_mean"].copy_(rm0), p["running_var"].copy_(rv0)
    y_eager = step()
    assert torch.equal(y_graph, y_eager), "graph replay and eager forward differ"
    assert torch.equal(rm_graph, p["running_mean"]) and torch.equal(rv_graph, p["running_var"])


@pytest.mark.parametrize("kept", [0, 1])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_too_few_kept_tokens_give_nan_on_cuda(kept, device):
    """CUDA does not read the kept count to the host: < 2 kept tokens give NaN batch statistics
    (y, gradients, running statistics) instead of the CPU's RuntimeError."""
    x, p, _, _ = _fused_args((2, 5, 16), torch.float32, True)
    mask = torch.zeros(2, 5, dtype=torch.bool, device="cuda")
    mask.view(-1)[:kept] = True
    y = slab.ops.rep_bn(
        x, p["bn_weight"], p["bn_bias"], p["alpha"], p["running_mean"], p["running_var"], True, mask=mask
    )
    assert torch.isnan(y).all() and torch.isnan(p["running_var"]).all()
    with pytest.raises(RuntimeError, match="unmasked token"):
        slab.ops.rep_bn(
            x.cpu(),
            p["bn_weight"].cpu(),
            p["bn_bias"].cpu(),
            p["alpha"].cpu(),
            p["running_mean"].cpu(),
            p["running_var"].cpu(),
            True,
            mask=mask.cpu(),
        )
