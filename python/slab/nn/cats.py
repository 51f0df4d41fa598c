"""CATS modules: a gated MLP with contextual activation sparsity (CATS).

:class:`CATSMLP` replaces the SiLU of ``down(silu(gate(x)) * up(x))`` by ``cats(., threshold)``
and, when decoding (at most 16 tokens, no autograd), runs the fused sparse kernel
:func:`slab.ops.cats_mlp`, which skips the ``up`` rows and ``down`` columns of dropped neurons.
:class:`TokenSparseBlock` (LeMo token sparsity) runs a block on the top-scoring tokens only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.cats import MAX_DECODE_TOKENS, cats, cats_mlp, token_scatter, token_select
from ._args import check_number, check_size

__all__ = ["CATSMLP", "TokenSparseBlock", "is_silu"]


def is_silu(act) -> bool:
    """True for SiLU activations: ``nn.SiLU``, ``F.silu`` and Hugging Face's SiLU activations."""
    if act is torch.nn.functional.silu or isinstance(act, nn.SiLU):
        return True
    return "silu" in type(act).__name__.lower() or "swish" in type(act).__name__.lower()


class CATSMLP(nn.Module):
    """``y = W_down (cats(gate(x), threshold) * up(x)) + b_down``; without ``up`` (a plain
    ``fc2(silu(fc1(x)))`` MLP) ``y = W_down cats(gate(x), threshold) + b_down``.

    The module keeps ``gate`` and ``up`` (the original ``nn.Linear`` modules) and owns the down
    projection only as ``w_down_t`` = ``W_down`` transposed, an (F, D) contiguous parameter (plus
    ``down_bias``), so no second copy of ``W_down`` exists. Paths:

    * decode: at most ``decode_tokens`` (<= 16) tokens, autograd off (or no parameter needing a
      gradient), gated, no gate/up bias: the fused sparse kernel :func:`slab.ops.cats_mlp`;
    * dense (prefill, training, anything else): the :func:`slab.ops.cats` op between the
      projections, differentiable.

    Both compute the same function. Build one from an existing MLP with :meth:`from_mlp`.
    """

    def __init__(
        self,
        gate: nn.Linear,
        up: Optional[nn.Linear],
        w_down_t: Tensor,
        down_bias: Optional[Tensor],
        threshold: float,
        decode_tokens: int = MAX_DECODE_TOKENS,
    ):
        super().__init__()
        decode_tokens = check_size("decode_tokens", decode_tokens, minimum=0, maximum=MAX_DECODE_TOKENS)
        _check_linear("gate", gate)
        if up is not None:
            _check_linear("up", up)
        if not isinstance(w_down_t, Tensor):
            raise TypeError(f"w_down_t must be a tensor, got {type(w_down_t).__name__}")
        features, dim = gate.out_features, gate.in_features
        if up is not None and (up.out_features, up.in_features) != (features, dim):
            raise ValueError(f"up must be a Linear({dim}, {features}) like gate, got {up}")
        if tuple(w_down_t.shape) != (features, dim):
            raise ValueError(f"w_down_t must have shape ({features}, {dim}), got {tuple(w_down_t.shape)}")
        if isinstance(threshold, Tensor) and threshold.numel() == 1:  # as the cats op takes it
            threshold = threshold.item()
        threshold = check_number("threshold", threshold)
        self.gate = gate
        self.up = up
        self.w_down_t = nn.Parameter(w_down_t.detach().contiguous(), requires_grad=w_down_t.requires_grad)
        self.down_bias = None if down_bias is None else nn.Parameter(down_bias.detach(), down_bias.requires_grad)
        self.threshold = threshold
        self.decode_tokens = decode_tokens

    @classmethod
    def from_mlp(cls, mlp: nn.Module, threshold: float, decode_tokens: int = MAX_DECODE_TOKENS) -> "CATSMLP":
        """From a Llama-style MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) or a plain
        ``fc1``/``fc2`` MLP with a SiLU activation (``act``/``act_fn``/``activation``). The
        transposed ``W_down`` replaces ``down_proj``/``fc2``'s weight; ``gate``/``up`` are shared."""
        gate, up, down = mlp_parts(mlp)
        return cls(
            gate,
            up,
            down.weight.detach().t().contiguous().requires_grad_(down.weight.requires_grad),
            down.bias,
            threshold,
            decode_tokens,
        )

    def _use_decode_kernel(self, x: Tensor) -> bool:
        if self.up is None or self.gate.bias is not None or self.up.bias is not None:
            return False
        if x.dtype != self.w_down_t.dtype or x.dim() == 0 or x.numel() == 0:
            return False
        tokens = x.numel() // x.shape[-1]
        if tokens > self.decode_tokens:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def forward(self, x: Tensor) -> Tensor:
        if self._use_decode_kernel(x):
            y = cats_mlp(x, self.gate.weight, self.up.weight, self.w_down_t, self.threshold)
        else:
            h = cats(self.gate(x), self.threshold)
            if self.up is not None:
                h = h * self.up(x)
            y = torch.matmul(h, self.w_down_t)
        return y if self.down_bias is None else y + self.down_bias

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}, gated={self.up is not None}, decode_tokens={self.decode_tokens}"


def _check_linear(name: str, layer) -> None:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(layer).__name__}")


def mlp_parts(mlp: nn.Module) -> tuple[nn.Linear, Optional[nn.Linear], nn.Linear]:
    """(gate, up or None, down) of a supported MLP; ValueError naming what is missing."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        act = getattr(mlp, "act_fn", torch.nn.functional.silu)
        parts = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    elif hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        act = next((getattr(mlp, n) for n in ("act", "act_fn", "activation") if hasattr(mlp, n)), None)
        if act is None:
            raise ValueError(
                f"{type(mlp).__name__}: an fc1/fc2 MLP needs its activation as .act, .act_fn or "
                ".activation to be converted"
            )
        parts = (mlp.fc1, None, mlp.fc2)
    else:
        raise ValueError(
            f"{type(mlp).__name__} is not a supported MLP: expected gate_proj/up_proj/down_proj "
            "(Llama/Mistral naming) or fc1/fc2"
        )
    if not is_silu(act):
        raise ValueError(f"{type(mlp).__name__}: CATS thresholds a SiLU activation, got {act!r}")
    for p in parts:
        if p is not None and not isinstance(p, nn.Linear):
            raise ValueError(f"{type(mlp).__name__}: projections must be nn.Linear, got {type(p).__name__}")
    return parts


def _check_keep(keep):
    """A ratio of the tokens (a float, as :func:`slab.ops.token_select` reads it) or a count."""
    if isinstance(keep, float):
        return check_number("keep", keep, gt=0, le=1)
    return check_size("keep", keep)


class TokenSparseBlock(nn.Module):
    """Token sparsity (LeMo): runs ``block`` on the most informative tokens only.

    ``forward(x)`` with ``x`` (B, N, C): scores each token (``scorer(x)`` -> (B, N); by default
    the L2 norm of the token), keeps ``keep`` tokens per sequence (a count or a ratio of N) in
    their original order with :func:`slab.ops.token_select`, computes ``block`` on them (B, k, C)
    and writes its output back with :func:`slab.ops.token_scatter`; the other tokens pass through
    unchanged. ``block`` should therefore be a residual block (``x + f(x)``) whose output for a
    token depends on that token alone or on the kept tokens only. With ``keep`` = all tokens it
    is exactly ``block(x)``.
    """

    def __init__(self, block: nn.Module, keep: float | int = 0.5, scorer: Optional[nn.Module] = None):
        super().__init__()
        if not callable(block):
            raise TypeError(f"block must be a module or callable, got {type(block).__name__}")
        if scorer is not None and not callable(scorer):
            raise TypeError(f"scorer must be None, a module or a callable, got {type(scorer).__name__}")
        self.block = block
        self.keep = _check_keep(keep)
        self.scorer = scorer

    def scores(self, x: Tensor) -> Tensor:
        if self.scorer is not None:
            s = self.scorer(x)
            return s.squeeze(-1) if s.dim() == 3 else s
        return x.detach().float().norm(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        kept, index = token_select(x, self.scores(x), self.keep)
        return token_scatter(x, self.block(kept), index)

    def extra_repr(self) -> str:
        return f"keep={self.keep}"
