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

ABI_VERSION = 2
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
    # format 2 (spaces: ptrs, offs, npieces)
    "ss2_scan": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, _c_i64p, ctypes.c_int]),
    "ss2_encode": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                  _c_i64p, ctypes.c_void_p, ctypes.c_int64, _c_i64p, ctypes.c_void_p, _c_u64p,
                                  _c_i64p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]),
    "ss2_decode": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int]),
    "ss2_scatter": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]),
    "ss2_add_scatter": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                       ctypes.c_void_p, ctypes.c_int]),
    "ss2_take": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]),
    "ss2_gather": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]),
    "ss2_put": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
    "ss2_tree64_many": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_int]),
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


# ---------------------------------------------------------------------------------------------------------------------
# format 2 (FORMAT.md §6): kernels on spaces (sparsesync.space.Space). Signatures: docs/notes/format2.md.

def _space_args(sp):
    """(ptrs address, offs address, npieces, keepalive) of a Space."""
    ptrs = np.ascontiguousarray(sp.ptrs, dtype=np.uint64)
    offs = np.ascontiguousarray(sp.offs, dtype=np.int64)
    if offs.shape != (ptrs.size + 1,):
        raise KernelError(-1, "space: offs must have len(ptrs) + 1 entries")
    return ptrs.ctypes.data, offs.ctypes.data, ptrs.size, (ptrs, offs)


def _check_pair(old, new) -> None:
    if old.w != new.w or old.n != new.n or not np.array_equal(old.offs, new.offs):
        raise KernelError(-1, "old and new spaces have different layouts")


def _cuts_arg(cuts):
    arr = np.ascontiguousarray(np.asarray(list(cuts), dtype=np.int64))
    return arr, (arr.ctypes.data if arr.size else None), int(arr.size)


def _freqs_arg(freqs, k: int):
    f = np.ascontiguousarray(freqs, dtype=np.uint32)
    if f.shape != (k, 256):
        raise KernelError(-5, f"symbol tables must have shape ({k}, 256), got {f.shape}")
    return f


def _idx_arg(idx: torch.Tensor) -> torch.Tensor:
    if idx.dtype != torch.int64 or idx.device.type != "cpu":
        raise KernelError(-1, "indices must be a CPU int64 tensor")
    return idx.reshape(-1).contiguous()


def _u8_arg(t: torch.Tensor, nbytes: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.device.type != "cpu":
        raise KernelError(-1, f"{what} must be a CPU uint8 tensor")
    t = t.reshape(-1).contiguous()
    if t.numel() != nbytes:
        raise KernelError(-1, f"{what} has {t.numel()} bytes, expected {nbytes}")
    return t


def _touched_arg(touched, sp):
    if touched is None:
        return None
    if not (isinstance(touched, np.ndarray) and touched.dtype == np.uint8 and touched.ndim == 1
            and touched.size == len(sp.names) and touched.flags.c_contiguous and touched.flags.writeable):
        raise KernelError(-1, "touched must be a writable np.uint8 array with one entry per tensor of the space")
    return touched.ctypes.data


_EMPTY_POS = np.zeros(1, dtype=np.int64)


def positions_cap(n: int) -> int:
    """Capacity of scan2's positions output for a space of n elements: more changes than this -> idx None."""
    return n // 8 + 1024


def scan2(old, new, mode: int, positions: bool = False):
    _check_pair(old, new)
    op, offs, npc, _k1 = _space_args(old)
    nptr = np.ascontiguousarray(new.ptrs, dtype=np.uint64)
    nkeys = 1 << old.kb if old.kb else 1
    counts = np.zeros(-(-old.n // 4096), dtype=np.uint32)
    hist = np.zeros((nkeys, 256), dtype=np.uint64)
    keys = np.zeros(nkeys, dtype=np.uint64)
    pieces = np.zeros(npc, dtype=np.int64)
    cap = positions_cap(old.n) if positions else 0
    # not zero-filled: only the pages the kernel writes are ever touched (and the result is a view of them)
    pos = torch.empty(cap, dtype=torch.int64) if positions else None
    npos = ctypes.c_int64(-1)
    total = lib.ss2_scan(op, nptr.ctypes.data, offs, npc, old.w, old.kb, mode, counts.ctypes.data, hist.ctypes.data,
                         keys.ctypes.data, pieces.ctypes.data, _ptr(pos) if positions else None, cap,
                         ctypes.byref(npos), config.threads())
    _check(total, "ss2_scan")
    if not positions:
        return counts, hist, keys, int(total), pieces
    idx = pos[:npos.value] if npos.value >= 0 else None
    return counts, hist, keys, int(total), pieces, idx


def encode2(old, new, mode: int, start: int, end: int, log2c: int, cuts, freqs, update_old: bool = False,
            nchanged_hint: int | None = None, positions: torch.Tensor | None = None):
    return _encode2_with(lib.ss2_encode, "ss2_encode", old, new, mode, start, end, log2c, cuts, freqs, update_old,
                         nchanged_hint, positions)


def encode2_caps(start: int, end: int, log2c: int, nclasses: int, w: int, nchanged_hint: int | None) -> tuple:
    """(table, data) buffer sizes for encoding [start, end) with about ``nchanged_hint`` changes (None: every element)
    in ``nclasses`` classes. Bounds of csrc/format2.cpp: every coded gap costs <= log2c+2 bits at the chosen k (at
    most one gap per change plus one per class and chunk), extra bits <= 8w per change, rANS <= 2 bytes per change
    + 4 per chunk. A hint that is too small costs one retry (the encoder reports the sizes it needs)."""
    nch = max(0, -(-(end - start) // (1 << log2c)))
    hint = (end - start) if nchanged_hint is None else max(0, min(int(nchanged_hint), end - start))
    gaps = hint + nclasses * min(nch, max(hint, 1))
    return (min(nch, max(hint, 1)) * 16 + nch + 64,
            (gaps * (log2c + 2) + 7) // 8 + hint * (w + 2) + nch * 6 + 64)


def ks_arg(ks, nclasses: int) -> np.ndarray:
    """Per-class Rice parameters (None: the class is absent) as the int32 array the decoders take (-1 = absent)."""
    if len(ks) != nclasses:
        raise KernelError(-1, f"{len(ks)} Rice parameters for {nclasses} classes")
    ks_arr = np.array([-1 if k is None else int(k) for k in ks], dtype=np.int32)
    if (ks_arr < -1).any():
        raise KernelError(-2, "negative Rice parameter")
    return ks_arr


def _encode2_with(fn, what: str, old, new, mode: int, start: int, end: int, log2c: int, cuts, freqs,
                  update_old: bool, nchanged_hint: int | None, positions: torch.Tensor | None):
    """encode2 through ``fn`` (ss2_encode, or a C function with its arguments and results)."""
    _check_pair(old, new)
    if positions is not None:
        positions = _idx_arg(positions)
        if nchanged_hint is None:
            nchanged_hint = positions.numel()
    op, offs, npc, _k1 = _space_args(old)
    nptr = np.ascontiguousarray(new.ptrs, dtype=np.uint64)
    cuts_arr, cuts_p, ncuts = _cuts_arg(cuts)
    K = ncuts + 1
    f = _freqs_arg(freqs, K)
    w = old.w
    table_cap, data_cap = encode2_caps(start, end, log2c, K, w, nchanged_hint)
    ks = np.zeros(K, dtype=np.int32)
    tlen, dlen, nch_out = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
    vh = ctypes.c_uint64()
    if positions is None:
        pos_p, npos = None, 0
    else:  # an empty positions tensor means "no change in the range", not "diff the range": pass a real address
        pos_p, npos = (_ptr(positions) if positions.numel() else _EMPTY_POS.ctypes.data), positions.numel()
    for _attempt in range(2):
        table = np.empty(table_cap, dtype=np.uint8)
        data = np.empty(data_cap, dtype=np.uint8)
        rc = fn(op, nptr.ctypes.data, offs, npc, w, old.kb, mode, start, end, log2c, cuts_p, ncuts, f.ctypes.data,
                table.ctypes.data, table_cap, ctypes.byref(tlen), data.ctypes.data, data_cap, ctypes.byref(dlen),
                ks.ctypes.data, ctypes.byref(vh), ctypes.byref(nch_out), int(bool(update_old)), pos_p, npos,
                config.threads())
        if rc == -6 and (tlen.value > table_cap or dlen.value > data_cap):
            table_cap, data_cap = max(table_cap, tlen.value), max(data_cap, dlen.value)  # the hint was too small
            continue
        break
    _check(rc, what)
    return (table[: tlen.value].tobytes(), data[: dlen.value].tobytes(),
            [None if k < 0 else int(k) for k in ks.tolist()], int(vh.value), int(nch_out.value))


def decode2(seg, table_len: int, old, mode: int, start: int, end: int, log2c: int, cuts, ks, freqs, nchanged: int,
            expected_hash: int, idx_out: torch.Tensor | None = None, val_out: torch.Tensor | None = None):
    return _decode2_with(lib.ss2_decode, "ss2_decode", seg, table_len, old, mode, start, end, log2c, cuts, ks, freqs,
                         nchanged, expected_hash, idx_out, val_out)


def _decode2_with(fn, what: str, seg, table_len: int, old, mode: int, start: int, end: int, log2c: int, cuts, ks,
                  freqs, nchanged: int, expected_hash: int, idx_out, val_out):
    """decode2 through ``fn`` (ss2_decode, or a C function with its arguments and results)."""
    op, offs, npc, _k1 = _space_args(old)
    cuts_arr, cuts_p, ncuts = _cuts_arg(cuts)
    K = ncuts + 1
    ks_arr = ks_arg(ks, K)
    f = _freqs_arg(freqs, K)
    p, seg_len, _keep = _bufptr(seg)
    w = old.w
    if nchanged < 0:
        raise KernelError(-6, "negative nchanged")
    idx = torch.empty(nchanged, dtype=torch.int64) if idx_out is None else idx_out
    vals = torch.empty(nchanged * w, dtype=torch.uint8) if val_out is None else val_out
    if idx.numel() != nchanged or vals.numel() != nchanged * w or not (idx.is_contiguous() and vals.is_contiguous()) \
            or idx.dtype != torch.int64 or vals.dtype != torch.uint8:
        raise KernelError(-1, "output buffers have the wrong size or type")
    rc = fn(p, seg_len, table_len, op, offs, npc, w, old.kb, mode, start, end, log2c, cuts_p, ncuts,
            ks_arr.ctypes.data, f.ctypes.data, nchanged, expected_hash & 0xFFFFFFFFFFFFFFFF,
            _ptr(idx) if nchanged else None, _ptr(vals) if nchanged else None, config.threads())
    _check(rc, what)
    return idx, vals


def scatter2(dst, idx: torch.Tensor, vals: torch.Tensor, touched: np.ndarray | None = None) -> None:
    ptrs, offs, npc, _k = _space_args(dst)
    idx = _idx_arg(idx)
    vals = _u8_arg(vals, idx.numel() * dst.w, "vals")
    rc = lib.ss2_scatter(ptrs, offs, npc, dst.w, _ptr(idx), _ptr(vals), idx.numel(), _touched_arg(touched, dst),
                         config.threads())
    _check(rc, "ss2_scatter")


def add_scatter2(dst, idx: torch.Tensor, d: torch.Tensor, new_out: torch.Tensor | None = None, negate: bool = False,
                 touched: np.ndarray | None = None) -> None:
    ptrs, offs, npc, _k = _space_args(dst)
    idx = _idx_arg(idx)
    d = _u8_arg(d, idx.numel() * dst.w, "d")
    if new_out is not None and (new_out.numel() != idx.numel() * dst.w or not new_out.is_contiguous()
                                or new_out.dtype != torch.uint8):
        raise KernelError(-1, "new_out has the wrong size")
    rc = lib.ss2_add_scatter(ptrs, offs, npc, dst.w, _ptr(idx), _ptr(d),
                             _ptr(new_out) if new_out is not None else None, idx.numel(), int(bool(negate)),
                             _touched_arg(touched, dst), config.threads())
    _check(rc, "ss2_add_scatter")


def gather2(src, start: int, end: int) -> torch.Tensor:
    ptrs, offs, npc, _k = _space_args(src)
    if not (0 <= start <= end <= src.n):
        raise KernelError(-1, f"range [{start}, {end}) outside the space ({src.n} elements)")
    out = torch.empty((end - start) * src.w, dtype=torch.uint8)
    rc = lib.ss2_gather(ptrs, offs, npc, src.w, start, end, _ptr(out) if out.numel() else None, config.threads())
    _check(rc, "ss2_gather")
    return out


def put2(dst, start: int, end: int, data, touched: np.ndarray | None = None) -> None:
    ptrs, offs, npc, _k = _space_args(dst)
    if not (0 <= start <= end <= dst.n):
        raise KernelError(-1, f"range [{start}, {end}) outside the space ({dst.n} elements)")
    if isinstance(data, torch.Tensor):
        data = _u8_arg(data, (end - start) * dst.w, "data")
        p, nbytes, keep = data.data_ptr(), data.numel(), data
    else:
        p, nbytes, keep = _bufptr(data)
    if nbytes != (end - start) * dst.w:
        raise KernelError(-1, f"data has {nbytes} bytes, expected {(end - start) * dst.w}")
    rc = lib.ss2_put(ptrs, offs, npc, dst.w, start, end, p if nbytes else None, _touched_arg(touched, dst),
                     config.threads())
    del keep
    _check(rc, "ss2_put")


def take2(src, idx: torch.Tensor) -> torch.Tensor:
    ptrs, offs, npc, _k = _space_args(src)
    idx = _idx_arg(idx)
    out = torch.empty(idx.numel() * src.w, dtype=torch.uint8)
    rc = lib.ss2_take(ptrs, offs, npc, src.w, _ptr(idx), _ptr(out) if out.numel() else None, idx.numel(),
                      config.threads())
    _check(rc, "ss2_take")
    return out


def tree64_many(tensors: list[torch.Tensor], ptrs: np.ndarray | None = None,
                nbytes: np.ndarray | None = None) -> np.ndarray:
    """tree64 of each tensor. ``ptrs``/``nbytes`` (uint64, one per tensor): the caller already knows the contiguous
    tensors' addresses and sizes (saves a Python pass over tens of thousands of tensors)."""
    count = len(tensors)
    out = np.zeros(count, dtype=np.uint64)
    if not count:
        return out
    keep, ptrs, lens = tree64_many_args(tensors, ptrs, nbytes)
    rc = lib.ss2_tree64_many(ptrs.ctypes.data, lens.ctypes.data, count, out.ctypes.data, config.threads())
    del keep
    _check(rc, "ss2_tree64_many")
    return out


def tree64_many_args(tensors: list, ptrs, nbytes) -> tuple[list, np.ndarray, np.ndarray]:
    """(tensors kept alive, uint64 addresses, uint64 byte sizes) for tree64_many (CPU or CUDA): the caller's
    ``ptrs``/``nbytes`` when they match the tensors in number, else read from contiguous versions of the tensors."""
    count = len(tensors)
    keep = tensors
    if ptrs is None or nbytes is None or len(ptrs) != count or len(nbytes) != count:
        if not all(t.is_contiguous() for t in tensors):
            keep = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        ptrs = np.fromiter((t.data_ptr() for t in keep), dtype=np.uint64, count=count)
        nbytes = np.array([t.nbytes for t in keep], dtype=np.uint64)
    return keep, np.ascontiguousarray(ptrs, dtype=np.uint64), np.ascontiguousarray(nbytes, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------------------------------
# host/device per-chunk coders (csrc/ss_hd.h through csrc/chunk_hd.cpp): the scalar code the CUDA kernels run, with
# the arguments and results of encode2 / decode2. Optional symbols: a library built before them still loads (they are
# not in _SIGNATURES); hd_available() says whether the loaded one has them.

_HD_SIGNATURES = {
    "ss2_hd_encode": _SIGNATURES["ss2_encode"],
    "ss2_hd_decode": _SIGNATURES["ss2_decode"],
    "ss2_hd_h64": (ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]),
    "ss2_hd_tree64": (ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]),
    "ss2_hd_tree64_leaves": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64]),
    "ss2_hd_cuda_compiled": (ctypes.c_int, []),
}


def _hd_bind():
    if lib is None:
        return "native library not available"
    missing = [name for name in _HD_SIGNATURES if not hasattr(lib, name)]
    if missing:
        return f"{path} lacks {', '.join(missing)} (built before csrc/chunk_hd.cpp: rebuild)"
    for name, (res, args) in _HD_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return None


hd_load_error = _hd_bind()


def hd_available() -> bool:
    """Whether the loaded library has the ss2_hd_* entry points (else ``hd_load_error`` says why)."""
    return hd_load_error is None


def _hd_fn(name: str):
    if hd_load_error is not None:
        raise KernelError(-1, f"{name}: {hd_load_error}")
    return getattr(lib, name)


def hd_encode2(old, new, mode: int, start: int, end: int, log2c: int, cuts, freqs, update_old: bool = False,
               nchanged_hint: int | None = None, positions: torch.Tensor | None = None):
    """encode2 through the host/device per-chunk coders (same arguments, same result)."""
    return _encode2_with(_hd_fn("ss2_hd_encode"), "ss2_hd_encode", old, new, mode, start, end, log2c, cuts, freqs,
                         update_old, nchanged_hint, positions)


def hd_decode2(seg, table_len: int, old, mode: int, start: int, end: int, log2c: int, cuts, ks, freqs, nchanged: int,
               expected_hash: int, idx_out: torch.Tensor | None = None, val_out: torch.Tensor | None = None):
    """decode2 through the host/device per-chunk coders (same arguments, same result)."""
    return _decode2_with(_hd_fn("ss2_hd_decode"), "ss2_hd_decode", seg, table_len, old, mode, start, end, log2c, cuts,
                         ks, freqs, nchanged, expected_hash, idx_out, val_out)


def hd_h64(data, seed: int) -> int:
    p, n, _keep = _bufptr(data)
    return int(_hd_fn("ss2_hd_h64")(p, n, seed & 0xFFFFFFFFFFFFFFFF))


def hd_tree64(data) -> int:
    """tree64 through the shared leaf hash (sshd::tree64_leaf / tree64_top)."""
    p, n, _keep = _bufptr(data)
    return int(_hd_fn("ss2_hd_tree64")(p, n, config.threads()))


def hd_tree64_leaves(data) -> np.ndarray:
    p, n, _keep = _bufptr(data)
    nl = 1 if n == 0 else -(-n // 4096)
    out = np.zeros(nl, dtype=np.uint64)
    _check(_hd_fn("ss2_hd_tree64_leaves")(p, n, out.ctypes.data, nl), "ss2_hd_tree64_leaves")
    return out


def hd_cuda_compiled() -> bool:
    """Whether the ss2_hd_cuda_* kernels (csrc/chunk_hd_device.cu) are in the loaded library."""
    return hd_available() and bool(lib.ss2_hd_cuda_compiled())


# ---------------------------------------------------------------------------------------------------------------------
# CUDA versions of the format-2 calls (csrc/device2.cu, compiled only with SPARSESYNC_CUDA): device pointers for the
# data and the space tables, host pointers for the small inputs and outputs, a cudaStream_t as void*. Optional symbols,
# bound like _HD_SIGNATURES: a library without them still loads; sparsesync.kernels_cuda wraps them.

_vp, _i64, _u64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
_CUDA_SIGNATURES = {
    "ss2_cuda_abi": (_int, []),
    "ss2_cuda_device_count": (_int, []),
    "ss2_cuda_error_string": (ctypes.c_char_p, [_int]),
    # old_ptrs, new_ptrs, offs, npieces, n, w, kb, mode, counts, hist, keys, pieces, total, stream
    "ss2_cuda_scan": (_int, [_vp, _vp, _vp, _i64, _i64, _int, _int, _int, _vp, _vp, _vp, _vp, _vp, _vp]),
    # old_ptrs, new_ptrs, offs, npieces, n, w, start, end, count, stream
    "ss2_cuda_count": (_int, [_vp, _vp, _vp, _i64, _i64, _int, _i64, _i64, _vp, _vp]),
    # old_ptrs, new_ptrs, offs, npieces, n, w, start, end, pos_out, nsel, temp, temp_bytes, stream
    "ss2_cuda_positions": (_int, [_vp, _vp, _vp, _i64, _i64, _int, _i64, _i64, _vp, _vp, _vp, _c_u64p, _vp]),
    # old_ptrs, new_ptrs, offs, npieces, n, w, kb, mode, start, end, log2c, cuts, ncuts, freqs, table_out, table_cap,
    # table_len, data_out, data_cap, data_len, ks_out, values_hash, nchanged, update_old, positions, npositions,
    # scratch, scratch_bytes, stream
    "ss2_cuda_encode": (_int, [_vp, _vp, _vp, _i64, _i64, _int, _int, _int, _i64, _i64, _int, _vp, _int, _vp, _vp,
                               _i64, _c_i64p, _vp, _i64, _c_i64p, _vp, _c_u64p, _c_i64p, _int, _vp, _i64, _vp,
                               _c_u64p, _vp]),
    # seg, seg_len, table_len, old_ptrs, offs, npieces, n, w, kb, mode, start, end, log2c, cuts, ncuts, ks, freqs,
    # nchanged, expected_hash, idx_out, val_out, scratch, scratch_bytes, stream
    "ss2_cuda_decode": (_int, [_vp, _i64, _i64, _vp, _vp, _i64, _i64, _int, _int, _int, _i64, _i64, _int, _vp, _int,
                               _vp, _vp, _i64, _u64, _vp, _vp, _vp, _c_u64p, _vp]),
    # ptrs, offs, npieces, n, w, start, end, buf, stream
    "ss2_cuda_gather": (_int, [_vp, _vp, _i64, _i64, _int, _i64, _i64, _vp, _vp]),
    "ss2_cuda_put": (_int, [_vp, _vp, _i64, _i64, _int, _i64, _i64, _vp, _vp]),
    # ptrs, offs, npieces, n, w, idx, vals, count, touched, status, stream
    "ss2_cuda_scatter": (_int, [_vp, _vp, _i64, _i64, _int, _vp, _vp, _i64, _vp, _vp, _vp]),
    # ptrs, offs, npieces, n, w, idx, d, new_out, count, negate, touched, status, stream
    "ss2_cuda_add_scatter": (_int, [_vp, _vp, _i64, _i64, _int, _vp, _vp, _vp, _i64, _int, _vp, _vp, _vp]),
    # ptrs, offs, npieces, n, w, idx, out, count, status, stream
    "ss2_cuda_take": (_int, [_vp, _vp, _i64, _i64, _int, _vp, _vp, _i64, _vp, _vp]),
    # ptrs, lens, base, count, nleaves, leaves, out, stream
    "ss2_cuda_tree64_many": (_int, [_vp, _vp, _vp, _i64, _u64, _vp, _vp, _vp]),
    # data, len, leaves, out, stream
    "ss2_cuda_tree64": (_int, [_vp, _u64, _vp, _vp, _vp]),
}


def _cuda_bind():
    if lib is None:
        return f"native library not available ({load_error})"
    missing = [name for name in _CUDA_SIGNATURES if not hasattr(lib, name)]
    if missing:
        return (f"{path} has no CUDA kernels ({len(missing)} ss2_cuda_* symbols missing: built without CUDA; "
                "rebuild with SPARSESYNC_CUDA=1 and nvcc)")
    for name, (res, args) in _CUDA_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return None


cuda_load_error = _cuda_bind()


def cuda_kernels_compiled() -> bool:
    """Whether the loaded library has the ss2_cuda_* calls (else ``cuda_load_error`` says why)."""
    return cuda_load_error is None
