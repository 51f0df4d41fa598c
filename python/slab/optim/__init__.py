"""Fused optimizers: ``torch.optim.Optimizer`` subclasses whose step is one multi-tensor kernel
per (device, dtype) bucket of a parameter group (plus the norms the rule needs), with no host
synchronisation inside ``step()``. Parameters may be float32, bfloat16 or float16 (states float32)
and may be FSDP2-sharded DTensors (norms are all-reduced over the shards). Every optimizer supports
``maximize``, a tensor ``lr`` (capturable) and ``torch.amp.GradScaler`` (``grad_scale`` /
``found_inf``: an overflowing step changes nothing).

* :class:`DoG`, :class:`LDoG` — distance-over-gradients step sizes (Ivgi et al. 2023);
* :class:`PolynomialDecayAverager` — the iterate averaging DoG is meant to be used with;
* :class:`Lion` — sign momentum (Chen et al. 2023);
* :class:`LAMB` — Adam with a per-tensor trust ratio (You et al. 2020);
* :class:`LARS` — momentum SGD with a per-tensor rate, optional LARC clipping (You et al. 2017);
* :class:`AdamP` — Adam with projection on scale-invariant weights (Heo et al. 2021).
"""

from .adamp import AdamP
from .averager import PolynomialDecayAverager
from .dog import DoG, LDoG
from .lamb import LAMB
from .lars import LARS
from .lion import Lion

__all__ = ["DoG", "LDoG", "PolynomialDecayAverager", "Lion", "LAMB", "LARS", "AdamP"]
