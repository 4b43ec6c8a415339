"""The NCCL payload backend (sparsesync/nccl.py).

Without a GPU: import laziness (fresh interpreters), availability reporting, library discovery, the ctypes function
table against nccl.h, error translation, the pure helpers of NCCLGroup, and the binding's argument passing through a
fake libnccl compiled at test time (skipped without a C compiler). With a GPU and libnccl (``gpu`` marker): byte
broadcasts on a single-rank communicator, and on two ranks when two GPUs are visible.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from sparsesync import backends, nccl
from sparsesync.errors import SparseSyncError

ROOT = Path(__file__).resolve().parent.parent
NCCL_OK, NCCL_WHY = nccl.available()
needs_nccl = pytest.mark.skipif(not (torch.cuda.is_available() and NCCL_OK), reason=f"NCCL unusable: {NCCL_WHY}")
needs_no_nccl = pytest.mark.skipif(NCCL_OK, reason="NCCL is usable on this machine")


def run_py(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (checkout on sys.path); it prints one JSON object as its last line."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPARSESYNC_")}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update({k: str(v) for k, v in env.items()})
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, cwd=str(ROOT), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"subprocess failed:\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- a fake libnccl -----------------------------------------------------------------------------------------------------
FAKE_SRC = r"""
#include <stddef.h>
#include <string.h>

typedef struct { char internal[128]; } ncclUniqueId;
typedef void* ncclComm_t;
typedef void* cudaStream_t;

/* knobs (set from Python) */
int fake_version = 22703;
int fake_uid_result = 0, fake_init_result = 0, fake_init_null = 0, fake_destroy_result = 0, fake_abort_result = 0;
int fake_broadcast_result = 0, fake_async_error = 0;
/* what the fake saw */
unsigned char fake_seen_id[128];
int fake_seen_nranks = -1, fake_seen_rank = -1;
const void* fake_bc_send; void* fake_bc_recv; size_t fake_bc_count; int fake_bc_dtype = -1, fake_bc_root = -1;
ncclComm_t fake_bc_comm; cudaStream_t fake_bc_stream;
ncclComm_t fake_destroyed, fake_aborted, fake_async_comm;
int fake_destroy_calls, fake_abort_calls, fake_async_calls, fake_group_starts, fake_group_ends;
static const char* last = "";

void fake_reset(void) {
  fake_version = 22703; fake_uid_result = fake_init_result = fake_init_null = 0;
  fake_destroy_result = fake_abort_result = fake_broadcast_result = fake_async_error = 0;
  memset(fake_seen_id, 0, sizeof fake_seen_id); fake_seen_nranks = fake_seen_rank = -1;
  fake_bc_send = 0; fake_bc_recv = 0; fake_bc_count = 0; fake_bc_dtype = fake_bc_root = -1;
  fake_bc_comm = 0; fake_bc_stream = 0; fake_destroyed = fake_aborted = fake_async_comm = 0;
  fake_destroy_calls = fake_abort_calls = fake_async_calls = fake_group_starts = fake_group_ends = 0;
  last = "";
}

int ncclGetVersion(int* version) { *version = fake_version; return 0; }

const char* ncclGetErrorString(int result) {
  switch (result) {
    case 0: return "fake: no error";
    case 1: return "fake: unhandled cuda error";
    case 2: return "fake: unhandled system error";
    case 3: return "fake: internal error";
    case 4: return "fake: invalid argument";
    case 5: return "fake: invalid usage";
    case 6: return "fake: remote process exited or there was a network error";
    case 7: return "fake: NCCL operation in progress";
    default: return "fake: unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) { (void)comm; return last; }

int ncclGetUniqueId(ncclUniqueId* id) {
  if (fake_uid_result) { last = "fake last error: ncclGetUniqueId"; return fake_uid_result; }
  for (int i = 0; i < 128; i++) id->internal[i] = (char)((i % 16 == 5) ? 0 : 255 - i);
  return 0;
}

int ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank) {
  memcpy(fake_seen_id, commId.internal, 128);
  fake_seen_nranks = nranks; fake_seen_rank = rank;
  if (fake_init_result) { last = "fake last error: ncclCommInitRank"; return fake_init_result; }
  *comm = fake_init_null ? (ncclComm_t)0 : (ncclComm_t)0xC0FFEE0;
  return 0;
}

int ncclCommDestroy(ncclComm_t comm) { fake_destroy_calls++; fake_destroyed = comm; return fake_destroy_result; }
int ncclCommAbort(ncclComm_t comm) { fake_abort_calls++; fake_aborted = comm; return fake_abort_result; }

int ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, int datatype, int root, ncclComm_t comm,
                  cudaStream_t stream) {
  fake_bc_send = sendbuff; fake_bc_recv = recvbuff; fake_bc_count = count; fake_bc_dtype = datatype;
  fake_bc_root = root; fake_bc_comm = comm; fake_bc_stream = stream;
  if (fake_broadcast_result) { last = "fake last error: ncclBroadcast"; return fake_broadcast_result; }
  if (sendbuff && recvbuff && sendbuff != recvbuff && datatype == 1) memmove(recvbuff, sendbuff, count);
  return 0;
}

int ncclGroupStart(void) { fake_group_starts++; return 0; }
int ncclGroupEnd(void) { fake_group_ends++; return 0; }

int ncclCommGetAsyncError(ncclComm_t comm, int* asyncError) {
  fake_async_calls++; fake_async_comm = comm; *asyncError = fake_async_error; return 0;
}
"""

FAKE_UID = bytes(0 if i % 16 == 5 else 255 - i for i in range(128))


def _compile_fake(directory: Path) -> Path | None:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None
    src = directory / "fake_nccl.c"
    src.write_text(FAKE_SRC)
    lib = directory / "libnccl.so.2"     # named like the real one, so that /proc/self/maps checks see it
    p = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)], capture_output=True, text=True,
                       timeout=60)
    if p.returncode != 0:
        pytest.fail(f"compiling the fake libnccl failed:\n{p.stderr}")
    return lib


@pytest.fixture(scope="module")
def fake_path(tmp_path_factory) -> Path:
    lib = _compile_fake(tmp_path_factory.mktemp("fake-nccl"))
    if lib is None:
        pytest.skip("no C compiler to build the fake libnccl")
    return lib


class Fake:
    """The fake library's knobs and records (ctypes views of its globals)."""

    def __init__(self, path: Path):
        self.cdll = ctypes.CDLL(str(path))   # same handle (and globals) as NCCLLibrary's dlopen of that path
        self.cdll.fake_reset()

    def __getattr__(self, name):
        typ = {"fake_bc_count": ctypes.c_size_t}.get(name, ctypes.c_int)
        if name in ("fake_bc_send", "fake_bc_recv", "fake_bc_comm", "fake_bc_stream", "fake_destroyed",
                    "fake_aborted", "fake_async_comm"):
            typ = ctypes.c_void_p
        return typ.in_dll(self.cdll, name)

    def set(self, name: str, value: int) -> None:
        ctypes.c_int.in_dll(self.cdll, name).value = value

    def seen_id(self) -> bytes:
        return bytes((ctypes.c_ubyte * 128).in_dll(self.cdll, "fake_seen_id"))


@pytest.fixture
def fake(fake_path):
    f = Fake(fake_path)
    yield f
    f.cdll.fake_reset()


@pytest.fixture
def fake_lib(fake_path, fake) -> nccl.NCCLLibrary:
    return nccl.NCCLLibrary(str(fake_path))


# -- import laziness ----------------------------------------------------------------------------------------------------
LAZY_PROBE = """
    import json, sys
    import torch
    def mapped():
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "libnccl" in line})
    before = mapped()
    import sparsesync, sparsesync.backends
    import sparsesync.nccl as n
    backend = sparsesync.backends.get("nccl")
    res = {"cuda": torch.cuda.is_initialized(), "new_maps": sorted(set(mapped()) - set(before)),
           "cached": list(n._libs), "backend": backend.__name__}
    res["ok"], res["why"] = n.available()
    res["maps_after_available"] = sorted(set(mapped()) - set(before))
    res["cuda_after_available"] = torch.cuda.is_initialized()
    print(json.dumps(res))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_import_loads_neither_nccl_nor_cuda():
    out = run_py(LAZY_PROBE)
    assert out["cuda"] is False
    assert out["new_maps"] == [] and out["cached"] == []
    assert out["backend"] == "NCCLBackend"
    assert out["cuda_after_available"] is False       # available() does not initialise CUDA either


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_import_laziness_probe_sees_a_loaded_library(fake_path):
    """Positive control of the probe above: with SPARSESYNC_NCCL_LIB at the fake, importing maps nothing, but
    available() (which loads the library) does map it."""
    out = run_py(LAZY_PROBE, SPARSESYNC_NCCL_LIB=str(fake_path))
    assert out["cuda"] is False and out["new_maps"] == [] and out["cached"] == []
    assert out["maps_after_available"] == [str(fake_path)]
    assert out["cuda_after_available"] is False


# -- availability and the backend ---------------------------------------------------------------------------------------
def test_available_never_raises_and_explains():
    ok, why = nccl.available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok == (why == "")
    if not torch.cuda.is_available():
        assert not ok and ("CUDA" in why)


def test_available_swallows_unexpected_errors(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    ok, why = nccl.available()
    assert not ok and "driver exploded" in why


def test_available_names_a_missing_library(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "libnccl.so.2"
    monkeypatch.setenv(nccl.ENV_LIB, str(missing))
    monkeypatch.setattr(nccl, "_libs", {})
    ok, why = nccl.available()
    assert not ok and str(missing) in why


@needs_no_nccl
def test_backend_check_explains_why_not():
    with pytest.raises(SparseSyncError) as ei:
        nccl.NCCLBackend.check()
    msg = str(ei.value)
    assert isinstance(ei.value, nccl.NCCLUnavailable)
    assert "backend='nccl'" in msg and "backend='tcp'" in msg and NCCL_WHY in msg


@needs_nccl
def test_backend_check_passes_when_usable():
    nccl.NCCLBackend.check()


def test_backend_shape_and_tcp_control_channel():
    assert backends.get("nccl") is nccl.NCCLBackend
    assert nccl.NCCLBackend.payload is True
    lst = nccl.NCCLBackend.listen("127.0.0.1", 0)
    try:
        assert isinstance(lst, backends._TCPListener) and lst.port > 0
        c = nccl.NCCLBackend.connect("127.0.0.1", lst.port, 5.0)
        s = None
        for _ in range(50):
            s, peer = lst.accept()
            if s is not None:
                break
        assert s is not None and peer.startswith("127.0.0.1:")
        c.sendall(b"ping")
        assert s.recv(4) == b"ping"
        assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        s.close()
        c.close()
    finally:
        lst.close()


@needs_no_nccl
def test_group_refuses_without_nccl_and_leaves_cuda_alone():
    with pytest.raises(nccl.NCCLUnavailable, match="NCCL cannot be used here"):
        nccl.NCCLGroup(bytes(128), 0, 1, 0)
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("args, match", [
    ((bytes(127), 0, 1, 0), "128 bytes"),
    (("x" * 128, 0, 1, 0), "128 bytes"),
    ((bytes(128), 1, 1, 0), "outside"),
    ((bytes(128), -1, 2, 0), "outside"),
    ((bytes(128), 0, 0, 0), "world must be"),
    ((bytes(128), True, 2, 0), "rank must be an int"),
    ((bytes(128), 0, 1, "cpu"), "CUDA device"),
    ((bytes(128), 0, 1, -1), ">= 0"),
    ((bytes(128), 0, 1, "not-a-device"), "not a CUDA device"),
])
def test_group_validates_arguments_first(args, match):
    with pytest.raises(nccl.NCCLArgumentError, match=match):
        nccl.NCCLGroup(*args)


@pytest.mark.parametrize("kw, match", [({"max_bytes": 0}, "max_bytes"), ({"timeout": 0}, "timeout"),
                                       ({"timeout": -1.0}, "timeout")])
def test_group_validates_options(kw, match):
    with pytest.raises(nccl.NCCLArgumentError, match=match):
        nccl.NCCLGroup(bytes(128), 0, 1, 0, **kw)


# -- finding the library ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_site(monkeypatch, tmp_path):
    """No real site-packages, sys.path or system NCCL: only what a test puts there."""
    monkeypatch.delenv(nccl.ENV_LIB, raising=False)
    monkeypatch.setattr(nccl.site, "getsitepackages", lambda: [])
    monkeypatch.setattr(nccl.site, "getusersitepackages", lambda: str(tmp_path / "user-site"))
    monkeypatch.setattr(sys, "path", [str(tmp_path / "empty")])
    monkeypatch.setattr(nccl.ctypes.util, "find_library", lambda name: None)
    return tmp_path


def _wheel(d: Path) -> Path:
    p = d / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    return p


def test_find_library_honours_the_environment(monkeypatch, no_site):
    wheel = _wheel(no_site / "site")
    monkeypatch.setattr(nccl.site, "getsitepackages", lambda: [str(no_site / "site")])
    monkeypatch.setenv(nccl.ENV_LIB, "/opt/custom/libnccl.so.2")
    assert nccl.find_library() == "/opt/custom/libnccl.so.2"      # wins over the wheel, even when missing
    monkeypatch.setenv(nccl.ENV_LIB, "")
    assert nccl.find_library() == str(wheel)


def test_find_library_searches_site_packages_then_sys_path(monkeypatch, no_site):
    in_path = _wheel(no_site / "on-sys-path")
    monkeypatch.setattr(sys, "path", ["", str(no_site / "nothing-here"), str(no_site / "on-sys-path")])
    assert nccl.find_library() == str(in_path)
    in_site = _wheel(no_site / "site")
    monkeypatch.setattr(nccl.site, "getsitepackages", lambda: [str(no_site / "site")])
    assert nccl.find_library() == str(in_site)


def test_find_library_falls_back_to_the_system(monkeypatch, no_site):
    monkeypatch.setattr(nccl.ctypes.util, "find_library", lambda name: "libnccl.so.2.99" if name == "nccl" else None)
    assert nccl.find_library() == "libnccl.so.2.99"
    monkeypatch.setattr(nccl.ctypes.util, "find_library", lambda name: None)
    if sys.platform.startswith("linux"):
        assert nccl.find_library() == "libnccl.so.2"
    monkeypatch.setattr(nccl.sys, "platform", "darwin")
    assert nccl.find_library() is None
    with pytest.raises(nccl.NCCLUnavailable, match=nccl.ENV_LIB):
        nccl.get_library()


def test_load_error_names_the_path(monkeypatch, tmp_path):
    missing = str(tmp_path / "no" / "such" / "libnccl.so.2")
    monkeypatch.setenv(nccl.ENV_LIB, missing)
    monkeypatch.setattr(nccl, "_libs", {})
    assert nccl.find_library() == missing
    with pytest.raises(nccl.NCCLUnavailable) as ei:
        nccl.get_library()
    assert missing in str(ei.value) and nccl.ENV_LIB in str(ei.value)
    assert nccl._libs == {}                                           # failures are not cached
    with pytest.raises(nccl.NCCLUnavailable, match="cannot load"):
        nccl.NCCLLibrary(missing)


def test_library_that_is_not_nccl():
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no libc to load")
    with pytest.raises(nccl.NCCLUnavailable, match="missing ncclGetVersion.*ncclCommGetAsyncError"):
        nccl.NCCLLibrary(libc)


# -- unique ids ---------------------------------------------------------------------------------------------------------
def test_unique_id_layout_and_round_trip():
    assert ctypes.sizeof(nccl.ncclUniqueId) == nccl.NCCL_UNIQUE_ID_BYTES == 128
    assert ctypes.alignment(nccl.ncclUniqueId) == 1
    raw = bytes(random.Random(7).randbytes(128))
    raw = raw[:10] + b"\0\0" + raw[12:]                 # interior NULs must survive (no C-string truncation)
    uid = nccl.unique_id_from_bytes(raw)
    assert isinstance(uid, nccl.ncclUniqueId)
    assert nccl.unique_id_to_bytes(uid) == raw
    assert nccl.unique_id_to_bytes(nccl.unique_id_from_bytes(bytearray(raw))) == raw
    assert nccl.unique_id_to_bytes(nccl.unique_id_from_bytes(memoryview(raw))) == raw
    arr = torch.frombuffer(bytearray(raw), dtype=torch.int32).numpy()      # a non-byte buffer of 128 bytes
    assert nccl.unique_id_to_bytes(nccl.unique_id_from_bytes(memoryview(arr))) == raw
    assert nccl.unique_id_to_bytes(nccl.ncclUniqueId()) == bytes(128)
    uid2 = nccl.unique_id_from_bytes(raw)
    raw_mut = bytearray(raw)
    uid3 = nccl.unique_id_from_bytes(raw_mut)
    raw_mut[0] ^= 0xFF                                   # copied, not aliased
    assert nccl.unique_id_to_bytes(uid3) == nccl.unique_id_to_bytes(uid2) == raw


@pytest.mark.parametrize("bad", [b"", bytes(127), bytes(129), bytes(256), "a" * 128, None, 128, [0] * 128,
                                 memoryview(bytes(256))[::2]])
def test_unique_id_validation(bad):
    with pytest.raises(nccl.NCCLArgumentError):
        nccl.unique_id_from_bytes(bad)
    with pytest.raises(ValueError):                      # NCCLArgumentError is a ValueError too
        nccl.unique_id_from_bytes(bad)


def test_unique_id_to_bytes_wants_the_struct():
    with pytest.raises(nccl.NCCLArgumentError):
        nccl.unique_id_to_bytes(bytes(128))


# -- the function table against nccl.h ----------------------------------------------------------------------------------
P = ctypes.POINTER
INT, VOIDP, SIZE_T = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
# written from NVIDIA/nccl src/nccl.h.in: enums are int, ncclComm_t/cudaStream_t are opaque pointers
EXPECTED = {
    "ncclGetVersion": (INT, [P(INT)]),                                        # (int *version)
    "ncclGetUniqueId": (INT, [P(nccl.ncclUniqueId)]),                         # (ncclUniqueId* uniqueId)
    "ncclCommInitRank": (INT, [P(VOIDP), INT, nccl.ncclUniqueId, INT]),       # (ncclComm_t*, int, ncclUniqueId, int)
    "ncclCommDestroy": (INT, [VOIDP]),                                        # (ncclComm_t)
    "ncclCommAbort": (INT, [VOIDP]),                                          # (ncclComm_t)
    "ncclBroadcast": (INT, [VOIDP, VOIDP, SIZE_T, INT, INT, VOIDP, VOIDP]),   # (const void*, void*, size_t,
                                                                              #  ncclDataType_t, int, comm, stream)
    "ncclGroupStart": (INT, []),
    "ncclGroupEnd": (INT, []),
    "ncclGetErrorString": (ctypes.c_char_p, [INT]),                           # const char* (ncclResult_t)
    "ncclCommGetAsyncError": (INT, [VOIDP, P(INT)]),                          # (ncclComm_t, ncclResult_t*)
}


def test_function_table_matches_nccl_h():
    table = {name: (restype, list(argtypes)) for name, restype, argtypes in nccl.FUNCTIONS}
    assert len(table) == len(nccl.FUNCTIONS)
    assert table == EXPECTED
    assert {n: (r, list(a)) for n, r, a in nccl.OPTIONAL_FUNCTIONS} == {"ncclGetLastError": (ctypes.c_char_p, [VOIDP])}
    assert ctypes.sizeof(ctypes.c_int) == 4                                   # what a C enum is on every NCCL target


def test_enum_values_match_nccl_h():
    D = nccl.DataType
    assert (D.ncclInt8, D.ncclChar, D.ncclUint8, D.ncclInt32, D.ncclInt, D.ncclUint32, D.ncclInt64, D.ncclUint64,
            D.ncclFloat16, D.ncclHalf, D.ncclFloat32, D.ncclFloat, D.ncclFloat64, D.ncclDouble, D.ncclBfloat16,
            D.ncclFloat8e4m3, D.ncclFloat8e5m2) == (0, 0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 10, 11)
    R = nccl.Result
    assert [(r.name, int(r)) for r in R] == [
        ("ncclSuccess", 0), ("ncclUnhandledCudaError", 1), ("ncclSystemError", 2), ("ncclInternalError", 3),
        ("ncclInvalidArgument", 4), ("ncclInvalidUsage", 5), ("ncclRemoteError", 6), ("ncclInProgress", 7),
        ("ncclTimeout", 8)]


def _stub_namespace(**overrides):
    def fn(ret=0):
        return lambda *a: ret
    ns = types.SimpleNamespace(**{name: fn() for name, _, _ in nccl.FUNCTIONS})
    ns.ncclGetErrorString = lambda code: b"stub error %d" % code
    for k, v in overrides.items():
        setattr(ns, k, v)
    return ns


def test_binding_sets_the_table_on_each_function():
    ns = _stub_namespace()
    lib = nccl.NCCLLibrary(handle=ns)
    for name, (restype, argtypes) in EXPECTED.items():
        f = getattr(ns, name)
        assert f.restype is restype and list(f.argtypes) == argtypes, name
        assert lib._fn[name] is f
    assert "ncclGetLastError" not in lib._fn                                   # optional, absent here
    del ns.ncclCommAbort
    with pytest.raises(nccl.NCCLUnavailable, match="missing ncclCommAbort"):
        nccl.NCCLLibrary(handle=ns)


# -- error translation --------------------------------------------------------------------------------------------------
def test_check_translates_result_codes():
    lib = nccl.NCCLLibrary(handle=_stub_namespace(), path="<stub>")
    lib._check(0)
    lib._check(ctypes.c_int(0).value)
    with pytest.raises(nccl.NCCLError) as ei:
        lib._check(3)
    e = ei.value
    assert isinstance(e, SparseSyncError)
    assert (e.code, e.name, e.message, e.detail) == (3, "ncclInternalError", "stub error 3", "")
    assert str(e) == "NCCL error 3 (ncclInternalError): stub error 3"
    with pytest.raises(nccl.NCCLError) as ei:
        lib._check(42)
    assert ei.value.name == "ncclResult_t(42)" and "stub error 42" in str(ei.value)


def test_check_survives_a_broken_error_string():
    def broken(code):
        raise OSError("segfault averted")
    lib = nccl.NCCLLibrary(handle=_stub_namespace(ncclGetErrorString=broken), path="<stub>")
    with pytest.raises(nccl.NCCLError) as ei:
        lib._check(2)
    assert ei.value.code == 2 and "ncclGetErrorString failed" in str(ei.value)
    lib = nccl.NCCLLibrary(handle=_stub_namespace(ncclGetErrorString=lambda c: None), path="<stub>")
    with pytest.raises(nccl.NCCLError, match="unknown error"):
        lib._check(5)


def test_check_appends_the_last_error_when_available():
    ns = _stub_namespace(ncclGetLastError=lambda comm: b"peer 3 went away")
    lib = nccl.NCCLLibrary(handle=ns, path="<stub>")
    assert ns.ncclGetLastError.restype is ctypes.c_char_p
    with pytest.raises(nccl.NCCLError) as ei:
        lib._check(6)
    assert ei.value.detail == "peer 3 went away"
    assert str(ei.value) == "NCCL error 6 (ncclRemoteError): stub error 6; last error: peer 3 went away"


def test_timeout_error():
    e = nccl.NCCLTimeout("broadcast of 5 bytes", 2.5)
    assert isinstance(e, nccl.NCCLError) and e.code == nccl.Result.ncclTimeout
    assert "broadcast of 5 bytes" in str(e) and "2.5 s" in str(e)


# -- version decoding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code, version", [(2804, (2, 8, 4)), (2708, (2, 7, 8)), (20906, (2, 9, 6)),
                                           (21903, (2, 19, 3)), (22703, (2, 27, 3)), (30001, (3, 0, 1)),
                                           (22899, (2, 28, 99))])
def test_decode_version(code, version):
    assert nccl.decode_version(code) == version


def test_decode_version_rejects_negative():
    with pytest.raises(ValueError):
        nccl.decode_version(-1)


# -- the binding against the fake library -------------------------------------------------------------------------------
def test_fake_version(fake, fake_lib):
    assert fake_lib.get_version() == 22703
    assert fake_lib.version == (2, 27, 3) and fake_lib.version_string == "2.27.3"
    fake.set("fake_version", 2804)
    assert fake_lib.version == (2, 8, 4)
    fake.set("fake_version", 21903)
    assert fake_lib.version_string == "2.19.3"


def test_fake_unique_id(fake, fake_lib):
    uid = fake_lib.get_unique_id()
    assert uid == FAKE_UID and len(uid) == 128
    assert nccl.new_unique_id(fake_lib) == FAKE_UID
    fake.set("fake_uid_result", 2)
    with pytest.raises(nccl.NCCLError) as ei:
        fake_lib.get_unique_id()
    assert ei.value.code == 2 and ei.value.message == "fake: unhandled system error"
    assert ei.value.detail == "fake last error: ncclGetUniqueId"


def test_fake_comm_init_passes_the_id_by_value(fake, fake_lib):
    raw = bytes(random.Random(3).randbytes(128))
    comm = fake_lib.comm_init_rank(8, raw, 5)
    assert comm.value == 0xC0FFEE0
    assert fake.seen_id() == raw
    assert (fake.fake_seen_nranks.value, fake.fake_seen_rank.value) == (8, 5)
    comm = fake_lib.comm_init_rank(2, nccl.unique_id_from_bytes(FAKE_UID), 1)
    assert fake.seen_id() == FAKE_UID and fake.fake_seen_rank.value == 1
    fake.set("fake_init_result", 4)
    with pytest.raises(nccl.NCCLError, match="fake: invalid argument") as ei:
        fake_lib.comm_init_rank(2, raw, 0)
    assert ei.value.code == nccl.Result.ncclInvalidArgument
    fake.set("fake_init_result", 0)
    fake.set("fake_init_null", 1)
    with pytest.raises(nccl.NCCLError, match="NULL communicator"):
        fake_lib.comm_init_rank(1, raw, 0)
    with pytest.raises(nccl.NCCLArgumentError):
        fake_lib.comm_init_rank(1, raw[:-1], 0)


def test_fake_broadcast_arguments(fake, fake_lib):
    comm = fake_lib.comm_init_rank(1, FAKE_UID, 0)
    src = (ctypes.c_ubyte * 64)(*range(64))
    dst = (ctypes.c_ubyte * 64)()
    fake_lib.broadcast(ctypes.addressof(src), ctypes.addressof(dst), 64, nccl.DataType.ncclUint8, 0, comm, 0x5EA)
    assert bytes(dst) == bytes(range(64))
    assert fake.fake_bc_send.value == ctypes.addressof(src) and fake.fake_bc_recv.value == ctypes.addressof(dst)
    assert (fake.fake_bc_count.value, fake.fake_bc_dtype.value, fake.fake_bc_root.value) == (64, 1, 0)
    assert fake.fake_bc_comm.value == 0xC0FFEE0 and fake.fake_bc_stream.value == 0x5EA
    # size_t count beyond 32 bits, in place (no copy in the fake), other root, NULL (default) stream
    big = (1 << 40) + 3
    fake_lib.broadcast(0x1000, 0x1000, big, 1, 3, comm, None)
    assert (fake.fake_bc_count.value, fake.fake_bc_root.value) == (big, 3)
    assert fake.fake_bc_stream.value is None
    fake.set("fake_broadcast_result", 5)
    with pytest.raises(nccl.NCCLError) as ei:
        fake_lib.broadcast(0x1000, 0x1000, 1, 1, 0, comm, None)
    e = ei.value
    assert (e.code, e.name, e.message, e.detail) == (5, "ncclInvalidUsage", "fake: invalid usage",
                                                     "fake last error: ncclBroadcast")


def test_fake_group_destroy_abort_async(fake, fake_lib):
    fake_lib.group_start()
    fake_lib.group_end()
    assert (fake.fake_group_starts.value, fake.fake_group_ends.value) == (1, 1)
    comm = fake_lib.comm_init_rank(1, FAKE_UID, 0)
    assert fake_lib.comm_get_async_error(comm) == 0 and fake.fake_async_comm.value == 0xC0FFEE0
    fake.set("fake_async_error", 6)
    assert fake_lib.comm_get_async_error(comm) == nccl.Result.ncclRemoteError
    fake_lib.comm_destroy(comm)
    fake_lib.comm_abort(comm)
    assert fake.fake_destroyed.value == fake.fake_aborted.value == 0xC0FFEE0


@pytest.mark.parametrize("failed, async_error, destroy_result, outcome, destroys, aborts", [
    (False, 0, 0, "destroyed", 1, 0),        # healthy: destroy
    (False, 7, 0, "destroyed", 1, 0),        # ncclInProgress is not a failure
    (False, 6, 0, "aborted", 0, 1),          # asynchronous error: abort, never destroy
    (False, 0, 3, "aborted", 1, 1),          # destroy fails: abort
    (True, 0, 0, "aborted", 0, 1),           # known failed: abort straight away
])
def test_close_comm(fake, fake_lib, failed, async_error, destroy_result, outcome, destroys, aborts):
    comm = fake_lib.comm_init_rank(1, FAKE_UID, 0)
    fake.set("fake_async_error", async_error)
    fake.set("fake_destroy_result", destroy_result)
    assert nccl._close_comm(fake_lib, comm, failed) == outcome
    assert (fake.fake_destroy_calls.value, fake.fake_abort_calls.value) == (destroys, aborts)
    if aborts:
        assert fake.fake_aborted.value == 0xC0FFEE0


def test_close_comm_raises_when_abort_fails(fake, fake_lib):
    comm = fake_lib.comm_init_rank(1, FAKE_UID, 0)
    fake.set("fake_abort_result", 3)
    with pytest.raises(nccl.NCCLError, match="fake: internal error"):
        nccl._close_comm(fake_lib, comm, True)


def test_environment_selects_the_fake(monkeypatch, fake, fake_path):
    monkeypatch.setenv(nccl.ENV_LIB, str(fake_path))
    monkeypatch.setattr(nccl, "_libs", {})
    assert nccl.find_library() == str(fake_path)
    lib = nccl.get_library()
    assert nccl.get_library() is lib and lib.path == str(fake_path)      # cached per path
    assert lib.version == (2, 27, 3)
    assert nccl.new_unique_id() == FAKE_UID
    ok, why = nccl.available()
    assert ok == torch.cuda.is_available()
    assert "cannot load" not in why


# -- pure helpers of NCCLGroup ------------------------------------------------------------------------------------------
def test_payload_view_root_and_receivers():
    mv = nccl._payload_view(b"abc", 3, 0, 0, 2, 10)
    assert mv.tobytes() == b"abc" and mv.format == "B"
    assert nccl._payload_view(None, 3, 0, 1, 2, 10) is None
    assert nccl._payload_view(bytearray(b"xy"), 2, 1, 1, 2, 10).tobytes() == b"xy"
    ints = memoryview(torch.arange(3, dtype=torch.int32).numpy())
    v = nccl._payload_view(ints, 12, 0, 0, 1, 100)
    assert v.format == "B" and v.nbytes == 12 and v.tobytes() == ints.tobytes()
    assert nccl._payload_view(b"", 0, 0, 0, 1, 10).nbytes == 0
    assert nccl._payload_view(b"x" * 10, 10, 0, 0, 1, 10).nbytes == 10    # max_bytes is inclusive


@pytest.mark.parametrize("data, nbytes, root, rank, world, match", [
    (b"abc", 4, 0, 0, 1, "3 bytes but nbytes is 4"),
    (b"abc", 2, 0, 0, 1, "3 bytes but nbytes is 2"),
    (None, 3, 0, 0, 1, "data is required"),
    (b"abc", 3, 0, 1, 2, "not the root"),
    (b"x" * 11, 11, 0, 0, 1, "outside"),
    (None, -1, 0, 1, 2, "outside"),
    (None, 3, 2, 1, 2, "root 2 outside"),
    (None, 3, -1, 1, 2, "root -1 outside"),
    (None, 3.0, 0, 1, 2, "nbytes must be an int"),
    (None, True, 0, 1, 2, "nbytes must be an int"),
    ("abc", 3, 0, 0, 1, "not str"),
    (12345, 3, 0, 0, 1, "bytes-like"),
    (memoryview(b"abcdef")[::2], 3, 0, 0, 1, "contiguous"),
])
def test_payload_view_rejects(data, nbytes, root, rank, world, match):
    with pytest.raises(nccl.NCCLArgumentError, match=match):
        nccl._payload_view(data, nbytes, root, rank, world, 10)


def test_grown():
    MiB = 1 << 20
    assert nccl._grown(0, 1, 1 << 30) == MiB
    assert nccl._grown(MiB, MiB, 1 << 30) == MiB                 # fits: unchanged
    assert nccl._grown(4 * MiB, 100, 1 << 30) == 4 * MiB         # never shrinks
    assert nccl._grown(MiB, MiB + 1, 1 << 30) == 2 * MiB         # doubles
    assert nccl._grown(MiB, 5 * MiB + 3, 1 << 30) == 6 * MiB     # at least n, rounded up to MiB
    assert nccl._grown(0, 100, 64) == 100                        # capped by the limit, never below n
    assert nccl._grown(512 * MiB, 600 * MiB, 1 << 30) == 1 << 30
    for cap in (0, 1, 3 * MiB, 7 * MiB + 5):
        for n in (1, MiB - 1, MiB, 10 * MiB + 1):
            g = nccl._grown(cap, n, 1 << 30)
            assert g >= n and g >= cap


class Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_poll_returns_when_done_and_backs_off():
    clock = Clock()
    calls = {"done": 0, "async": 0}

    def done():
        calls["done"] += 1
        return calls["done"] > 12

    def async_error():
        calls["async"] += 1
        return 0

    nccl._poll(done, async_error, None, clock=clock, sleep=clock.sleep)
    assert calls == {"done": 13, "async": 12}
    assert clock.sleeps[0] == pytest.approx(1e-5) and max(clock.sleeps) == pytest.approx(1e-3)
    assert clock.sleeps == sorted(clock.sleeps)
    clock = Clock()
    nccl._poll(lambda: True, lambda: 1 / 0, 0.001, clock=clock, sleep=clock.sleep)   # done first: no error check
    assert clock.sleeps == []


def test_poll_raises_asynchronous_errors():
    clock = Clock()
    errs = iter([0, 7, 0, 6])
    with pytest.raises(nccl.NCCLError) as ei:
        nccl._poll(lambda: False, lambda: next(errs), None, "broadcast of 9 bytes", clock=clock, sleep=clock.sleep)
    assert ei.value.code == 6 and "broadcast of 9 bytes" in str(ei.value)
    assert len(clock.sleeps) == 3


def test_poll_times_out():
    clock = Clock()
    with pytest.raises(nccl.NCCLTimeout, match="close did not complete within 0.5 s"):
        nccl._poll(lambda: False, lambda: 0, 0.5, "close", clock=clock, sleep=clock.sleep)
    assert 0.5 < clock.t < 0.52


def test_device_index():
    assert nccl._device_index(0) == 0 and nccl._device_index(3) == 3
    assert nccl._device_index("cuda:2") == 2
    assert nccl._device_index(torch.device("cuda", 1)) == 1
    assert nccl._device_index("cuda") is None
    for bad in ("cpu", torch.device("cpu"), "meta", -2, True, "gpu0", 1.5):
        with pytest.raises(nccl.NCCLArgumentError):
            nccl._device_index(bad)


def test_check_ranks():
    assert nccl._check_ranks(0, 1) == (0, 1) and nccl._check_ranks(3, 4) == (3, 4)
    for rank, world in ((0, 0), (1, 1), (-1, 2), (0, -3), (0.0, 1), (0, 2.0), (False, 1)):
        with pytest.raises(nccl.NCCLArgumentError):
            nccl._check_ranks(rank, world)


# -- on a GPU -----------------------------------------------------------------------------------------------------------
SIZES = [1, 2, 3, 255, 4096, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (5 << 20) + 7, 33 << 20, 17, 1000]


@pytest.fixture
def group():
    g = nccl.NCCLGroup(nccl.new_unique_id(), 0, 1, 0, timeout=120.0)
    yield g
    g.close()


@pytest.mark.gpu
@needs_nccl
def test_gpu_single_rank_broadcast(group):
    rnd = random.Random(1)
    for n in SIZES:                 # grows the staging buffers, then reuses them for smaller payloads
        data = rnd.randbytes(n)
        out = group.broadcast_bytes(data, n)
        assert type(out) is bytes and out == data, n
    assert group.broadcast_bytes(b"", 0) == b""
    data = rnd.randbytes(12345)
    assert group.broadcast_bytes(bytearray(data), len(data), root=0) == data
    assert group.broadcast_bytes(memoryview(data), len(data)) == data
    assert group._dev.device == torch.device("cuda", 0) and group._host.is_pinned()
    assert group._dev.numel() >= 33 << 20


@pytest.mark.gpu
@needs_nccl
def test_gpu_group_validation_and_close(group):
    with pytest.raises(nccl.NCCLArgumentError):
        group.broadcast_bytes(b"abc", 4)
    with pytest.raises(nccl.NCCLArgumentError):
        group.broadcast_bytes(None, 4)                 # rank 0 of 1 is the root
    with pytest.raises(nccl.NCCLArgumentError):
        group.broadcast_bytes(b"abc", 3, root=1)
    assert group.broadcast_bytes(b"still fine", 10) == b"still fine"
    assert not group.closed and "open" in repr(group)
    group.close()
    group.close()                                      # idempotent
    assert group.closed
    with pytest.raises(nccl.NCCLError, match="closed"):
        group.broadcast_bytes(b"x", 1)


@pytest.mark.gpu
@needs_nccl
def test_gpu_library_and_context_manager():
    lib = nccl.get_library()
    assert lib.version >= (2, 4, 0)
    with nccl.NCCLGroup(nccl.new_unique_id(), 0, 1, torch.device("cuda", 0), max_bytes=1 << 16) as g:
        assert g.broadcast_bytes(b"\0" * 100, 100) == b"\0" * 100
        with pytest.raises(nccl.NCCLArgumentError, match="outside"):
            g.broadcast_bytes(b"\0" * ((1 << 16) + 1), (1 << 16) + 1)
        assert g.broadcast_bytes(b"ok", 2) == b"ok"      # still usable after a rejected call
    assert g.closed


TWO_RANK_WORKER = """
    import json, random, sys
    import torch
    from sparsesync.nccl import NCCLGroup
    uid, rank = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
    g = NCCLGroup(uid, rank, 2, rank, timeout=120.0)
    ok = []
    for root in (0, 1):
        for n in (1, 4096, (1 << 20) + 1, 9 << 20, 10):
            expected = random.Random(n * 2 + root).randbytes(n)
            got = g.broadcast_bytes(expected if rank == root else None, n, root=root)
            ok.append(got == expected)
    g.close()
    print(json.dumps({"ok": ok}))
"""


@pytest.mark.gpu
@needs_nccl
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two ranks need two GPUs (NCCL refuses to share one)")
def test_gpu_two_ranks_on_two_devices():
    uid = nccl.new_unique_id()      # this process hosts the bootstrap root for the workers
    e = {k: v for k, v in os.environ.items() if not k.startswith("SPARSESYNC_")}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(TWO_RANK_WORKER), uid.hex(), str(r)], env=e,
                              cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(all(o["ok"]) for o in outs) and len(outs[0]["ok"]) == 10
