"""The demo's models: SLAB networks and their plain-PyTorch twins of the same sizes.

SLAB side: :class:`slab.nn.PRepBN` norms, :class:`slab.nn.SimplifiedLinearAttention` (with its
depthwise-conv branch of V) and a gated SiLU MLP (``gate_proj``/``up_proj``/``down_proj``, the
naming :mod:`slab.sparse` converts to CATS). Baseline side: ``nn.LayerNorm``/``nn.RMSNorm``,
softmax attention through ``F.scaled_dot_product_attention`` and the same dense gated MLP.

Every norm feeds only Linears: the attention's (``norm1``) its fused ``qkv`` projection, the
MLP's (``norm2``) ``gate_proj`` and ``up_proj``; both modules are registered with
:func:`slab.register_input_linear`, so :func:`slab.deploy` folds every norm and keeps the modules
whole.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slab.deploy import register_input_linear
from slab.nn import PRepBN, SimplifiedLinearAttention

__all__ = [
    "GatedMLP",
    "SlabBlock",
    "SoftmaxBlock",
    "VisionNet",
    "LMNet",
    "prepbn_modules",
    "current_lam",
]


class GatedMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Llama naming, so CATS can convert it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# deploy keeps the MLP one call (slab.sparse.convert swaps it for a CATS MLP afterwards) and folds
# the norm in front of it into both projections that read its input
register_input_linear(GatedMLP, "gate_proj", "up_proj")


def _prepbn(dim: int, norm: str, warm: int, step: int, lm: bool) -> PRepBN:
    # SLAB: alpha starts at 1 for vision, 0 for language models; LayerNorm eps 1e-6 for vision
    return PRepBN(
        dim, norm=norm, warm=warm, step=step, alpha_init=0.0 if lm else 1.0, norm_eps=1e-6 if not lm else 1e-5
    )


class SlabBlock(nn.Module):
    """Pre-norm block: ``x + SLA(PRepBN(x))``, ``x + MLP(PRepBN(x))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        *,
        causal: bool,
        dwc: int,
        warm: int,
        step: int,
        num_tokens: Optional[int] = None,
        norm: str = "layer",
    ):
        super().__init__()
        lm = causal
        self.norm1 = _prepbn(dim, norm, warm, step, lm)
        self.attn = SimplifiedLinearAttention(dim, heads, causal=causal, dwc_kernel_size=dwc, num_tokens=num_tokens)
        self.norm2 = _prepbn(dim, norm, warm, step, lm)
        self.mlp = GatedMLP(dim, hidden)

    def forward(self, x: Tensor, grid=None) -> Tensor:
        x = x + self.attn(self.norm1(x), grid=grid)
        return x + self.mlp(self.norm2(x))

    # causal decoding (eval): the attention's O(1) state, the MLP per token
    def prefill(self, x: Tensor):
        y, cache = self.attn.prefill(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), cache

    def step(self, x: Tensor, cache) -> Tensor:
        x = x + self.attn.step(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention via ``F.scaled_dot_product_attention``; for causal models
    also a preallocated KV cache for decoding."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor):
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(x)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(o.transpose(1, 2).reshape(x.shape))

    def prefill(self, x: Tensor, capacity: int):
        q, k, v = self._split(x)
        b, h, n, d = k.shape
        cache = {"k": k.new_zeros(b, h, capacity, d), "v": v.new_zeros(b, h, capacity, d), "pos": n}
        cache["k"][:, :, :n] = k
        cache["v"][:, :, :n] = v
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(x.shape)), cache

    def step(self, x: Tensor, cache) -> Tensor:  # x (B, dim)
        q, k, v = self._split(x.unsqueeze(1))
        p = cache["pos"]
        cache["k"][:, :, p : p + 1] = k
        cache["v"][:, :, p : p + 1] = v
        cache["pos"] = p + 1
        o = F.scaled_dot_product_attention(q, cache["k"][:, :, : p + 1], cache["v"][:, :, : p + 1])
        return self.proj(o.reshape(x.shape))


class SoftmaxBlock(nn.Module):
    """The plain-PyTorch twin of :class:`SlabBlock`: LayerNorm (RMSNorm for the LM), softmax
    attention, the same dense gated MLP."""

    def __init__(self, dim: int, heads: int, hidden: int, *, causal: bool, norm: str = "layer"):
        super().__init__()
        mk = (lambda: nn.LayerNorm(dim, eps=1e-6)) if norm == "layer" else (lambda: nn.RMSNorm(dim, eps=1e-5))
        self.norm1, self.attn, self.norm2, self.mlp = (
            mk(),
            SoftmaxAttention(dim, heads, causal),
            mk(),
            GatedMLP(dim, hidden),
        )

    def forward(self, x: Tensor, grid=None) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def prefill(self, x: Tensor, capacity: int):
        y, cache = self.attn.prefill(self.norm1(x), capacity)
        x = x + y
        return x + self.mlp(self.norm2(x)), cache

    def step(self, x: Tensor, cache) -> Tensor:
        x = x + self.attn.step(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class VisionNet(nn.Module):
    """8x8 digit -> 2x2 patches (a 4x4 grid of 16 tokens) -> ``depth`` blocks -> mean pool ->
    norm -> linear classifier. ``kind`` is ``"slab"`` or ``"baseline"``."""

    def __init__(
        self,
        kind: str = "slab",
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        hidden: int = 128,
        classes: int = 10,
        patch: int = 2,
        image: int = 8,
        warm: int = 0,
        step: int = 1000,
    ):
        super().__init__()
        self.kind, self.patch, self.grid = kind, patch, (image // patch, image // patch)
        n = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, n, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        if kind == "slab":
            self.blocks = nn.ModuleList(
                SlabBlock(dim, heads, hidden, causal=False, dwc=3, warm=warm, step=step, num_tokens=n)
                for _ in range(depth)
            )
            norm = _prepbn(dim, "layer", warm, step, lm=False)
        else:
            self.blocks = nn.ModuleList(SoftmaxBlock(dim, heads, hidden, causal=False) for _ in range(depth))
            norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Sequential(norm, nn.Linear(dim, classes))

    def tokens(self, images: Tensor) -> Tensor:
        b, h, w = images.shape
        p = self.patch
        t = images.view(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        return self.embed(t) + self.pos

    def forward(self, images: Tensor) -> Tensor:
        x = self.tokens(images)
        for blk in self.blocks:
            x = blk(x, grid=self.grid)
        return self.head(x.mean(1))


class LMNet(nn.Module):
    """Causal LM: embedding -> ``depth`` blocks -> norm -> tied-free output head. ``kind`` is
    ``"slab"`` (PRepBN with RMSNorm, causal SLA with a causal depthwise conv, gated MLP that CATS
    converts) or ``"baseline"`` (RMSNorm, causal softmax attention, KV-cache decoding)."""

    def __init__(
        self,
        vocab: int,
        kind: str = "slab",
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 256,
        warm: int = 0,
        step: int = 1000,
    ):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab, dim)
        if kind == "slab":
            self.blocks = nn.ModuleList(
                SlabBlock(dim, heads, hidden, causal=True, dwc=4, warm=warm, step=step, norm="rms")
                for _ in range(depth)
            )
            norm = _prepbn(dim, "rms", warm, step, lm=True)
        else:
            self.blocks = nn.ModuleList(SoftmaxBlock(dim, heads, hidden, causal=True, norm="rms") for _ in range(depth))
            norm = nn.RMSNorm(dim, eps=1e-5)
        self.head = nn.Sequential(norm, nn.Linear(dim, vocab))

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, capacity: int):
        x = self.embed(tokens)
        caches = []
        for blk in self.blocks:
            if self.kind == "slab":
                x, c = blk.prefill(x)
            else:
                x, c = blk.prefill(x, capacity)
            caches.append(c)
        return self.head(x[:, -1]), caches

    @torch.no_grad()
    def step(self, token: Tensor, caches) -> Tensor:  # token (B,) -> logits (B, vocab)
        x = self.embed(token)
        for blk, c in zip(self.blocks, caches):
            x = blk.step(x, c)
        return self.head(x)


def prepbn_modules(model: nn.Module) -> list[PRepBN]:
    return [m for m in model.modules() if isinstance(m, PRepBN)]


def current_lam(model: nn.Module) -> Optional[float]:
    """The PRepBN mixing weight ``lam`` (1 = LayerNorm only, 0 = RepBN only) of the model, or None."""
    mods = prepbn_modules(model)
    if not mods:
        return None
    m = mods[0]
    if int(m.warm) > 0:
        return 1.0
    return m.current_lam()
