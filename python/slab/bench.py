"""``slab-bench``: check every op against its float64 reference, then time it.

This module is the runner: the registry of entries, the command line, the tables and the files it
writes. The per-family check and benchmark bodies live in :mod:`slab.benches` (one module per
family), the references in :mod:`slab.reference`, the tolerance table in
:mod:`slab.reference.compare`, the timing helpers in :mod:`slab._bench`.

On the current device (``cuda`` when a GPU is present and slab's CUDA kernels are built, else
``cpu``; ``--device`` chooses) every entry first runs its correctness check -- the op on
float32/bfloat16/float16 inputs (optimizers: float32 and bfloat16 parameters) against the
plain-PyTorch reference run in float64 on the same rounded inputs; outputs, gradients and in-place
states compared with THE per-dtype tolerance -- and prints PASS/FAIL per op. Then one speed table:
slab against the eager reference composite, ``torch.compile`` of it and the best known library op,
with the spread of the timed calls and a "noisy" flag per row. Every run writes a JSON file (the
path is printed at the end). Exit status: 0, 1 when a check fails, 2 on bad flags or when the op
library cannot be used.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

from slab import _bench

__all__ = [
    "CheckResult",
    "BenchContext",
    "Entry",
    "register",
    "REGISTRY",
    "check_tensors",
    "speed_row",
    "main",
    "NOISY_IQR",
    "SCHEMA",
]

SCHEMA = "slab-bench/2"
NOISY_IQR = 0.25  # a row is "noisy" when a provider's (p75 - p25) / median exceeds this


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckResult:
    """One correctness comparison: ``case`` of op ``op`` in ``dtype``; ``detail`` says the worst error."""

    op: str
    case: str
    dtype: str
    ok: bool
    detail: str


@dataclasses.dataclass
class BenchContext:
    """What a bench function gets: where and how much to measure."""

    device: torch.device
    dtypes: list[torch.dtype]
    quick: bool
    compile: bool
    budget_s: float
    copy_bw: float  # measured copy bandwidth of the device, bytes/s (read + write)

    def time_many(self, fns: dict[str, Callable[[], Any]]) -> dict[str, _bench.Timing]:
        """Timings of several providers, measured interleaved (:func:`slab._bench.time_fns`), so a
        busy moment of a shared machine does not land on one provider only."""
        return _bench.time_fns(
            fns,
            self.device,
            warmup=3,
            min_reps=7 if self.quick else 15,
            max_reps=100 if self.quick else 300,
            budget_s=self.budget_s,
        )


@dataclasses.dataclass
class Entry:
    """One op of slab-bench.

    ``check(device) -> list[CheckResult]``: correctness against the reference on ``device``.
    ``bench(ctx) -> list[dict]``: speed rows made with :func:`speed_row`.
    """

    name: str
    family: str
    description: str
    check: Callable[[torch.device], list[CheckResult]]
    bench: Optional[Callable[[BenchContext], list[dict]]] = None


REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in REGISTRY:
        raise ValueError(f"slab-bench: entry {entry.name!r} registered twice")
    REGISTRY[entry.name] = entry
    return entry


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIM_DTYPES = (torch.float32, torch.bfloat16)  # SPEC section 5: float32 or bfloat16 parameters


def check_tensors(op: str, case: str, dtype: torch.dtype, pairs: Sequence[tuple]) -> CheckResult:
    """One :class:`CheckResult` from ``(name, got, expected[, tol_dtype])`` triples, each judged by
    :func:`slab.reference.compare.compare` at ``tol_dtype`` (default ``dtype``); ``got`` of the
    wrong dtype or shape fails. NaN never passes (the references here are finite)."""
    from slab.reference.compare import compare

    bad, worst, worst_used = [], "", -1.0
    for item in pairs:
        name, got, ref = item[:3]
        tol = item[3] if len(item) > 3 else dtype
        if got is None or ref is None:
            if (got is None) != (ref is None):
                bad.append(f"{name}: one side is None")
            continue
        c = compare(got, ref, tol, name=name, equal_nan=False)
        if not c.ok:
            bad.append(c.message)
        elif c.used > worst_used:
            worst_used, worst = c.used, f"{name} {c.message}"
    if bad:
        return CheckResult(op, case, _bench.dtype_name(dtype), False, "; ".join(bad))
    return CheckResult(op, case, _bench.dtype_name(dtype), True, f"{len(pairs)} tensors, worst {worst}")


def run_cases(
    op: str, cases: Sequence[tuple[str, Callable]], dtypes: Sequence[torch.dtype], device: torch.device
) -> list[CheckResult]:
    """``case_fn(device, dtype) -> list of (name, got, expected[, tol_dtype])`` for every case and
    dtype; an exception is a failed check (reported with its type and message)."""
    out = []
    for case, fn in cases:
        for dtype in dtypes:
            try:
                out.append(check_tensors(op, case, dtype, fn(device, dtype)))
            except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported
                out.append(
                    CheckResult(op, case, _bench.dtype_name(dtype), False, f"raised {type(exc).__name__}: {exc}")
                )
    return out


# ----------------------------------------------------------------------------------------------
# Speed rows
# ----------------------------------------------------------------------------------------------
PROVIDERS = ("slab", "eager", "compile", "library")

SPEED_COLUMNS = [
    _bench.Column("op", align="<"),
    _bench.Column("case", align="<"),
    _bench.Column("shape", align="<"),
    _bench.Column("dtype", align="<"),
    _bench.Column("slab_ms", "slab ms", ".4g"),
    _bench.Column("slab_iqr", "±IQR", ".0%"),
    _bench.Column("slab_range", "min..max ms", align=">"),
    _bench.Column("eager_ms", "eager ms", ".4g"),
    _bench.Column("eager_iqr", "±IQR", ".0%"),
    _bench.Column("compile_ms", "compile ms", ".4g"),
    _bench.Column("library_ms", "library ms", ".4g"),
    _bench.Column("vs_eager", "x eager", ".2f"),
    _bench.Column("vs_compile", "x compile", ".2f"),
    _bench.Column("vs_library", "x library", ".2f"),
    _bench.Column("gbps", "GB/s", ".1f"),
    _bench.Column("frac_floor", "of floor", ".0%"),
    _bench.Column("noisy", "noisy", align="<"),
]


def speed_row(
    ctx: BenchContext,
    *,
    op: str,
    case: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    timings: dict[str, _bench.Timing],
    bytes_floor: Optional[float] = None,
    bytes_moved: Optional[float] = None,
    size: Optional[float] = None,
) -> dict:
    """A row of :data:`SPEED_COLUMNS` from provider timings (keys of :data:`PROVIDERS`).

    ``bytes_floor``: every input read once and every output written once (the absolute floor);
    ``bytes_moved``: what slab's algorithm moves (default the floor). ``size``: the x axis of
    ``--plot`` (default the element count of ``shape``). Speedups are other / slab (> 1: slab is
    faster); ``of floor`` = floor time at the measured copy bandwidth / slab's time (1 = speed of
    light); all higher-is-better. The row is "noisy" when a provider's relative IQR > NOISY_IQR.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    row: dict[str, Any] = {
        "op": op,
        "case": case,
        "shape": "x".join(map(str, shape)),
        "dtype": _bench.dtype_name(dtype),
        "size": float(size if size is not None else numel),
        "device": str(ctx.device),
        "timings": {k: v.as_dict() for k, v in timings.items()},
    }
    for k in PROVIDERS:
        if k in timings:
            row[f"{k}_ms"] = timings[k].median_ms
            row[f"{k}_iqr"] = timings[k].iqr
    t = timings.get("slab")
    if t is not None:
        row["slab_range"] = f"{t.min_ms:.3g}..{t.max_ms:.3g}"
        for k in ("eager", "compile", "library"):
            if k in timings and t.median_ms > 0:
                row[f"vs_{k}"] = timings[k].median_ms / t.median_ms
        if bytes_floor:
            moved = bytes_moved if bytes_moved is not None else bytes_floor
            row["bytes_floor"], row["bytes_moved"] = bytes_floor, moved
            row["gbps"] = moved / (t.median_ms * 1e-3) / 1e9
            row["frac_floor"] = (bytes_floor / ctx.copy_bw * 1e3) / t.median_ms
    noisy = sorted(k for k, v in timings.items() if v.iqr > NOISY_IQR)
    row["noisy"] = "NOISY " + ",".join(noisy) if noisy else ""
    row["noisy_providers"] = noisy
    return row


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------
# Machine facts
# ----------------------------------------------------------------------------------------------
def _commit() -> Optional[str]:
    try:
        from slab import info

        c = info._build("git_commit")
        if isinstance(c, str) and c and "unknown" not in c:
            return c
    except Exception:  # noqa: BLE001 - no build info: try the source checkout below
        pass
    try:
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: torch.device) -> dict[str, Any]:
    gpu = None
    if torch.cuda.is_available():
        try:
            gpu = _bench.device_description(torch.device("cuda"))
        except Exception:  # noqa: BLE001
            gpu = "unknown"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "hardware": _bench.device_description(device),
        "platform": platform.platform(),
        "load": _bench.machine_load(),
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``slab-bench: error: ...``, exit status 2)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _device_arg(text: str) -> str:
    t = text.strip().lower()
    if t == "cpu" or t == "cuda" or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"invalid device {text!r}: expected cpu, cuda or cuda:N")


_DTYPE_CHOICES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _dtypes_arg(text: str) -> list[torch.dtype]:
    out: list[torch.dtype] = []
    for part in text.split(","):
        p = part.strip().lower()
        if p == "all":
            out.extend(CHECK_DTYPES)
        elif p in _DTYPE_CHOICES:
            out.append(_DTYPE_CHOICES[p])
        else:
            raise argparse.ArgumentTypeError(
                f"invalid dtype {part!r}: expected float32, bfloat16, float16 "
                f"(or fp32, bf16, fp16), comma-separated, or all"
            )
    return list(dict.fromkeys(out))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive number of seconds") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive number of seconds")
    return v


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="slab-bench",
        description="Check every slab op against its float64 reference on this device, then time it. "
        "Always writes a JSON file with the checks, the speed rows and their spread.",
    )
    p.add_argument(
        "--device",
        type=_device_arg,
        help="cpu, cuda or cuda:N (default: cuda if slab's CUDA kernels and a GPU are available, else cpu)",
    )
    p.add_argument("--only", nargs="+", metavar="OP", help="run only these ops or families (see --list)")
    p.add_argument("--list", action="store_true", help="list the ops and exit")
    p.add_argument("--check-only", action="store_true", help="correctness checks only, no timing")
    p.add_argument(
        "--dtype",
        type=_dtypes_arg,
        default=None,
        metavar="DTYPES",
        help="dtypes of the speed table: float32, bfloat16, float16, comma-separated, or all "
        "(default float32). The checks always cover all three.",
    )
    p.add_argument(
        "--quick", action="store_true", help="one small shape per op, short budget, no torch.compile (unless --compile)"
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time torch.compile of the reference (default: on, off with --quick)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile column")
    p.add_argument(
        "--budget",
        type=_positive_float,
        default=None,
        help="seconds of timed calls per provider and row (default 0.4, --quick 0.08)",
    )
    p.add_argument("--json", metavar="PATH", help="where the JSON goes (default slab-bench-<timestamp>.json here)")
    p.add_argument("--csv", metavar="PATH", help="also write the speed rows (with --check-only: the check rows) as CSV")
    p.add_argument("--plot", metavar="PATH", help="draw speedup against size per op into a PNG (needs matplotlib)")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    return p


def _load_registry() -> None:
    from slab import benches  # noqa: F401  (registers every family's entries)


def _select(names: Optional[Sequence[str]], parser: argparse.ArgumentParser) -> list[Entry]:
    if not names:
        return list(REGISTRY.values())
    families = {e.family for e in REGISTRY.values()}
    chosen: list[Entry] = []
    for n in names:
        if n in REGISTRY:
            hit = [REGISTRY[n]]
        elif n in families:
            hit = [e for e in REGISTRY.values() if e.family == n]
        else:
            parser.error(
                f"argument --only: unknown op {n!r}; known ops: {', '.join(REGISTRY)}; "
                f"families: {', '.join(sorted(families))}"
            )
        chosen.extend(e for e in hit if e not in chosen)
    return chosen


def _plot(path: str, rows: Sequence[dict]) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "slab-bench: --plot needs matplotlib: pip install slab-kernels[plot]"
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("vs_eager") or r.get("vs_library"):
            key = f"{r['op']} {r['case']} {r['dtype']}".strip()
            series.setdefault(key, []).append((r["size"], r.get("vs_eager") or r["vs_library"]))
    ops = sorted({k.split(" ")[0] for k in series})
    if not ops:
        return "slab-bench: --plot: no speed rows to draw"
    cols = min(4, len(ops))
    nrows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        for key, pts in series.items():
            if key.split(" ")[0] != op:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key[len(op) :].strip() or op)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("size (elements)", fontsize=8)
        ax.set_ylabel("speedup vs eager (higher is better)", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(ops) :]:
        ax.axis("off")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _load_registry()
    except (ImportError, OSError) as exc:  # the op library did not load: slab's own one-line message
        print(
            f"slab-bench: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            file=sys.stderr,
        )
        return 2
    entries = _select(args.only, parser)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("slab-bench: --plot needs matplotlib: pip install slab-kernels[plot]", file=sys.stderr)
            return 2
    if args.list:
        width = max(len(e.name) for e in REGISTRY.values())
        for e in REGISTRY.values():
            print(f"{e.name:{width}s}  {e.family:7s} {e.description}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    import slab

    device = torch.device(args.device) if args.device else _bench.pick_device(None)
    if device.type == "cuda" and not (torch.cuda.is_available() and slab.cuda_available()):
        print(
            "slab-bench: --device cuda, but "
            + (
                "torch sees no CUDA device"
                if not torch.cuda.is_available()
                else "this slab build has no CUDA kernels (rebuild with SLAB_CUDA=1 on a machine with nvcc)"
            ),
            file=sys.stderr,
        )
        return 2
    dtypes = args.dtype or [torch.float32]
    quick = args.quick
    use_compile = args.compile if args.compile is not None else not quick
    budget = args.budget if args.budget is not None else (0.08 if quick else 0.4)
    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    json_path = args.json or f"slab-bench-{started.strftime('%Y%m%d-%H%M%S')}.json"
    machine = machine_facts(device)
    load = machine["load"]
    load_text = f"load {load['load1']:.1f} on {load['cores']} cores" if load["load1"] is not None else "load unknown"
    if load["busy"]:
        load_text += " -- BUSY: other processes compete, timings unreliable (try --threads 1 or a quieter machine)"
    print(
        f"slab {slab.__version__} (commit {_commit() or 'unknown'}), torch {torch.__version__}, device {device}: "
        f"{machine['hardware']}; {load_text}",
        flush=True,
    )

    # ---- correctness
    t0 = time.perf_counter()
    checks: list[CheckResult] = []
    for e in entries:
        try:
            checks.extend(e.check(device))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            checks.append(CheckResult(e.name, "(check)", "-", False, f"raised {type(exc).__name__}: {exc}"))
    check_s = time.perf_counter() - t0
    table = _bench.Table(
        ["op", "case", "dtype", "result", "detail"],
        title=f"\nCorrectness against slab.reference in float64, tolerances of "
        f"slab.reference.compare ({check_s:.1f} s)",
    )
    for r in checks:
        table.add(op=r.op, case=r.case, dtype=r.dtype, result="PASS" if r.ok else "FAIL", detail=r.detail)
    table.print()
    failed_ops = [e.name for e in entries if any(r.op == e.name and not r.ok for r in checks)]
    print("\n" + "  ".join(f"{'FAIL' if e.name in failed_ops else 'PASS'} {e.name}" for e in entries))

    # ---- speed
    rows: list[dict] = []
    bw = None
    speed = None
    if not args.check_only:
        t0 = time.perf_counter()
        bw = _bench.copy_bandwidth(device)
        ctx = BenchContext(device, dtypes, quick, use_compile, budget, bw)
        for e in entries:
            if e.bench is None:
                continue
            try:
                rows.extend(e.bench(ctx))
            except Exception as exc:  # noqa: BLE001 - a broken benchmark must not hide the others
                traceback.print_exc()
                print(f"slab-bench: benchmark {e.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        noisy = [r for r in rows if r["noisy"]]
        speed = _bench.Table(
            SPEED_COLUMNS,
            title=f"\nSpeed on {device} ({load_text}; measured copy bandwidth {bw / 1e9:.1f} GB/s). "
            f"ms: median of the timed calls, lower is better; every other number: higher is better",
            notes=[
                "Providers, timed interleaved call by call: slab; eager = the plain-PyTorch reference "
                "(slab.reference); compile = torch.compile of it"
                + ("" if use_compile else " (off: --compile)")
                + "; library = the best known torch op (per op, see --list).",
                "±IQR: (p75 - p25) / median of the timed calls; min..max: fastest and slowest slab call. "
                "x eager / x compile / x library: their median / slab's (> 1: slab is faster).",
                "GB/s: bytes slab moves / its time; of floor: (every input read once + every output written "
                "once at the measured copy bandwidth) / slab's time (100% = speed of light; above it: cache-resident).",
                f"noisy: a provider's ±IQR above {NOISY_IQR:.0%}. {len(noisy)} of {len(rows)} rows noisy"
                + (" -- rerun on a quieter machine, with --threads 1, or a larger --budget." if noisy else ".")
                + f" Took {time.perf_counter() - t0:.0f} s.",
            ],
        )
        for r in rows:
            speed.add(r)
        speed.print()

    # ---- files
    payload = {
        "schema": SCHEMA,
        "timestamp": started.isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "slab": {"version": slab.__version__, "commit": _commit()},
        "torch": torch.__version__,
        "machine": machine,
        "device": str(device),
        "quick": quick,
        "compile": use_compile,
        "budget_s": budget,
        "copy_bandwidth_gbps": bw / 1e9 if bw else None,
        "noisy_iqr_bound": NOISY_IQR,
        "ops": [e.name for e in entries],
        "checks": [dataclasses.asdict(c) for c in checks],
        "failed": failed_ops,
        "speed": rows,
        "noisy_rows": sum(1 for r in rows if r["noisy"]),
    }
    folder = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(folder, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    written = [f"JSON: {json_path}"]
    if args.csv:
        if speed is not None:
            text = speed.to_csv(exclude=("timings", "noisy_providers"))
        else:
            text = table.to_csv()
        folder = os.path.dirname(os.path.abspath(args.csv))
        os.makedirs(folder, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            f.write(text)
        written.append(f"CSV: {args.csv}")
    if args.plot:
        if rows:
            err = _plot(args.plot, rows)
            if err:
                print(err, file=sys.stderr)
            else:
                written.append(f"plot: {args.plot}")
        else:
            print("slab-bench: --plot: no speed rows (--check-only)", file=sys.stderr)
    print(
        "\nslab-bench: wrote "
        + ", ".join(written)
        + ("" if args.csv else " (--csv PATH for CSV, --plot PATH for a speedup plot)")
    )
    if failed_ops:
        print(f"slab-bench: FAILED: {', '.join(failed_ops)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m slab.bench: run the imported module, whose REGISTRY the families fill
    from slab.bench import main as _main

    sys.exit(_main())
