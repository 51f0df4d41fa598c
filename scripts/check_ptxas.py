#!/usr/bin/env python3
"""Read the ptxas resource report out of a build log and fail on register spills or local memory.

nvcc is run with -Xptxas=-v,--warn-on-spills,--warn-on-local-memory-usage, so the build log holds,
for every kernel and every architecture:

    ptxas info    : Compiling entry function '_Z10add_kernelPfPKfi' for 'sm_80'
    ptxas info    : Function properties for _Z10add_kernelPfPKfi
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 10 registers, used 0 barriers, 372 bytes cmem[0]

and warnings such as "ptxas warning : Registers are spilled to local memory in function '...'".
This script prints one row per (kernel, arch) and exits 1 if any kernel or non-inlined device
function has a nonzero stack frame, spill stores/loads or local memory (lmem), if ptxas reported
a warning/error of that kind, or if the log holds no ptxas report at all.

    python scripts/check_ptxas.py build/pip-build.log
    python scripts/check_ptxas.py --archs "80;89;90a" build/pip-build.log
    nvcc ... -Xptxas=-v 2>&1 | python scripts/check_ptxas.py -

Exit status: 0 clean, 1 violations or no report, 2 bad usage / unreadable log.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GMEM = re.compile(r"ptxas\s+info\s*:\s*\d+ bytes gmem")
_ENTRY = re.compile(r"ptxas\s+info\s*:\s*Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"ptxas\s+info\s*:\s*Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas\s+info\s*:\s*Used (\d+) registers(.*)")
_LMEM = re.compile(r"(\d+) bytes lmem")
_SMEM = re.compile(r"(\d+) bytes smem")
_CUMSTACK = re.compile(r"(\d+) bytes cumulative stack size")
_WARN_SPILL = re.compile(
    r"ptxas\s+(warning|error)\s*:\s*Registers are spilled to local memory in function '([^']+)'"
    r"(?:, (\d+) bytes spill stores, (\d+) bytes spill loads)?"
)
_WARN_LMEM = re.compile(
    r"ptxas\s+(warning|error)\s*:\s*Local memory used for function '([^']+)'"
    r"(?:, size of stack frame: (\d+) bytes)?"
)
_PTXAS_ERR = re.compile(r"ptxas\s+(error|fatal)\s*:\s*(.*)")
_SOURCE = re.compile(r"Building CUDA object \S*?([^/\s]+\.cu)\.o")
_CUDA_FLAG = re.compile(r"slab: CUDA kernels (ON|OFF)")


@dataclass
class Record:
    name: str
    arch: str
    kind: str = "function"  # "kernel" (entry function) or "function" (non-inlined device function)
    source: str = ""
    registers: int | None = None
    stack: int = 0
    cumulative_stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    lmem: int = 0
    smem: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # ptxas spill/lmem warnings (no arch given)
    errors: list[str] = field(default_factory=list)  # ptxas error/fatal lines
    cuda_flag: str | None = None  # "ON"/"OFF" from CMake's "slab: CUDA kernels ..." line


def _arch_name(arch: str) -> str:
    arch = arch.strip().lower().replace(".", "")
    if not arch:
        return arch
    return arch if arch.startswith(("sm_", "compute_")) else "sm_" + arch


def parse(lines) -> Report:
    rep = Report()
    arch = "?"
    source = ""
    last_entry: str | None = None
    pending: Record | None = None

    def record(name: str, a: str) -> Record:
        key = (name, a)
        if key not in rep.records:
            rep.records[key] = Record(name=name, arch=a, source=source)
        return rep.records[key]

    for raw in lines:
        line = _ANSI.sub("", raw.rstrip("\r\n")).replace("\r", "")
        m = _CUDA_FLAG.search(line)
        if m:
            rep.cuda_flag = m.group(1)
        m = _SOURCE.search(line)
        if m:
            source = m.group(1)
            continue
        if _GMEM.search(line):
            pending, last_entry = None, None
            continue
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            last_entry = m.group(1)
            record(last_entry, arch).kind = "kernel"
            pending = None
            continue
        m = _PROPS.search(line)
        if m:
            pending = record(m.group(1), arch)
            if m.group(1) == last_entry:
                pending.kind = "kernel"
            continue
        m = _FRAME.search(line)
        if m and pending is not None:
            pending.stack, pending.spill_stores, pending.spill_loads = (int(g) for g in m.groups())
            pending = None
            continue
        m = _USED.search(line)
        if m and last_entry is not None:
            r = record(last_entry, arch)
            r.registers = int(m.group(1))
            rest = m.group(2)
            for rx, attr in ((_LMEM, "lmem"), (_SMEM, "smem"), (_CUMSTACK, "cumulative_stack")):
                mm = rx.search(rest)
                if mm:
                    setattr(r, attr, int(mm.group(1)))
            continue
        for rx in (_WARN_SPILL, _WARN_LMEM):
            m = rx.search(line)
            if m:
                rep.warnings.append(line.strip())
                break
        else:
            m = _PTXAS_ERR.search(line)
            if m:
                rep.errors.append(line.strip())
    return rep


def check(rep: Report, max_registers: int | None, pretty: dict[str, str]) -> list[str]:
    failures = []
    for r in rep.records.values():
        if r.spill_stores or r.spill_loads:
            r.problems.append(f"spills {r.spill_stores}/{r.spill_loads} B")
        if r.stack:
            r.problems.append(f"stack frame {r.stack} B")
        elif r.cumulative_stack:
            r.problems.append(f"cumulative stack {r.cumulative_stack} B")
        if r.lmem:
            r.problems.append(f"lmem {r.lmem} B")
        if max_registers is not None and r.registers is not None and r.registers > max_registers:
            r.problems.append(f"{r.registers} registers > {max_registers}")
        if r.problems:
            failures.append(f"{_compact(pretty.get(r.name, r.name))} [{r.arch}]: " + ", ".join(r.problems))
    failures += [f"ptxas: {w}" for w in rep.warnings]
    failures += [f"ptxas: {e}" for e in rep.errors]
    return failures


def demangler(names: list[str], enabled: bool) -> dict[str, str]:
    out = {n: n for n in names}
    cxxfilt = shutil.which("c++filt") if enabled else None
    if not cxxfilt or not names:
        return out
    try:
        res = subprocess.run(
            [cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return out
    lines = res.stdout.splitlines()
    if len(lines) == len(names):
        out = dict(zip(names, lines))
    return out


def _compact(name: str) -> str:
    """A shorter display name: no return type 'void ', no '(anonymous namespace)::'."""
    name = name.replace("(anonymous namespace)::", "")
    return name[5:] if name.startswith("void ") else name


def _short(s: str, width: int) -> str:
    return s if width <= 0 or len(s) <= width else s[: width - 3] + "..."


def _arch_key(a: str) -> tuple[int, str]:
    m = re.search(r"(\d+)", a)
    return (int(m.group(1)) if m else 0, a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("logs", nargs="+", metavar="LOG", help="build log(s); '-' reads stdin")
    ap.add_argument("--archs", default=None, help="architectures that must each appear in the report, e.g. '80;89;90a'")
    ap.add_argument(
        "--allow-cpu-only",
        action="store_true",
        help="exit 0 when the log says the CUDA kernels were not built ('slab: CUDA kernels OFF')",
    )
    ap.add_argument(
        "--max-registers", type=int, default=None, help="also fail when a kernel uses more registers than this"
    )
    ap.add_argument("--width", type=int, default=100, help="truncate kernel names to this width (0: never)")
    ap.add_argument("--no-demangle", action="store_true", help="print mangled names")
    ap.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only problems and the verdict")
    args = ap.parse_args(argv)

    lines: list[str] = []
    for path in args.logs:
        try:
            if path == "-":
                lines += sys.stdin.read().splitlines()
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines += f.read().splitlines()
        except OSError as e:
            print(f"check_ptxas: cannot read {path}: {e}", file=sys.stderr)
            return 2
    where = ", ".join(args.logs)

    rep = parse(lines)
    if not rep.records and not rep.warnings and not rep.errors:
        if rep.cuda_flag == "OFF" and args.allow_cpu_only:
            print(f"check_ptxas: CPU-only build ({where} says 'CUDA kernels OFF'); nothing to check")
            return 0
        print(
            f"check_ptxas: FAIL: no ptxas report found in {where}.\n"
            "  Was CUDA built, was the build verbose (pip install -v) and did nvcc actually run "
            "(a fresh build directory, not an up-to-date incremental one)?",
            file=sys.stderr,
        )
        return 1

    names = sorted({r.name for r in rep.records.values()})
    pretty = demangler(names, not args.no_demangle)
    failures = check(rep, args.max_registers, pretty)
    archs_seen = sorted({r.arch for r in rep.records.values() if r.kind == "kernel"}, key=_arch_key)
    if args.archs:
        wanted = [_arch_name(a) for a in re.split(r"[;,\s]+", args.archs) if a.strip()]
        for a in wanted:
            if a not in archs_seen:
                failures.append(
                    f"architecture {a} requested but no kernel was compiled for it "
                    f"(seen: {', '.join(archs_seen) or 'none'})"
                )

    recs = sorted(rep.records.values(), key=lambda r: (r.kind != "kernel", pretty[r.name], _arch_key(r.arch)))
    n_kernels = len({r.name for r in recs if r.kind == "kernel"})
    n_funcs = len({r.name for r in recs if r.kind != "kernel"})

    src_w = max([len("source")] + [len(r.source) for r in recs])
    if not args.quiet:
        print(
            f"ptxas report from {where}: {n_kernels} kernel(s)"
            + (f", {n_funcs} non-inlined device function(s)" if n_funcs else "")
            + f", archs {', '.join(archs_seen) or 'none'}"
        )
        hdr = (
            f"{'status':<6} {'arch':<8} {'regs':>4} {'stack':>6} {'spill st/ld':>12} {'lmem':>5} {'smem':>6}"
            f"  {'source':<{src_w}}  kernel"
        )
        print(hdr)
        print("-" * len(hdr))
    for r in recs:
        if args.quiet and not r.problems:
            continue
        regs = "-" if r.registers is None else str(r.registers)
        stack = r.stack or r.cumulative_stack
        name = _compact(pretty[r.name]) + ("" if r.kind == "kernel" else "  (device function)")
        print(
            f"{'FAIL' if r.problems else 'ok':<6} {r.arch:<8} {regs:>4} {stack:>6} "
            f"{f'{r.spill_stores}/{r.spill_loads}':>12} {r.lmem:>5} {r.smem:>6}  {r.source or '-':<{src_w}}"
            f"  {_short(name, args.width)}"
        )

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "records": [asdict(r) | {"demangled": pretty[r.name]} for r in recs],
                    "warnings": rep.warnings,
                    "errors": rep.errors,
                    "failures": failures,
                },
                f,
                indent=1,
            )

    if failures:
        print(f"check_ptxas: FAIL: {len(failures)} problem(s):", file=sys.stderr)
        for f_ in failures:
            print(f"  {_short(f_, max(args.width, 0) * 2)}", file=sys.stderr)
        return 1
    print(f"check_ptxas: OK: {len(recs)} (function, arch) entries, no spills, no stack frame, no local memory")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(1)
