"""Constructors and conversion helpers of slab.nn, slab.quant, slab.sparse and slab.deploy reject bad
sizes, hyperparameters and options with a ValueError that names the argument (not a torch error
from deep inside, or a silently odd module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import slab
from slab.deploy import DeployReport
from slab.nn import CATSMLP, PRepBN, RepBN, SimplifiedLinearAttention, SLACache, TokenSparseBlock, W4A8Linear

NAN, INF = float("nan"), float("inf")


class GatedMLP(nn.Module):
    def __init__(self, dim=4, hidden=8):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def mlp_model():
    return nn.Sequential(GatedMLP())


def cache(position):
    return SLACache(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, 3, 2), position)


# (argument name, the bad call); every call must raise ValueError naming the argument.
BAD = [
    ("channels", lambda: RepBN(-1)),
    ("channels", lambda: RepBN(0)),
    ("channels", lambda: RepBN(2.5)),
    ("channels", lambda: RepBN(True)),
    ("channels", lambda: RepBN("4")),
    ("eps", lambda: RepBN(4, eps=-1e-5)),
    ("eps", lambda: RepBN(4, eps=NAN)),
    ("momentum", lambda: RepBN(4, momentum=1.5)),
    ("momentum", lambda: RepBN(4, momentum=NAN)),
    ("alpha_init", lambda: RepBN(4, alpha_init=INF)),
    ("sync", lambda: RepBN(4, sync=1)),
    ("dim", lambda: PRepBN(0)),
    ("dim", lambda: PRepBN(True)),
    ("norm", lambda: PRepBN(4, norm="batch")),
    ("warm", lambda: PRepBN(4, warm=-1)),
    ("warm", lambda: PRepBN(4, warm=1.5)),
    ("step", lambda: PRepBN(4, step=-1)),
    ("step", lambda: PRepBN(4, step="10")),
    ("r0", lambda: PRepBN(4, r0=2.0)),
    ("r0", lambda: PRepBN(4, r0=NAN)),
    ("eps", lambda: PRepBN(4, eps=-1.0)),
    ("norm_eps", lambda: PRepBN(4, norm_eps=NAN)),
    ("norm_eps", lambda: PRepBN(4, norm_eps=None)),  # None only for RMSNorm
    ("alpha_init", lambda: PRepBN(4, alpha_init=NAN)),
    ("sync", lambda: PRepBN(4, sync="yes")),
    ("scale", lambda: slab.nn.ChannelAffine(torch.ones(4), torch.ones(3))),
    ("dim", lambda: SimplifiedLinearAttention(dim=0, num_heads=1)),
    ("dim", lambda: SimplifiedLinearAttention(dim=-4, num_heads=2)),
    ("num_heads", lambda: SimplifiedLinearAttention(32, 0)),
    ("num_heads", lambda: SimplifiedLinearAttention(32, True)),
    ("num_heads", lambda: SimplifiedLinearAttention(30, 4)),  # does not divide dim
    ("causal", lambda: SimplifiedLinearAttention(32, 4, causal="no")),
    ("qkv_bias", lambda: SimplifiedLinearAttention(32, 4, qkv_bias=1)),
    ("dwc_kernel_size", lambda: SimplifiedLinearAttention(32, 4, dwc_kernel_size=0)),
    ("dwc_kernel_size", lambda: SimplifiedLinearAttention(32, 4, dwc_kernel_size=4)),  # even, 2-D
    ("dwc_kernel_size", lambda: SimplifiedLinearAttention(32, 4, dwc_kernel_size=3.0)),
    ("num_tokens", lambda: SimplifiedLinearAttention(32, 4, num_tokens=0)),
    ("batch", lambda: SimplifiedLinearAttention(32, 4, causal=True, dwc_kernel_size=4).init_cache(0)),
    ("position", lambda: cache(-1)),
    ("decode_tokens", lambda: CATSMLP.from_mlp(GatedMLP(), 0.1, decode_tokens=17)),
    ("decode_tokens", lambda: CATSMLP.from_mlp(GatedMLP(), 0.1, decode_tokens=-1)),
    ("decode_tokens", lambda: CATSMLP.from_mlp(GatedMLP(), 0.1, decode_tokens=True)),
    ("threshold", lambda: CATSMLP.from_mlp(GatedMLP(), NAN)),
    ("threshold", lambda: CATSMLP.from_mlp(GatedMLP(), "0.1")),
    ("threshold", lambda: CATSMLP.from_mlp(GatedMLP(), True)),
    ("keep", lambda: TokenSparseBlock(nn.Identity(), keep=0)),
    ("keep", lambda: TokenSparseBlock(nn.Identity(), keep=-2)),
    ("keep", lambda: TokenSparseBlock(nn.Identity(), keep=0.0)),
    ("keep", lambda: TokenSparseBlock(nn.Identity(), keep=1.5)),
    ("keep", lambda: TokenSparseBlock(nn.Identity(), keep=True)),
    ("keep", lambda: TokenSparseBlock(nn.Identity(), keep="half")),
    ("in_features", lambda: W4A8Linear(0, 8)),
    ("in_features", lambda: W4A8Linear(63, 8)),  # two int4 codes per byte
    ("out_features", lambda: W4A8Linear(64, 0)),
    ("out_features", lambda: W4A8Linear(64, 8.0)),
    ("bias", lambda: W4A8Linear(64, 8, bias=1)),
    ("dtype", lambda: W4A8Linear(64, 8, dtype=torch.int32)),
    ("group_size", lambda: W4A8Linear(64, 8, group_size=48)),
    ("group_size", lambda: W4A8Linear(64, 8, group_size=True)),
    ("group_size", lambda: W4A8Linear(64, 8, group_size=32.0)),
    ("group_size", lambda: W4A8Linear(96, 8, group_size=64)),  # does not divide in_features
    ("group_size", lambda: W4A8Linear.from_linear(nn.Linear(64, 8), group_size=5)),
    ("group_size", lambda: slab.quant.quantize_w4(torch.randn(4, 64), group_size=64.0)),
    ("skip", lambda: slab.quant.convert(nn.Sequential(nn.Linear(64, 8)), skip=5)),
    ("skip", lambda: slab.quant.convert(nn.Sequential(nn.Linear(64, 8)), skip=["0", 1])),
    ("group_size", lambda: slab.quant.convert(nn.Sequential(nn.ReLU()), group_size=7)),
    ("bins", lambda: slab.sparse.StreamingHistogram(bins=7)),
    ("bins", lambda: slab.sparse.StreamingHistogram(bins=0)),
    ("bins", lambda: slab.sparse.StreamingHistogram(bins=64.0)),
    ("q", lambda: slab.sparse.StreamingHistogram(bins=4).quantile(NAN)),
    ("sparsity", lambda: slab.sparse.ThresholdCalibrator(mlp_model(), sparsity=1.0)),
    ("sparsity", lambda: slab.sparse.ThresholdCalibrator(mlp_model(), sparsity=NAN)),
    ("sparsity", lambda: slab.sparse.ThresholdCalibrator(mlp_model()).thresholds(sparsity=-0.5)),
    ("bins", lambda: slab.sparse.ThresholdCalibrator(mlp_model(), bins=3)),
    ("sparsity", lambda: slab.sparse.calibrate(mlp_model(), [], sparsity=2)),
    ("thresholds", lambda: slab.sparse.convert(mlp_model(), NAN)),
    ("thresholds", lambda: slab.sparse.convert(mlp_model(), True)),
    ("decode_tokens", lambda: slab.sparse.convert(mlp_model(), 0.1, decode_tokens=32)),
    ("inplace", lambda: slab.deploy(nn.Linear(2, 2).eval(), inplace=1)),
    ("return_report", lambda: slab.deploy(nn.Linear(2, 2).eval(), return_report="yes")),
    ("example_inputs", lambda: slab.deploy(nn.Linear(2, 2).eval(), example_inputs=5)),
]


@pytest.mark.parametrize("name, call", BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_bad_argument_raises_value_error_naming_it(name, call):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: slab.nn.convert_sync(5),
        lambda: CATSMLP(nn.Conv1d(4, 8, 1), None, torch.zeros(8, 4), None, 0.1),
        lambda: TokenSparseBlock(5),
        lambda: slab.quant.convert("model"),
        lambda: slab.sparse.find_mlps(None),
        lambda: slab.deploy(lambda x: x),
    ],
    ids=["convert_sync", "CATSMLP.gate", "TokenSparseBlock.block", "quant.convert", "find_mlps", "deploy"],
)
def test_wrong_module_type_raises_type_error(call):
    with pytest.raises(TypeError, match="must be|expected"):
        call()


def test_valid_constructions_still_work():
    assert RepBN(4).channels == 4 and RepBN(4, momentum=None).bn.momentum is None
    assert RepBN(np.int64(4)).channels == 4  # any integral size
    assert PRepBN(4).dim == 4 and PRepBN(4, norm="rms", norm_eps=None).norm1.eps is None
    assert PRepBN(4, warm=2, step=0, r0=0.5).current_lam() == 0.0
    assert SimplifiedLinearAttention(32, 4).head_dim == 8
    causal = SimplifiedLinearAttention(32, 4, causal=True, dwc_kernel_size=4, num_tokens=8)
    assert causal.init_cache(2).position == 0 and cache(3).position == 3
    assert CATSMLP.from_mlp(GatedMLP(), 0.1).decode_tokens == 16
    assert CATSMLP.from_mlp(GatedMLP(), torch.tensor(0.25), decode_tokens=0).threshold == 0.25
    assert TokenSparseBlock(nn.Identity()).keep == 0.5 and TokenSparseBlock(nn.Identity(), keep=3).keep == 3
    assert W4A8Linear(256, 8).group_size == 128
    assert W4A8Linear(64, 8, group_size=-1).scales.shape == (8, 1)
    assert W4A8Linear(64, 8, group_size=32, bias=False, dtype=torch.bfloat16).bias is None
    for skip in (None, "0", ["0"], ("1",), lambda name, mod: False):
        slab.quant.convert(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64)), skip=skip, group_size=32)
    assert slab.sparse.StreamingHistogram().bins == 4096
    with slab.sparse.ThresholdCalibrator(mlp_model(), sparsity=0.0, bins=2) as cal:
        assert cal.sparsity == 0.0
    assert isinstance(slab.sparse.convert(mlp_model(), 0.0)[0], CATSMLP)
    _, report = slab.deploy(
        nn.Sequential(nn.Linear(2, 2)).eval(), inplace=True, example_inputs=(torch.randn(3, 2),), return_report=True
    )
    assert isinstance(report, DeployReport)
