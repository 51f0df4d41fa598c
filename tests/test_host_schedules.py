"""The CUDA kernels' work decompositions, run on the CPU.

Each ``tests/host/*.cpp`` includes the kernels' own host-callable headers (index maps, pack splits,
row/warp schedules, the family's ``*_math.h``), emulates the GPU schedule serially over every
(block, warp, lane) and checks it against a float64 reference of its own; it exits nonzero and
prints what differed when a check fails. They need a C++20 compiler and no torch: the headers they
include carry no torch dependency (csrc/core/common.h, vec.h, the families' *.h / *_math.h).
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tests" / "host").glob("*.cpp"))
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(
    CXX is None or not (ROOT / "csrc").is_dir(), reason="needs a C++ compiler and the csrc/ tree"
)


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_host_schedule(source, tmp_path):
    exe = tmp_path / source.stem
    build = subprocess.run(
        [
            CXX,
            "-std=c++20",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            f"-I{ROOT / 'csrc'}",
            str(source),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "checks passed" in run.stdout, run.stdout[-2000:]
