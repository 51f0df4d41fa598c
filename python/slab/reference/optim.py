"""Optimizer references (SPEC section 5): the published update rules stepped in float64.

Each ``Ref*`` class holds float64 copies of the parameters (``x``) and its states; ``step(grads)``
applies one update (a None grad leaves that parameter alone) and rounds the new iterate with
``store`` (e.g. :func:`rounding` of the parameter dtype), as the real parameters are stored.
"""

from __future__ import annotations

import torch

__all__ = ["RefDoG", "RefLion", "RefLAMB", "RefLARS", "RefAdamP", "RefAverager", "rounding"]


def rounding(dtype):
    """``store`` for parameters kept in ``dtype``: round to it, compute on in float64."""
    return lambda x: x.to(dtype).to(torch.float64)


class RefDoG:
    """DoG / LDoG as formll/dog defines it, in float64. After each update the iterate is rounded to
    the parameter dtype (``store``), as the real parameters are stored; everything else is float64."""

    def __init__(
        self,
        params,
        store,
        lr=1.0,
        reps_rel=1e-6,
        eps=1e-8,
        weight_decay=0.0,
        init_eta=None,
        layerwise=False,
        maximize=False,
    ):
        self.x = [p.detach().to(torch.float64).clone() for p in params]
        self.store, self.lr, self.eps, self.wd = store, lr, eps, weight_decay
        self.reps = 0.0 if init_eta is not None else reps_rel
        self.init_eta, self.layerwise, self.maximize = init_eta, layerwise, maximize
        self.t = 0

    def _norm(self, ts):
        sq = torch.stack([(t * t).sum() for t in ts])
        return sq.sqrt() if self.layerwise else sq.sum().sqrt()

    def step(self, grads):
        g = [
            None if gi is None else (-gi if self.maximize else gi).to(torch.float64) + self.wd * x
            for gi, x in zip(grads, self.x)
        ]
        gsq = torch.stack([torch.zeros((), dtype=torch.float64) if t is None else (t * t).sum() for t in g])
        gsq = gsq if self.layerwise else gsq.sum()
        if self.t == 0:  # x_0 of every parameter, with a gradient now or not
            self.x0 = [x.clone() for x in self.x]
            self.rbar = self.reps * (1 + self._norm(self.x0))
            self.G = gsq
        else:
            self.rbar = torch.maximum(self.rbar, self._norm([x - x0 for x, x0 in zip(self.x, self.x0)]))
            self.G = self.G + gsq
        eta = self.lr * self.rbar / torch.sqrt(self.G + self.eps)
        if self.t == 0 and self.init_eta is not None:
            eta = torch.full_like(eta, self.init_eta)
        eta = eta.expand(len(self.x)) if eta.dim() == 0 else eta
        self.x = [x if gi is None else self.store(x - e * gi) for x, e, gi in zip(self.x, eta, g)]
        self.t += 1


class RefLion:
    def __init__(self, params, store, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        self.x = [p.detach().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(x) for x in self.x]
        self.store, self.lr, (self.b1, self.b2) = store, lr, betas
        self.wd, self.maximize = weight_decay, maximize

    def step(self, grads):
        for i, gi in enumerate(grads):
            if gi is None:
                continue
            g = (-gi if self.maximize else gi).to(torch.float64)
            c = self.b1 * self.m[i] + (1 - self.b1) * g
            self.x[i] = self.store(self.x[i] * (1 - self.lr * self.wd) - self.lr * torch.sign(c))
            self.m[i] = self.b2 * self.m[i] + (1 - self.b2) * g


class RefLAMB:
    """LAMB, Algorithm 2 of You et al. 2020, in float64 (phi = min(., clamp_value) or identity)."""

    def __init__(
        self,
        params,
        store,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.01,
        bias_correction=True,
        clamp_value=None,
        maximize=False,
    ):
        self.x = [p.detach().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(x) for x in self.x]
        self.v = [torch.zeros_like(x) for x in self.x]
        self.store, self.lr, (self.b1, self.b2), self.eps, self.wd = store, lr, betas, eps, weight_decay
        self.bc, self.clamp, self.maximize = bias_correction, clamp_value, maximize
        self.t = [0] * len(self.x)  # per parameter: the steps in which it had a gradient

    def step(self, grads):
        for i, gi in enumerate(grads):
            if gi is None:
                continue
            self.t[i] += 1
            bc1 = 1 - self.b1 ** self.t[i] if self.bc else 1.0
            bc2 = 1 - self.b2 ** self.t[i] if self.bc else 1.0
            g = (-gi if self.maximize else gi).to(torch.float64)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            u = (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + self.eps) + self.wd * self.x[i]
            xn, un = self.x[i].norm(), u.norm()
            phi = xn if self.clamp is None else xn.clamp(max=self.clamp)
            trust = phi / un if (xn > 0 and un > 0) else 1.0
            self.x[i] = self.store(self.x[i] - self.lr * trust * u)


class RefLARS:
    """LARS (You et al. 2017) with optional LARC clipping, in float64."""

    def __init__(
        self,
        params,
        store,
        lr=1.0,
        momentum=0.9,
        weight_decay=5e-4,
        trust_coefficient=1e-3,
        eps=1e-8,
        clip=False,
        maximize=False,
    ):
        self.x = [p.detach().to(torch.float64).clone() for p in params]
        self.buf = [torch.zeros_like(x) for x in self.x]
        self.store, self.lr, self.mu, self.wd = store, lr, momentum, weight_decay
        self.tc, self.eps = trust_coefficient, eps
        self.clip, self.maximize = clip, maximize

    def step(self, grads):
        for i, gi in enumerate(grads):
            if gi is None:
                continue
            g = (-gi if self.maximize else gi).to(torch.float64)
            xn, gn = self.x[i].norm(), g.norm()
            local = self.tc * xn / (gn + self.wd * xn + self.eps) if (xn > 0 and gn > 0) else torch.tensor(1.0)
            if self.clip:
                local = min(local / self.lr, 1.0)
            self.buf[i] = self.mu * self.buf[i] + local * (g + self.wd * self.x[i])
            self.x[i] = self.store(self.x[i] - self.lr * self.buf[i])


class RefAdamP:
    """AdamP (Heo et al. 2021) as its reference implementation defines it, in float64; counts which
    projection (channel / layer / none) each 2+-D tensor got."""

    def __init__(
        self,
        params,
        store,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        delta=0.1,
        wd_ratio=0.1,
        nesterov=False,
        maximize=False,
    ):
        self.x = [p.detach().to(torch.float64).clone() for p in params]
        self.m = [torch.zeros_like(x) for x in self.x]
        self.v = [torch.zeros_like(x) for x in self.x]
        self.store, self.lr, (self.b1, self.b2), self.eps, self.wd = store, lr, betas, eps, weight_decay
        self.delta, self.wd_ratio, self.nesterov, self.maximize = delta, wd_ratio, nesterov, maximize
        self.t = [0] * len(self.x)  # per parameter, as the reference implementation counts them
        self.hits = {"channel": 0, "layer": 0, "none": 0}

    def _project(self, x, g, pert):
        for view in ("channel", "layer"):
            shape = (x.shape[0], -1) if view == "channel" else (1, -1)
            xv, gv, pv = x.reshape(shape), g.reshape(shape), pert.reshape(shape)
            cos = (xv * gv).sum(1).abs() / (gv.norm(dim=1).clamp(min=self.eps) * xv.norm(dim=1).clamp(min=self.eps))
            if cos.max() < self.delta / xv.shape[1] ** 0.5:
                pn = xv / (xv.norm(dim=1, keepdim=True) + self.eps)
                self.hits[view] += 1
                return (pv - pn * (pn * pv).sum(1, keepdim=True)).reshape(x.shape), self.wd_ratio
        self.hits["none"] += 1
        return pert, 1.0

    def step(self, grads):
        for i, gi in enumerate(grads):
            if gi is None:
                continue
            self.t[i] += 1
            bc1, bc2 = 1 - self.b1 ** self.t[i], 1 - self.b2 ** self.t[i]
            g = (-gi if self.maximize else gi).to(torch.float64)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            num = self.b1 * self.m[i] + (1 - self.b1) * g if self.nesterov else self.m[i]
            pert = num / (self.v[i].sqrt() / bc2**0.5 + self.eps)
            ratio = 1.0
            if self.x[i].dim() > 1:
                pert, ratio = self._project(self.x[i], g, pert)
            self.x[i] = self.store(self.x[i] * (1 - self.lr * self.wd * ratio) - self.lr / bc1 * pert)


class RefAverager:
    """PolynomialDecayAverager: ``avg = (1 - w) avg + w x``, ``w = (gamma + 1) / (gamma + t)``, t from 1."""

    def __init__(self, params, gamma=8.0):
        self.avg = [p.detach().to(torch.float64).clone() for p in params]
        self.gamma, self.t = gamma, 0

    def step(self, params):
        self.t += 1
        w = (self.gamma + 1) / (self.gamma + self.t)
        self.avg = [(1 - w) * a + w * p.detach().to(torch.float64) for a, p in zip(self.avg, params)]
