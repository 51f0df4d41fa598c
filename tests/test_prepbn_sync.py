"""Data-parallel RepBN / PRepBN (sync=True): 2 gloo processes on CPU against one process.

One global batch is cut along its first dimension into two (often uneven) slices, one per rank.
With synchronised statistics every rank must produce the rows of y and dx that a single-process
``slab.ops.rep_bn`` / ``slab.ops.prep_bn`` gives on the whole batch; the per-rank parameter
gradients must sum to the single-process ones (DDP reduces them); running statistics must be
identical on both ranks and equal to the single-process update.  All cases run in ONE spawn of
two processes (a module-scoped fixture) to keep the file fast; each case is then its own test.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import slab
import slab.ops
from slab.nn._sync import prep_bn_sync

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available",
    ),
]

WORLD = 2
PARAMS = ("norm_weight", "norm_bias", "bn_weight", "bn_bias", "alpha")


# ------------------------------------------------------------------------------------------------
# cases: (shape, split of dim 0, norm, lam, mask kind, ...), built deterministically from a seed so
# that the parent and both children construct bit-identical tensors.
CASES = {
    # RepBN (norm="none"), uneven split, random padding mask
    "repbn_uneven_mask": dict(shape=(7, 5, 13), split=(4, 3), norm="none", lam=0.0, mask="random"),
    # RepBN, rank 1 keeps a single token
    "repbn_one_kept_on_rank1": dict(shape=(6, 4, 13), split=(3, 3), norm="none", lam=0.0, mask="few"),
    # RepBN, rank 1 keeps no token at all (its tokens are still normalised and get gradients)
    "repbn_zero_kept_on_rank1": dict(shape=(6, 4, 9), split=(3, 3), norm="none", lam=0.0, mask="none_on_1"),
    # RepBN, 2-D tokens, no mask, very uneven, non-contiguous local x, 0-d alpha
    "repbn_2d_nomask_noncontig": dict(
        shape=(11, 6), split=(9, 2), norm="none", lam=0.0, mask=None, noncontig=True, alpha_shape=()
    ),
    # PRepBN with LayerNorm (weight and bias), uneven split, mask, large mean offset
    "layer_uneven_mask": dict(shape=(5, 7, 24), split=(2, 3), norm="layer", lam=0.35, mask="random", offset=30.0),
    # PRepBN with LayerNorm without bias, rank 1 keeps one token, explicit process group
    "layer_nobias_few_group": dict(
        shape=(4, 6, 17), split=(3, 1), norm="layer", lam=0.6, mask="few", norm_bias=False, group=True
    ),
    # PRepBN with RMSNorm
    "rms_mask": dict(shape=(6, 5, 16), split=(2, 4), norm="rms", lam=0.5, mask="random", norm_bias=False),
    # bfloat16 activations and parameters (statistics still float32)
    "layer_bf16": dict(shape=(4, 6, 16), split=(1, 3), norm="layer", lam=0.4, mask="random", dtype=torch.bfloat16),
    # float64 end to end (tight tolerance)
    "layer_f64": dict(shape=(5, 3, 12), split=(3, 2), norm="layer", lam=0.25, mask="random", dtype=torch.float64),
}
# A global batch with a single kept token must raise ValueError on every rank (no deadlock).
ERROR_CASE = dict(shape=(2, 3, 8), split=(1, 1), norm="none", lam=0.0, mask="one_total")


def make_case(name: str, spec: dict) -> dict:
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919)
    dtype = spec.get("dtype", torch.float32)
    shape = spec["shape"]
    C = shape[-1]
    offset = spec.get("offset", 1.5)
    x = (
        torch.randn(shape, generator=g, dtype=torch.float64) * 2.0
        + offset
        + torch.randn(C, generator=g, dtype=torch.float64)
    ).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    tok = shape[:-1]
    kind = spec.get("mask")
    if kind is None:
        mask = None
    else:
        mask = torch.rand(tok, generator=g) < 0.7
        s0 = spec["split"][0]
        if kind == "few":  # rank 1 keeps exactly one token
            mask[s0:] = False
            mask[s0:].view(-1)[1] = True
            mask[:s0].view(-1)[:2] = True
        elif kind == "none_on_1":
            mask[s0:] = False
            mask[:s0].view(-1)[:2] = True
        elif kind == "one_total":
            mask[:] = False
            mask.view(-1)[0] = True
        else:
            mask[:s0].view(-1)[0] = True
            mask[s0:].view(-1)[0] = True
    norm = spec["norm"]
    has_norm = norm != "none"

    def rnd(scale, shift=0.0):
        return (shift + scale * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)

    p = dict(
        norm_weight=rnd(0.3, 1.0) if has_norm else None,
        norm_bias=rnd(0.2) if norm == "layer" and spec.get("norm_bias", True) else None,
        bn_weight=rnd(0.3, 1.0),
        bn_bias=rnd(0.2),
        alpha=torch.full(spec.get("alpha_shape", (1,)), 0.7, dtype=dtype),
    )
    running_mean = (0.1 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    running_var = (0.5 + torch.rand(C, generator=g, dtype=torch.float64)).to(dtype)
    return dict(
        x=x,
        dy=dy,
        mask=mask,
        params=p,
        running_mean=running_mean,
        running_var=running_var,
        norm=norm,
        lam=spec["lam"],
        momentum=0.1,
        eps=1e-5,
        norm_eps=1e-6,
        split=spec["split"],
        noncontig=spec.get("noncontig", False),
        group=spec.get("group", False),
    )


def rank_slice(case: dict, rank: int) -> slice:
    start = sum(case["split"][:rank])
    return slice(start, start + case["split"][rank])


# ------------------------------------------------------------------------------------------------
# the two ranks
def _run_sync_case(case: dict, rank: int, group) -> dict:
    sl = rank_slice(case, rank)
    x = case["x"][sl].clone()
    if case["noncontig"]:
        x = x.t().contiguous().t()
        assert not x.is_contiguous()
    x.requires_grad_(True)
    mask = None if case["mask"] is None else case["mask"][sl].clone()
    params = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in case["params"].items()}
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    y = prep_bn_sync(
        x,
        params["norm_weight"],
        params["norm_bias"],
        params["bn_weight"],
        params["bn_bias"],
        params["alpha"],
        rm,
        rv,
        case["lam"],
        case["momentum"],
        case["eps"],
        case["norm_eps"],
        case["norm"],
        mask,
        group,
    )
    y.backward(case["dy"][sl])
    out = dict(
        y=y.detach(), dx=x.grad, running_mean=rm, running_var=rv, stats_in_graph=rm.requires_grad or rv.requires_grad
    )
    for k, v in params.items():
        out["d_" + k] = None if v is None else v.grad
    return out


def _module_case(rank: int) -> dict:
    """RepBN(sync=True) directly, and a Linear + PRepBN model made sync by convert_sync."""
    import slab.nn as snn

    C, split = 10, (5, 2)
    g = torch.Generator().manual_seed(1234)
    x_full = torch.randn(7, 4, C, generator=g) * 1.5 + 0.5
    dy_full = torch.randn(7, 4, C, generator=g)
    mask_full = torch.rand(7, 4, generator=g) < 0.6
    mask_full[5:].view(-1)[0] = True
    start = sum(split[:rank])
    sl = slice(start, start + split[rank])
    out = {}

    torch.manual_seed(0)
    rep = snn.RepBN(C, sync=True)
    with torch.no_grad():
        rep.alpha.fill_(0.8)
        rep.bn.weight.uniform_(0.5, 1.5)
        rep.bn.bias.uniform_(-0.3, 0.3)
    rep.train()
    x = x_full[sl].clone().requires_grad_(True)
    y = rep(x, mask=mask_full[sl])
    y.backward(dy_full[sl])
    out["repbn"] = dict(
        y=y.detach(),
        dx=x.grad,
        state={k: v.clone() for k, v in rep.state_dict().items()},
        grads={n: p.grad.clone() for n, p in rep.named_parameters()},
    )

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(C, C), snn.PRepBN(C, norm="layer", warm=0, step=10))
    model = snn.convert_sync(model)
    model.train()
    x = x_full[sl].clone().requires_grad_(True)
    ys = []
    for _ in range(2):  # two steps: lam moves with the schedule
        y = model[1](model[0](x), mask=mask_full[sl])
        y.backward(dy_full[sl])
        ys.append(y.detach())
    out["prepbn"] = dict(
        y=torch.stack(ys),
        dx=x.grad,
        state={k: v.clone() for k, v in model.state_dict().items()},
        grads={n: p.grad.clone() for n, p in model.named_parameters()},
    )
    return out


def _worker(rank: int, world: int, init_file: str, outdir: str, names: list, with_modules: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method="file://" + init_file, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    results = {}
    try:
        group = dist.new_group(list(range(world)))
        for name in names:
            case = make_case(name, CASES[name])
            results[name] = _run_sync_case(case, rank, group if case["group"] else None)
        # too few kept tokens in the global batch: ValueError on every rank
        case = make_case("error", ERROR_CASE)
        try:
            _run_sync_case(case, rank, None)
            results["error"] = dict(raised=None)
        except ValueError as e:
            results["error"] = dict(raised=str(e))
        if with_modules:
            try:
                results["modules"] = _module_case(rank)
            except Exception:  # report in the parent's test, not as a spawn failure
                results["modules"] = dict(failed=traceback.format_exc())
        dist.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _modules_available() -> bool:
    try:
        import slab.nn as snn
    except Exception:
        return False
    return all(hasattr(snn, n) for n in ("RepBN", "PRepBN", "convert_sync"))


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepbn_sync")
    init_file = str(d / "init")
    mp.spawn(_worker, args=(WORLD, init_file, str(d), list(CASES), _modules_available()), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------
# single-process references
def _single_process(case: dict) -> dict:
    x = case["x"].clone().requires_grad_(True)
    params = {k: (None if v is None else v.clone().requires_grad_(True)) for k, v in case["params"].items()}
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    if case["norm"] == "none":
        y = slab.ops.rep_bn(
            x,
            params["bn_weight"],
            params["bn_bias"],
            params["alpha"],
            rm,
            rv,
            True,
            momentum=case["momentum"],
            eps=case["eps"],
            mask=case["mask"],
        )
    else:
        y = slab.ops.prep_bn(
            x,
            params["norm_weight"],
            params["norm_bias"],
            params["bn_weight"],
            params["bn_bias"],
            params["alpha"],
            rm,
            rv,
            case["lam"],
            True,
            momentum=case["momentum"],
            eps=case["eps"],
            norm_eps=case["norm_eps"],
            norm=case["norm"],
            mask=case["mask"],
        )
    y.backward(case["dy"])
    out = dict(y=y.detach(), dx=x.grad, running_mean=rm, running_var=rv)
    for k, v in params.items():
        out["d_" + k] = None if v is None else v.grad
    return out


def _torch_reference(case: dict) -> dict:
    """Plain-torch float64 composite on the whole batch (independent of slab's kernels)."""
    x = case["x"].double().clone().requires_grad_(True)
    p = {k: (None if v is None else v.double().clone().requires_grad_(True)) for k, v in case["params"].items()}
    C = x.shape[-1]
    flat = x.reshape(-1, C)
    kept = flat if case["mask"] is None else flat[case["mask"].reshape(-1)]
    mean = kept.mean(0)
    var = kept.var(0, unbiased=False)
    rep = (x - mean) / torch.sqrt(var + case["eps"]) * p["bn_weight"] + p["bn_bias"] + p["alpha"] * x
    lam = case["lam"]
    if case["norm"] == "layer":
        n1 = torch.nn.functional.layer_norm(x, (C,), p["norm_weight"], p["norm_bias"], case["norm_eps"])
    elif case["norm"] == "rms":
        n1 = torch.nn.functional.rms_norm(x, (C,), p["norm_weight"], case["norm_eps"])
    else:
        n1 = torch.zeros_like(x)
    y = lam * n1 + (1 - lam) * rep
    y.backward(case["dy"].double())
    n = kept.shape[0]
    m = case["momentum"]
    out = dict(
        y=y.detach(),
        dx=x.grad,
        running_mean=(1 - m) * case["running_mean"].double() + m * mean.detach(),
        running_var=(1 - m) * case["running_var"].double() + m * var.detach() * n / (n - 1),
    )
    for k, v in p.items():
        out["d_" + k] = None if v is None else v.grad
    return out


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    if dtype == torch.float32:
        return dict(rtol=2e-5, atol=2e-5)
    return dict(rtol=1.6e-2, atol=2e-2)  # bf16 / fp16 outputs: a rounding step apart at most


def _close(got, want, what, **tol):
    if want is None:
        assert got is None, f"{what}: expected no gradient, got one"
        return
    assert got is not None, f"{what}: gradient missing"
    torch.testing.assert_close(got, want.to(got.dtype), msg=lambda m: f"{what}: {m}", **tol)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_sync_equals_single_process(sync_results, name):
    case = make_case(name, CASES[name])
    ref = _single_process(case)
    tol = _tol(case["x"].dtype)
    for r in range(WORLD):
        got = sync_results[r][name]
        sl = rank_slice(case, r)
        _close(got["y"], ref["y"][sl], f"rank {r} y", **tol)
        _close(got["dx"], ref["dx"][sl], f"rank {r} dx", **tol)
        assert got["y"].dtype == case["x"].dtype and got["dx"].dtype == case["x"].dtype
        _close(got["running_mean"], ref["running_mean"], f"rank {r} running_mean", **tol)
        _close(got["running_var"], ref["running_var"], f"rank {r} running_var", **tol)
        assert not got["stats_in_graph"], f"rank {r}: running stats were attached to the autograd graph"
    # running stats bit-identical across ranks (buffers stay in sync without a broadcast)
    for k in ("running_mean", "running_var"):
        assert torch.equal(sync_results[0][name][k], sync_results[1][name][k]), f"{k} differs across ranks"
    # parameter gradients: local per rank, their sum (what DDP all-reduces) is the global gradient
    for k in PARAMS:
        want = ref["d_" + k]
        got = [sync_results[r][name]["d_" + k] for r in range(WORLD)]
        if want is None:
            assert all(gr is None for gr in got), f"d_{k}: expected no gradient"
            continue
        assert got[0].shape == want.shape
        _close(got[0] + got[1], want, f"sum over ranks of d_{k}", **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_sync_matches_float64_composite(sync_results, name):
    """Independent check of the concatenated result against a plain-torch float64 composite."""
    case = make_case(name, CASES[name])
    ref = _torch_reference(case)
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}.get(
        case["x"].dtype, dict(rtol=3e-2, atol=5e-2)
    )
    for k in ("y", "dx"):
        got = torch.cat([sync_results[r][name][k] for r in range(WORLD)])
        _close(got.double(), ref[k], k, **tol)
    for k in ("running_mean", "running_var"):
        _close(sync_results[0][name][k].double(), ref[k], k, **tol)
    for k in PARAMS:
        if ref["d_" + k] is not None:
            got = sync_results[0][name]["d_" + k] + sync_results[1][name]["d_" + k]
            _close(got.double(), ref["d_" + k], f"d_{k}", **tol)


def test_sync_too_few_kept_tokens_raises_on_every_rank(sync_results):
    for r in range(WORLD):
        msg = sync_results[r]["error"]["raised"]
        assert msg is not None, f"rank {r}: no ValueError for a global batch with one kept token"
        assert "Expected more than 1 value per channel" in msg


def test_sync_without_process_group_is_single_process():
    """Not initialised -> no collective: equals the fused single-process op."""
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    name = "layer_uneven_mask"
    case = make_case(name, CASES[name])
    case["split"] = (case["x"].shape[0],)
    got = _run_sync_case(case, 0, None)
    ref = _single_process(case)
    tol = _tol(case["x"].dtype)
    for k in ("y", "dx", "running_mean", "running_var") + tuple("d_" + p for p in PARAMS):
        _close(got[k], ref[k], k, **tol)


def test_sync_bad_arguments():
    x = torch.randn(4, 3)
    w, b, a = torch.ones(3), torch.zeros(3), torch.ones(1)
    with pytest.raises(ValueError, match="norm"):
        prep_bn_sync(x, None, None, w, b, a, None, None, 0.0, 0.1, 1e-5, 1e-6, "batch", None)
    with pytest.raises(ValueError, match="lam"):
        prep_bn_sync(x, None, None, w, b, a, None, None, 0.5, 0.1, 1e-5, 1e-6, "none", None)
    with pytest.raises(ValueError, match="norm_bias"):
        prep_bn_sync(x, w, b, w, b, a, None, None, 0.5, 0.1, 1e-5, 1e-6, "rms", None)


def test_sync_modules(sync_results):
    if "modules" not in sync_results[0]:
        pytest.skip(
            "slab.nn.RepBN / PRepBN / convert_sync are not there yet (python/slab/nn is written by another helper)"
        )
    for r in range(WORLD):
        assert "failed" not in sync_results[r]["modules"], sync_results[r]["modules"].get("failed")
    import slab.nn as snn

    C, split = 10, (5, 2)
    g = torch.Generator().manual_seed(1234)
    x_full = torch.randn(7, 4, C, generator=g) * 1.5 + 0.5
    dy_full = torch.randn(7, 4, C, generator=g)
    mask_full = torch.rand(7, 4, generator=g) < 0.6
    mask_full[5:].view(-1)[0] = True
    tol = dict(rtol=2e-5, atol=2e-5)

    torch.manual_seed(0)
    rep = snn.RepBN(C)
    with torch.no_grad():
        rep.alpha.fill_(0.8)
        rep.bn.weight.uniform_(0.5, 1.5)
        rep.bn.bias.uniform_(-0.3, 0.3)
    rep.train()
    x = x_full.clone().requires_grad_(True)
    y = rep(x, mask=mask_full)
    y.backward(dy_full)
    ref_rep = dict(
        y=y.detach(), dx=x.grad, state=rep.state_dict(), grads={n: p.grad for n, p in rep.named_parameters()}
    )

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(C, C), snn.PRepBN(C, norm="layer", warm=0, step=10))
    model.train()
    x = x_full.clone().requires_grad_(True)
    ys = []
    for _ in range(2):
        y = model[1](model[0](x), mask=mask_full)
        y.backward(dy_full)
        ys.append(y.detach())
    ref_pre = dict(
        y=torch.stack(ys), dx=x.grad, state=model.state_dict(), grads={n: p.grad for n, p in model.named_parameters()}
    )

    for key, ref, dim in (("repbn", ref_rep, 0), ("prepbn", ref_pre, 1)):
        for r in range(WORLD):
            got = sync_results[r]["modules"][key]
            start = sum(split[:r])
            idx = [slice(None)] * dim + [slice(start, start + split[r])]
            _close(got["y"], ref["y"][tuple(idx)], f"{key} rank {r} y", **tol)
            _close(got["dx"], ref["dx"][start : start + split[r]], f"{key} rank {r} dx", **tol)
            assert set(got["state"]) == set(ref["state"]), f"{key}: state_dict keys differ"
            for k, v in ref["state"].items():
                if v.is_floating_point():
                    _close(got["state"][k], v, f"{key} rank {r} state {k}", **tol)
                else:
                    assert torch.equal(got["state"][k], v), f"{key} rank {r} state {k}"
        for n, want in ref["grads"].items():
            total = sync_results[0]["modules"][key]["grads"][n] + sync_results[1]["modules"][key]["grads"][n]
            _close(total, want, f"{key} sum over ranks of grad {n}", **tol)
