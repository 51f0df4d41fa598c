"""The ``slab`` command (also ``python -m slab``).

slab info [--json]   build and runtime facts for a bug report (slab.info)
slab bench [...]     check and time every op; the same as ``slab-bench`` (slab.bench)
slab demo [...]      train, deploy, quantize, sparsify and time a small SLAB model (slab.demo);
                     ``torchrun --nproc-per-node 2 -m slab demo`` trains it data-parallel
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from slab import info

    parser = argparse.ArgumentParser(prog="slab", description="slab: C++/CUDA kernels for efficient transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser(
        "info",
        help="print the build and runtime facts a bug report needs",
        description="Print the build and runtime facts a bug report needs.",
    )
    info.add_arguments(p_info)
    sub.add_parser(
        "bench",
        add_help=False,
        help="check every op against its reference, then time it (same as slab-bench; "
        "`slab bench --help` lists its options)",
    )
    p_demo = sub.add_parser(
        "demo",
        help="train, deploy, quantize, sparsify and time a small SLAB model",
        description="Train a small SLAB model (vision, or --lm), fold its norms, quantize "
        "it to W4A8, sparsify its MLPs with CATS and time every variant "
        "against a plain-PyTorch twin.",
    )
    _add_demo_arguments(p_demo)
    p_demo.set_defaults(demo_parser=p_demo)  # its errors print "slab demo: error: ..." (exit 2)
    return parser


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from slab.demo import add_arguments  # the demo imports slab; slab never imports the demo

    add_arguments(p)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # every further argument belongs to slab-bench
        from slab import bench

        return bench.main(argv[1:])
    if argv and argv[0] == "demo":  # its own parser: one-line errors, exit status 2
        from slab import demo

        return demo.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from slab import info

        return info.run(as_json=args.json)
    if args.command == "demo":
        from slab import demo

        return demo.run(args, args.demo_parser)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
