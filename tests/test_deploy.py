"""slab.deploy: folding eval-mode RepBN/PRepBN into the next Linear, Conv/Linear + BatchNorm pairs,
ChannelAffine for norms that cannot fold; outputs equal to the unfolded eval model."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import slab  # noqa: F401  (loads the op library)
from slab.deploy import deploy
from slab.nn import ChannelAffine, PRepBN, RepBN, SimplifiedLinearAttention

NORMS = (RepBN, PRepBN, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats / affine params / alpha in every norm, so nothing folds trivially."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.3)
            m.weight.copy_(1 + 0.4 * torch.randn(m.num_features, generator=g))
            m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
        if isinstance(m, RepBN):
            m.alpha.copy_(torch.rand(1, generator=g) + 0.2)
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.4 * torch.randn(m.weight.shape, generator=g))
    return model


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def count(model: nn.Module, types) -> int:
    return sum(isinstance(m, types) for m in model.modules())


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(snap)
    for k, v in snap.items():
        assert torch.equal(state[k], v), f"{k} changed"


# ------------------------------------------------------------------------------------------------
# A small ViT-style model
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, norm):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ResidualNormBlock(nn.Module):
    """The norm output feeds both a Linear and the residual add: it cannot fold."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RepBN(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.norm(x)
        return y + self.fc(y)


class TinyViT(nn.Module):
    def __init__(self, dim=32, heads=4, depth=2, classes=10, in_dim=12):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, lambda d: PRepBN(d, step=10)) for _ in range(depth)])
        self.res = ResidualNormBlock(dim)
        self.norm = PRepBN(dim, step=10)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.res(x)
        return self.head(self.norm(x).mean(1))  # norm -> mean -> Linear: not a Linear consumer


def vit(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return randomize(TinyViT(), seed).to(dtype).eval()


def test_vit_block_folds_and_matches():
    model = vit()
    x = torch.randn(3, 9, 12)
    with torch.no_grad():
        ref = model(x)
    snap = snapshot(model)

    dep = deploy(model)
    assert isinstance(dep, fx.GraphModule)
    # norm1 -> qkv and norm2 -> fc1 folded in every block; the residual-fed RepBN and the final norm
    # (feeding a mean) became ChannelAffine; nothing else is left.
    assert count(dep, (RepBN, PRepBN)) == 0
    assert count(dep, ChannelAffine) == 2
    assert isinstance(dep.res.norm, ChannelAffine) and isinstance(dep.norm, ChannelAffine)
    for i in range(2):

        def weight(m, name):
            return m.get_submodule(f"blocks.{i}.{name}").weight

        assert not torch.equal(weight(dep, "attn.qkv"), weight(model, "attn.qkv"))
        assert not torch.equal(weight(dep, "mlp.0"), weight(model, "mlp.0"))
        assert torch.equal(weight(dep, "attn.proj"), weight(model, "attn.proj"))
    with torch.no_grad():
        out = dep(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)

    # the original is untouched and still computes the same thing
    assert_same_state(model, snap)
    assert count(model, PRepBN) == 5 and count(model, ChannelAffine) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


def test_vit_fold_is_exact_in_float64():
    """In float64 the only difference is rounding: a wrong fold formula cannot hide here."""
    model = vit(seed=3, dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        out = deploy(model)(x)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


def test_repbn_into_linear_without_bias_and_standalone():
    """A Linear without bias gets one (b' = W @ t); a bare norm deploys to its ChannelAffine."""
    torch.manual_seed(1)
    model = randomize(nn.Sequential(RepBN(8), nn.Linear(8, 5, bias=False)), 1).eval()
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        ref = model(x)
        dep = deploy(model)
        assert count(dep, RepBN) == 0 and dep.get_submodule("1").bias is not None
        assert rel_err(dep(x), ref) < 1e-5

        norm = randomize(PRepBN(8), 2).eval()
        aff = deploy(norm)
        assert isinstance(aff, ChannelAffine)
        assert rel_err(aff(x), norm(x)) < 1e-5


def test_deploy_twice_and_inplace():
    model = vit(seed=5)
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        ref = model(x)
        once = deploy(model, inplace=True)
        twice = deploy(once)
        assert count(twice, ChannelAffine) == 2
        assert rel_err(once(x), ref) < 1e-5
        assert rel_err(twice(x), ref) < 1e-5


def test_training_mode():
    model = vit()
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        deploy(model)

    # a submodule deliberately left training inside an eval model is left alone
    model.eval()
    model.blocks[0].norm1.train()
    dep = deploy(model)
    kept = dep.get_submodule("blocks.0.norm1")
    assert isinstance(kept, PRepBN) and kept.training
    assert torch.equal(dep.get_submodule("blocks.0.attn.qkv").weight, model.blocks[0].attn.qkv.weight)
    assert count(dep, PRepBN) == 1
    assert not torch.equal(dep.get_submodule("blocks.0.mlp.0").weight, model.blocks[0].mlp[0].weight)
    x = torch.randn(2, 6, 12)
    with torch.no_grad():  # both copies take the same batch-statistics step
        assert rel_err(dep(x), model(x)) < 1e-5
    assert torch.allclose(kept.norm2.bn.running_mean, model.blocks[0].norm1.norm2.bn.running_mean)


def test_tied_weight_is_not_modified():
    """Folding creates new parameters: a weight shared with an embedding keeps its value."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.norm = PRepBN(8, alpha_init=0.0)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.norm(self.emb(ids)))

    torch.manual_seed(0)
    model = randomize(LM(), 4).eval()
    ids = torch.randint(0, 20, (2, 6))
    emb_before = model.emb.weight.detach().clone()
    with torch.no_grad():
        ref = model(ids)
        dep = deploy(model, inplace=True)
        assert count(dep, PRepBN) == 0
        assert torch.equal(dep.emb.weight, emb_before)
        assert rel_err(dep(ids), ref) < 1e-5


def test_shared_linear_is_not_folded():
    """A Linear that is also called elsewhere (or whose weight is read directly) keeps its weights."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RepBN(8)
            self.fc = nn.Linear(8, 8)
            self.norm2 = PRepBN(8)
            self.fc2 = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(self.norm(x)) + self.fc(x)
            return self.fc2(self.norm2(y)) + y @ self.fc2.weight.t()

    torch.manual_seed(0)
    model = randomize(Shared(), 6).eval()
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        ref = model(x)
        dep = deploy(model)
        assert torch.equal(dep.fc.weight, model.fc.weight)
        assert torch.equal(dep.fc2.weight, model.fc2.weight)
        assert isinstance(dep.norm, ChannelAffine) and isinstance(dep.norm2, ChannelAffine)
        assert rel_err(dep(x), ref) < 1e-5


class PreNormBlock(nn.Module):
    """``x + SLA(norm1(x))``, ``x + down(silu(gate(norm2(x))) * up(norm2(x)))``: every norm feeds
    only Linears (the attention reads its input through its qkv Linear alone)."""

    def __init__(self, dim=8, causal=False):
        super().__init__()
        self.norm1, self.norm2 = PRepBN(dim), RepBN(dim)
        self.attn = SimplifiedLinearAttention(dim, 2, causal=causal, dwc_kernel_size=3)
        self.gate, self.up, self.down = nn.Linear(dim, 16, bias=False), nn.Linear(dim, 16), nn.Linear(16, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


@pytest.mark.parametrize("causal", [False, True])
def test_norm_folds_into_every_linear_and_the_attention_qkv(causal):
    model = randomize(PreNormBlock(causal=causal), 21).double().eval()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    dep, report = deploy_checked(model, x)
    assert sorted(report.folded) == [("norm1", "attn.qkv"), ("norm2", "gate, up")]
    assert report.converted == [] and report.left == []
    assert count(dep, (RepBN, PRepBN, ChannelAffine)) == 0
    assert dep.gate.bias is not None  # the affine's shift became a bias
    assert not torch.equal(dep.attn.qkv.weight, model.attn.qkv.weight)


def test_norm_with_a_non_linear_consumer_is_not_folded_anywhere():
    """One consumer that is not a Linear keeps the norm (as a ChannelAffine) for all of them."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc, self.attn = RepBN(8), nn.Linear(8, 8), SimplifiedLinearAttention(8, 2)

        def forward(self, x):
            h = self.norm(x)
            return self.fc(h) + self.attn(x, mask=h[..., 0] > 0)  # the attention reads h as its mask

    model = randomize(Mixed(), 22).double().eval()
    dep, report = deploy_checked(model, torch.randn(2, 9, 8, dtype=torch.float64))
    assert report.folded == [] and isinstance(dep.norm, ChannelAffine)
    assert torch.equal(dep.fc.weight, model.fc.weight) and torch.equal(dep.attn.qkv.weight, model.attn.qkv.weight)


# ------------------------------------------------------------------------------------------------
# Conv-BN CNN (Efficient ConvBN)
# ------------------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)  # conv3's output is also the skip: cannot fold
        self.fc = nn.Linear(8, 16)
        self.bn4 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        x = F.relu(self.bn3(y) + y)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.out(F.relu(self.bn4(self.fc(x))))


def test_conv_bn_cnn_folds_and_matches():
    torch.manual_seed(0)
    model = randomize(TinyCNN(), 7).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
    snap = snapshot(model)
    dep = deploy(model)
    assert isinstance(dep, fx.GraphModule)
    bns = [n for n, m in dep.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns == ["bn3"]
    assert dep.conv2.bias is not None  # the BN shift became the conv bias
    assert torch.equal(dep.conv3.weight, model.conv3.weight)
    with torch.no_grad():
        out = dep(x)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert_same_state(model, snap)
    assert count(model, nn.BatchNorm2d) == 3


def test_prepbn_linear_bn1d_chain():
    """norm -> Linear -> BatchNorm1d: both folds land on the same Linear (example_inputs prove the
    Linear output is 2-D; the graph alone cannot, as the model input could be (N, L, C))."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(PRepBN(6), nn.Linear(6, 7), nn.BatchNorm1d(7), nn.ReLU()), 9).eval()
    x = torch.randn(11, 6)
    with torch.no_grad():
        ref = model(x)
        dep, report = deploy(model, example_inputs=x, return_report=True)
        assert count(dep, NORMS) == 0 and count(dep, ChannelAffine) == 0
        assert rel_err(dep(x), ref) < 1e-5
    assert sorted(report.folded) == [("0", "1"), ("2", "1")] and not report.left and not report.converted

    with pytest.warns(UserWarning, match="example_inputs"):
        dep, report = deploy(model, return_report=True)
    assert report.folded == [("0", "1")]
    assert [k.norm for k in report.left] == ["2"] and "rank is unknown" in report.left[0].reason
    with torch.no_grad():
        assert rel_err(dep(x), ref) < 1e-5


# ------------------------------------------------------------------------------------------------
# A BN folds only where it normalises the layer's output channels (BN normalises dim 1)
# ------------------------------------------------------------------------------------------------
def deploy_checked(model, x, **kwargs):
    """deploy(model) with its report; the deployed model must compute what the model does."""
    with torch.no_grad():
        ref = model(x)
        dep, report = deploy(model, return_report=True, **kwargs)
        assert rel_err(dep(x), ref) < 1e-12, rel_err(dep(x), ref)
    return dep, report


def left_reason(report, name: str) -> str:
    reasons = [k.reason for k in report.left if k.norm == name]
    assert reasons, f"{name} is not reported as left: {report}"
    return reasons[0]


def test_linear_bn1d_over_tokens_is_left():
    """Linear(8, 6) on (N, L, 8) tokens, then BatchNorm1d(L) with L = 6 = out_features: the BN
    normalises the L positions (dim 1), not the Linear's features, so folding it is wrong."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)), 12).double().eval()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="example_inputs"):
        dep, report = deploy_checked(model, x)
    assert report.folded == [] and "rank is unknown" in left_reason(report, "1")
    dep, report = deploy_checked(model, x, example_inputs=x)
    assert count(dep, nn.BatchNorm1d) == 1 and report.folded == []
    assert "3-D" in left_reason(report, "1")

    # the same layers on a 2-D (N, C) input: the BN normalises the features and folds exactly
    x2 = torch.randn(5, 8, dtype=torch.float64)
    dep, report = deploy_checked(model, x2, example_inputs=(x2,))
    assert count(dep, nn.BatchNorm1d) == 0 and report.folded == [("1", "0")] and report.left == []


class Head(nn.Module):
    """pool -> 2-D (N, C) by one of several spellings -> Linear -> BatchNorm1d."""

    def __init__(self, flat):
        super().__init__()
        self.flat = flat
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(self.flat(self, x)))


FLATS = {
    "torch.flatten": lambda m, x: torch.flatten(x, 1),
    "Tensor.flatten": lambda m, x: x.flatten(start_dim=1),
    "nn.Flatten": lambda m, x: m.flatten(x),
    "view": lambda m, x: x.view(x.size(0), -1),
    "reshape": lambda m, x: x.reshape((x.shape[0], 12)),
}


@pytest.mark.parametrize("flat", FLATS, ids=str)
def test_linear_bn1d_folds_where_the_graph_proves_2d(flat):
    torch.manual_seed(0)
    model = randomize(Head(FLATS[flat]), 13).double().eval()
    dep, report = deploy_checked(model, torch.randn(3, 3, 2, 2, dtype=torch.float64))
    assert report.folded == [("bn", "fc")] and count(dep, nn.BatchNorm1d) == 0


def test_linear_bn1d_left_where_the_graph_proves_nothing():
    torch.manual_seed(0)
    model = randomize(Head(lambda m, x: torch.flatten(x, 2).mean(-1)), 13).double().eval()  # (N, 12)
    x = torch.randn(3, 12, 2, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="example_inputs"):
        _, report = deploy_checked(model, x)
    assert "rank is unknown" in left_reason(report, "bn")
    _, report = deploy_checked(model, x, example_inputs=x)
    assert report.folded == [("bn", "fc")]


class ConvThenBN(nn.Module):
    def __init__(self, conv, bn, between=lambda y: y):
        super().__init__()
        self.conv, self.bn, self.between = conv, bn, between

    def forward(self, x):
        return self.bn(self.between(self.conv(x)))


def test_conv_bn_after_a_transpose_is_left():
    """Conv1d(4, 6) -> transpose -> BatchNorm1d(6): num_features matches out_channels, but the BN
    normalises the 6 positions."""
    torch.manual_seed(0)
    model = ConvThenBN(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6), lambda y: y.transpose(1, 2))
    model = randomize(model, 14).double().eval()
    _, report = deploy_checked(model, torch.randn(2, 4, 6, dtype=torch.float64))
    assert report.folded == [] and "transpose" in left_reason(report, "bn")


@pytest.mark.parametrize("kind", ["bn1d", "sync"])
def test_unbatched_conv_then_bn_is_left(kind):
    """An unbatched conv gives (C, L) / (C, H, W): BatchNorm1d / SyncBatchNorm normalise dim 1 = L / H,
    which equals C here, so the old check (num_features == out_channels) folded it wrongly."""
    torch.manual_seed(0)
    if kind == "bn1d":
        conv, bn, x = nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), torch.randn(4, 8, dtype=torch.float64)
    else:
        conv, bn, x = nn.Conv2d(3, 5, 1), nn.SyncBatchNorm(5), torch.randn(3, 5, 7, dtype=torch.float64)
    model = randomize(ConvThenBN(conv, bn), 15).double().eval()
    with pytest.warns(UserWarning, match="example_inputs"):
        _, report = deploy_checked(model, x)
    assert report.folded == [] and "rank is unknown" in left_reason(report, "bn")
    _, report = deploy_checked(model, x, example_inputs=x)
    assert report.folded == [] and f"{x.dim()}-D" in left_reason(report, "bn")
    batched = x.unsqueeze(0).expand(2, *x.shape).contiguous()
    _, report = deploy_checked(model, batched, example_inputs=batched)
    assert report.folded == [("bn", "conv")]


def test_example_inputs_change_nothing():
    """Shape propagation runs on fake tensors: a submodule kept in training mode takes no step."""
    model = vit()
    model.blocks[0].norm1.train()
    prefix = "blocks.0.norm1."
    kept = {k[len(prefix) :]: v for k, v in snapshot(model).items() if k.startswith(prefix)}
    dep = deploy(model, inplace=True, example_inputs=torch.randn(2, 6, 12))
    assert dep.get_submodule("blocks.0.norm1").training
    assert_same_state(dep.get_submodule("blocks.0.norm1"), kept)
    with pytest.raises(ValueError, match="example_inputs"):
        deploy(vit(), example_inputs=torch.randn(2, 6, 7))  # the embedding takes 12 features


def test_report_names_every_norm():
    model = vit()
    model.blocks[1].norm2.train()
    _, report = deploy(model, return_report=True)
    assert ("blocks.0.norm1", "blocks.0.attn.qkv") in report.folded
    assert ("blocks.1.norm2", "blocks.1.mlp.0") not in report.folded
    assert dict(report.converted) == {
        "res.norm": "it feeds add(), not an nn.Linear",
        "norm": "it feeds .mean(), not an nn.Linear",
    }
    assert dict(report.left) == {"blocks.1.norm2": "in training mode (it normalises with batch statistics)"}
    assert "folded blocks.0.norm1 into blocks.0.attn.qkv" in str(report)
    assert "res.norm -> ChannelAffine: it feeds add(), not an nn.Linear" in str(report)

    _, report = deploy(randomize(TinyCNN(), 7).eval(), return_report=True)
    assert sorted(report.folded) == [("bn1", "conv1"), ("bn2", "conv2"), ("bn4", "fc")]
    assert report.left == [("bn3", "the output of conv3 is also used elsewhere")]


# ------------------------------------------------------------------------------------------------
# Fallback when torch.fx cannot trace
# ------------------------------------------------------------------------------------------------
class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.proj = nn.Linear(6, 6)
        self.mlp = nn.Sequential(PRepBN(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        self.norm = RepBN(6)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, HW, 6)
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            x = x * 1.0
        x = self.proj(x)
        x = x + self.mlp(x)
        return self.norm(x) + x


def test_fallback_without_tracing():
    torch.manual_seed(0)
    model = randomize(Untraceable(), 11).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="trace"):
        dep = deploy(model)
    assert type(dep) is Untraceable
    assert isinstance(dep.stem[1], nn.Identity) and isinstance(dep.mlp[0], nn.Identity)
    assert isinstance(dep.norm, ChannelAffine)
    assert count(dep, NORMS) == 0
    with torch.no_grad():
        out = dep(x)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert_same_state(model, snap)


class UntraceableHeads(nn.Module):
    """Untraceable: deploy sees only nn.Sequential adjacency, which proves a 2-D Linear output only
    after an nn.Flatten()."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(12, 6), nn.BatchNorm1d(6))
        self.tokens = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # on (N, 3, 4): over tokens
        self.conv = nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3))

    def forward(self, x):  # x (N, 3, 4)
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            x = x * 1.0
        return self.flat(x).sum() + self.tokens(x).sum() + self.conv(x).sum()


def test_fallback_folds_bn_only_where_proven():
    torch.manual_seed(0)
    model = randomize(UntraceableHeads(), 16).double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning) as caught:
        dep, report = deploy_checked(model, x)
    assert any("trace" in str(w.message) for w in caught) and any("example_inputs" in str(w.message) for w in caught)
    assert report.folded == [("flat.3", "flat.2")]
    assert "rank is unknown" in left_reason(report, "tokens.1")
    assert "rank is unknown" in left_reason(report, "conv.1")


# ------------------------------------------------------------------------------------------------
def test_channel_affine():
    scale, shift = torch.randn(5), torch.randn(5)
    m = ChannelAffine(scale, shift)
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(m(x), x * scale + shift)
    torch.testing.assert_close(m(x, torch.ones(2, 3, dtype=torch.bool)), x * scale + shift)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert set(m.state_dict()) == {"scale", "shift"}
    with pytest.raises(ValueError):
        ChannelAffine(torch.randn(5), torch.randn(4))


class UntraceablePRepBN(nn.Module):
    """Untraceable, with an eval-mode PRepBN that feeds no Linear: converted to one ChannelAffine."""

    def __init__(self):
        super().__init__()
        self.norm = PRepBN(6)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            x = x * 1.0
        return self.norm(x) + x


def test_fallback_converts_a_prepbn_once():
    torch.manual_seed(0)
    model = randomize(UntraceablePRepBN(), 3).eval()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="trace"):
        dep, report = deploy(model, return_report=True)
    assert isinstance(dep.norm, ChannelAffine)
    assert [c.norm for c in report.converted] == ["norm"], report.converted  # not also its inner RepBN
    with torch.no_grad():
        assert rel_err(dep(x), ref) < 1e-5
