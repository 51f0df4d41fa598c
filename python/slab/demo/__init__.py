"""``slab demo``: train, deploy, quantize, sparsify and time a small SLAB model.

    slab demo [--lm] [--quick] [--device cpu|cuda[:N]] [--json PATH] [--plot PATH]
    torchrun --nproc-per-node 2 -m slab demo      # data parallel (gloo on CPU, NCCL on CUDA)

Vision (default): a SLAB vision transformer on scikit-learn's 8x8 digits (see
:mod:`slab.demo.vision`); ``--lm``: a causal SLAB LM on text from a small grammar (see
:mod:`slab.demo.lm`). The JSON (``--json``) holds ``task``, ``train_seconds`` and ``models``, a
list of ``{name, accuracy | perplexity, latency_ms}`` with names ``float``, ``deployed``,
``w4a8``, ``cats`` and ``baseline`` (the plain-PyTorch twin); ``accuracy`` is a fraction in
[0, 1] (the table prints percent), ``latency_ms`` is per image (vision) or per token (lm); for
``--lm`` also ``decode``, a list of ``{context, slab_tokens_per_s, softmax_kv_tokens_per_s}``.

Nothing else in slab imports this package (only ``slab.__main__``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "add_arguments", "run"]


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm", action="store_true", help="the causal language model instead of the vision model")
    p.add_argument("--quick", action="store_true", help="a few steps on tiny models (for CI)")
    p.add_argument(
        "--device",
        type=_device,
        default=None,
        help="cpu, cuda or cuda:N (default: cuda when slab's CUDA kernels are available, else cpu)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="write a PNG (training curves, latency/quality per model)")
    p.add_argument("--epochs", type=_positive, default=None, help="vision: training epochs (default 120, quick 2)")
    p.add_argument("--steps", type=_positive, default=None, help="lm: training steps (default 600, quick 8)")
    p.add_argument(
        "--optim",
        choices=("ldog", "dog"),
        default="ldog",
        help="the SLAB models' optimizer: slab.optim.LDoG (per-tensor DoG step sizes, default) or "
        "slab.optim.DoG (one step size for the whole model)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args, parser: Optional[argparse.ArgumentParser] = None) -> int:
    import torch

    import slab

    from . import _ddp, report

    def fail(msg: str) -> int:
        if parser is not None:
            parser.error(msg)  # one line, exit status 2
        print(f"slab demo: error: {msg}", file=sys.stderr)
        return 2

    if args.plot:
        why = report.check_plot_available()
        if why:
            return fail(why)
    if args.device is None:
        args.device = "cuda" if slab.cuda_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not slab.cuda_available():
            return fail(f"--device {args.device}: slab's CUDA kernels are not available (slab info says why)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return fail(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    world = _ddp.init(device)
    if world.initialized and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    t0 = time.perf_counter()
    try:
        if args.lm:
            from . import lm

            result = lm.run(args, world, device)
        else:
            from . import vision

            result = vision.run(args, world, device)
        _ddp.barrier(world)
    finally:
        _ddp.finish(world)
    if result is None:  # not rank 0
        return 0
    result.update(
        {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "slab": slab.__version__,
            "quick": bool(args.quick),
            "total_seconds": time.perf_counter() - t0,
        }
    )
    print()
    print(report.table(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {os.path.abspath(args.json)}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {os.path.abspath(args.plot)}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (no usage block), exit status 2 as argparse
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _Parser(prog="slab demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, parser)
