"""slab.optim under torch.distributed: parameters sharded by FSDP2 (DTensor, Shard(0), uneven and
empty shards), 2 processes on CPU with gloo. Every optimizer's sharded run must equal the
unsharded run of the same model (the norms are all-reduced). Run in float64 (the kernels accept
it) so the comparison is tight: in float32 the two runs' gradients drift apart by rounding alone,
since each run computes its gradients at its own iterate."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

OPTIMIZERS = [
    ("DoG", {"reps_rel": 1e-2}),
    ("LDoG", {"reps_rel": 1e-2, "weight_decay": 0.01}),
    ("Lion", {"lr": 1e-3, "weight_decay": 0.1}),
    ("LAMB", {"lr": 1e-2}),
    ("LARS", {"lr": 0.5}),
    ("AdamP", {"lr": 1e-2, "weight_decay": 0.1}),
]


def _model():
    torch.manual_seed(0)
    # (no bias before the BatchNorm: its gradient is rounding noise, which Adam-type rules
    # normalise into O(1) steps that differ between any two runs)
    return nn.Sequential(
        nn.Linear(7, 13, bias=False),
        nn.LayerNorm(13),
        nn.Tanh(),
        nn.Linear(13, 9, bias=False),
        nn.BatchNorm1d(9),
        nn.Tanh(),
        nn.Linear(9, 1),
        nn.Flatten(0),
    ).double()


def _worker(rank: int, world: int, store: str) -> None:
    import slab.optim
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for name, kw in OPTIMIZERS:
            cls = getattr(slab.optim, name)
            sharded, plain = _model(), _model()
            for m in sharded:
                if isinstance(m, nn.Linear):
                    fully_shard(m)
            fully_shard(sharded)
            o_sh, o_pl = cls(sharded.parameters(), **kw), cls(plain.parameters(), **kw)
            for t in range(5):
                g = torch.Generator().manual_seed(t)  # the same batch on every rank
                x = torch.randn(16, 7, generator=g, dtype=torch.float64)
                y = torch.randn(16, generator=g, dtype=torch.float64)
                for model, opt in ((sharded, o_sh), (plain, o_pl)):
                    opt.zero_grad()
                    ((model(x) - y) ** 2).mean().backward()
                    opt.step()
            for (n, p), q in zip(sharded.named_parameters(), plain.parameters()):
                full = p.full_tensor().detach()
                scale = float(q.detach().abs().max())
                err = float((full - q.detach()).abs().max())
                assert err <= 1e-10 * max(scale, 1e-3), f"{name} {n}: max error {err:.3g} (scale {scale:.3g})"
                assert float((full - _model().state_dict()[n]).abs().max()) > 0, f"{name} {n} did not move"
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp2_sharded_equals_unsharded():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "store")), nprocs=2, join=True)
