#!/usr/bin/env python3
"""Check that built objects or libraries import only stable entry points of libtorch.

A library that is to load under every torch from 2.11 on may leave undefined only
  - the stable C shim: ``aoti_torch_*`` and the ``torch_*`` C functions of torch/csrc/stable/c/shim.h,
  - the C and C++ runtime (libc, libm, libstdc++, libgcc: unmangled C names, ``std::``, ``__cxa_*``,
    ``operator new/delete``, typeinfo/vtables of the C++ runtime),
  - the CUDA runtime (``cuda*``, ``__cuda*``) for CUDA code.
Anything else (``at::``, ``c10::``, ``torch::`` C++ symbols, Sleef, ...) ties the binary to the
exact torch it was built against. ``nm -D --undefined-only`` (``nm --undefined-only`` for objects)
lists the imports; this script classifies them and exits 1 when an unstable one is found.

    python scripts/check_symbols.py build/*/CMakeFiles/slab_ops.dir/csrc/*/*_cpu.cpp.o
    python scripts/check_symbols.py --report-only path/to/libslab_ops.so   # count, never fail

Exit status: 0 clean (or --report-only), 1 unstable imports, 2 bad usage / nm failed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

_C_RUNTIME = re.compile(
    r"^(std::|__cxa_|__cxxabiv1::|__gxx_|__gcc_|_Unwind_|__dso_handle|_GLOBAL_OFFSET_TABLE_|operator (new|delete)|"
    r"(typeinfo|typeinfo name|vtable|VTT) for (std::|__cxxabiv1::|__gnu_cxx::)|__gnu_cxx::|__stack_chk|__tls_get_addr|"
    r"__libc_|__errno_location|__assert_fail|__pthread|__cxa)"
)
_CUDA = re.compile(r"^(cuda|__cuda|cu[A-Z]|__fatbinwrap|__nv)")
_STABLE_SHIM = re.compile(r"^(aoti_torch_|torch_)[A-Za-z0-9_]*$")
_PLAIN_C = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(@.*)?$")  # an unmangled name: libc/libm (or the shim)


def imports(path: str) -> list[str]:
    dynamic = [] if path.endswith(".o") else ["-D"]
    out = subprocess.run(["nm", "-C", *dynamic, "--undefined-only", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nm failed on {path}: {out.stderr.strip()}")
    rows = [line.split(None, 1) for line in out.stdout.splitlines()]
    return [r[1].strip() for r in rows if len(r) == 2 and r[0] in ("U", "w")]


def unstable(symbol: str) -> bool:
    name = symbol.split("@")[0]
    if name.startswith("slab::"):  # the library's own functions (an object's imports from its siblings)
        return False
    if _STABLE_SHIM.match(name) or _C_RUNTIME.match(name) or _CUDA.match(name):
        return False
    if re.match(r"^(at::|c10::|torch::|caffe2::|Sleef_)", name) or "::" in name:
        return True
    return not _PLAIN_C.match(symbol)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="object files (.o) or shared libraries")
    ap.add_argument("--report-only", action="store_true", help="print the count of unstable imports, exit 0")
    args = ap.parse_args()
    bad: dict[str, list[str]] = {}
    try:
        for path in args.paths:
            found = sorted({s for s in imports(path) if unstable(s)})
            if found:
                bad[path] = found
    except (RuntimeError, FileNotFoundError) as e:
        print(f"check_symbols: {e}", file=sys.stderr)
        return 2
    total = sum(len(v) for v in bad.values())
    if args.report_only:
        print(f"check_symbols: {total} unstable libtorch imports in {len(args.paths)} file(s) (report only)")
        return 0
    for path, found in bad.items():
        print(f"{path}: {len(found)} unstable imports")
        for s in found[:40]:
            print(f"    {s}")
    if total:
        print(f"check_symbols: FAILED: {total} unstable imports in {len(bad)} of {len(args.paths)} file(s)")
        return 1
    print(f"check_symbols: OK: {len(args.paths)} file(s) import only the stable shim and the C/C++/CUDA runtimes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
