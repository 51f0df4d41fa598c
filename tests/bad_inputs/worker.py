"""Runs cases of bad_inputs.cases in this process and reports each as one JSON line.

Protocol (tests/test_bad_inputs.py is the other side): the first line of stdin is a JSON list of
case ids. The worker answers ``{"event": "ready"}`` once torch and slab are imported, then for
each case ``{"event": "start", "id": ...}`` before running it and ``{"event": "done", "id": ...,
...outcome}`` after, flushing every line, so that the parent knows which case was running when
the process died. Run as ``python -m bad_inputs.worker`` with tests/ on the path.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
import warnings
import zlib

# Protocol lines go to a private copy of stdout; whatever else writes to fd 1 (a C++ printf, a
# stray print) lands on stderr instead of in the middle of a JSON line.
_proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr
faulthandler.enable()  # a segfault prints the Python stack to stderr, which the parent keeps

import torch  # noqa: E402

import slab  # noqa: E402,F401  (loads the op library)
from bad_inputs import cases  # noqa: E402


def send(msg: dict) -> None:
    _proto.write(json.dumps(msg) + "\n")
    _proto.flush()


def _limit_memory() -> None:
    # A case whose size check wrapped around could ask for terabytes; make that a MemoryError-like
    # failed allocation instead of the machine swapping or the OOM killer taking the test run.
    try:
        import resource

        with open("/proc/self/statm") as f:
            vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = vsize + 8 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, OSError, ValueError):
        pass


# ---- snapshots of the tensor arguments ------------------------------------------------------------


def _tensors(args: dict):
    """(label, tensor) for every tensor argument, list elements as ``name[i]``."""
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            yield name, name, value
        elif isinstance(value, (list, tuple)):
            for i, t in enumerate(value):
                if isinstance(t, torch.Tensor):
                    yield name, f"{name}[{i}]", t


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of the elements (so NaN == NaN and -0.0 != 0.0), in a fresh contiguous tensor."""
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.detach().reshape(-1).clone().view(torch.uint8)


def _layout(t: torch.Tensor):
    return (
        tuple(t.shape),
        t.stride() if t.layout == torch.strided else None,
        t.storage_offset() if t.layout == torch.strided else None,
        t.dtype,
        str(t.device),
    )


def snapshot(args: dict) -> list:
    snap = []
    for name, label, t in _tensors(args):
        bits = None if t.device.type == "meta" else _bits(t)
        snap.append((name, label, t, _layout(t), bits))
    return snap


def changed(snap: list) -> list:
    """(arg name, label, "layout" or "values") for each tensor that differs from the snapshot."""
    out = []
    for name, label, t, layout, bits in snap:
        if _layout(t) != layout:
            out.append((name, label, "layout"))
        elif bits is not None and not torch.equal(_bits(t), bits):
            out.append((name, label, "values"))
    return out


def written_args(op) -> set:
    return {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


# ---- one case -------------------------------------------------------------------------------------


def error_kind(e: BaseException) -> str:
    # NotImplementedError subclasses RuntimeError in Python; report it under its own name.
    for kind in (NotImplementedError, ValueError, TypeError, RuntimeError):
        if isinstance(e, kind):
            return kind.__name__
    return type(e).__name__


def run(case: cases.Case) -> dict:
    torch.manual_seed(zlib.crc32(case.id.encode()))
    try:
        args = case.build()
    except Exception:
        return {"build_error": traceback.format_exc(limit=-3)}
    op = getattr(torch.ops.slab, case.op).default
    written = written_args(op)
    snap = snapshot(args)
    out = {"raised": None, "message": "", "changed": [], "check": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = op(**args)
    except Exception as e:  # noqa: BLE001 - every exception is an outcome to report
        out["raised"] = error_kind(e)
        out["type"] = f"{type(e).__module__}.{type(e).__qualname__}"
        out["message"] = str(e)
    else:
        if case.check is not None:
            try:
                out["check"] = case.check(result)
            except Exception:
                out["check"] = "the result check raised:\n" + traceback.format_exc(limit=-2)
    # A valid call may write only the values of what the schema marks (never resize or restride
    # it); a failed call may write nothing.
    failed = out["raised"] is not None
    out["changed"] = [
        label if what == "values" else f"{label} (layout)"
        for name, label, what in changed(snap)
        if failed or name not in written or what == "layout"
    ]
    return out


def main() -> None:
    ids = json.loads(sys.stdin.readline())
    table = {c.id: c for c in cases.all_cases()}
    _limit_memory()
    send({"event": "ready"})
    for cid in ids:
        send({"event": "start", "id": cid})
        case = table.get(cid)
        result = run(case) if case is not None else {"build_error": f"no case {cid!r} in the table"}
        send({"event": "done", "id": cid, **result})


if __name__ == "__main__":
    main()
