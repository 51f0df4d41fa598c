"""SLAB's simplified linear attention as a module: qkv projection, a learnable positional term
added to k, ReLU linear attention (:func:`slab.ops.sla`), a depthwise convolution of V added to
the attention output (:func:`slab.ops.dwc2d` for image tokens, :func:`slab.ops.causal_dwc1d`
for causal sequences), and the output projection.

Parameter names match SLAB's ``SimplifiedLinearAttention`` (``qkv``, ``proj``, ``dwc``,
``positional_encoding``), so its checkpoints load with ``load_state_dict``. Causal models decode
token by token with :meth:`SimplifiedLinearAttention.prefill` and
:meth:`SimplifiedLinearAttention.step`, in O(1) time and memory per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops.dwc import causal_dwc1d, causal_dwc1d_step, dwc2d, dwc_cache_from_prefill
from ..ops.sla import sla, sla_step
from ._args import check_flag, check_size

__all__ = ["SimplifiedLinearAttention", "SLACache"]


@dataclass
class SLACache:
    """Decoding state of one causal :class:`SimplifiedLinearAttention` layer, per sequence:
    ``state`` (B, H, D, D) and ``z`` (B, H, D) float32 (the running sums of phi(k) v^T and
    phi(k)), ``conv`` (B, H, k - 1, D) the last k - 1 values for the depthwise convolution, and
    ``position``, the number of tokens seen (indexes the positional term). Updated in place by
    :meth:`SimplifiedLinearAttention.step`."""

    state: Tensor
    z: Tensor
    conv: Tensor
    position: int = 0

    def __post_init__(self) -> None:
        check_size("position", self.position, minimum=0)


def _check_sizes(dim, num_heads, causal, dwc_kernel_size, num_tokens) -> None:
    check_size("dim", dim)
    check_size("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"num_heads must divide dim, got num_heads={num_heads}, dim={dim}")
    check_flag("causal", causal)
    check_size("dwc_kernel_size", dwc_kernel_size)
    if not causal and dwc_kernel_size % 2 == 0:  # a centred k x k window needs odd k
        raise ValueError(f"dwc_kernel_size must be odd for the 2-D (non-causal) branch, got {dwc_kernel_size}")
    if num_tokens is not None:
        check_size("num_tokens", num_tokens)


class SimplifiedLinearAttention(nn.Module):
    """``proj(sla(q, relu(k + pos), v) + dwc(v))`` over (B, N, dim) tokens.

    Args:
        dim: channels; ``num_heads`` must divide it (head dim D = dim // num_heads).
        num_heads: heads.
        causal: causal attention and a causal 1-D depthwise convolution over the tokens (language
            models, decodable with :meth:`step`); otherwise non-causal attention and a 2-D
            convolution over the token grid (vision, as SLAB).
        qkv_bias: bias of the qkv projection.
        dwc_kernel_size: the convolution kernel: k x k for images (odd), k for sequences (4 is
            the usual choice for causal language models).
        num_tokens: length of the learnable positional term added to k (SLAB's
            ``positional_encoding``, shape (1, num_tokens, dim), zero-initialised); inputs may
            have at most this many tokens. None: no positional term.

    As in SLAB the attention runs in float32 whatever the input dtype (the kernels accumulate in
    float32 and return the input dtype); the convolution weights are shared by all heads.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = False,
        qkv_bias: bool = False,
        dwc_kernel_size: int = 5,
        num_tokens: Optional[int] = None,
    ):
        super().__init__()
        _check_sizes(dim, num_heads, causal, dwc_kernel_size, num_tokens)
        check_flag("qkv_bias", qkv_bias)
        self.dim, self.num_heads, self.head_dim, self.causal = dim, num_heads, dim // num_heads, causal
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        d = self.head_dim
        if causal:
            self.dwc = nn.Conv1d(d, d, dwc_kernel_size, groups=d)
        else:
            self.dwc = nn.Conv2d(d, d, dwc_kernel_size, groups=d, padding=dwc_kernel_size // 2)
        if num_tokens is not None:
            self.positional_encoding = nn.Parameter(torch.zeros(1, num_tokens, dim))
        else:
            self.register_parameter("positional_encoding", None)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}"

    def _heads(self, x: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, H, N, D) views of the fused projection (no copies); k gets the
        positional term of tokens start .. start + N - 1."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        if self.positional_encoding is not None:
            if start + n > self.positional_encoding.shape[1]:
                raise ValueError(f"{start + n} tokens exceed num_tokens={self.positional_encoding.shape[1]}")
            pos = self.positional_encoding[:, start : start + n].view(1, n, self.num_heads, self.head_dim)
            k = k + pos.to(k.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _dwc(self, v: Tensor, o: Tensor, grid: Optional[Sequence[int]]) -> Tensor:
        if self.causal:
            return causal_dwc1d(v, self.dwc.weight, self.dwc.bias, residual=o)
        return dwc2d(v, self.dwc.weight, self.dwc.bias, grid=grid, residual=o)

    def _merge_heads(self, out: Tensor) -> Tensor:
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))  # a view: out is (B, N, H, D) in memory

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        grid: Optional[Sequence[int]] = None,
        cache: Optional[SLACache] = None,
    ) -> Tensor:
        """x (B, N, dim) -> (B, N, dim). ``mask`` (B, N) bool, True = real token: padded tokens
        add nothing to the attention sums (they still enter the convolution of their neighbours;
        for right-padded causal sequences that never touches a real token). ``grid`` = (h, w)
        of the image tokens (default square). ``cache`` (causal only, no autograd): an empty
        cache (:meth:`init_cache`) receives the prefill state; a cache that has seen tokens is
        continued token by token with :meth:`step`."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        if cache is not None:
            return self._forward_cached(x, mask, cache)
        q, k, v = self._heads(x, 0)
        o = sla(q, k, v, causal=self.causal, mask=mask)
        return self._merge_heads(self._dwc(v, o, grid))

    # ---- causal decoding ---------------------------------------------------------------------

    def _require_causal(self) -> None:
        if not self.causal:
            raise RuntimeError("prefill/step need a causal SimplifiedLinearAttention (causal=True)")

    def init_cache(self, batch: int, device=None, dtype: Optional[torch.dtype] = None) -> SLACache:
        """An empty cache (no tokens seen) for ``batch`` sequences; ``dtype`` is the activation
        dtype (default: the qkv weight's)."""
        self._require_causal()
        batch = check_size("batch", batch)
        device = self.qkv.weight.device if device is None else device
        dtype = self.qkv.weight.dtype if dtype is None else dtype
        h, d, k = self.num_heads, self.head_dim, self.dwc.weight.shape[-1]
        return SLACache(
            torch.zeros(batch, h, d, d, device=device, dtype=torch.float32),
            torch.zeros(batch, h, d, device=device, dtype=torch.float32),
            torch.zeros(batch, h, k - 1, d, device=device, dtype=dtype),
        )

    @torch.no_grad()
    def prefill(self, x: Tensor) -> tuple[Tensor, SLACache]:
        """The causal forward over a prompt x (B, N, dim), plus the cache to continue from."""
        self._require_causal()
        q, k, v = self._heads(x, 0)
        o, state, z = sla(q, k, v, causal=True, return_state=True)
        cache = SLACache(state, z, dwc_cache_from_prefill(v, self.dwc.weight.shape[-1]), x.shape[1])
        return self._merge_heads(self._dwc(v, o, None)), cache

    @torch.no_grad()
    def _forward_cached(self, x: Tensor, mask: Optional[Tensor], cache: SLACache) -> Tensor:
        if mask is not None:
            raise ValueError("mask is not supported together with cache (decode sequences unpadded)")
        if cache.position > 0:
            return torch.stack([self.step(x[:, t], cache) for t in range(x.shape[1])], 1)
        out, filled = self.prefill(x)
        cache.state.copy_(filled.state)
        cache.z.copy_(filled.z)
        cache.conv.copy_(filled.conv)
        cache.position = filled.position
        return out

    @torch.no_grad()
    def step(self, x: Tensor, cache: SLACache) -> Tensor:
        """One new token per sequence: x (B, dim) or (B, 1, dim) -> the output of the same shape;
        ``cache`` advances by one token in place. Equal to the last row of :meth:`forward` over
        the whole sequence (up to float rounding)."""
        self._require_causal()
        tokens = x if x.dim() == 3 else x.unsqueeze(1)
        if tokens.shape[1] != 1 or tokens.shape[-1] != self.dim:
            raise ValueError(
                f"step takes one token per sequence, (batch, {self.dim}) or (batch, 1, {self.dim}); "
                f"got {tuple(x.shape)}"
            )
        q, k, v = (t[:, :, 0] for t in self._heads(tokens, cache.position))
        o = sla_step(q, k, v, cache.state, cache.z)
        out = causal_dwc1d_step(v, cache.conv, self.dwc.weight, self.dwc.bias, residual=o)
        cache.position += 1
        y = self.proj(out.reshape(x.shape[0], self.dim))
        return y if x.dim() == 2 else y.unsqueeze(1)
