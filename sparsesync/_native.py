"""The one module that loads the native library (libsparsesync.so, built from csrc/ by setup.py through CMake).

It exposes the kernels of csrc/sparsesync.h with the same Python signatures as ``sparsesync.reference``. When the
library is missing or unusable, ``available`` is False, ``load_error`` says why, and ``sparsesync.kernels`` falls back
to the reference (with one warning).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from . import config
from .reference import KernelError

ABI_VERSION = 1
ERRORS = {
    -1: "bad argument",
    -2: "chunk table malformed",
    -3: "stream overrun or not consumed exactly",
    -4: "position outside its chunk",
    -5: "rANS state or symbol table invalid",
    -6: "counts disagree",
    -7: "values hash mismatch",
    -8: "out of memory",
}

_c_u8p = ctypes.POINTER(ctypes.c_uint8)
_c_i64p = ctypes.POINTER(ctypes.c_int64)
_c_u64p = ctypes.POINTER(ctypes.c_uint64)
_c_u32p = ctypes.POINTER(ctypes.c_uint32)
_SIGNATURES = {
    "ss_abi_version": (ctypes.c_int, []),
    "ss_h64": (ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]),
    "ss_tree64": (ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]),
    "ss_scan": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
    "ss_encode": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int64, _c_i64p, ctypes.c_void_p, ctypes.c_int64, _c_i64p,
                                 _c_u64p, _c_i64p, ctypes.c_int, ctypes.c_int]),
    "ss_decode": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int]),
    "ss_add_scatter": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]),
    "ss_scatter": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_int]),
}


def _candidates() -> list[Path]:
    env = os.environ.get("SPARSESYNC_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    return [here / "libsparsesync.so", here / "libsparsesync.dylib"]


def _load():
    errors = []
    for path in _candidates():
        if not path.exists():
            errors.append(f"{path}: not found")
            continue
        try:
            lib = ctypes.CDLL(str(path))
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
            abi = lib.ss_abi_version()
            if abi != ABI_VERSION:
                errors.append(f"{path}: ABI version {abi}, expected {ABI_VERSION} (rebuild: pip install -e .)")
                continue
            return lib, None
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors)


lib, load_error = _load()
available = lib is not None
path = None if lib is None else lib._name


def cuda_compiled() -> bool:
    """Whether the library was built with the CUDA sources (SPARSESYNC_CUDA)."""
    fn = getattr(lib, "ss_cuda_compiled", None) if lib is not None else None
    return bool(fn()) if fn is not None else False


def _ptr(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.data_ptr()
    return t.ctypes.data


def _bufptr(data) -> tuple[int, int, object]:
    """(address, length, keepalive) of any contiguous bytes-like object or uint8 tensor, without copying."""
    if isinstance(data, torch.Tensor):
        return data.data_ptr(), data.numel() * data.element_size(), data
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr.ctypes.data if arr.size else 0, arr.size, arr


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise KernelError(rc, f"{what}: {ERRORS.get(rc, 'error')} (code {rc})")


def h64(data, seed: int) -> int:
    p, n, _keep = _bufptr(data)
    return int(lib.ss_h64(p, n, seed & 0xFFFFFFFFFFFFFFFF))


def tree64(data) -> int:
    p, n, _keep = _bufptr(data)
    return int(lib.ss_tree64(p, n, config.threads()))


def scan(old: torch.Tensor, new: torch.Tensor, w: int, mode: int):
    n = old.numel() // w
    counts = np.zeros(-(-n // 4096), dtype=np.uint32)
    hist = np.zeros(256, dtype=np.uint64)
    total = lib.ss_scan(_ptr(old), _ptr(new), n, w, mode, counts.ctypes.data, hist.ctypes.data, config.threads())
    _check(total, "ss_scan")
    return counts, hist, int(total)


def encode(old: torch.Tensor, new: torch.Tensor, w: int, mode: int, log2c: int, chunk_begin: int, chunk_end: int,
           freq, update_old: bool = False, nchanged_hint: int | None = None):
    n = old.numel() // w
    freq = np.ascontiguousarray(freq, dtype=np.uint32)
    nchunks = chunk_end - chunk_begin
    if nchanged_hint is None:
        nchanged_hint = n
    # capacity bounds of csrc: Rice <= log2c+1 bits, extra <= 8w bits, rANS <= 2 bytes/symbol + 4 per chunk
    data_cap = nchanged_hint * (2 + (log2c + 1 + 8 * w + 7) // 8 + 1) + nchunks * 8 + 64
    table_cap = nchunks * 32 + 64
    table = np.empty(table_cap, dtype=np.uint8)
    data = np.empty(data_cap, dtype=np.uint8)
    tlen, dlen, nch = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
    vh = ctypes.c_uint64()
    rc = lib.ss_encode(_ptr(old), _ptr(new), n, w, mode, log2c, chunk_begin, chunk_end, freq.ctypes.data,
                       table.ctypes.data, table_cap, ctypes.byref(tlen), data.ctypes.data, data_cap,
                       ctypes.byref(dlen), ctypes.byref(vh), ctypes.byref(nch), int(bool(update_old)),
                       config.threads())
    _check(rc, "ss_encode")
    return table[: tlen.value].tobytes(), data[: dlen.value].tobytes(), int(vh.value), int(nch.value)


def decode(seg, table_len: int, old: torch.Tensor, w: int, mode: int, log2c: int, chunk_begin: int, chunk_end: int,
           freq, nchanged: int, expected_hash: int, idx_out: torch.Tensor | None = None,
           val_out: torch.Tensor | None = None):
    n = old.numel() // w
    freq = np.ascontiguousarray(freq, dtype=np.uint32)
    if freq.shape != (256,):
        raise KernelError(-5, "symbol table must have 256 entries")
    p, seg_len, _keep = _bufptr(seg)
    idx = torch.empty(nchanged, dtype=torch.int64) if idx_out is None else idx_out
    vals = torch.empty(nchanged * w, dtype=torch.uint8) if val_out is None else val_out
    if idx.numel() != nchanged or vals.numel() != nchanged * w or not (idx.is_contiguous() and vals.is_contiguous()):
        raise KernelError(-1, "output buffers have the wrong size")
    rc = lib.ss_decode(p, seg_len, table_len, _ptr(old), n, w, mode, log2c, chunk_begin, chunk_end,
                       freq.ctypes.data, nchanged, expected_hash & 0xFFFFFFFFFFFFFFFF, _ptr(idx), _ptr(vals),
                       config.threads())
    _check(rc, "ss_decode")
    return idx, vals


def scatter(dst: torch.Tensor, w: int, idx: torch.Tensor, vals: torch.Tensor) -> None:
    n = dst.numel() * dst.element_size() // w
    rc = lib.ss_scatter(_ptr(dst), n, w, _ptr(idx), _ptr(vals), idx.numel(), config.threads())
    _check(rc, "ss_scatter")


def add_scatter(dst: torch.Tensor, w: int, idx: torch.Tensor, d: torch.Tensor, new_out: torch.Tensor | None = None,
                negate: bool = False) -> None:
    n = dst.numel() * dst.element_size() // w
    if new_out is not None and new_out.numel() != idx.numel() * w:
        raise KernelError(-1, "new_out has the wrong size")
    rc = lib.ss_add_scatter(_ptr(dst), n, w, _ptr(idx), _ptr(d), _ptr(new_out) if new_out is not None else None,
                            idx.numel(), int(bool(negate)), config.threads())
    _check(rc, "ss_add_scatter")
