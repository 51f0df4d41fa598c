"""``slab info``: the build and runtime facts a bug report needs.

    slab info            # aligned text, one fact a line
    slab info --json     # the same facts as one JSON object
    python -m slab info  # the same without the console script

Facts: slab version and commit; the torch slab was built against and the one running; the CUDA
kernels (architectures, nvcc), whether their library loaded and why not, the driver and the GPUs;
the CPU ISA the CPU kernels use and whether this CPU has it; torch's threads; Python and platform.
Build facts come from the ``_build_info.json`` written by cmake/build_info.cmake; a development
build without one reports them as "unknown". Every probe is guarded: a failure reads
``unknown (<reason>)`` and never stops the report. Nothing here initialises CUDA unless torch is
a CUDA build and sees a device.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from . import __version__, _loader, cuda_available

__all__ = ["collect", "format_text", "main", "run"]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _unknown(reason: object) -> str:
    return f"unknown ({_one_line(reason)})"


def _try(fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``unknown (<exception>)`` when it raises."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a probe never stops the report
        return _unknown(f"{type(exc).__name__}: {exc}")


def _build(key: str) -> Any:
    """A fact of ``_build_info.json``, or ``unknown`` when the file or the key is absent."""
    info = _loader.STATE.build_info
    if key in info:
        return info[key]
    return "unknown"


# ---- probes -----------------------------------------------------------------------------------
def _cpu_flags() -> Optional[set[str]]:
    """The CPU's feature flags from /proc/cpuinfo (Linux x86); None where there is no such line."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _nvidia_kernel_driver() -> Optional[str]:
    """The NVIDIA kernel driver's version from /proc (Linux), without touching CUDA."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as f:
            m = re.search(r"Kernel Module\s+(\S+)", f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def _cuda_driver_api_version() -> Optional[str]:
    """The CUDA version the installed driver supports (cuDriverGetVersion; no context is made)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
            return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    return None


def _cuda_devices() -> list[dict[str, Any]]:
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": p.name,
                "capability": f"sm_{p.major}{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
            }
        )
    return devices


def _slab_facts() -> dict[str, Any]:
    st = _loader.STATE
    return {
        "version": __version__,
        "commit": _build("git_commit"),
        "location": os.path.dirname(os.path.abspath(__file__)),  # the package folder
        "ops_library": st.ops_library,
        "library_override": os.environ.get("SLAB_LIBRARY") or None,
        "build_info": st.build_info_path if st.build_info else _unknown(st.build_info_error or "not read"),
    }


def _torch_facts() -> dict[str, Any]:
    return {
        "built_against": _build("torch_version"),
        "built_cuda": _build("torch_cuda_version"),
        "running": str(torch.__version__),
        "running_cuda": torch.version.cuda,
        "stable_abi_target": _build("stable_abi_target"),
        "required": f">={_loader.TORCH_MIN_STR}",
        "location": os.path.dirname(os.path.abspath(torch.__file__)),
    }


def _kernels_built() -> Any:
    built = _build("cuda")
    if built != "unknown":
        return bool(built)
    return True if _loader.STATE.cuda_loaded else "unknown"


def _cuda_facts() -> dict[str, Any]:
    st = _loader.STATE
    facts: dict[str, Any] = {
        "kernels_built": _try(_kernels_built),
        "archs": _build("cuda_archs"),
        "nvcc": _build("nvcc_version"),
        "library": st.cuda_library,
        "library_loaded": st.cuda_loaded,
        "library_reason": st.cuda_reason,
        "fallback_ops": len(st.cuda_fallback_ops),
    }
    if torch.version.cuda:
        facts["torch_cuda_available"] = _try(torch.cuda.is_available)
        facts["available"] = _try(cuda_available)
        facts["driver"] = _try(_nvidia_kernel_driver)
        facts["driver_cuda"] = _try(_cuda_driver_api_version)
        if facts["torch_cuda_available"] is True:
            facts["device_count"] = _try(torch.cuda.device_count)
            facts["devices"] = _try(_cuda_devices)
        else:
            facts["device_count"] = 0
            facts["devices"] = []
    else:  # a CPU-only torch: no CUDA probe at all
        facts.update(
            torch_cuda_available=False, available=False, driver=None, driver_cuda=None, device_count=0, devices=[]
        )
    return facts


# The /proc/cpuinfo flags the W4A8 GEMM's AVX-512 kernels need, and those its AMX tiles add for
# more than one row of x (csrc/w4a8/w4a8_vnni_cpu.cpp, which checks the same with
# __builtin_cpu_supports when it first runs, and asks Linux for the tile state).
W4A8_VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi")
W4A8_AMX_FLAGS = ("amx_tile", "amx_int8")


def _w4a8_kernels(isa: Any, flags: Optional[set[str]]) -> str:
    """The CPU W4A8 GEMM kernels this process runs: AVX-512 VNNI where the CPU has them and
    SLAB_CPU_ISA is not "avx2", with AMX-INT8 tiles where it also has those and SLAB_CPU_ISA is not
    "avx512"; else the build's own ISA."""
    if isa == "portable":
        return "portable"
    chosen = os.environ.get("SLAB_CPU_ISA")
    if chosen == "avx2":
        return "AVX2 (SLAB_CPU_ISA=avx2)"
    if flags is None:
        return _unknown("no /proc/cpuinfo flags")
    if not all(f in flags for f in W4A8_VNNI_FLAGS):
        return "AVX2"
    if all(f in flags for f in W4A8_AMX_FLAGS):
        return "AVX-512 VNNI (SLAB_CPU_ISA=avx512)" if chosen == "avx512" else "AVX-512 VNNI + AMX-INT8"
    return "AVX-512 VNNI"


def w4a8_vnni_kernels() -> bool:
    """Whether the CPU W4A8 GEMM runs the AVX-512 VNNI kernels on this CPU with this environment
    (slab.ops.w4a8 reads it once, at import, as the library decides once per process)."""
    return _w4a8_kernels(_build("cpu_isa"), _cpu_flags()).startswith("AVX-512 VNNI")


def _cpu_facts() -> dict[str, Any]:
    isa = _build("cpu_isa")
    wanted = _build("cpu_isa_flags")
    machine = platform.machine().lower()
    if not isinstance(wanted, list):  # no build info: ask about the flags an x86-64 build uses
        wanted = ["avx2", "fma", "f16c", "bmi2"] if machine in ("x86_64", "amd64") else []
    flags = _cpu_flags() if wanted else None
    if isa == "portable":
        supported: Any = True
    elif not wanted:
        supported = "unknown"
    elif flags is None:
        supported = _unknown("no /proc/cpuinfo flags")
    else:
        missing = [f for f in wanted if f not in flags]
        supported = not missing if isa != "unknown" else _unknown("no build info")
    return {
        "isa": isa,
        "isa_flags": wanted,
        "flags_present": {f: (f in flags) for f in wanted} if flags is not None else _unknown("no /proc/cpuinfo flags"),
        "supported": supported,
        "w4a8_kernels": _w4a8_kernels(isa, flags if flags is not None else _cpu_flags())
        if machine in ("x86_64", "amd64")
        else "portable",
        "torch_capability": _try(torch.backends.cpu.get_cpu_capability),
        "model": _try(_cpu_model),
        "threads": _try(torch.get_num_threads),
        "cores": os.cpu_count(),
    }


def _python_facts() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": _try(platform.platform),
    }


def collect() -> dict[str, Any]:
    """All facts, as a JSON-serialisable dict of sections: slab, torch, cuda, cpu, python."""
    out: dict[str, Any] = {}
    for section, fn in (
        ("slab", _slab_facts),
        ("torch", _torch_facts),
        ("cuda", _cuda_facts),
        ("cpu", _cpu_facts),
        ("python", _python_facts),
    ):
        out[section] = _try(fn)
    return out


# ---- text -------------------------------------------------------------------------------------
def _get(facts: dict, section: str, key: str) -> Any:
    sec = facts.get(section)
    if not isinstance(sec, dict):
        return sec if isinstance(sec, str) else "unknown"
    return sec.get(key, "unknown")


def _cuda_lines(facts: dict) -> list[tuple[str, str]]:
    g = lambda k: _get(facts, "cuda", k)  # noqa: E731
    built = g("kernels_built")
    if built is True:
        archs = g("archs")
        archs = ";".join(archs) if isinstance(archs, list) else str(archs)
        nvcc = g("nvcc") or "unknown"
        kernels = f"built for {archs} with nvcc {nvcc}"
    elif built is False:
        kernels = "not built (a CPU-only slab build)"
    else:
        kernels = str(built)
    if g("library_loaded") is True:
        lib = f"loaded: {g('library')}"
    else:
        lib = f"not loaded: {g('library_reason')}"
    driver = g("driver")
    driver_cuda = g("driver_cuda")
    if driver is None and driver_cuda is None:
        driver_text = "none found"
    else:
        driver_text = f"{driver or 'unknown'} (supports CUDA {driver_cuda or 'unknown'})"
    lines = [
        ("CUDA kernels", kernels),
        ("CUDA library", lib),
        ("CUDA available", f"{g('available')} (torch.cuda.is_available(): {g('torch_cuda_available')})"),
        ("CUDA driver", driver_text),
    ]
    devices = g("devices")
    if isinstance(devices, list):
        lines.append(("CUDA devices", str(len(devices))))
        for d in devices:
            lines.append((f"  cuda:{d['index']}", f"{d['name']} ({d['capability']}, {d['memory_gib']} GiB)"))
    else:
        lines.append(("CUDA devices", str(devices)))
    return lines


def _cpu_isa_line(facts: dict) -> str:
    isa = _get(facts, "cpu", "isa")
    supported = _get(facts, "cpu", "supported")
    present = _get(facts, "cpu", "flags_present")
    if supported is True:
        verdict = "supported by this CPU"
    elif supported is False:
        missing = [f for f, ok in present.items() if not ok] if isinstance(present, dict) else []
        verdict = f"NOT supported by this CPU (missing {' '.join(missing)})"
    else:
        verdict = f"support {supported}"
        if isinstance(present, dict) and present:
            verdict += "; this CPU has " + " ".join(f"{f}={'yes' if ok else 'no'}" for f, ok in present.items())
    return f"{isa}: {verdict}"


def format_text(facts: dict[str, Any]) -> str:
    s = lambda k: _get(facts, "slab", k)  # noqa: E731
    t = lambda k: _get(facts, "torch", k)  # noqa: E731
    c = lambda k: _get(facts, "cpu", k)  # noqa: E731
    p = lambda k: _get(facts, "python", k)  # noqa: E731
    built = t("built_against")
    built_cuda = t("built_cuda")
    built_text = f"{built}" + (f" (CUDA {built_cuda})" if built_cuda and built_cuda != "unknown" else "")
    lines = [
        ("slab", f"{s('version')} (commit {s('commit')}) at {s('location')}"),
        ("op library", f"{s('ops_library')}" + (" (from SLAB_LIBRARY)" if s("library_override") else "")),
        ("build info", str(s("build_info"))),
        ("torch built", f"{built_text}; stable ABI target {t('stable_abi_target')}"),
        ("torch running", f"{t('running')} (CUDA {t('running_cuda') or 'none: a CPU-only build'}) at {t('location')}"),
        *_cuda_lines(facts),
        ("CPU ISA", _cpu_isa_line(facts)),
        ("CPU", f"{c('model')}, {c('cores')} cores"),
        ("W4A8 CPU GEMM", str(c("w4a8_kernels"))),
        ("torch CPU", f"{c('threads')} threads, capability {c('torch_capability')}"),
        ("python", f"{p('version')} ({p('implementation')}) at {p('executable')}"),
        ("platform", str(p("platform"))),
    ]
    width = max(len(k) for k, _ in lines) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in lines)


# ---- command ----------------------------------------------------------------------------------
def run(as_json: bool = False, file=None) -> int:
    """Prints the report (text, or JSON with ``as_json``) to ``file`` (stdout); returns 0."""
    file = sys.stdout if file is None else file
    facts = collect()
    if as_json:
        print(json.dumps(facts, indent=2, default=str), file=file)
    else:
        print(format_text(facts), file=file)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="slab info", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
