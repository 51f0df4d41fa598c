"""`slab demo --quick` end to end (CI): it trains, the deployed/W4A8/CATS models agree with the
float model, the JSON has the documented shape; bad flags fail with one line and status 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import slab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"float", "deployed", "w4a8", "cats", "baseline"}


def _env():
    env = dict(os.environ)
    # the slab this test imported (the installed package in CI, the source tree with SLAB_LIBRARY here)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(slab.__file__)) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "slab", "demo", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=timeout,
    )


def _check_models(data, metric):
    assert isinstance(data["train_seconds"], float) and data["train_seconds"] > 0
    assert {m["name"] for m in data["models"]} == NAMES
    for m in data["models"]:
        assert m["latency_ms"] > 0
        assert metric in m
    hist = data["history"]["slab"]
    assert hist[-1]["loss"] < hist[0]["loss"] or hist[-1]["loss"] < 2.0  # it trains


def test_vision_quick(tmp_path):
    out = tmp_path / "v.json"
    r = _run(["--quick", "--device", "cpu", "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["task"] == "vision"
    _check_models(data, "accuracy")
    for m in data["models"]:
        assert 0.0 <= m["accuracy"] <= 1.0
    agree = {m["name"]: m["agreement_with_float"] for m in data["models"]}
    assert agree["deployed"] >= 0.99
    assert agree["cats"] >= 0.8
    assert agree["w4a8"] >= 0.6  # the quick model is barely trained: int4 flips some of its argmaxes
    assert "float" in r.stdout and "baseline" in r.stdout


def test_lm_quick(tmp_path):
    out = tmp_path / "lm.json"
    r = _run(["--lm", "--quick", "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["task"] == "lm"
    _check_models(data, "perplexity")
    assert len(data["decode"]) == 3
    for d in data["decode"]:
        assert set(d) >= {"context", "slab_tokens_per_s", "softmax_kv_tokens_per_s"}
        assert d["slab_tokens_per_s"] > 0 and d["softmax_kv_tokens_per_s"] > 0
    ppl = {m["name"]: m["perplexity"] for m in data["models"]}
    assert abs(ppl["deployed"] - ppl["float"]) < 1e-2 * ppl["float"]


@pytest.mark.parametrize(
    "flags, needle", [(["--device", "gpu"], "--device"), (["--bogus"], "--bogus"), (["--epochs", "0"], "--epochs")]
)
def test_bad_flags(flags, needle):
    r = _run(flags, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], r.stderr


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_ddp_quick(tmp_path):
    out = tmp_path / "ddp.json"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run(
        [
            torchrun if os.path.exists(torchrun) else "torchrun",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29561",
            "-m",
            "slab",
            "demo",
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=150,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world_size"] == 2
    _check_models(data, "accuracy")
