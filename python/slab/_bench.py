"""Timing and reporting utilities shared by ``slab-bench`` and the scripts under ``bench/``.

Kept inside the package so the installed console script can use them. Nothing here depends on the
slab op library; it only needs torch (and slab._memory, plain Python).

* :func:`time_fn` -- median time of a callable: warm-up first, then many individually timed calls
  (``time.perf_counter`` on CPU; CUDA events on GPU, with the L2 cache flushed before each call so
  memory-bound kernels are measured from DRAM, as Triton's ``do_bench`` does).
  :func:`time_fns` does the same for several providers, interleaved call by call, so a drift of a
  shared machine affects them alike.
* :func:`copy_bandwidth` -- the MEASURED bandwidth of a large device-to-device tensor copy
  (bytes read + bytes written per second): the machine's practical limit that the benchmarks
  compare against ("fraction of the floor"), instead of a datasheet number; :func:`read_provider`
  the read of a large tensor, timed with the kernels (a GEMV's limit).
* :class:`Table` -- a small fixed-width table printer with optional CSV / JSON output.
* :func:`grid` -- a config grid: every combination of the given axes as dataclass instances
  (``itertools.product``).
* :func:`profile_table` -- a ``torch.profiler`` summary of a callable (the ``--profile`` flags).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ._memory import huge_page_empty

__all__ = [
    "Timing",
    "time_fn",
    "time_fns",
    "synchronize",
    "copy_bandwidth",
    "read_provider",
    "Column",
    "Table",
    "write_results",
    "grid",
    "parse_dtype",
    "dtype_name",
    "pick_device",
    "device_description",
    "profile_table",
    "fmt_bytes",
    "busy_warning",
    "machine_load",
    "start",
]


# ----------------------------------------------------------------------------------------------
# Devices and dtypes
# ----------------------------------------------------------------------------------------------
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "f64": torch.float64,
    "double": torch.float64,
}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16`` (ValueError otherwise)."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def pick_device(requested: Optional[str] = None) -> torch.device:
    """``requested`` if given, else ``cuda`` when a GPU is present *and* slab's CUDA kernels are built
    (``slab.cuda_available()``), else ``cpu``."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {requested}: no CUDA device is available to torch")
        return dev
    if torch.cuda.is_available():
        try:
            import slab

            if slab.cuda_available():
                return torch.device("cuda")
        except Exception:  # the op library did not load: stay on the CPU, the caller reports it
            pass
    return torch.device("cpu")


def device_description(device: torch.device) -> str:
    """One line naming the hardware: GPU name, or CPU model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def machine_load() -> dict[str, Any]:
    """The 1-minute load average, the core count and whether the machine looks busy (load above
    cores + 0.5: other processes compete for the CPUs). ``load`` is None where unknown."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load1": load, "cores": cores, "busy": bool(load is not None and load > cores + 0.5)}


def busy_warning(device: torch.device | str = "cpu") -> Optional[str]:
    """A warning when other processes keep the CPUs busy (1-minute load average above the core
    count): CPU timings are then unreliable -- OpenMP-parallel torch ops in particular can slow down
    by orders of magnitude when their threads are descheduled. None when the machine looks idle."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > cores + 0.5:
        where = "CPU timings" if torch.device(device).type == "cpu" else "host-side overheads"
        return (
            f"warning: load average {load:.1f} on {cores} cores -- other processes are running; "
            f"{where} will be unreliable (torch.set_num_threads(1) / --threads 1 suffers less)"
        )
    return None


def start(threads: Optional[int], requested_device: Optional[str]) -> torch.device:
    """The common start of a benchmark script: torch's CPU thread count (when given), the device
    (:func:`pick_device`), and the :func:`busy_warning` on stderr when the machine is loaded."""
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(requested_device)
    warn = busy_warning(device)
    if warn:
        print(warn, file=sys.stderr)
    return device


def synchronize(device: torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    """Statistics of ``n`` timed calls, in milliseconds: min, quartiles, median, max (and p20/p80)."""

    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    max_ms: float = float("nan")
    p25_ms: float = float("nan")
    p75_ms: float = float("nan")

    @property
    def spread(self) -> float:
        """Inter-quantile spread relative to the median, (p80 - p20) / median."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def iqr(self) -> float:
        """Interquartile range relative to the median, (p75 - p25) / median."""
        return (self.p75_ms - self.p25_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def as_dict(self) -> dict:
        """min / p25 / median / p75 / max (ms), n and the relative IQR: what the JSON files hold."""
        return {
            "min_ms": self.min_ms,
            "p25_ms": self.p25_ms,
            "median_ms": self.median_ms,
            "p75_ms": self.p75_ms,
            "max_ms": self.max_ms,
            "n": self.n,
            "iqr_rel": self.iqr,
        }

    def __str__(self) -> str:
        return (
            f"{self.median_ms:.4g} ms (min {self.min_ms:.4g}, max {self.max_ms:.4g}, n={self.n}, "
            f"IQR {100 * self.iqr:.0f}%)"
        )


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summarize(samples_ms: list[float]) -> Timing:
    s = sorted(samples_ms)
    return Timing(
        statistics.median(s),
        s[0],
        _quantile(s, 0.2),
        _quantile(s, 0.8),
        len(s),
        s[-1],
        _quantile(s, 0.25),
        _quantile(s, 0.75),
    )


_L2_FLUSH: dict[Any, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _L2_FLUSH:
        # Larger than any current L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB).
        _L2_FLUSH[key] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return _L2_FLUSH[key]


def time_fn(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    min_reps: int = 10,
    max_reps: int = 200,
    budget_s: float = 1.0,
    flush_l2: Optional[bool] = None,
) -> Timing:
    """Median time of ``fn()`` on ``device``.

    ``warmup`` untimed calls (autotuning, allocator, compilation caches) come first; the fastest
    of them estimates the cost of a call, from which the number of timed calls is chosen so that
    they take about ``budget_s`` seconds, clamped to ``[min_reps, max_reps]``. Every call is timed
    on its own and the median reported (robust to the occasional preempted run).

    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events around each call
    (device time, no host overhead between calls) and, unless ``flush_l2=False``, a 256 MB buffer
    zeroed before each call so the inputs are not served from L2.
    """
    return time_fns(
        {"fn": fn}, device, warmup=warmup, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s, flush_l2=flush_l2
    )["fn"]


def time_fns(
    fns: dict[str, Callable[[], Any]],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 3,
    min_reps: int = 10,
    max_reps: int = 200,
    budget_s: float = 1.0,
    flush_l2: Optional[bool] = None,
) -> dict[str, Timing]:
    """Median times of several providers, measured INTERLEAVED: after each provider's warm-up,
    round after round times one call of every provider that still needs samples, each round in a
    new (seeded) random order. A slow drift of the machine (another process, clock or thermal
    changes) then affects all providers alike instead of whichever ran during it, and no provider
    always runs after the same one. Each provider gets its own number of calls (about
    ``budget_s`` seconds' worth, clamped to ``[min_reps, max_reps]``); otherwise as :func:`time_fn`.
    """
    device = torch.device(device)
    warmup = max(1, warmup)
    cuda = device.type == "cuda"
    flush = _l2_flush_buffer(device) if cuda and flush_l2 in (None, True) else None
    clock = time.perf_counter
    need: dict[str, int] = {}
    for name, fn in fns.items():
        est = float("inf")
        for _ in range(warmup):  # the fastest warm-up call estimates the cost (the first is often slow)
            synchronize(device)
            t0 = clock()
            fn()
            synchronize(device)
            est = min(est, clock() - t0)
        need[name] = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-7))))

    samples: dict[str, list[float]] = {name: [] for name in fns}
    events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in fns}
    names, shuffle = list(fns), random.Random(0).shuffle
    for r in range(max(need.values())):
        # Each round in a fresh order, so that each provider follows every other about equally
        # often: a call's time depends on the call before it (on a 2-core KVM guest, slab's GEMV
        # took ~10% longer right after torch's int4 kernel than after a bf16 matmul).
        shuffle(names)
        for name in names:
            fn = fns[name]
            if r >= need[name]:
                continue
            if cuda:
                if flush is not None:
                    flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
            else:
                t = clock()
                fn()
                samples[name].append((clock() - t) * 1e3)
        if cuda and r % 32 == 31:  # bound the queue of outstanding work
            torch.cuda.synchronize(device)
    if cuda:
        torch.cuda.synchronize(device)
        samples = {name: [s.elapsed_time(e) for s, e in ev] for name, ev in events.items()}
    return {name: _summarize(v) for name, v in samples.items()}


_BW_CACHE: dict[Any, float] = {}


def _stream_source(device: torch.device, nbytes: Optional[int] = None, huge_pages: bool = False) -> torch.Tensor:
    """A float32 tensor of ones far larger than the last-level cache (CPU: 256 MiB, GPU: 1 GiB); on
    the CPU with ``huge_pages`` on transparent huge pages where the system has them
    (slab._memory), as slab's streamed W4A8 weights are."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 256 * 2**20
    if device.type == "cpu" and huge_pages:
        return huge_page_empty(nbytes // 4 * 4).view(torch.float32).fill_(1.0)
    return torch.ones(nbytes // 4, dtype=torch.float32, device=device)


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: Optional[int] = None) -> float:
    """Measured copy bandwidth of ``device`` in bytes/s, counting bytes read + bytes written
    (``dst.copy_(src)`` of a large tensor), the best of several runs: the limit, least disturbed by
    other processes. This is the practical limit a memory-bound kernel can reach; the benchmarks
    report their times against it. Cached per device, size and CPU thread count."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index, nbytes, torch.get_num_threads())
    if key not in _BW_CACHE:
        src = _stream_source(device, nbytes)
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), device, warmup=3, min_reps=10, max_reps=50, budget_s=1.0, flush_l2=False)
        _BW_CACHE[key] = 2 * src.numel() * 4 / (t.min_ms * 1e-3)
    return _BW_CACHE[key]


def read_provider(device: torch.device | str = "cpu", nbytes: Optional[int] = None) -> tuple[Callable[[], Any], int]:
    """``(fn, nbytes)``: the sum of a tensor far larger than the last-level cache, or of ``nbytes``
    (the limit of a kernel that only streams its operand in, a GEMV's weights) as a provider to time
    with the kernels in :func:`time_fns`, and the bytes it reads. ``nbytes`` over its median time is the read
    bandwidth of the same rounds, the same statistic as the kernels' medians (a best run measured
    apart would set a lucky moment of a shared machine against a typical one). On the CPU the
    tensor is on huge pages where the system has them: on a KVM guest a stream over 4 KB pages also
    pays page walks through the host's tables (a cold 4096 x 4096 W4A8 GEMV took 25% longer), and
    the limit is the stream without them."""
    src = _stream_source(torch.device(device), nbytes, huge_pages=True)
    return src.sum, src.numel() * 4


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} GiB"


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Column:
    """A table column: ``key`` in the row dicts, ``header`` shown, ``fmt`` a format spec for numbers
    (e.g. ``".3f"``, ``".2f"``, ``".0%"``), ``width`` a minimum width, ``align`` ``"<"`` or ``">"``."""

    key: str
    header: Optional[str] = None
    fmt: str = ".4g"
    width: int = 0
    align: str = ">"

    def format(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return format(value, self.fmt)
            except (ValueError, TypeError):
                return str(value)
        return str(value)


class Table:
    """Fixed-width text table built row by row; also writes CSV or JSON.

    >>> t = Table(["shape", Column("ms", fmt=".3f")], title="demo")
    >>> t.add(shape="64x196x384", ms=1.23456)
    >>> print(t.render())
    """

    def __init__(self, columns: Iterable[Column | str], title: Optional[str] = None, notes: Sequence[str] = ()):
        self.columns = [c if isinstance(c, Column) else Column(c, align="<") for c in columns]
        self.title = title
        self.notes = list(notes)
        self.rows: list[dict[str, Any]] = []

    def add(self, row: Optional[dict[str, Any]] = None, **values: Any) -> None:
        r = dict(row or {})
        r.update(values)
        self.rows.append(r)

    def render(self) -> str:
        headers = [c.header or c.key for c in self.columns]
        cells = [[c.format(r.get(c.key)) for c in self.columns] for r in self.rows]
        widths = [
            max([len(h), c.width] + [len(row[i]) for row in cells])
            for i, (h, c) in enumerate(zip(headers, self.columns))
        ]

        def line(vals: Sequence[str]) -> str:
            return "  ".join(f"{v:{c.align}{w}}" for v, c, w in zip(vals, self.columns, widths)).rstrip()

        out = []
        if self.title:
            out.append(self.title)
        out.append(line(headers))
        out.append("  ".join("-" * w for w in widths))
        out.extend(line(r) for r in cells)
        out.extend(self.notes)
        return "\n".join(out)

    def print(self) -> None:
        print(self.render(), flush=True)

    def to_csv(self, exclude: Sequence[str] = ()) -> str:
        """The rows as CSV text: the table's columns first, then every other key of the rows
        (except ``exclude``); lists/tuples joined by ``x``, other objects as ``str``."""
        buf = io.StringIO()
        keys = [k for k in _all_keys(self.rows, [c.key for c in self.columns]) if k not in exclude]
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _plain(r.get(k)) for k in keys})
        return buf.getvalue()


def _all_keys(rows: Sequence[dict[str, Any]], first: Sequence[str]) -> list[str]:
    keys = list(first)
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    return keys


def _plain(v: Any) -> Any:
    """JSON/CSV-friendly value (dtypes, devices, tuples as strings)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return "x".join(str(i) for i in v)
    return str(v)


def write_results(
    path: str, rows: Sequence[dict[str, Any]], meta: Optional[dict[str, Any]] = None, fmt: Optional[str] = None
) -> None:
    """Writes ``rows`` (dicts) to ``path`` as ``fmt`` (``"csv"`` or ``"json"``; default: CSV when
    the path ends with ``.csv``, JSON otherwise: ``{"meta": {...}, "rows": [...]}``). A script's
    ``--csv PATH`` passes ``fmt="csv"`` so any file name gets CSV. Parent folders are created."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if fmt not in (None, "csv", "json"):
        raise ValueError(f"fmt must be 'csv' or 'json', got {fmt!r}")
    if fmt == "csv" or (fmt is None and path.endswith(".csv")):
        keys = _all_keys(rows, [])
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: _plain(r.get(k)) for k in keys})
    else:
        payload = {
            "meta": {k: _plain(v) for k, v in (meta or {}).items()},
            "rows": [{k: _plain(v) for k, v in r.items()} for r in rows],
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")


# ----------------------------------------------------------------------------------------------
# Config grids
# ----------------------------------------------------------------------------------------------
def grid(cls: type, **axes: Iterable[Any]) -> list[Any]:
    """Every combination of ``axes`` as instances of the dataclass ``cls``, in ``itertools.product``
    order (the first axis varies slowest). Fields not named keep their defaults.

    >>> @dataclasses.dataclass(frozen=True)
    ... class Cfg:
    ...     shape: tuple
    ...     dtype: torch.dtype = torch.float32
    >>> grid(Cfg, shape=[(2, 3)], dtype=[torch.float32, torch.bfloat16])
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"grid() needs a dataclass, got {cls!r}")
    names = list(axes)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    return [cls(**dict(zip(names, values))) for values in itertools.product(*(list(axes[n]) for n in names))]


# ----------------------------------------------------------------------------------------------
# Profiling
# ----------------------------------------------------------------------------------------------
def profile_table(
    fn: Callable[[], Any], device: torch.device | str = "cpu", *, steps: int = 5, row_limit: int = 20
) -> str:
    """Runs ``fn`` ``steps`` times (after one warm-up) under ``torch.profiler`` and returns the
    operator table sorted by self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
