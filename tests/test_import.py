"""Import-time behaviour, checked in fresh interpreters: no CUDA initialisation, no inference engines imported, and
a missing native library degrades to the reference kernels with exactly one RuntimeWarning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def code(*parts: str) -> str:
    """Join dedented code parts."""
    return "\n".join(textwrap.dedent(p) for p in parts)


def run_py(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (checkout on sys.path); it prints one JSON object as its last line."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPARSESYNC_")}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update({k: str(v) for k, v in env.items()})
    p = subprocess.run([sys.executable, "-c", code], env=e, cwd=str(ROOT), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"subprocess failed:\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


ROUNDTRIP = """
    g = torch.Generator().manual_seed(0)
    old = {"w": torch.randn(5000, generator=g).to(torch.bfloat16), "b": torch.randn(7, 9, generator=g),
           "i": torch.arange(10, dtype=torch.int64)}
    new = {k: v.clone() for k, v in old.items()}
    new["w"].view(torch.int16)[::37] += 1
    new["b"][2] = float("nan")
    new["i"][3] = -1
    upd = sparsesync.Encoder(old, 0, bucket_bytes=4096, digest=True).encode(new, 1)
    dst = {k: v.clone() for k, v in old.items()}
    sparsesync.Decoder(dst, 0, verify_digest=True).apply(upd)
    ok = sparsesync.state_digest(dst) == sparsesync.state_digest(new) and all(
        torch.equal(dst[k].flatten().view(torch.uint8), new[k].flatten().view(torch.uint8)) for k in new)
"""


def test_import_does_not_initialise_cuda_or_engines():
    out = run_py(code("""
        import json, sys
        import sparsesync, torch
        import sparsesync.codec, sparsesync.format, sparsesync.kernels, sparsesync.reference, sparsesync.digest
        res = {"cuda": torch.cuda.is_initialized(),
               "engines": sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "sglang"))}
        """, ROUNDTRIP, """
        res["cuda_after_roundtrip"] = torch.cuda.is_initialized()
        res["ok"] = ok
        res["engines_after"] = sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "sglang"))
        print(json.dumps(res))
    """))
    assert out == {"cuda": False, "engines": [], "cuda_after_roundtrip": False, "ok": True, "engines_after": []}


def test_importing_every_submodule_stays_lazy():
    """Every module of the package imports without initialising CUDA or importing vLLM/SGLang (modules that need an
    optional third-party package which is not installed are skipped)."""
    out = run_py(code("""
        import importlib, json, pkgutil, sys
        import torch, sparsesync
        skipped, imported = [], []
        for info in pkgutil.iter_modules(sparsesync.__path__, "sparsesync."):
            if info.name.startswith("sparsesync.libsparsesync"):  # the ctypes library, not a Python module
                continue
            try:
                importlib.import_module(info.name)
                imported.append(info.name)
            except ImportError as exc:
                if getattr(exc, "name", None) and not exc.name.startswith("sparsesync"):
                    skipped.append([info.name, exc.name])
                else:
                    raise
        print(json.dumps({"cuda": torch.cuda.is_initialized(), "imported": imported, "skipped": skipped,
                          "engines": sorted(m for m in sys.modules if m.split(".")[0] in ("vllm", "sglang"))}))
    """))
    assert not out["cuda"], out
    assert out["engines"] == [], out
    assert "sparsesync.codec" in out["imported"]


@pytest.mark.parametrize("lib", ["missing", "not_a_library"])
def test_missing_native_library_falls_back_with_one_warning(tmp_path, lib):
    path = tmp_path / "libsparsesync.so"
    if lib == "not_a_library":
        path.write_text("this is not an ELF file\n")
    out = run_py(code("""
        import json, warnings
        caught = warnings.catch_warnings(record=True).__enter__()
        warnings.simplefilter("always")
        import torch, sparsesync
        import sparsesync._native as native
        from sparsesync import kernels, reference
        at_import = [str(w.message) for w in caught]
        """, ROUNDTRIP, """
        sparsesync.state_digest(new)
        kernels.impl(); kernels.impl()
        fallback = [w for w in caught if issubclass(w.category, RuntimeWarning)
                    and "native library not available" in str(w.message)]
        print(json.dumps({"available": native.available, "load_error": native.load_error,
                          "at_import": at_import, "n_warnings": len(fallback),
                          "message": str(fallback[0].message) if fallback else "",
                          "impl_is_reference": kernels.impl() is reference, "ok": ok}))
    """), SPARSESYNC_LIB=str(path))
    assert out["available"] is False
    assert str(path) in out["load_error"]
    assert out["at_import"] == [], "importing must not warn; the warning comes when a kernel is first used"
    assert out["n_warnings"] == 1, out
    assert str(path) in out["message"]
    assert out["impl_is_reference"] and out["ok"]


def test_forced_reference_does_not_warn(tmp_path):
    out = run_py(code("""
        import json, warnings
        caught = warnings.catch_warnings(record=True).__enter__()
        warnings.simplefilter("always")
        import torch, sparsesync
        from sparsesync import kernels, reference
        """, ROUNDTRIP, """
        print(json.dumps({"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                          "impl_is_reference": kernels.impl() is reference, "ok": ok}))
    """), SPARSESYNC_LIB=str(tmp_path / "nope.so"), SPARSESYNC_REFERENCE="1")
    assert out == {"warnings": [], "impl_is_reference": True, "ok": True}


def test_native_used_when_available():
    from sparsesync import _native
    if not _native.available:
        pytest.skip(f"native library not available: {_native.load_error}")
    out = run_py(code("""
        import json, warnings
        caught = warnings.catch_warnings(record=True).__enter__()
        warnings.simplefilter("always")
        import torch, sparsesync
        from sparsesync import kernels, _native
        """, ROUNDTRIP, """
        print(json.dumps({"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                          "native": kernels.impl() is _native, "ok": ok}))
    """))
    assert out == {"warnings": [], "native": True, "ok": True}


def test_build_info_says_what_this_installation_can_do():
    import sparsesync
    from sparsesync import _native
    info = sparsesync.build_info()
    assert set(info) >= {"native", "simd", "cuda", "cuda_archs", "cuda_usable", "nccl"}
    assert info["native"] == bool(_native.available)
    if info["native"]:
        assert info["simd"] in ("avx512", "portable")
        assert info["cuda"] == _native.cuda_compiled()
        if info["cuda"]:
            assert info["cuda_archs"] and all(isinstance(a, int) and a >= 50 for a in info["cuda_archs"])
    if not info["cuda_usable"]:
        assert isinstance(info["cuda_error"], str) and info["cuda_error"]
    if not info["nccl"]:
        assert isinstance(info["nccl_error"], str) and info["nccl_error"]
