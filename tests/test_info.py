"""`slab info` (slab/info.py) and the `slab` command (slab/__main__.py): they run, exit 0, print
every fact (as text and as JSON), never crash on a failing probe, and `slab bench` forwards to
slab-bench. The subprocesses inherit the environment, so they import the slab under test
(installed, or a development build through $SLAB_LIBRARY)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import slab
from slab import _loader, info
from slab.__main__ import main as slab_main

SECTIONS = {
    "slab": {"version", "commit", "location", "ops_library", "build_info"},
    "torch": {"built_against", "built_cuda", "running", "running_cuda", "stable_abi_target"},
    "cuda": {
        "kernels_built",
        "archs",
        "nvcc",
        "library",
        "library_loaded",
        "library_reason",
        "available",
        "torch_cuda_available",
        "driver",
        "device_count",
        "devices",
    },
    "cpu": {"isa", "isa_flags", "supported", "w4a8_kernels", "torch_capability", "model", "threads", "cores"},
    "python": {"version", "implementation", "executable", "platform"},
}
TEXT_LABELS = [
    "slab ",
    "op library",
    "build info",
    "torch built",
    "torch running",
    "CUDA kernels",
    "CUDA library",
    "CUDA available",
    "CUDA driver",
    "CUDA devices",
    "CPU ISA",
    "W4A8 CPU GEMM",
    "torch CPU",
    "python",
    "platform",
]


def _python_m_slab(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slab", *args],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _check_facts(facts: dict) -> None:
    for section, keys in SECTIONS.items():
        assert isinstance(facts.get(section), dict), f"section {section}: {facts.get(section)!r}"
        assert keys <= set(facts[section]), f"{section} lacks {sorted(keys - set(facts[section]))}"
    assert facts["slab"]["version"] == slab.__version__
    assert facts["torch"]["running"] == str(torch.__version__)
    assert facts["torch"]["running_cuda"] == torch.version.cuda
    assert facts["cuda"]["library_loaded"] is _loader.STATE.cuda_loaded
    assert facts["cuda"]["available"] is slab.cuda_available()
    if not _loader.STATE.cuda_loaded:
        assert facts["cuda"]["library_reason"] == _loader.STATE.cuda_reason
    assert facts["cpu"]["threads"] == torch.get_num_threads()
    assert isinstance(facts["cuda"]["devices"], list) and len(facts["cuda"]["devices"]) == facts["cuda"]["device_count"]


def test_python_m_slab_info(tmp_path):
    r = _python_m_slab("info", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for label in TEXT_LABELS:
        assert any(line.startswith(label) for line in lines), f"no {label!r} line in:\n{r.stdout}"
    assert lines[0].split()[1] == slab.__version__
    assert "Traceback" not in r.stdout + r.stderr


def test_python_m_slab_info_json(tmp_path):
    r = _python_m_slab("info", "--json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    _check_facts(json.loads(r.stdout))


def test_main_info_returns_0(capsys):
    assert slab_main(["info"]) == 0
    assert "torch running" in capsys.readouterr().out
    assert slab_main(["info", "--json"]) == 0
    _check_facts(json.loads(capsys.readouterr().out))
    assert info.main(["--json"]) == 0
    _check_facts(json.loads(capsys.readouterr().out))


def test_console_script_entry_point(capsys):
    """The installed `slab` console script is slab_cli.slab (slab.__main__.main behind a guard for a
    failed library load) and returns 0 for `info`."""
    try:
        eps = metadata.entry_points(group="console_scripts", name="slab")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no package metadata: {exc}")
    eps = [ep for ep in eps if ep.value.startswith("slab_cli")]
    if not eps:
        pytest.skip("slab is not installed (a development build through SLAB_LIBRARY)")
    import slab_cli

    fn = eps[0].load()
    assert fn is slab_cli.slab
    assert fn(["info"]) == 0
    assert "CUDA library" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert slab_main([]) == 2
    out = capsys.readouterr().out
    assert "info" in out and "bench" in out


def test_bench_forwards_to_slab_bench(capsys):
    assert slab_main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    from slab import bench

    assert out.split() and out.split()[0] in bench.REGISTRY


def test_collect_is_json_and_does_not_init_cuda():
    facts = info.collect()
    _check_facts(facts)
    json.dumps(facts)  # plain JSON types only
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()


def test_failing_probes_read_unknown(monkeypatch):
    def boom():
        raise RuntimeError("probe\nbroke")

    monkeypatch.setattr(torch, "get_num_threads", boom)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", boom)
    monkeypatch.setattr(info, "_python_facts", boom)
    facts = info.collect()
    assert facts["cpu"]["threads"] == "unknown (RuntimeError: probe broke)"
    assert facts["cpu"]["torch_capability"] == "unknown (RuntimeError: probe broke)"
    assert facts["python"] == "unknown (RuntimeError: probe broke)"
    buf = io.StringIO()
    assert info.run(file=buf) == 0
    assert "unknown (RuntimeError: probe broke)" in buf.getvalue()


def test_report_with_and_without_build_info(monkeypatch):
    monkeypatch.setattr(_loader.STATE, "build_info", {})
    monkeypatch.setattr(_loader.STATE, "build_info_error", "no _build_info.json next to libslab_ops.so")
    text = info.format_text(info.collect())
    assert "unknown (no _build_info.json next to libslab_ops.so)" in text
    assert "torch built     unknown" in text
    built = {
        "slab_version": slab.__version__,
        "git_commit": "abc1234",
        "torch_version": "2.11.0+cu128",
        "torch_cuda_version": "12.8",
        "stable_abi_target": "2.11",
        "cuda": True,
        "cuda_archs": ["80", "89", "90a"],
        "nvcc_version": "12.8.93",
        "cpu_isa": "x86-64 AVX2+FMA+F16C",
        "cpu_isa_flags": ["avx2", "fma", "f16c"],
    }
    monkeypatch.setattr(_loader.STATE, "build_info", built)
    facts = info.collect()
    assert facts["slab"]["commit"] == "abc1234"
    assert facts["torch"]["built_against"] == "2.11.0+cu128"
    assert facts["cuda"]["kernels_built"] is True and facts["cuda"]["archs"] == ["80", "89", "90a"]
    text = info.format_text(facts)
    assert "(commit abc1234)" in text
    assert "torch built     2.11.0+cu128 (CUDA 12.8); stable ABI target 2.11" in text
    assert "built for 80;89;90a with nvcc 12.8.93" in text
    assert "x86-64 AVX2+FMA+F16C: " in text


def test_w4a8_kernels(monkeypatch):
    """The W4A8 GEMM's CPU kernels as reported: AVX-512 VNNI only with every flag it needs, AMX-INT8
    with its two as well; SLAB_CPU_ISA=avx512 leaves the tiles out, =avx2 both."""
    monkeypatch.delenv("SLAB_CPU_ISA", raising=False)
    isa = "x86-64 AVX2+FMA+F16C"
    vnni, amx = set(info.W4A8_VNNI_FLAGS), set(info.W4A8_AMX_FLAGS)
    assert info._w4a8_kernels(isa, vnni | {"avx2"}) == "AVX-512 VNNI"
    assert info._w4a8_kernels(isa, vnni | amx) == "AVX-512 VNNI + AMX-INT8"
    assert info._w4a8_kernels(isa, vnni | {"amx_tile"}) == "AVX-512 VNNI"
    assert info._w4a8_kernels(isa, (vnni | amx) - {"avx512vbmi"}) == "AVX2"
    assert info._w4a8_kernels(isa, None) == "unknown (no /proc/cpuinfo flags)"
    assert info._w4a8_kernels("portable", vnni) == "portable"
    monkeypatch.setattr(info, "_build", lambda key: isa)
    monkeypatch.setattr(info, "_cpu_flags", lambda: vnni | amx)
    assert info.w4a8_vnni_kernels()  # the panel layout, with or without the tiles
    monkeypatch.setenv("SLAB_CPU_ISA", "avx512")
    assert info._w4a8_kernels(isa, vnni | amx) == "AVX-512 VNNI (SLAB_CPU_ISA=avx512)"
    assert info.w4a8_vnni_kernels()
    monkeypatch.setenv("SLAB_CPU_ISA", "avx2")
    assert info._w4a8_kernels(isa, vnni | amx) == "AVX2 (SLAB_CPU_ISA=avx2)"
    assert not info.w4a8_vnni_kernels()


def test_cpu_isa_verdict(monkeypatch):
    monkeypatch.setattr(
        _loader.STATE, "build_info", {"cpu_isa": "x86-64 AVX2+FMA+F16C", "cpu_isa_flags": ["avx2", "fma", "f16c"]}
    )
    monkeypatch.setattr(info, "_cpu_flags", lambda: {"sse2", "avx2"})
    facts = info.collect()
    assert facts["cpu"]["supported"] is False
    assert "NOT supported by this CPU (missing fma f16c)" in info.format_text(facts)
    monkeypatch.setattr(info, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert info.collect()["cpu"]["supported"] is True
    monkeypatch.setattr(info, "_cpu_flags", lambda: None)
    assert info.collect()["cpu"]["supported"] == "unknown (no /proc/cpuinfo flags)"
    monkeypatch.setattr(_loader.STATE, "build_info", {"cpu_isa": "portable", "cpu_isa_flags": []})
    assert info.collect()["cpu"]["supported"] is True
