"""slab-bench (SPEC section 6): `--quick` runs and writes a valid JSON, bad flags fail at parse
time with a one-line error and exit status 2, `--list` names every op, `--csv` writes real CSV."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import json

import pytest

import slab.bench as sb

# Every op of slab that slab-bench must check (SPEC sections 1-5).
EVERY_OP = {
    "rep_bn",
    "prep_bn",
    "sla",
    "sla_step",
    "dwc2d",
    "causal_dwc1d",
    "causal_dwc1d_step",
    "cats",
    "cats_mlp",
    "token_select",
    "token_scatter",
    "quantize_fp8",
    "w4a8_gemm",
    "w4a8_linear",
    "dog",
    "ldog",
    "lion",
    "lamb",
    "lars",
    "adamp",
    "averager",
    "fold_conv_bn",
}
# A fast subset for the timed run (the whole --quick takes about a minute on 2 cores).
QUICK_ONLY = ["cats", "token_scatter", "sla_step", "fold_conv_bn", "lion"]


def _run(argv, capsys):
    rc = sb.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_names_every_op(capsys):
    rc, out, _ = _run(["--list"], capsys)
    assert rc == 0
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert listed == EVERY_OP == set(sb.REGISTRY)


@pytest.mark.parametrize(
    "flags",
    [
        ["--device", "gpu"],
        ["--dtype", "int8"],
        ["--threads", "0"],
        ["--budget", "-1"],
        ["--budget", "nan"],
        ["--only", "nosuchop"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_one_line_exit_2(flags, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        sb.main(flags + ["--json", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""  # no work done: nothing printed on stdout
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slab-bench: error:"), out.err
    assert not list(tmp_path.iterdir())  # and no file written


def test_quick_json_validates(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    csv_path = tmp_path / "speed.txt"  # any name gets CSV
    rc, out, err = _run(
        [
            "--quick",
            "--only",
            *QUICK_ONLY,
            "--json",
            str(path),
            "--csv",
            str(csv_path),
            "--dtype",
            "float32,bfloat16",
            "--budget",
            "0.02",
        ],
        capsys,
    )
    assert rc == 0, err
    assert f"JSON: {path}" in out and "noisy" in out and "higher is better" in out
    data = json.loads(path.read_text())
    for key, typ in [
        ("schema", str),
        ("timestamp", str),
        ("slab", dict),
        ("torch", str),
        ("machine", dict),
        ("checks", list),
        ("speed", list),
        ("ops", list),
        ("failed", list),
        ("noisy_rows", int),
    ]:
        assert isinstance(data[key], typ), key
    assert data["schema"] == sb.SCHEMA and data["slab"]["version"] == slab_version()
    for key in ("cpu", "threads", "gpu", "cores", "load"):
        assert key in data["machine"]
    assert isinstance(data["machine"]["threads"], int) and data["machine"]["threads"] >= 1
    assert data["failed"] == []
    assert set(data["ops"]) == set(QUICK_ONLY)
    assert {c["op"] for c in data["checks"]} == set(QUICK_ONLY)
    for c in data["checks"]:
        assert c["ok"] is True and isinstance(c["detail"], str) and c["dtype"] in ("fp32", "bf16", "fp16")
    # every dtype checked for every op (optimizers: fp32 and bf16 parameters)
    assert {c["dtype"] for c in data["checks"] if c["op"] == "cats"} == {"fp32", "bf16", "fp16"}
    assert {c["dtype"] for c in data["checks"] if c["op"] == "lion"} == {"fp32", "bf16"}
    rows = data["speed"]
    assert {r["op"] for r in rows} == set(QUICK_ONLY)
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    for r in rows:
        t = r["timings"]["slab"]
        assert t["min_ms"] <= t["p25_ms"] <= t["median_ms"] <= t["p75_ms"] <= t["max_ms"]
        assert t["n"] >= 1 and t["iqr_rel"] >= 0
        assert r["slab_ms"] == t["median_ms"] and isinstance(r["noisy"], str)
        assert any(k in r for k in ("vs_eager", "vs_library"))
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"op", "slab_ms", "noisy"} <= set(table[0])


def test_check_only_csv_has_check_rows(tmp_path, capsys):
    csv_path = tmp_path / "checks.csv"
    rc, out, err = _run(
        ["--check-only", "--only", "token_select", "--json", str(tmp_path / "c.json"), "--csv", str(csv_path)], capsys
    )
    assert rc == 0, err
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["op"] for r in table} == {"token_select"} and {r["result"] for r in table} == {"PASS"}
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["speed"] == [] and len(data["checks"]) == 3


def test_default_json_path_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(["--check-only", "--only", "fold_conv_bn"], capsys)
    assert rc == 0
    files = list(tmp_path.glob("slab-bench-*.json"))
    assert len(files) == 1 and f"JSON: {files[0].name}" in out


def test_failed_check_is_reported(tmp_path, capsys, monkeypatch):
    """A wrong result fails the check (exit status 1): the comparison is not vacuous."""
    import slab.ops

    real = slab.ops.token_scatter
    monkeypatch.setattr(slab.ops, "token_scatter", lambda x, y, index: real(x, y, index) * 1.01)
    rc, out, err = _run(["--check-only", "--only", "token_scatter", "--json", str(tmp_path / "f.json")], capsys)
    assert rc == 1 and "FAIL" in out and "token_scatter" in err
    assert json.loads((tmp_path / "f.json").read_text())["failed"] == ["token_scatter"]


def slab_version():
    import slab

    return slab.__version__


@pytest.mark.parametrize("entry", ["bench", "slab"])
def test_failed_library_load_is_one_line(entry, tmp_path):
    """The console scripts (slab_cli) print the loader's message, not a traceback, when the op
    library cannot be loaded."""
    import slab_cli

    env = dict(os.environ, SLAB_LIBRARY=str(tmp_path / "missing.so"))
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(slab_cli.__file__)) + os.pathsep + env.get("PYTHONPATH", "")
    code = f"import sys, slab_cli; sys.exit(slab_cli.{entry}())"
    run = subprocess.run([sys.executable, "-c", code, "info"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "op library not found" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_read_provider_and_huge_page_memory():
    # The read reference the W4A8 table times with its providers: the sum of ones over 256 MiB
    # (bytes = 4 x elements), on the same huge-page memory as the CPU panel weights.
    import torch

    from slab import _bench
    from slab._memory import HUGE_PAGE, huge_page_empty

    fn, nbytes = _bench.read_provider("cpu")
    assert nbytes == 256 * 2**20 and float(fn()) == nbytes // 4
    big, small = huge_page_empty(HUGE_PAGE + 4097), huge_page_empty(4097)
    assert big.dtype == small.dtype == torch.uint8 and big.numel() == HUGE_PAGE + 4097 and small.numel() == 4097
    big.fill_(7)
    assert int(big.sum()) == 7 * big.numel()
    if sys.platform.startswith("linux"):
        assert big.data_ptr() % HUGE_PAGE == 0
