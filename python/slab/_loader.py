"""Loading slab's op libraries (used by ``slab/__init__.py``; ``slab info`` reads :data:`STATE`).

* ``libslab_ops.so``: every schema and the CPU kernels; loading it runs the static registrations.
  ``$SLAB_LIBRARY`` points at a development build instead of the installed one.
* ``libslab_cuda.so``: the CUDA kernels, in the same folder (``$SLAB_CUDA_LIBRARY`` overrides the
  path); loaded only when torch is a CUDA build, so one wheel imports under a CPU-only torch too.
  When it is not loaded, every op with a CPU kernel and no CUDA kernel gets a CUDA kernel that
  raises a RuntimeError saying why (:func:`register_cuda_fallbacks`).
* ``_build_info.json`` next to ``libslab_ops.so`` (written by cmake/build_info.cmake): the build
  facts; absent in a development build that predates it, then every fact reads "unknown".

Nothing here raises except :func:`check_torch_version` and :func:`load_ops_library`, whose
ImportErrors are one line each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = [
    "TORCH_MIN",
    "STATE",
    "LoadState",
    "parse_torch_version",
    "check_torch_version",
    "read_build_info",
    "load_ops_library",
    "load_cuda_library",
    "register_cuda_fallbacks",
    "cuda_unavailable_message",
    "load",
]

TORCH_MIN = (2, 11)  # the stable-ABI target: the oldest torch the op library loads under
TORCH_MIN_STR = ".".join(map(str, TORCH_MIN))
OPS_LIBRARY = "libslab_ops.so"
CUDA_LIBRARY = "libslab_cuda.so"
BUILD_INFO = "_build_info.json"
PIP_NAME = "slab-kernels"

REASON_CPU_TORCH = "torch is a CPU-only build"
REASON_NO_CUDA_LIBRARY = f"this slab build has no CUDA kernels ({CUDA_LIBRARY} not found)"

_HINT_CPU_TORCH = "Install a CUDA build of torch (and of slab), or move the tensors to the CPU."
_HINT_NO_CUDA_LIBRARY = (
    "Rebuild slab with a CUDA build of torch and nvcc present (SLAB_CUDA=1), or move the tensors to the CPU."
)
_HINT_LOAD_FAILED = (
    "Reinstall slab against the running torch and CUDA (`slab info` shows both), or move the tensors to the CPU."
)


@dataclasses.dataclass
class LoadState:
    """What loading found; filled in by :func:`load`, printed by ``slab info``."""

    ops_library: Optional[str] = None  # path of the loaded libslab_ops.so
    cuda_library: Optional[str] = None  # path of the CUDA kernels' library (loaded or tried)
    cuda_loaded: bool = False  # the CUDA kernels are registered
    cuda_reason: Optional[str] = None  # why not, when they are not
    cuda_hint: Optional[str] = None  # what to do about it
    cuda_fallback_ops: list[str] = dataclasses.field(default_factory=list)  # ops given the error kernel
    build_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # {} when absent
    build_info_path: Optional[str] = None
    build_info_error: Optional[str] = None  # why build_info is empty


STATE = LoadState()
_fallback_libraries: list = []  # torch.library.Library objects: registrations live as long as they do


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def parse_torch_version(version: object) -> Optional[tuple[int, int, int]]:
    """(major, minor, patch) of a torch version string: '2.13.0+cpu', '2.11.0a0+git1234abc',
    '2.14.1', '2.12' all parse; pre-release and local parts are ignored. None when unparseable."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_torch_version(version: object, slab_version: str = "") -> None:
    """ImportError (one line) when ``version`` is older than :data:`TORCH_MIN`; an unparseable
    version passes (loading the library is the real test)."""
    parsed = parse_torch_version(version)
    if parsed is not None and parsed[:2] < TORCH_MIN:
        name = f"slab {slab_version}" if slab_version else "slab"
        raise ImportError(
            f"{name} needs torch >= {TORCH_MIN_STR} (found torch {version}); pip install 'torch>={TORCH_MIN_STR}'"
        )


def ops_library_path() -> str:
    return os.environ.get("SLAB_LIBRARY") or os.path.join(os.path.dirname(os.path.abspath(__file__)), OPS_LIBRARY)


def read_build_info(library_path: str) -> tuple[dict[str, Any], str, Optional[str]]:
    """(facts, path, error) from the ``_build_info.json`` next to ``library_path``; facts is {}
    and error says why when the file is missing or unreadable."""
    path = os.path.join(os.path.dirname(os.path.abspath(library_path)), BUILD_INFO)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict):
            return {}, path, f"{path} does not hold a JSON object"
        return info, path, None
    except FileNotFoundError:
        return {}, path, f"no {BUILD_INFO} next to {os.path.basename(library_path)} (a development build?)"
    except (OSError, ValueError) as exc:
        return {}, path, f"cannot read {path}: {_one_line(exc)}"


def load_ops_library(path: str, slab_version: str = "") -> None:
    """Loads ``libslab_ops.so`` (the static registrations run). ImportError (one line) when it is
    missing, or when the dynamic loader refuses it -- typically undefined symbols of a library
    built against another torch; the OSError is the ImportError's ``__cause__``."""
    if not os.path.exists(path):
        raise ImportError(
            f"slab: op library not found at {path}; install slab with pip (which builds it), "
            "or set SLAB_LIBRARY to a built libslab_ops.so"
        )
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        name = f"slab {slab_version}" if slab_version else "slab"
        running = str(torch.__version__)
        built = STATE.build_info.get("torch_version") or "unknown"
        reinstall = f"pip install --force-reinstall --no-deps --no-build-isolation {PIP_NAME}"
        if built == "unknown":
            built_desc = (
                f"it was built against an unknown torch (no readable {BUILD_INFO}) and torch {running} "
                f"is running: reinstalling slab against the running torch fixes it ({reinstall})"
            )
        elif built != running:
            built_desc = (
                f"it was built against torch {built} and torch {running} is running: reinstalling slab "
                f"against the running torch fixes it ({reinstall})"
            )
        else:
            built_desc = (
                f"it was built against torch {built}, the running one: check that what it links to is "
                f"installed, or reinstall slab ({reinstall})"
            )
        raise ImportError(f"{name}: cannot load {path} ({load_error_text(exc, path)}); {built_desc}") from exc


def load_error_text(exc: BaseException, path: str) -> str:
    """The dynamic loader's message for a failed torch.ops.load_library: torch wraps the ctypes
    OSError (which has the dlerror text: undefined symbol, missing dependency) in its own
    "Could not load this library" OSError. One line, without a leading "<path>: "."""
    inner = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    text = _one_line(inner)
    for prefix in (f"{path}: ", f"{os.path.abspath(path)}: "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return text


def load_cuda_library(ops_path: str) -> None:
    """Loads the CUDA kernels' library when torch is a CUDA build; records in :data:`STATE`
    whether the CUDA kernels are registered and, if not, why. Never raises."""
    if not torch.version.cuda:
        STATE.cuda_reason, STATE.cuda_hint = REASON_CPU_TORCH, _HINT_CPU_TORCH
        return
    override = os.environ.get("SLAB_CUDA_LIBRARY")
    path = override or os.path.join(os.path.dirname(os.path.abspath(ops_path)), CUDA_LIBRARY)
    STATE.cuda_library = path
    if not os.path.exists(path):
        if override:
            STATE.cuda_reason = f"SLAB_CUDA_LIBRARY={override} does not exist"
        else:
            STATE.cuda_reason = REASON_NO_CUDA_LIBRARY
        STATE.cuda_hint = _HINT_NO_CUDA_LIBRARY
        return
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        STATE.cuda_reason = f"{os.path.basename(path)} did not load ({load_error_text(exc, path)})"
        STATE.cuda_hint = _HINT_LOAD_FAILED
        return
    STATE.cuda_loaded = True


def cuda_unavailable_message(qualname: str, reason: str, hint: str = _HINT_NO_CUDA_LIBRARY) -> str:
    """The error of a slab op called with a CUDA tensor when the CUDA kernels are not loaded
    (the message of the C++ cuda_unavailable it replaces, with the reason filled in)."""
    return f"{qualname}: got a CUDA tensor, but {reason}. {hint}"


def cuda_unavailable_kernel(qualname: str, reason: str, hint: str = _HINT_NO_CUDA_LIBRARY) -> Callable:
    """A kernel (for the CUDA dispatch key) that raises :func:`cuda_unavailable_message`."""
    message = cuda_unavailable_message(qualname, reason, hint)

    def kernel(*args, **kwargs):
        raise RuntimeError(message)

    kernel.__name__ = f"cuda_unavailable_{qualname.split('::')[-1].replace('.', '_')}"
    return kernel


def namespace_overloads(namespace: str = "slab") -> Iterator[tuple[str, "torch._ops.OpOverload"]]:
    """(``op`` or ``op.overload``, the OpOverload) of every op and overload registered under
    ``namespace``, in name order; ops not reachable through ``torch.ops`` are skipped."""
    prefix = f"{namespace}::"
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith(prefix):
            continue
        op = name[len(prefix) :]
        try:
            packet = getattr(getattr(torch.ops, namespace), op)
        except Exception:  # noqa: BLE001 - not reachable through torch.ops: leave it alone
            continue
        for overload in packet.overloads():
            yield (op if overload == "default" else f"{op}.{overload}"), getattr(packet, overload)


def register_cuda_fallbacks(reason: str, hint: str = _HINT_NO_CUDA_LIBRARY, namespace: str = "slab") -> list[str]:
    """Registers :func:`cuda_unavailable_kernel` under the CUDA key for every op (and overload) of
    ``namespace`` with a CPU kernel and no CUDA kernel. Returns the qualified names it covered."""
    lib = torch.library.Library(namespace, "IMPL")
    covered = []
    for qualified, _ in namespace_overloads(namespace):
        full = f"{namespace}::{qualified}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(full, "CPU"):
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(full, "CUDA"):
            continue  # real CUDA kernels
        lib.impl(qualified, cuda_unavailable_kernel(full, reason, hint), "CUDA")
        covered.append(full)
    _fallback_libraries.append(lib)
    return covered


def load(slab_version: str) -> LoadState:
    """Everything ``import slab`` does before ``slab.ops``: torch version check, build facts,
    libslab_ops.so, libslab_cuda.so (or the CUDA error kernels)."""
    check_torch_version(torch.__version__, slab_version)
    path = ops_library_path()
    STATE.ops_library = path
    STATE.build_info, STATE.build_info_path, STATE.build_info_error = read_build_info(path)
    load_ops_library(path, slab_version)
    load_cuda_library(path)
    if not STATE.cuda_loaded:
        STATE.cuda_fallback_ops = register_cuda_fallbacks(
            STATE.cuda_reason or "the CUDA kernels are not loaded", STATE.cuda_hint or _HINT_NO_CUDA_LIBRARY
        )
    return STATE
