"""RepBN / PRepBN modules (SLAB, ICML 2024) on top of the fused ``slab.ops`` kernels.

``RepBN`` and ``PRepBN`` are drop-in, state-dict compatible replacements for SLAB's public ``RepBN``
and ``LinearNorm(dim, LayerNorm, RepBN)`` modules: a SLAB checkpoint loads with ``strict=True``.
Unlike SLAB's versions they take tokens of any rank ``(..., C)`` (statistics over every dimension
but the last) and an optional padding mask.

``ChannelAffine`` is what an eval-mode norm becomes when :func:`slab.deploy` cannot fold it into the
following Linear; ``convert_sync`` switches every RepBN/PRepBN of a model to synchronized
(data-parallel) batch statistics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ._args import check_choice, check_flag, check_number, check_size

__all__ = ["RepBN", "PRepBN", "ChannelAffine", "convert_sync"]


def _need_sync(module: nn.Module) -> bool:
    """True when ``module`` must all-reduce its batch statistics (same rule as nn.SyncBatchNorm)."""
    if not (module.sync and module.training):
        return False
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    group = module.process_group if module.process_group is not None else dist.group.WORLD
    return dist.get_world_size(group) > 1


def _bn_step(bn: nn.BatchNorm1d, training: bool) -> float:
    """Counts one training batch on ``bn`` and returns its running-average factor.

    Exactly ``torch.nn.BatchNorm1d``: ``num_batches_tracked += 1`` in training, factor ``momentum``,
    or the cumulative average ``1 / num_batches_tracked`` when ``momentum`` is None.
    """
    if training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else float(bn.momentum)


def _check_running_stats(bn: nn.BatchNorm1d, who: str) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{who}: bn has no running statistics (track_running_stats=False is not supported); "
            "slab's RepBN always tracks running_mean/running_var"
        )


class RepBN(nn.Module):
    r"""Re-parameterizable BatchNorm over the last dimension: ``y = BN(x) + alpha * x``.

    ``x`` has shape ``(..., C)``; the batch statistics run over every dimension but the last.

    Training::

        mean, var = per-channel mean and biased variance of x over the kept tokens
        y = (x - mean) / sqrt(var + eps) * bn.weight + bn.bias + alpha * x

    and ``bn.running_mean`` / ``bn.running_var`` are updated in place exactly like
    ``torch.nn.BatchNorm1d`` (``momentum``, unbiased variance ``n / (n - 1)`` with ``n`` the number
    of kept tokens; ``momentum=None`` gives the cumulative average), ``bn.num_batches_tracked``
    counts the training batches.

    Eval (a per-channel affine, foldable into the next Linear by :func:`slab.deploy`)::

        s = bn.weight / sqrt(bn.running_var + eps)
        y = x * (s + alpha) + (bn.bias - bn.running_mean * s)

    Args:
        channels: C, the size of the last dimension.
        eps: BatchNorm epsilon (default 1e-5).
        momentum: running-average momentum (default 0.1; None = cumulative average).
        alpha_init: initial value of the learnable scalar ``alpha`` (SLAB: 1.0 for vision models,
            0.0 for language models).
        sync: all-reduce the batch statistics over ``process_group`` when ``torch.distributed`` is
            initialized and the module is training (see :func:`convert_sync`).
        process_group: the group to synchronize over (default: the world).

    State-dict keys are SLAB's: ``alpha`` (shape (1,)), ``bn.weight``, ``bn.bias``,
    ``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``.

    ``forward(x, mask=None)``: ``mask`` is an optional bool tensor of shape ``x.shape[:-1]``;
    True marks a real token, False a padding token. Only real tokens enter the batch statistics;
    every token (padding included) is normalised with them. (Note this is the opposite polarity
    of ``nn.MultiheadAttention``'s ``key_padding_mask``.)
    """

    def __init__(
        self,
        channels: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        alpha_init: float = 1.0,
        sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        channels = check_size("channels", channels)
        eps = check_number("eps", eps, ge=0)
        if momentum is not None:
            momentum = check_number("momentum", momentum, ge=0, le=1)
        alpha_init = check_number("alpha_init", alpha_init)
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.bn = nn.BatchNorm1d(channels, eps=eps, momentum=momentum)
        self.sync = check_flag("sync", sync)
        self.process_group = process_group

    @property
    def channels(self) -> int:
        return self.bn.num_features

    def extra_repr(self) -> str:
        return f"{self.channels}, sync={self.sync}"

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        bn = self.bn
        _check_running_stats(bn, "slab.nn.RepBN")
        momentum = _bn_step(bn, self.training)
        if _need_sync(self):
            from ._sync import prep_bn_sync

            return prep_bn_sync(
                x,
                None,
                None,
                bn.weight,
                bn.bias,
                self.alpha,
                bn.running_mean,
                bn.running_var,
                0.0,
                momentum,
                bn.eps,
                0.0,
                "none",
                mask,
                self.process_group,
            )
        return ops.rep_bn(
            x,
            bn.weight,
            bn.bias,
            self.alpha,
            bn.running_mean,
            bn.running_var,
            self.training,
            momentum=momentum,
            eps=bn.eps,
            mask=mask,
        )


class PRepBN(nn.Module):
    r"""Progressive RepBN (SLAB's ``LinearNorm``): ``y = lam * Norm1(x) + (1 - lam) * RepBN(x)``.

    ``Norm1`` is ``nn.LayerNorm(dim, eps=norm_eps)`` (``norm="layer"``) or
    ``nn.RMSNorm(dim, eps=norm_eps)`` (``norm="rms"``); ``norm2`` is a :class:`RepBN`. The whole
    training step runs as one fused ``slab.ops.prep_bn`` call.

    Schedule (per training forward, as SLAB):

    * while ``warm > 0``: ``warm -= 1`` and ``y = norm1(x)`` (BN statistics untouched);
    * then ``lam = r0 * iter / total_step`` and, if ``iter > 0``, ``iter -= 1``; the mixed output
      above is returned and the BN running statistics of ``norm2`` are updated like
      ``torch.nn.BatchNorm1d``. ``lam`` reaches 0 after ``step`` such steps and stays there
      (``step=0`` means lam = 0 from the start).

    Eval: ``y = norm2(x)``, i.e. RepBN with running statistics only — a per-channel affine that
    :func:`slab.deploy` folds into the following Linear.

    Args:
        dim: C, the size of the last dimension.
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) for ``norm1``.
        warm: warm-up steps using ``norm1`` only (default 0).
        step: number of steps over which ``lam`` decays from ``r0`` to 0 (default 300000).
        r0: initial ``lam``, in [0, 1] (default 1.0).
        eps: BatchNorm epsilon of ``norm2`` (default 1e-5).
        norm_eps: epsilon of ``norm1`` (default 1e-6, SLAB's vision LayerNorm; ``norm="rms"`` also
            takes None, the input dtype's machine epsilon, as ``nn.RMSNorm``).
        alpha_init: initial ``alpha`` of ``norm2`` (SLAB: 1.0 vision, 0.0 language models).
        sync, process_group: synchronized batch statistics, as :class:`RepBN`.

    State-dict keys are SLAB's ``LinearNorm``: buffers ``warm``, ``iter``, ``total_step`` (int64
    scalars), ``norm1.*``, ``norm2.alpha``, ``norm2.bn.*``. The BN momentum is
    ``norm2.bn.momentum`` (0.1).

    ``forward(x, mask=None)``: ``mask`` as in :class:`RepBN` (True = real token); it only affects
    the BN statistics, Norm1 is per token.
    """

    def __init__(
        self,
        dim: int,
        norm: str = "layer",
        warm: int = 0,
        step: int = 300000,
        r0: float = 1.0,
        eps: float = 1e-5,
        norm_eps: float = 1e-6,
        alpha_init: float = 1.0,
        sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        dim = check_size("dim", dim)
        self.norm = check_choice("norm", norm, ("layer", "rms"))
        self.register_buffer("warm", torch.tensor(check_size("warm", warm, minimum=0)))
        step = check_size("step", step, minimum=0)
        self.register_buffer("iter", torch.tensor(step))
        self.register_buffer("total_step", torch.tensor(step))
        self.r0 = check_number("r0", r0, ge=0, le=1)  # lam = r0 * iter / total_step mixes two norms
        if norm == "layer":
            self.norm1 = nn.LayerNorm(dim, eps=check_number("norm_eps", norm_eps, ge=0))
        else:  # nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
            eps1 = None if norm_eps is None else check_number("norm_eps", norm_eps, ge=0)
            self.norm1 = nn.RMSNorm(dim, eps=eps1)
        self.norm2 = RepBN(dim, eps=eps, alpha_init=alpha_init)
        self.sync = check_flag("sync", sync)
        self.process_group = process_group

    @property
    def dim(self) -> int:
        return self.norm2.channels

    def extra_repr(self) -> str:
        return f"{self.dim}, norm={self.norm!r}, r0={self.r0}, sync={self.sync}"

    def _counters(self) -> list[int]:
        """``[warm, iter, total_step]`` as Python ints without a device sync per step.

        The buffers live on the module's device; reading them each step would stall a GPU
        pipeline (three host syncs per layer). They are read once and cached, keyed by the buffer
        objects and their in-place version counters, so ``load_state_dict``, ``.to()``, or any
        in-place edit of a buffer invalidates the cache.
        """
        bufs = (self.warm, self.iter, self.total_step)
        key = getattr(self, "_counter_key", None)
        if key is None or any(v is None or b is not k or _version(b) != v for b, (k, v) in zip(bufs, key)):
            self._counter_vals = [int(b) for b in bufs]
            self._counter_key = tuple((b, _version(b)) for b in bufs)
        return self._counter_vals

    def _count_down(self, index: int) -> None:
        """``buffer -= 1`` for warm (0) or iter (1), keeping the cache in step."""
        buf = (self.warm, self.iter)[index]
        buf.sub_(1)
        self._counter_vals[index] -= 1
        key = list(self._counter_key)
        key[index] = (buf, _version(buf))
        self._counter_key = tuple(key)

    def current_lam(self) -> float:
        """The ``lam`` the next training step (after warm-up) will use: ``r0 * iter / total_step``."""
        _, it, total = self._counters()
        return self.r0 * it / total if total > 0 else 0.0

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if not self.training:
            return self.norm2(x, mask)
        warm, it, _ = self._counters()
        if warm > 0:
            self._count_down(0)
            return self.norm1(x)
        lam = self.current_lam()
        if it > 0:
            self._count_down(1)

        norm1, bn = self.norm1, self.norm2.bn
        _check_running_stats(bn, "slab.nn.PRepBN")
        norm_eps = norm1.eps
        if norm_eps is None:  # nn.RMSNorm(eps=None): torch uses the dtype's machine epsilon
            norm_eps = torch.finfo(x.dtype).eps
        norm_bias = getattr(norm1, "bias", None)
        momentum = _bn_step(bn, True)
        if _need_sync(self):
            from ._sync import prep_bn_sync

            return prep_bn_sync(
                x,
                norm1.weight,
                norm_bias,
                bn.weight,
                bn.bias,
                self.norm2.alpha,
                bn.running_mean,
                bn.running_var,
                lam,
                momentum,
                bn.eps,
                float(norm_eps),
                self.norm,
                mask,
                self.process_group,
            )
        return ops.prep_bn(
            x,
            norm1.weight,
            norm_bias,
            bn.weight,
            bn.bias,
            self.norm2.alpha,
            bn.running_mean,
            bn.running_var,
            lam,
            True,
            momentum=momentum,
            eps=bn.eps,
            norm_eps=float(norm_eps),
            norm=self.norm,
            mask=mask,
        )


def _version(t: Tensor) -> Optional[int]:
    """The in-place version counter of ``t`` (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class ChannelAffine(nn.Module):
    r"""Per-channel affine over the last dimension: ``y = x * scale + shift``.

    What an eval-mode :class:`RepBN`/:class:`PRepBN` becomes when :func:`slab.deploy` cannot fold
    it into a Linear (its output feeds a residual add or several consumers). ``scale`` and
    ``shift`` are parameters of shape ``(C,)``; the output has the dtype of ``x`` (the affine is
    computed with one ``torch.addcmul``). ``forward`` accepts and ignores a ``mask`` so it stays a
    drop-in for the norm it replaces.
    """

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        scale = torch.as_tensor(scale)
        shift = torch.as_tensor(shift)
        if scale.dim() != 1 or shift.shape != scale.shape:
            raise ValueError(
                "slab.nn.ChannelAffine: scale and shift must be 1-D of the same length, got "
                f"{tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())

    @classmethod
    def from_norm(cls, module: nn.Module) -> "ChannelAffine":
        """The eval-mode affine of a RepBN/PRepBN (computed in float64, stored in its dtype)."""
        scale, shift = norm_affine(module)
        dtype = _affine_owner(module).alpha.dtype
        return cls(scale.to(dtype), shift.to(dtype))

    @property
    def channels(self) -> int:
        return self.scale.numel()

    def extra_repr(self) -> str:
        return f"{self.channels}"

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))


def _affine_owner(module: nn.Module) -> RepBN:
    if isinstance(module, PRepBN):
        return module.norm2
    if isinstance(module, RepBN):
        return module
    raise TypeError(f"expected slab.nn.RepBN or PRepBN, got {type(module).__name__}")


@torch.no_grad()
def norm_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` in float64 such that eval ``module(x) == x * scale + shift``.

    For RepBN (and PRepBN, whose eval path is its ``norm2``):
    ``s = w / sqrt(rv + eps)``, ``scale = s + alpha``, ``shift = b - rm * s``.
    A ChannelAffine returns its own parameters.
    """
    if isinstance(module, ChannelAffine):
        return module.scale.double(), module.shift.double()
    rep = _affine_owner(module)
    bn = rep.bn
    _check_running_stats(bn, "slab.nn.ChannelAffine")
    rm = bn.running_mean.double()
    rv = bn.running_var.double()
    w = bn.weight.double() if bn.weight is not None else torch.ones_like(rm)
    b = bn.bias.double() if bn.bias is not None else torch.zeros_like(rm)
    s = w / torch.sqrt(rv + bn.eps)
    return s + rep.alpha.double().reshape(()), b - rm * s


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Sets ``sync=True`` (and ``process_group``) on every RepBN/PRepBN in ``module``; returns it.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: with ``torch.distributed`` initialized,
    a training forward then all-reduces the per-channel statistics (masks respected) so every rank
    normalises with the global batch statistics, forward and backward. The modules are changed in
    place (no copy); without an initialized process group they behave as before.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    for m in module.modules():
        if isinstance(m, (RepBN, PRepBN)):
            m.sync = True
            m.process_group = process_group
    return module
