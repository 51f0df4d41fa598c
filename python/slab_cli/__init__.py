"""The console scripts ``slab`` and ``slab-bench``.

They live outside the ``slab`` package on purpose: ``import slab`` loads the op library and raises
an ImportError when that fails (as it should for a program importing slab), which a console
script importing ``slab.bench`` would print as a traceback. Here slab's own one-line message is
printed instead (it names slab and the fix), and the command exits with status 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["slab", "bench"]


def _failed_import(command: str, exc: ImportError) -> int:
    if isinstance(exc, ModuleNotFoundError) and exc.name == "torch":
        message = "slab needs PyTorch: pip install torch"
    else:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not message.startswith("slab"):  # not slab's own loader message: a real bug, keep its traceback
            raise exc
    print(message if message.startswith("slab") else f"{command}: {message}", file=sys.stderr)
    return 2


def slab(argv: Optional[Sequence[str]] = None) -> int:
    """``slab`` (info, demo, bench); ``argv`` defaults to the command line."""
    try:
        from slab.__main__ import main
    except ImportError as exc:
        return _failed_import("slab", exc)
    return main(argv)


def bench(argv: Optional[Sequence[str]] = None) -> int:
    """``slab-bench``; ``argv`` defaults to the command line."""
    try:
        from slab.bench import main
    except ImportError as exc:
        return _failed_import("slab-bench", exc)
    return main(argv)
