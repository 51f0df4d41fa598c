"""slab.deploy: folding eval-mode RepBN/PRepBN into the next Linear, Conv/Linear + BatchNorm pairs,
ChannelAffine for norms that cannot fold; outputs equal to the unfolded eval model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import slab  # noqa: F401  (loads the op library)
from slab.deploy import deploy
from slab.nn import ChannelAffine, PRepBN, RepBN

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
        self.blocks = nn.ModuleList(
            [Block(dim, heads, lambda d: PRepBN(d, step=10)) for _ in range(depth)])
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
    """norm -> Linear -> BatchNorm1d: both folds land on the same Linear."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(PRepBN(6), nn.Linear(6, 7), nn.BatchNorm1d(7), nn.ReLU()), 9).eval()
    x = torch.randn(11, 6)
    with torch.no_grad():
        ref = model(x)
        dep = deploy(model)
        assert count(dep, NORMS) == 0 and count(dep, ChannelAffine) == 0
        assert rel_err(dep(x), ref) < 1e-5


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
