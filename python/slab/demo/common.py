"""Shared pieces of the demo: seeding, the training loop, timing."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from ._ddp import World, all_mean
from .models import current_lam


def seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def progress(total: int, desc: str, world: World, quiet: bool):
    """A tqdm bar on rank 0 when stderr is a terminal (None otherwise)."""
    if quiet or not world.main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Callable[[int], tuple],
    steps: int,
    loss_fn: Callable,
    world: World,
    device: torch.device,
    desc: str,
    *,
    log_every: int,
    quiet: bool = False,
    sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    track_acc: bool = True,
    clip: Optional[float] = 1.0,
) -> tuple[list[dict], float]:
    """Runs ``steps`` optimizer steps; ``batches(step)`` returns this rank's ``(inputs, targets)``.
    Returns the history (one entry per ``log_every`` steps: step, loss, accuracy, lam) and the
    wall time in seconds. ``model`` may be DDP-wrapped; ``lam`` is read from its PRepBNs."""
    inner = model.module if hasattr(model, "module") else model
    bar = progress(steps, desc, world, quiet)
    history: list[dict] = []
    model.train()
    t0 = time.perf_counter()
    run_loss, run_acc, run_n = 0.0, 0.0, 0
    for step in range(steps):
        x, y = batches(step)
        lam = current_lam(inner)
        out = model(x)
        loss, correct = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:  # keeps DoG's growing step sizes stable once lam reaches 0 (pure RepBN)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        run_loss += float(loss.detach())
        run_acc += float(correct)
        run_n += 1
        if bar is not None:
            post = {"loss": f"{run_loss / run_n:.3f}"}
            if track_acc:
                post["acc"] = f"{run_acc / run_n:.3f}"
            if lam is not None:
                post["lam"] = f"{lam:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {
                "step": step + 1,
                "loss": all_mean(run_loss / run_n, world, device),
                "seconds": time.perf_counter() - t0,
            }
            if track_acc:
                entry["accuracy"] = all_mean(run_acc / run_n, world, device)
            if lam is not None:
                entry["lam"] = current_lam(inner)
            history.append(entry)
            if bar is None and world.main and not quiet:
                extra = f" acc {entry['accuracy']:.3f}" if track_acc else ""
                extra += f" lam {entry['lam']:.3f}" if lam is not None else ""
                print(f"  {desc} step {step + 1}/{steps}: loss {entry['loss']:.4f}{extra}", flush=True)
            run_loss, run_acc, run_n = 0.0, 0.0, 0
    if bar is not None:
        bar.close()
    return history, time.perf_counter() - t0


def interleaved_median(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each callable, the repeats interleaved across them (so a load
    spike on the shared machine hits every model alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
