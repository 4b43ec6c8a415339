"""NCCL payload backend: a small ctypes binding over ``libnccl.so.2`` and a byte-broadcast group on one CUDA device.

Nothing is loaded at import time: libnccl is opened on first use (``get_library``), CUDA is touched only by
``NCCLGroup``. The binding follows NCCL's ``nccl.h`` (src/nccl.h.in); every function it binds is listed in
``FUNCTIONS`` as ``(name, restype, argtypes)``, and every non-success ``ncclResult_t`` becomes an ``NCCLError``
carrying the code and ``ncclGetErrorString``'s text.

The library is found (``find_library``) through ``SPARSESYNC_NCCL_LIB``, then the ``nvidia-nccl-cu12``/``-cu13``
wheel that CUDA builds of PyTorch depend on (``site-packages/nvidia/nccl/lib/libnccl.so.2``), then the system.

The session control channel of the ``nccl`` backend is plain TCP (``NCCLBackend.listen``/``connect``); bucket bytes
travel through ``NCCLGroup.broadcast_bytes``. NCCL refuses two ranks of one communicator on the same GPU, so a
one-GPU machine can only run single-rank communicators.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import logging
import os
import site
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from .backends import TCP
from .errors import SparseSyncError

log = logging.getLogger(__name__)

ENV_LIB = "SPARSESYNC_NCCL_LIB"
LIB_NAME = "libnccl.so.2"
WHEEL_SUBDIR = os.path.join("nvidia", "nccl", "lib")    # nvidia-nccl-cu12 / nvidia-nccl-cu13
NCCL_UNIQUE_ID_BYTES = 128
DEFAULT_MAX_BYTES = 1 << 30                              # bound of one broadcast (the session's default bucket bound)
_MIN_BUFFER = 1 << 20                                    # staging buffers start at 1 MiB and grow by doubling


# -- nccl.h: types and enums --------------------------------------------------------------------------------------------
class Result(enum.IntEnum):
    """ncclResult_t."""
    ncclSuccess = 0
    ncclUnhandledCudaError = 1
    ncclSystemError = 2
    ncclInternalError = 3
    ncclInvalidArgument = 4
    ncclInvalidUsage = 5
    ncclRemoteError = 6
    ncclInProgress = 7
    ncclTimeout = 8


class DataType(enum.IntEnum):
    """ncclDataType_t. Byte payloads travel as ncclUint8 (= 1; ncclInt8 = ncclChar = 0)."""
    ncclInt8 = 0
    ncclChar = 0
    ncclUint8 = 1
    ncclInt32 = 2
    ncclInt = 2
    ncclUint32 = 3
    ncclInt64 = 4
    ncclUint64 = 5
    ncclFloat16 = 6
    ncclHalf = 6
    ncclFloat32 = 7
    ncclFloat = 7
    ncclFloat64 = 8
    ncclDouble = 8
    ncclBfloat16 = 9
    ncclFloat8e4m3 = 10
    ncclFloat8e5m2 = 11


ncclResult_t = ctypes.c_int          # C enum
ncclDataType_t = ctypes.c_int        # C enum
ncclComm_t = ctypes.c_void_p         # typedef struct ncclComm* ncclComm_t
cudaStream_t = ctypes.c_void_p       # typedef struct CUstream_st* cudaStream_t
buffer_t = ctypes.c_void_p


class ncclUniqueId(ctypes.Structure):
    """typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId; (passed by value to ncclCommInitRank)."""
    _fields_ = [("internal", ctypes.c_ubyte * NCCL_UNIQUE_ID_BYTES)]


# (name, restype, argtypes), as declared in nccl.h
FUNCTIONS: tuple[tuple[str, object, list], ...] = (
    # ncclResult_t ncclGetVersion(int *version);
    ("ncclGetVersion", ncclResult_t, [ctypes.POINTER(ctypes.c_int)]),
    # ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);
    ("ncclGetUniqueId", ncclResult_t, [ctypes.POINTER(ncclUniqueId)]),
    # ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
    ("ncclCommInitRank", ncclResult_t, [ctypes.POINTER(ncclComm_t), ctypes.c_int, ncclUniqueId, ctypes.c_int]),
    # ncclResult_t ncclCommDestroy(ncclComm_t comm);
    ("ncclCommDestroy", ncclResult_t, [ncclComm_t]),
    # ncclResult_t ncclCommAbort(ncclComm_t comm);
    ("ncclCommAbort", ncclResult_t, [ncclComm_t]),
    # ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
    #                            int root, ncclComm_t comm, cudaStream_t stream);
    ("ncclBroadcast", ncclResult_t, [buffer_t, buffer_t, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t,
                                     cudaStream_t]),
    # ncclResult_t ncclGroupStart(); ncclResult_t ncclGroupEnd();
    ("ncclGroupStart", ncclResult_t, []),
    ("ncclGroupEnd", ncclResult_t, []),
    # const char* ncclGetErrorString(ncclResult_t result);
    ("ncclGetErrorString", ctypes.c_char_p, [ncclResult_t]),
    # ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
    ("ncclCommGetAsyncError", ncclResult_t, [ncclComm_t, ctypes.POINTER(ncclResult_t)]),
)
# bound when present (NCCL >= 2.13), used only to enrich error messages
OPTIONAL_FUNCTIONS: tuple[tuple[str, object, list], ...] = (
    # const char* ncclGetLastError(ncclComm_t comm);
    ("ncclGetLastError", ctypes.c_char_p, [ncclComm_t]),
)


# -- errors -------------------------------------------------------------------------------------------------------------
class NCCLError(SparseSyncError):
    """An NCCL call returned a non-success ncclResult_t (``code``), or a communicator failed asynchronously."""

    def __init__(self, code: int, message: str, detail: str = ""):
        self.code = int(code)
        try:
            self.name = Result(self.code).name
        except ValueError:
            self.name = f"ncclResult_t({self.code})"
        self.message = message
        self.detail = detail
        text = f"NCCL error {self.code} ({self.name}): {message}"
        super().__init__(text + (f"; last error: {detail}" if detail else ""))


class NCCLTimeout(NCCLError):
    """A collective did not complete within the group's timeout; the communicator was aborted."""

    def __init__(self, what: str, seconds: float):
        super().__init__(Result.ncclTimeout, f"{what} did not complete within {seconds:g} s (communicator aborted)")


class NCCLUnavailable(SparseSyncError):
    """NCCL cannot be used here: no CUDA device, no CUDA build of torch, or libnccl cannot be loaded."""


class NCCLArgumentError(SparseSyncError, ValueError):
    """A malformed argument: unique id of the wrong size, bad rank/world/root, payload size out of bounds."""


# -- finding and loading the library ------------------------------------------------------------------------------------
def _search_dirs() -> list[str]:
    dirs: list[str] = []
    for getter in ("getsitepackages", "getusersitepackages"):
        try:
            got = getattr(site, getter)()
        except Exception:       # virtualenv's old site.py lacks them; some embedders raise
            continue
        dirs.extend([got] if isinstance(got, str) else list(got))
    dirs.extend(p for p in sys.path if isinstance(p, str) and p)     # "" (the cwd) is deliberately not searched
    seen: set[str] = set()
    out = []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_library() -> str | None:
    """Where libnccl is loaded from: ``$SPARSESYNC_NCCL_LIB`` (as given, even when it does not exist, so that the
    load error names it), else ``<dir>/nvidia/nccl/lib/libnccl.so.2`` for the first ``site.getsitepackages()`` /
    ``sys.path`` directory that has it (the nvidia-nccl-cu12/-cu13 wheel of CUDA PyTorch), else
    ``ctypes.util.find_library("nccl")``, else plain ``libnccl.so.2`` for the dynamic loader to resolve (Linux).
    None where NCCL cannot exist (not Linux) and nothing was configured."""
    env = os.environ.get(ENV_LIB, "").strip()
    if env:
        return env
    for d in _search_dirs():
        p = os.path.join(d, WHEEL_SUBDIR, LIB_NAME)
        if os.path.isfile(p):
            return p
    try:
        found = ctypes.util.find_library("nccl")
    except Exception:
        found = None
    if found:
        return found
    return LIB_NAME if sys.platform.startswith("linux") else None


def decode_version(code: int) -> tuple[int, int, int]:
    """(major, minor, patch) of an NCCL_VERSION_CODE: X*10000+Y*100+Z since 2.9, X*1000+Y*100+Z before."""
    code = int(code)
    if code < 0:
        raise ValueError(f"invalid NCCL version code {code}")
    if code >= 10000:
        return code // 10000, code // 100 % 100, code % 100
    return code // 1000, code // 100 % 10, code % 100


class NCCLLibrary:
    """libnccl bound through ctypes. ``path`` defaults to ``find_library()``; ``handle`` (tests) is any object whose
    attributes are the functions (a ``ctypes.CDLL`` normally). Raises NCCLUnavailable when it cannot be loaded or lacks
    a function of ``FUNCTIONS``."""

    def __init__(self, path: str | None = None, *, handle=None):
        if handle is None:
            path = path or find_library()
            if path is None:
                raise NCCLUnavailable(f"no NCCL library on this platform ({sys.platform}); set {ENV_LIB}")
            try:
                handle = ctypes.CDLL(path)
            except OSError as exc:
                raise NCCLUnavailable(
                    f"cannot load the NCCL library {path!r}: {exc} (set {ENV_LIB} to the path of libnccl.so.2; "
                    f"CUDA builds of torch ship it in the nvidia-nccl-cu12 wheel at "
                    f"site-packages/nvidia/nccl/lib/libnccl.so.2)") from exc
        self.path = path if path is not None else repr(handle)
        self.handle = handle
        self._fn: dict[str, Callable] = {}
        missing = []
        for table, required in ((FUNCTIONS, True), (OPTIONAL_FUNCTIONS, False)):
            for name, restype, argtypes in table:
                try:
                    f = getattr(handle, name)
                except AttributeError:
                    if required:
                        missing.append(name)
                    continue
                f.restype = restype
                f.argtypes = argtypes
                self._fn[name] = f
        if missing:
            raise NCCLUnavailable(f"{self.path!r} is not a usable NCCL library (NCCL >= 2.4 needed): "
                                  f"missing {', '.join(missing)}")

    def __repr__(self) -> str:
        return f"NCCLLibrary({self.path!r})"

    # -- errors ---------------------------------------------------------------------------------------------------------
    def error_string(self, code: int) -> str:
        try:
            s = self._fn["ncclGetErrorString"](int(code))
        except Exception as exc:        # never mask the original error with one from the error path
            return f"(ncclGetErrorString failed: {exc})"
        if s is None:
            return "unknown error"
        return s.decode("utf-8", "replace") if isinstance(s, (bytes, bytearray)) else str(s)

    def last_error(self, comm=None) -> str:
        f = self._fn.get("ncclGetLastError")
        if f is None:
            return ""
        try:
            s = f(comm)
        except Exception:
            return ""
        if not s:
            return ""
        return s.decode("utf-8", "replace") if isinstance(s, (bytes, bytearray)) else str(s)

    def _check(self, result, comm=None) -> None:
        """Raise NCCLError for a non-success ncclResult_t (with ncclGetErrorString's text)."""
        code = int(result)
        if code == Result.ncclSuccess:
            return
        raise NCCLError(code, self.error_string(code), self.last_error(comm))

    # -- calls ----------------------------------------------------------------------------------------------------------
    def get_version(self) -> int:
        """The raw NCCL_VERSION_CODE of the loaded library."""
        v = ctypes.c_int()
        self._check(self._fn["ncclGetVersion"](ctypes.byref(v)))
        return v.value

    @property
    def version(self) -> tuple[int, int, int]:
        return decode_version(self.get_version())

    @property
    def version_string(self) -> str:
        major, minor, patch = self.version
        return f"{major}.{minor}.{patch}"

    def get_unique_id(self) -> bytes:
        """A fresh ncclUniqueId (root side), as its 128 bytes."""
        uid = ncclUniqueId()
        self._check(self._fn["ncclGetUniqueId"](ctypes.byref(uid)))
        return unique_id_to_bytes(uid)

    def comm_init_rank(self, world: int, unique_id, rank: int) -> ctypes.c_void_p:
        """ncclCommInitRank on the current CUDA device; blocks until all ``world`` ranks have joined."""
        uid = unique_id if isinstance(unique_id, ncclUniqueId) else unique_id_from_bytes(unique_id)
        comm = ncclComm_t()
        self._check(self._fn["ncclCommInitRank"](ctypes.byref(comm), int(world), uid, int(rank)))
        if not comm.value:
            raise NCCLError(Result.ncclInternalError, "ncclCommInitRank returned success and a NULL communicator")
        return comm

    def comm_destroy(self, comm) -> None:
        self._check(self._fn["ncclCommDestroy"](comm))

    def comm_abort(self, comm) -> None:
        self._check(self._fn["ncclCommAbort"](comm))

    def comm_get_async_error(self, comm) -> int:
        """The communicator's asynchronous error state (a Result code; 0 when healthy)."""
        err = ncclResult_t()
        self._check(self._fn["ncclCommGetAsyncError"](comm, ctypes.byref(err)), comm)
        return err.value

    def broadcast(self, sendbuff: int | None, recvbuff: int | None, count: int, datatype: int, root: int, comm,
                  stream: int | None) -> None:
        """ncclBroadcast of ``count`` elements of ``datatype`` (device pointers as ints); enqueued on ``stream``."""
        self._check(self._fn["ncclBroadcast"](sendbuff, recvbuff, int(count), int(datatype), int(root), comm, stream),
                    comm)

    def group_start(self) -> None:
        self._check(self._fn["ncclGroupStart"]())

    def group_end(self) -> None:
        self._check(self._fn["ncclGroupEnd"]())


_libs: dict[str, NCCLLibrary] = {}
_libs_lock = threading.Lock()


def get_library(path: str | None = None) -> NCCLLibrary:
    """The NCCLLibrary for ``path`` (default ``find_library()``), loaded once per path and cached (failures are not
    cached, so fixing the environment and retrying works)."""
    path = path or find_library()
    if path is None:
        raise NCCLUnavailable(f"no NCCL library on this platform ({sys.platform}); set {ENV_LIB}")
    with _libs_lock:
        lib = _libs.get(path)
        if lib is None:
            lib = _libs[path] = NCCLLibrary(path)
        return lib


# -- unique ids ---------------------------------------------------------------------------------------------------------
def unique_id_to_bytes(uid: ncclUniqueId) -> bytes:
    if not isinstance(uid, ncclUniqueId):
        raise NCCLArgumentError(f"expected an ncclUniqueId, got {type(uid).__name__}")
    return ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)


def unique_id_from_bytes(data) -> ncclUniqueId:
    """An ncclUniqueId from exactly NCCL_UNIQUE_ID_BYTES (128) bytes (bytes, bytearray or a contiguous buffer)."""
    if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
        raise NCCLArgumentError(f"an NCCL unique id is {NCCL_UNIQUE_ID_BYTES} bytes, got {type(data).__name__}")
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise NCCLArgumentError("an NCCL unique id must be a contiguous buffer")
    if mv.nbytes != NCCL_UNIQUE_ID_BYTES:
        raise NCCLArgumentError(f"an NCCL unique id is {NCCL_UNIQUE_ID_BYTES} bytes, got {mv.nbytes}")
    return ncclUniqueId.from_buffer_copy(mv.cast("B"))


def new_unique_id(library: NCCLLibrary | None = None) -> bytes:
    """ncclGetUniqueId (to be called once, by the root, and sent to every rank over the control channel)."""
    return (library or get_library()).get_unique_id()


# -- availability -------------------------------------------------------------------------------------------------------
def available() -> tuple[bool, str]:
    """(True, "") when this process can use NCCL (a CUDA device is visible and libnccl loads), else (False, why).
    Never raises; does not initialise CUDA."""
    try:
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"this torch build ({torch.__version__}) has no CUDA support")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA device is visible (torch.cuda.is_available() is False)")
        try:
            get_library()
        except SparseSyncError as exc:
            reasons.append(str(exc))
        if reasons:
            return False, "; ".join(reasons)
        return True, ""
    except Exception as exc:
        return False, f"NCCL availability check failed: {type(exc).__name__}: {exc}"


# -- pure helpers of NCCLGroup (unit-tested without a GPU) --------------------------------------------------------------
def _check_ranks(rank, world) -> tuple[int, int]:
    for what, v in (("rank", rank), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise NCCLArgumentError(f"{what} must be an int, got {type(v).__name__}")
    if world < 1:
        raise NCCLArgumentError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise NCCLArgumentError(f"rank {rank} outside [0, {world})")
    return rank, world


def _device_index(device) -> int | None:
    """The CUDA device index of ``device`` (int, "cuda[:i]" or torch.device); None for "cuda" without index."""
    if isinstance(device, bool):
        raise NCCLArgumentError(f"not a CUDA device: {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise NCCLArgumentError(f"CUDA device index must be >= 0, got {device}")
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise NCCLArgumentError(f"not a CUDA device: {device!r}") from exc
    if dev.type != "cuda":
        raise NCCLArgumentError(f"NCCL needs a CUDA device, got {dev}")
    return dev.index


def _payload_view(data, nbytes, root, rank, world, max_bytes) -> memoryview | None:
    """Validate one broadcast call; the root's payload as a flat byte view (None on the other ranks)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise NCCLArgumentError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if not 0 <= nbytes <= max_bytes:
        raise NCCLArgumentError(f"nbytes {nbytes} outside [0, {max_bytes}]")
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < world:
        raise NCCLArgumentError(f"root {root!r} outside [0, {world})")
    if rank != root:
        if data is not None:
            raise NCCLArgumentError(f"rank {rank} is not the root ({root}): pass data=None and receive")
        return None
    if data is None:
        raise NCCLArgumentError(f"rank {rank} is the root: data is required")
    if isinstance(data, str):
        raise NCCLArgumentError("data must be bytes-like, not str")
    try:
        mv = memoryview(data)
    except TypeError:
        raise NCCLArgumentError(f"data must be bytes-like, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise NCCLArgumentError("data must be a contiguous buffer")
    if mv.nbytes != nbytes:
        raise NCCLArgumentError(f"root data is {mv.nbytes} bytes but nbytes is {nbytes}")
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")


def _grown(capacity: int, n: int, limit: int) -> int:
    """The capacity of a staging buffer that must hold ``n`` bytes: unchanged when it fits, else doubled (at least
    1 MiB, rounded up to 1 MiB, at most ``limit`` but never below ``n``)."""
    if n <= capacity:
        return capacity
    cap = max(n, 2 * capacity, _MIN_BUFFER)
    cap = -(-cap // _MIN_BUFFER) * _MIN_BUFFER
    return max(n, min(cap, limit))


def _poll(done: Callable[[], bool], async_error: Callable[[], int], timeout: float | None, what: str = "operation",
          *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait until ``done()``, checking the communicator's asynchronous error at every step (so a failed peer raises
    instead of hanging) and the timeout (None = no limit). Backs off from 10 us to 1 ms between checks."""
    start = clock()
    delay = 1e-5
    while True:
        if done():
            return
        err = async_error()
        if err not in (Result.ncclSuccess, Result.ncclInProgress):
            raise NCCLError(err, f"communicator failed asynchronously during {what}")
        if timeout is not None and clock() - start > timeout:
            raise NCCLTimeout(what, timeout)
        sleep(delay)
        delay = min(delay * 2, 1e-3)


def _close_comm(lib: NCCLLibrary, comm, failed: bool) -> str:
    """Release a communicator: ncclCommDestroy when healthy, ncclCommAbort when ``failed``, when it reports an
    asynchronous error, or when destroy fails. Returns "destroyed" or "aborted"; raises NCCLError if abort fails."""
    if not failed:
        try:
            err = lib.comm_get_async_error(comm)
            failed = err not in (Result.ncclSuccess, Result.ncclInProgress)
        except NCCLError:
            failed = True
    if not failed:
        try:
            lib.comm_destroy(comm)
            return "destroyed"
        except NCCLError as exc:
            log.warning("ncclCommDestroy failed (%s); aborting the communicator", exc)
    lib.comm_abort(comm)
    return "aborted"


# -- the group ----------------------------------------------------------------------------------------------------------
class NCCLGroup:
    """One rank of an NCCL communicator on one CUDA device, broadcasting byte payloads.

    ``unique_id``: the 128 bytes of the root's ``new_unique_id()``, identical on every rank. The constructor blocks
    (inside ncclCommInitRank) until all ``world`` ranks have joined. Work runs on a dedicated CUDA stream, and every
    method synchronises it before returning (waiting with checks of the communicator's asynchronous error and of
    ``timeout`` seconds; on failure the communicator is aborted and NCCLError raised). Thread-safe; ``close()`` (or a
    ``with`` block) releases it. NCCL refuses two ranks of one communicator on the same GPU.
    """

    def __init__(self, unique_id: bytes, rank: int, world: int, device: int | torch.device, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, timeout: float | None = None,
                 library: NCCLLibrary | None = None):
        uid = unique_id_from_bytes(unique_id)
        self.rank, self.world = _check_ranks(rank, world)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise NCCLArgumentError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if timeout is not None and not timeout > 0:
            raise NCCLArgumentError(f"timeout must be positive or None, got {timeout!r}")
        index = _device_index(device)
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._lock = threading.Lock()
        self._comm = None
        self._failed = False
        self._dev: torch.Tensor | None = None      # device staging buffer (uint8)
        self._host: torch.Tensor | None = None     # pinned host staging buffer (uint8)
        if library is None:
            ok, why = available()
            if not ok:
                raise NCCLUnavailable(f"NCCL cannot be used here: {why}")
            library = get_library()
        elif not torch.cuda.is_available():
            raise NCCLUnavailable("NCCL cannot be used here: no CUDA device is visible")
        self.lib = library
        if index is None:
            index = torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise NCCLArgumentError(f"CUDA device {index} does not exist ({count} visible)")
        self.device = torch.device("cuda", index)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(device=self.device)
            self._comm = self.lib.comm_init_rank(self.world, uid, self.rank)
        log.debug("NCCL group: rank %d/%d on %s (%r)", self.rank, self.world, self.device, self.lib)

    def __repr__(self) -> str:
        state = "closed" if self._comm is None else "open"
        dev = getattr(self, "device", "?")
        return f"NCCLGroup(rank={self.rank}, world={self.world}, device={dev}, {state})"

    @property
    def closed(self) -> bool:
        return self._comm is None

    def __enter__(self) -> "NCCLGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------------------
    def _sync(self, what: str) -> None:
        """Synchronise the group's stream, watching the communicator for asynchronous errors and the timeout."""
        ev = torch.cuda.Event()
        ev.record(self.stream)
        comm = self._comm
        _poll(ev.query, lambda: self.lib.comm_get_async_error(comm), self.timeout, what)

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device and pinned host staging buffers of at least ``n`` bytes (grown, never shrunk; allocated on the
        group's stream, which must be current)."""
        if self._dev is None or self._dev.numel() < n:
            cap = _grown(0 if self._dev is None else self._dev.numel(), n, self.max_bytes)
            self._dev = None
            self._dev = torch.empty(cap, dtype=torch.uint8, device=self.device)
        if self._host is None or self._host.numel() < n:
            cap = _grown(0 if self._host is None else self._host.numel(), n, self.max_bytes)
            self._host = None
            self._host = torch.empty(cap, dtype=torch.uint8, pin_memory=True)
        return self._dev, self._host

    def _fail(self) -> None:
        """Abort after an error (lock held); the group is closed afterwards."""
        comm, self._comm = self._comm, None
        self._failed = True
        self._dev = self._host = None
        if comm is not None:
            try:
                _close_comm(self.lib, comm, failed=True)
            except NCCLError as exc:
                log.error("ncclCommAbort failed: %s", exc)

    # -- API ------------------------------------------------------------------------------------------------------------
    def broadcast_bytes(self, data: bytes | None, nbytes: int, root: int = 0) -> bytes:
        """Broadcast ``nbytes`` bytes from rank ``root``: the root passes ``data`` (exactly ``nbytes`` long), the
        others pass None; every rank gets the payload back as bytes. ``nbytes`` must be the same on every rank
        (0 returns b"" without communicating) and at most ``max_bytes``."""
        mv = _payload_view(data, nbytes, root, self.rank, self.world, self.max_bytes)
        with self._lock:
            if self._comm is None:
                raise NCCLError(Result.ncclInvalidUsage, "the NCCL group is closed"
                                + (" (aborted after an error)" if self._failed else ""))
            if nbytes == 0:
                return b""
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                    dev, host = self._buffers(nbytes)
                    host_np = host.numpy()
                    if mv is not None:
                        host_np[:nbytes] = np.frombuffer(mv, dtype=np.uint8)     # -> pinned host (CPU copy)
                        dev[:nbytes].copy_(host[:nbytes], non_blocking=True)
                    ptr = dev.data_ptr()
                    self.lib.broadcast(ptr, ptr, nbytes, DataType.ncclUint8, root, self._comm,
                                       self.stream.cuda_stream)
                    if mv is None:
                        host[:nbytes].copy_(dev[:nbytes], non_blocking=True)
                    self._sync(f"broadcast of {nbytes} bytes")
                    if mv is None:
                        return host_np[:nbytes].tobytes()
            except NCCLError:
                self._fail()
                raise
        return data if isinstance(data, bytes) else mv.tobytes()

    def close(self) -> None:
        """Destroy the communicator (abort it if it failed or cannot be destroyed cleanly). Idempotent."""
        with self._lock:
            comm = self._comm
            if comm is None:
                return
            failed = self._failed
            if not failed:
                try:
                    with torch.cuda.device(self.device):
                        self._sync("close")
                except NCCLError as exc:
                    log.warning("NCCL group: %s; aborting", exc)
                    failed = True
            self._comm = None
            self._dev = self._host = None
            with torch.cuda.device(self.device):
                _close_comm(self.lib, comm, failed)


# -- the backend --------------------------------------------------------------------------------------------------------
class NCCLBackend:
    """backend="nccl": the session's control channel is TCP (listen/connect delegate to ``backends.TCP``); bucket
    payloads go through an NCCLGroup (``payload = True``). ``check()`` raises NCCLUnavailable when it cannot work."""

    name = "nccl"
    payload = True

    @staticmethod
    def listen(host: str, port: int):
        return TCP.listen(host, port)

    @staticmethod
    def connect(host: str, port: int, timeout: float):
        return TCP.connect(host, port, timeout)

    @classmethod
    def check(cls) -> None:
        ok, why = available()
        if not ok:
            raise NCCLUnavailable(
                f"backend='nccl' cannot be used on this machine: {why}. It needs a CUDA GPU, a CUDA build of torch and "
                f"libnccl.so.2; use backend='tcp' here.")


__all__ = ["NCCLBackend", "NCCLGroup", "NCCLLibrary", "NCCLError", "NCCLTimeout", "NCCLUnavailable",
           "NCCLArgumentError", "available", "find_library", "get_library", "new_unique_id", "unique_id_to_bytes",
           "unique_id_from_bytes", "decode_version", "FUNCTIONS", "DataType", "Result", "NCCL_UNIQUE_ID_BYTES",
           "ncclUniqueId"]
