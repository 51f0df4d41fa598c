"""slab's loader (slab/_loader.py): the torch version check, the one-line ImportErrors of a
too-old torch and of an op library that does not load, the CUDA library's bookkeeping and the
CUDA-key error kernels of a build without CUDA kernels.

Runs against the installed package (scripts/test.sh) and a development build ($SLAB_LIBRARY);
the subprocesses inherit the environment, so they import the same slab."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import slab
from slab import _loader

TOO_OLD = "slab {v} needs torch >= 2.11 (found torch {t}); pip install 'torch>=2.11'"


def _run(code: str, tmp_path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- torch version --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "version, expected",
    [
        ("2.13.0+cpu", (2, 13, 0)),
        ("2.11.0a0+git1234abc", (2, 11, 0)),
        ("2.14.1", (2, 14, 1)),
        ("2.12", (2, 12, 0)),
        ("2.10.1+cu128", (2, 10, 1)),
        ("1.13.0", (1, 13, 0)),
        ("3.0.0.dev20270101", (3, 0, 0)),
        ("garbage", None),
        ("", None),
    ],
)
def test_parse_torch_version(version, expected):
    assert _loader.parse_torch_version(version) == expected


@pytest.mark.parametrize("version", ["2.10.1", "1.13.0", "2.10.0a0+gitabcdef", "2.9.0+cpu"])
def test_too_old_torch_is_one_line_naming_2_11(version):
    with pytest.raises(ImportError) as info:
        _loader.check_torch_version(version, slab.__version__)
    msg = str(info.value)
    assert msg == TOO_OLD.format(v=slab.__version__, t=version)
    assert "\n" not in msg and "2.11" in msg


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0a0+git1234abc", "2.13.0+cpu", "2.14.1", "3.0.0", "unparseable"])
def test_supported_torch_passes(version):
    _loader.check_torch_version(version, slab.__version__)


def test_too_old_torch_import_path(tmp_path):
    """The real `import slab` with torch.__version__ monkeypatched: one line, before any library loads."""
    r = _run(
        """
        import json, torch
        torch.__version__ = "2.10.1"
        try:
            import slab
        except ImportError as exc:
            print(json.dumps({"msg": str(exc), "loaded": sorted(torch.ops.loaded_libraries)}))
        else:
            print(json.dumps({"msg": None}))
    """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["msg"] == TOO_OLD.format(v=slab.__version__, t="2.10.1")
    assert not [p for p in out["loaded"] if "slab" in os.path.basename(p)], "the op library was loaded before the check"


# ---- op library that does not load ------------------------------------------------------------
def _broken_library(tmp_path, compiled: bool) -> str:
    path = tmp_path / "libslab_ops.so"
    if compiled:
        src = tmp_path / "broken.c"
        src.write_text("extern void slab_no_such_symbol(void);\nvoid slab_entry(void) { slab_no_such_symbol(); }\n")
        subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    else:
        path.write_bytes(b"not an ELF file\n")
    return str(path)


@pytest.mark.parametrize("compiled", [False, True], ids=["junk", "undefined_symbol"])
def test_ops_library_load_error_names_both_torches(tmp_path, monkeypatch, compiled):
    if compiled and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build a library with an undefined symbol")
    path = _broken_library(tmp_path, compiled)
    monkeypatch.setattr(_loader.STATE, "build_info", {"torch_version": "2.12.0+fake"})
    with pytest.raises(ImportError) as info:
        _loader.load_ops_library(path, slab.__version__)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"slab {slab.__version__}: cannot load {path} (")
    assert f"built against torch 2.12.0+fake and torch {torch.__version__} is running" in msg
    assert "reinstalling slab against the running torch fixes it" in msg
    assert isinstance(info.value.__cause__, OSError)
    if compiled:
        assert "undefined symbol: slab_no_such_symbol" in msg


def test_ops_library_load_error_without_build_info(tmp_path, monkeypatch):
    path = _broken_library(tmp_path, compiled=False)
    monkeypatch.setattr(_loader.STATE, "build_info", {})
    with pytest.raises(ImportError, match=r"built against an unknown torch \(no readable _build_info.json\)"):
        _loader.load_ops_library(path, slab.__version__)


def test_ops_library_load_error_import_path(tmp_path):
    """`import slab` with SLAB_LIBRARY at a broken library and its build info: one line, OSError cause."""
    path = _broken_library(tmp_path, compiled=False)
    (tmp_path / "_build_info.json").write_text(json.dumps({"torch_version": "2.12.0+fake"}))
    r = _run(
        """
        import json
        try:
            import slab
        except ImportError as exc:
            print(json.dumps({"msg": str(exc), "cause": type(exc.__cause__).__name__}))
    """,
        tmp_path,
        env={"SLAB_LIBRARY": path},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "\n" not in out["msg"] and "built against torch 2.12.0+fake" in out["msg"], out
    assert out["cause"] == "OSError"


def test_missing_library_message(tmp_path):
    with pytest.raises(ImportError, match="op library not found"):
        _loader.load_ops_library(str(tmp_path / "libslab_ops.so"))


# ---- build info -------------------------------------------------------------------------------
def test_read_build_info(tmp_path):
    lib = tmp_path / "libslab_ops.so"
    info, path, err = _loader.read_build_info(str(lib))
    assert info == {} and path == str(tmp_path / "_build_info.json") and "no _build_info.json" in err
    (tmp_path / "_build_info.json").write_text('{"torch_version": "2.13.0+cpu", "cuda": false}')
    assert _loader.read_build_info(str(lib)) == ({"torch_version": "2.13.0+cpu", "cuda": False}, path, None)
    (tmp_path / "_build_info.json").write_text("{broken")
    info, _, err = _loader.read_build_info(str(lib))
    assert info == {} and err.startswith("cannot read")


def test_installed_build_info_matches():
    """An installed slab (no SLAB_LIBRARY) ships _build_info.json with the facts of its build."""
    st = _loader.STATE
    if not st.build_info:
        pytest.skip(f"no build info: {st.build_info_error}")
    for key in ("slab_version", "git_commit", "torch_version", "stable_abi_target", "cuda", "cuda_archs", "cpu_isa"):
        assert key in st.build_info, key
    assert st.build_info["slab_version"] == slab.__version__
    assert st.build_info["stable_abi_target"] == "2.11"


# ---- CUDA library -----------------------------------------------------------------------------
@pytest.fixture
def fresh_state(monkeypatch):
    state = _loader.LoadState()
    monkeypatch.setattr(_loader, "STATE", state)
    monkeypatch.delenv("SLAB_CUDA_LIBRARY", raising=False)
    return state


def test_cuda_library_cpu_torch(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    _loader.load_cuda_library(str(tmp_path / "libslab_ops.so"))
    assert not fresh_state.cuda_loaded and fresh_state.cuda_reason == "torch is a CPU-only build"


def test_cuda_library_not_found(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    _loader.load_cuda_library(str(tmp_path / "libslab_ops.so"))
    assert not fresh_state.cuda_loaded
    assert fresh_state.cuda_reason == "this slab build has no CUDA kernels (libslab_cuda.so not found)"
    assert fresh_state.cuda_library == str(tmp_path / "libslab_cuda.so")


def test_cuda_library_override_missing(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("SLAB_CUDA_LIBRARY", str(tmp_path / "elsewhere.so"))
    _loader.load_cuda_library(str(tmp_path / "libslab_ops.so"))
    assert fresh_state.cuda_reason == f"SLAB_CUDA_LIBRARY={tmp_path / 'elsewhere.so'} does not exist"


def test_cuda_library_load_failure(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    (tmp_path / "libslab_cuda.so").write_bytes(b"not an ELF file\n")
    _loader.load_cuda_library(str(tmp_path / "libslab_ops.so"))
    assert not fresh_state.cuda_loaded
    assert fresh_state.cuda_reason.startswith("libslab_cuda.so did not load (")
    assert "Could not load this library" not in fresh_state.cuda_reason  # the loader's own text, not torch's wrapper
    assert "\n" not in fresh_state.cuda_reason


def test_import_state_is_consistent():
    st = _loader.STATE
    assert st.ops_library and os.path.exists(st.ops_library)
    if not torch.version.cuda:
        assert st.cuda_reason == "torch is a CPU-only build"
    if not st.cuda_loaded:
        assert st.cuda_reason
        assert slab.cuda_available() is False
    else:
        assert st.cuda_reason is None


# ---- CUDA error kernels -----------------------------------------------------------------------
def test_cuda_unavailable_message():
    assert _loader.cuda_unavailable_message("slab::cats", _loader.REASON_NO_CUDA_LIBRARY) == (
        "slab::cats: got a CUDA tensor, but this slab build has no CUDA kernels (libslab_cuda.so not found). "
        "Rebuild slab with a CUDA build of torch and nvcc present (SLAB_CUDA=1), or move the tensors to the CPU."
    )
    kernel = _loader.cuda_unavailable_kernel("slab::cats", "torch is a CPU-only build", "Move the tensors to the CPU.")
    with pytest.raises(RuntimeError) as info:
        kernel(torch.ones(2))
    assert str(info.value) == (
        "slab::cats: got a CUDA tensor, but torch is a CPU-only build. Move the tensors to the CPU."
    )


_CUDA_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def test_register_cuda_fallbacks_on_a_test_namespace():
    """Which ops get the error kernel (CPU kernel, no CUDA kernel; overloads too), and that the
    dispatcher runs it for the CUDA key (redispatch reaches it with CPU tensors, no GPU needed)."""
    ns = "slab_loader_test"
    lib = torch.library.Library(ns, "DEF")
    for schema in (
        "cpu_only(Tensor x) -> Tensor",
        "both(Tensor x) -> Tensor",
        "composite(Tensor x) -> Tensor",
        "ov(Tensor x) -> Tensor",
        "ov.scaled(Tensor x, float s) -> Tensor",
    ):
        lib.define(schema)
    lib.impl("cpu_only", lambda x: x * 2, "CPU")
    lib.impl("both", lambda x: x * 2, "CPU")
    lib.impl("both", lambda x: x * 2, "CUDA")
    lib.impl("composite", lambda x: x * 2, "CompositeImplicitAutograd")
    lib.impl("ov", lambda x: x, "CPU")
    lib.impl("ov.scaled", lambda x, s: x * s, "CPU")
    covered = _loader.register_cuda_fallbacks("the reason", namespace=ns)
    assert covered == [f"{ns}::cpu_only", f"{ns}::ov", f"{ns}::ov.scaled"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::cpu_only", "CUDA")
    with pytest.raises(RuntimeError) as info:
        torch.ops.slab_loader_test.cpu_only.default.redispatch(_CUDA_ONLY, torch.ones(3))
    assert str(info.value) == _loader.cuda_unavailable_message(f"{ns}::cpu_only", "the reason")
    with pytest.raises(RuntimeError, match=r"slab_loader_test::ov\.scaled: got a CUDA tensor, but the reason\."):
        torch.ops.slab_loader_test.ov.scaled.redispatch(_CUDA_ONLY, torch.ones(3), 2.0)
    assert torch.equal(torch.ops.slab_loader_test.cpu_only(torch.ones(3)), torch.full((3,), 2.0))  # CPU untouched


def _dummy(kind: str):
    """An argument of schema type ``kind`` that the dispatcher accepts (the error kernels ignore it)."""
    if kind.startswith("Optional["):
        return None
    if kind.startswith("List["):
        return [_dummy(kind[len("List[") : -1])]
    return {
        "Tensor": torch.ones(1),
        "int": 1,
        "SymInt": 1,
        "float": 1.0,
        "bool": False,
        "str": "x",
        "Scalar": 1.0,
        "ScalarType": torch.float32,
    }.get(kind)


def test_every_slab_cpu_op_errors_clearly_for_cuda():
    """Without the CUDA kernels, every slab op with a CPU kernel still has a CUDA kernel -- the op
    library's own error kernel, or the loader's fallback -- and it raises a RuntimeError saying a
    CUDA tensor cannot be served (exactly the loader's message for the fallbacks). Reached with
    redispatch on CPU tensors, so no GPU is needed; skipped where real CUDA kernels are registered."""
    st = _loader.STATE
    if st.cuda_loaded:
        pytest.skip("the CUDA kernels are loaded")
    fallbacks = set(st.cuda_fallback_ops)
    checked = 0
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("slab::"):
            continue
        packet = getattr(torch.ops.slab, name[len("slab::") :])
        for overload in packet.overloads():
            full = name if overload == "default" else f"{name}.{overload}"
            if not torch._C._dispatch_has_kernel_for_dispatch_key(full, "CPU"):
                continue
            assert torch._C._dispatch_has_kernel_for_dispatch_key(full, "CUDA"), (
                f"{full}: no CUDA kernel, not even an error"
            )
            op = getattr(packet, overload)
            args = [_dummy(str(a.type)) for a in op._schema.arguments if not a.kwarg_only]
            kwargs = {a.name: _dummy(str(a.type)) for a in op._schema.arguments if a.kwarg_only}
            with pytest.raises(RuntimeError, match="got a CUDA tensor, but ") as info:
                op.redispatch(_CUDA_ONLY, *args, **kwargs)
            if full in fallbacks:
                assert str(info.value) == _loader.cuda_unavailable_message(full, st.cuda_reason, st.cuda_hint)
            checked += 1
    assert checked, "no slab op has a CPU kernel"
