"""Polynomial-decay iterate averaging (Shamir & Zhang 2013), the averaging the DoG paper pairs
with DoG: ``avg_t = (1 - w_t) avg_{t-1} + w_t x_t`` with ``w_t = (gamma + 1) / (gamma + t)``,
t = 1, 2, ... (so avg_1 = x_1). One fused lerp per (device, dtype) over all parameters and
floating buffers; integer buffers (e.g. BatchNorm's num_batches_tracked) are copied."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import optim as _ops
from ._base import buckets, check_number

__all__ = ["PolynomialDecayAverager"]


class PolynomialDecayAverager:
    """Keeps ``averaged_model``, a polynomially decayed average of ``model``'s weights.

    Args:
        model: the model being trained; a deep copy becomes ``averaged_model``.
        gamma (float, default 8.0): decay parameter (the DoG paper's default); 0 gives the
            uniform average of all iterates.

    Call :meth:`step` after each optimizer step. ``state_dict``/``load_state_dict`` save and
    restore ``t`` and the averaged weights. ``gamma`` may be changed between steps; it is checked
    at every step.
    """

    def __init__(self, model: nn.Module, gamma: float = 8.0):
        check_number("gamma", gamma)
        self.model = model
        self.gamma = float(gamma)
        self.t = 1
        self.av_model = copy.deepcopy(model)
        for p in self.av_model.parameters():
            p.requires_grad_(False)

    @property
    def averaged_model(self) -> nn.Module:
        return self.av_model

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def weight(self) -> float:
        """The weight ``w_t = (gamma + 1) / (gamma + t)`` the next :meth:`step` uses."""
        return (self.gamma + 1.0) / (self.gamma + self.t)

    @torch.no_grad()
    def step(self) -> None:
        check_number("gamma", self.gamma)
        src = self.model.state_dict(keep_vars=True)
        dst = self.av_model.state_dict(keep_vars=True)
        avg, cur, copies_to, copies_from = [], [], [], []
        w = self.weight()
        for k, x in src.items():
            a = dst[k]
            if a.device != x.device:  # the averaged copy follows the model's device
                raise RuntimeError(f"averaged_model.{k} is on {a.device} but model.{k} is on {x.device}")
            if a.is_floating_point() and w < 1.0:
                avg.append(a.detach())
                cur.append(x.detach())
            else:  # integer buffers, and w_1 = 1 (an exact copy, not a rounded lerp)
                copies_to.append(a.detach())
                copies_from.append(x.detach())
        for idx in buckets(avg):
            _ops.multi_tensor_lerp_([avg[i] for i in idx], [cur[i] for i in idx], w)
        if copies_to:
            torch._foreach_copy_(copies_to, copies_from)
        self.t += 1

    def reset(self) -> None:
        self.t = 1

    def state_dict(self) -> dict:
        return {"t": self.t, "gamma": self.gamma, "av_model": self.av_model.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.t = int(state_dict["t"])
        self.gamma = float(state_dict.get("gamma", self.gamma))
        self.av_model.load_state_dict(state_dict["av_model"])
