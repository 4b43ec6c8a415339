"""The format-2 kernel calls on CUDA tensors (csrc/device2.cu through the ss2_cuda_* symbols of the native library).

Every function is named and called like its CPU counterpart in :mod:`sparsesync._native` (``scan2``, ``encode2``,
``decode2``, ``gather2``, ``put2``, ``scatter2``, ``add_scatter2``, ``take2``, ``tree64_many``) but takes
:class:`~sparsesync.space.Space` objects whose tensors live on one CUDA device, and returns the same results:

- what the planner needs comes back on the host exactly as the CPU call returns it (``scan2``'s counts, histogram,
  keys, total and per-tensor counts as numpy arrays; ``encode2``'s chunk table and data as ``bytes``, ``ks``, values
  hash, count; ``tree64_many``'s hashes as a numpy array);
- changed positions, decoded indices and values, gathered and taken bytes stay on the device (CUDA tensors: int64
  indices, uint8 bytes); index and byte arguments may be CUDA tensors, or CPU tensors / bytes (copied over).

Work is enqueued on PyTorch's current stream of the space's device and scratch memory comes from PyTorch's caching
allocator. The device copies of a space's pointer and offset tables are cached (keyed by the space's ``ptrs`` /
``offs`` arrays; a table whose contents changed is copied again).

Importing this module needs no GPU and no CUDA build: :func:`available` says whether the loaded library has the
CUDA kernels and a CUDA device is present, :func:`unavailable_reason` says why not, and every call raises
:class:`CudaKernelsUnavailable` with that reason when they are not.
"""
from __future__ import annotations

import collections
import ctypes
import threading

import numpy as np
import torch

from . import _native
from .reference import KernelError


class CudaKernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot run in this process (the message says why: no CUDA build, no device, ...)."""


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here (None when they can)."""
    err = getattr(_native, "cuda_load_error", "sparsesync._native has no CUDA bindings")
    if err is not None:
        return f"the native library has no CUDA kernels: {err}"
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
    except Exception as exc:  # a broken driver install
        return f"torch.cuda failed: {exc}"
    return None


def available() -> bool:
    """Whether the loaded library has the ss2_cuda_* kernels AND a CUDA device is present."""
    return unavailable_reason() is None


def _lib():
    why = unavailable_reason()
    if why is not None:
        raise CudaKernelsUnavailable(f"sparsesync CUDA kernels unavailable: {why}")
    return _native.lib


def _check(rc: int, what: str) -> None:
    if rc >= 0:
        return
    if rc <= -1000:
        msg = _native.lib.ss2_cuda_error_string(rc)
        raise KernelError(rc, f"{what}: CUDA error {-1000 - rc}: {msg.decode() if msg else '?'}")
    raise KernelError(rc, f"{what}: {_native.ERRORS.get(rc, 'error')} (code {rc})")


# ---------------------------------------------------------------------------------------------------------------------
# spaces on the device

class _DevSpace:
    __slots__ = ("ptrs_h", "offs_h", "ptrs", "offs", "device", "np", "n", "w", "kb", "pinned")


_traffic = threading.local()


def host_traffic() -> int:
    """Bytes of pinned host memory (an ``Encoder(snapshot="pinned")`` snapshot) that this thread's kernel calls
    covered so far: the ranges they read or wrote there, through unified addressing, across PCIe."""
    return getattr(_traffic, "n", 0)


def _count_host(ds: "_DevSpace", nbytes: int) -> None:
    if ds.pinned:
        _traffic.n = getattr(_traffic, "n", 0) + int(nbytes)


_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_LOCK = threading.Lock()
_TABLES_MAX = 256


def _space_device(sp) -> tuple[torch.device, bool]:
    """(the CUDA device whose kernels handle the space, whether its tensors are in pinned host memory). A space is
    on one device, or in pinned host memory declared to be handled by one device (``Space.set_devices``), which the
    kernels then read and write through unified virtual addressing."""
    tensors = sp.tensors
    if not tensors:
        return torch.device("cuda", torch.cuda.current_device()), False
    runs = sp.druns
    dev = runs[0][2] if len(runs) == 1 else None
    if not isinstance(dev, torch.device) or dev.type != "cuda":
        where = sorted({str(t.device) for t in tensors})
        raise KernelError(-1, f"space {sp.dtype}: tensors are on {', '.join(where)}, not on one CUDA device")
    pinned = False
    for t in tensors:
        if t.device == dev:
            continue
        if t.is_cpu and t.is_pinned():
            pinned = True
            continue
        raise KernelError(-1, f"space {sp.dtype}: a tensor on {t.device} in a space of {dev} (host tensors must be "
                          "in pinned memory)")
    return dev, pinned


def _dev(sp) -> _DevSpace:
    """The space with device copies of its tables (cached)."""
    key = (id(sp.ptrs), id(sp.offs))
    with _TABLES_LOCK:
        ent = _TABLES.get(key)
        if ent is not None:
            src_ptrs, src_offs, ds = ent
            if src_ptrs is sp.ptrs and src_offs is sp.offs and np.array_equal(ds.ptrs_h, sp.ptrs) \
                    and np.array_equal(ds.offs_h, sp.offs):
                _TABLES.move_to_end(key)
                return ds
            del _TABLES[key]
    ptrs = np.array(sp.ptrs, dtype=np.uint64, copy=True).reshape(-1)
    offs = np.array(sp.offs, dtype=np.int64, copy=True).reshape(-1)
    if offs.shape != (ptrs.size + 1,) or offs[0] != 0 or (np.diff(offs) < 0).any():
        raise KernelError(-1, "space: offs must be len(ptrs) + 1 non-decreasing prefix sums from 0")
    if ptrs.size and (ptrs % np.uint64(sp.w)).any():
        raise KernelError(-1, f"space {sp.dtype}: a tensor address is not a multiple of the element width {sp.w}")
    dev, pinned = _space_device(sp)
    ds = _DevSpace()
    ds.ptrs_h, ds.offs_h, ds.device, ds.pinned = ptrs, offs, dev, pinned
    ds.np, ds.n, ds.w, ds.kb = int(ptrs.size), int(offs[-1]), sp.w, sp.kb
    ds.ptrs = torch.from_numpy(ptrs.view(np.int64).copy()).to(dev)
    ds.offs = torch.from_numpy(offs.copy()).to(dev)
    with _TABLES_LOCK:
        _TABLES[key] = (sp.ptrs, sp.offs, ds)
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    return ds


def clear_table_cache() -> None:
    """Drop the cached device copies of space tables."""
    with _TABLES_LOCK:
        _TABLES.clear()


def _pair(old, new) -> tuple[_DevSpace, _DevSpace]:
    _native._check_pair(old, new)
    o, n = _dev(old), _dev(new)
    if o.device != n.device:
        raise KernelError(-1, f"old and new spaces are on different devices ({o.device}, {n.device})")
    return o, n


def _stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def _p(t) -> int | None:
    return t.data_ptr() if t is not None and t.numel() else None


def _idx_dev(idx, dev: torch.device) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise KernelError(-1, "indices must be an int64 tensor")
    return idx.reshape(-1).to(dev).contiguous()


def _u8_dev(t, nbytes: int, what: str, dev: torch.device) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.uint8:
            raise KernelError(-1, f"{what} must be a uint8 tensor")
        t = t.reshape(-1).to(dev).contiguous()
    else:
        t = torch.from_numpy(np.frombuffer(t, dtype=np.uint8).copy()).to(dev)
    if t.numel() != nbytes:
        raise KernelError(-1, f"{what} has {t.numel()} bytes, expected {nbytes}")
    return t


def _touched_dev(touched, sp, dev: torch.device):
    if touched is None:
        return None
    _native._touched_arg(touched, sp)  # the CPU call's checks
    return torch.zeros(touched.size, dtype=torch.uint8, device=dev)


def _touched_merge(touched, dt) -> None:
    if touched is not None and dt is not None and dt.numel():
        touched[dt.cpu().numpy() != 0] = 1


# ---------------------------------------------------------------------------------------------------------------------
# positions

#: scan2 keeps the changed positions (int64) of a run only while they take at most this share of the run's bytes;
#: above it (e.g. bf16 at more than 1% changed) encode2 selects each segment's positions again (one more read of the
#: segment's range) so that the extra device memory of an encode stays below 5% of the state
POSITIONS_BUDGET = 0.04

def _count(lib, o: _DevSpace, n: _DevSpace, start: int, end: int, st: int) -> int:
    _count_host(o, (end - start) * o.w)
    cnt = torch.empty(1, dtype=torch.int64, device=o.device)
    _check(lib.ss2_cuda_count(_p(o.ptrs), _p(n.ptrs), _p(o.offs), o.np, o.n, o.w, start, end, cnt.data_ptr(), st),
           "ss2_cuda_count")
    return int(cnt.item())


def _select(lib, o: _DevSpace, n: _DevSpace, start: int, end: int, count: int, st: int) -> torch.Tensor:
    """The changed elements of [start, end) (there are `count` of them) as a CUDA int64 tensor, ascending."""
    pos = torch.empty(count, dtype=torch.int64, device=o.device)
    if count == 0:
        return pos
    _count_host(o, (end - start) * o.w)
    nsel = torch.empty(1, dtype=torch.int64, device=o.device)
    tb = ctypes.c_uint64(0)
    args = (_p(o.ptrs), _p(n.ptrs), _p(o.offs), o.np, o.n, o.w, start, end, pos.data_ptr(), nsel.data_ptr())
    _check(lib.ss2_cuda_positions(*args, None, ctypes.byref(tb), st), "ss2_cuda_positions")
    temp = torch.empty(max(1, tb.value), dtype=torch.uint8, device=o.device)
    _check(lib.ss2_cuda_positions(*args, temp.data_ptr(), ctypes.byref(tb), st), "ss2_cuda_positions")
    got = int(nsel.item())
    if got != count:
        raise KernelError(-6, f"ss2_cuda_positions: {got} changed elements, counted {count} (tensors changed "
                          "while being encoded?)")
    return pos


def positions2(old, new, start: int, end: int) -> torch.Tensor:
    """The changed elements of space range [start, end) as an ascending CUDA int64 tensor."""
    lib = _lib()
    o, n = _pair(old, new)
    if not (0 <= start <= end <= o.n):
        raise KernelError(-1, f"range [{start}, {end}) outside the space ({o.n} elements)")
    with torch.cuda.device(o.device):
        st = _stream(o.device)
        return _select(lib, o, n, start, end, _count(lib, o, n, start, end, st), st)


# ---------------------------------------------------------------------------------------------------------------------
# the calls of sparsesync._native, on CUDA spaces

def scan2(old, new, mode: int, positions: bool = False):
    lib = _lib()
    o, n = _pair(old, new)
    nkeys = 1 << o.kb if o.kb else 1
    nblocks = -(-o.n // 4096)
    dev = o.device
    _count_host(o, o.n * o.w)
    with torch.cuda.device(dev):
        st = _stream(dev)
        counts = torch.empty(max(1, nblocks), dtype=torch.int32, device=dev)
        # one buffer for the small outputs (one copy back): hist, keys, pieces, total
        small = torch.empty(nkeys * 256 + nkeys + o.np + 1, dtype=torch.int64, device=dev)
        hist_d = small[: nkeys * 256]
        keys_d = small[nkeys * 256: nkeys * 256 + nkeys]
        pieces_d = small[nkeys * 256 + nkeys: nkeys * 256 + nkeys + o.np]
        total_d = small[-1:]
        rc = lib.ss2_cuda_scan(_p(o.ptrs), _p(n.ptrs), _p(o.offs), o.np, o.n, o.w, o.kb, mode, counts.data_ptr(),
                               hist_d.data_ptr(), keys_d.data_ptr(), pieces_d.data_ptr() if o.np else None,
                               total_d.data_ptr(), st)
        _check(rc, "ss2_cuda_scan")
        small_h = small.cpu().numpy()
        counts_h = counts[:nblocks].cpu().numpy().view(np.uint32).copy()
        hist = small_h[: nkeys * 256].view(np.uint64).reshape(nkeys, 256).copy()
        keys = small_h[nkeys * 256: nkeys * 256 + nkeys].view(np.uint64).copy()
        pieces = small_h[nkeys * 256 + nkeys: nkeys * 256 + nkeys + o.np].copy()
        total = int(small_h[-1])
        if not positions:
            return counts_h, hist, keys, total, pieces
        idx = None
        if total * 8 <= POSITIONS_BUDGET * o.n * o.w:
            idx = _select(lib, o, n, 0, o.n, total, st)
        return counts_h, hist, keys, total, pieces, idx


def encode2(old, new, mode: int, start: int, end: int, log2c: int, cuts, freqs, update_old: bool = False,
            nchanged_hint: int | None = None, positions: torch.Tensor | None = None):
    lib = _lib()
    o, n = _pair(old, new)
    dev = o.device
    cuts_arr, cuts_p, ncuts = _native._cuts_arg(cuts)
    K = ncuts + 1
    f = _native._freqs_arg(freqs, K)
    w = o.w
    with torch.cuda.device(dev):
        st = _stream(dev)
        if positions is None:
            if not (0 <= start < end <= o.n):
                raise KernelError(-1, f"range [{start}, {end}) outside the space ({o.n} elements)")
            positions = _select(lib, o, n, start, end, _count(lib, o, n, start, end, st), st)
        else:
            positions = _idx_dev(positions, dev)
        npos = positions.numel()
        # a pinned snapshot: the coder reads the base over the range (keys) or at the changes, and writes the changes
        _count_host(o, ((end - start) if ncuts else npos) * w + (npos * w if update_old else 0))
        table_cap, data_cap = _native.encode2_caps(start, end, log2c, K, w, npos)   # with the exact count
        ks = np.zeros(K, dtype=np.int32)
        tlen, dlen, nch_out = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
        vh = ctypes.c_uint64()
        rc = 0
        for _attempt in range(2):
            table = np.empty(table_cap, dtype=np.uint8)
            data = np.empty(data_cap, dtype=np.uint8)
            sb = ctypes.c_uint64(0)

            def call(scratch, sb=sb, table=table, data=data):
                return lib.ss2_cuda_encode(
                    _p(o.ptrs), _p(n.ptrs), _p(o.offs), o.np, o.n, w, o.kb, mode, start, end, log2c, cuts_p, ncuts,
                    f.ctypes.data, table.ctypes.data, table_cap, ctypes.byref(tlen), data.ctypes.data, data_cap,
                    ctypes.byref(dlen), ks.ctypes.data, ctypes.byref(vh), ctypes.byref(nch_out),
                    int(bool(update_old)), _p(positions), npos, scratch, ctypes.byref(sb), st)

            rc = call(None)
            if rc:
                break
            scratch = torch.empty(max(1, sb.value), dtype=torch.uint8, device=dev)
            rc = call(scratch.data_ptr())
            del scratch
            if rc == -6 and (tlen.value > table_cap or dlen.value > data_cap):
                table_cap, data_cap = max(table_cap, tlen.value), max(data_cap, dlen.value)
                continue
            break
        _check(rc, "ss2_cuda_encode")
        return (table[: tlen.value].tobytes(), data[: dlen.value].tobytes(),
                [None if k < 0 else int(k) for k in ks.tolist()], int(vh.value), int(nch_out.value))


def decode2(seg, table_len: int, old, mode: int, start: int, end: int, log2c: int, cuts, ks, freqs, nchanged: int,
            expected_hash: int, idx_out: torch.Tensor | None = None, val_out: torch.Tensor | None = None):
    lib = _lib()
    o = _dev(old)
    dev = o.device
    cuts_arr, cuts_p, ncuts = _native._cuts_arg(cuts)
    K = ncuts + 1
    ks_arr = _native.ks_arg(ks, K)
    f = _native._freqs_arg(freqs, K)
    if isinstance(seg, torch.Tensor) and seg.device.type != "cpu":
        seg = seg.cpu()  # the chunk table is parsed on the host
    p, seg_len, _keep = _native._bufptr(seg)
    w = o.w
    if nchanged < 0:
        raise KernelError(-6, "negative nchanged")
    with torch.cuda.device(dev):
        st = _stream(dev)
        idx = torch.empty(nchanged, dtype=torch.int64, device=dev) if idx_out is None else idx_out
        vals = torch.empty(nchanged * w, dtype=torch.uint8, device=dev) if val_out is None else val_out
        if idx.numel() != nchanged or vals.numel() != nchanged * w or not (idx.is_contiguous() and vals.is_contiguous()) \
                or idx.dtype != torch.int64 or vals.dtype != torch.uint8 or idx.device != dev or vals.device != dev:
            raise KernelError(-1, "output buffers have the wrong size, type or device")
        sb = ctypes.c_uint64(0)

        def call(scratch):
            return lib.ss2_cuda_decode(p, seg_len, table_len, _p(o.ptrs), _p(o.offs), o.np, o.n, w, o.kb, mode, start,
                                       end, log2c, cuts_p, ncuts, ks_arr.ctypes.data, f.ctypes.data, nchanged,
                                       expected_hash & 0xFFFFFFFFFFFFFFFF, _p(idx), _p(vals), scratch,
                                       ctypes.byref(sb), st)

        rc = call(None)
        if rc == 0:
            scratch = torch.empty(max(1, sb.value), dtype=torch.uint8, device=dev)
            rc = call(scratch.data_ptr())
            del scratch
        _check(rc, "ss2_cuda_decode")
        return idx, vals


def scatter2(dst, idx: torch.Tensor, vals: torch.Tensor, touched: np.ndarray | None = None) -> None:
    lib = _lib()
    d = _dev(dst)
    with torch.cuda.device(d.device):
        st = _stream(d.device)
        idx = _idx_dev(idx, d.device)
        vals = _u8_dev(vals, idx.numel() * d.w, "vals", d.device)
        td = _touched_dev(touched, dst, d.device)
        status = torch.empty(1, dtype=torch.int32, device=d.device)
        rc = lib.ss2_cuda_scatter(_p(d.ptrs), _p(d.offs), d.np, d.n, d.w, _p(idx), _p(vals), idx.numel(), _p(td),
                                  status.data_ptr(), st)
        _check(rc, "ss2_cuda_scatter")
        _touched_merge(touched, td)


def add_scatter2(dst, idx: torch.Tensor, d: torch.Tensor, new_out: torch.Tensor | None = None, negate: bool = False,
                 touched: np.ndarray | None = None) -> None:
    lib = _lib()
    ds = _dev(dst)
    dev = ds.device
    with torch.cuda.device(dev):
        st = _stream(dev)
        idx = _idx_dev(idx, dev)
        d = _u8_dev(d, idx.numel() * ds.w, "d", dev)
        if new_out is not None and (new_out.numel() != idx.numel() * ds.w or not new_out.is_contiguous()
                                    or new_out.dtype != torch.uint8 or new_out.device != dev):
            raise KernelError(-1, "new_out has the wrong size, type or device")
        td = _touched_dev(touched, dst, dev)
        status = torch.empty(1, dtype=torch.int32, device=dev)
        rc = lib.ss2_cuda_add_scatter(_p(ds.ptrs), _p(ds.offs), ds.np, ds.n, ds.w, _p(idx), _p(d),
                                      _p(new_out) if new_out is not None else None, idx.numel(), int(bool(negate)),
                                      _p(td), status.data_ptr(), st)
        _check(rc, "ss2_cuda_add_scatter")
        _touched_merge(touched, td)


def gather2(src, start: int, end: int) -> torch.Tensor:
    lib = _lib()
    s = _dev(src)
    if not (0 <= start <= end <= s.n):
        raise KernelError(-1, f"range [{start}, {end}) outside the space ({s.n} elements)")
    _count_host(s, (end - start) * s.w)
    with torch.cuda.device(s.device):
        out = torch.empty((end - start) * s.w, dtype=torch.uint8, device=s.device)
        rc = lib.ss2_cuda_gather(_p(s.ptrs), _p(s.offs), s.np, s.n, s.w, start, end, _p(out), _stream(s.device))
        _check(rc, "ss2_cuda_gather")
        return out


def put2(dst, start: int, end: int, data, touched: np.ndarray | None = None) -> None:
    lib = _lib()
    d = _dev(dst)
    if not (0 <= start <= end <= d.n):
        raise KernelError(-1, f"range [{start}, {end}) outside the space ({d.n} elements)")
    if touched is not None:
        _native._touched_arg(touched, dst)
    _count_host(d, (end - start) * d.w)
    with torch.cuda.device(d.device):
        buf = _u8_dev(data, (end - start) * d.w, "data", d.device)
        rc = lib.ss2_cuda_put(_p(d.ptrs), _p(d.offs), d.np, d.n, d.w, start, end, _p(buf), _stream(d.device))
        _check(rc, "ss2_cuda_put")
        del buf  # stream ordered: the caching allocator reuses it only after the copy
    if touched is not None and end > start:
        lo, hi = d.offs_h[:-1], d.offs_h[1:]
        touched[(lo < end) & (hi > start) & (hi > lo)] = 1


def take2(src, idx: torch.Tensor) -> torch.Tensor:
    lib = _lib()
    s = _dev(src)
    with torch.cuda.device(s.device):
        idx = _idx_dev(idx, s.device)
        out = torch.empty(idx.numel() * s.w, dtype=torch.uint8, device=s.device)
        status = torch.empty(1, dtype=torch.int32, device=s.device)
        rc = lib.ss2_cuda_take(_p(s.ptrs), _p(s.offs), s.np, s.n, s.w, _p(idx), _p(out), idx.numel(),
                               status.data_ptr(), _stream(s.device))
        _check(rc, "ss2_cuda_take")
        return out


def tree64_many(tensors: list[torch.Tensor], ptrs: np.ndarray | None = None,
                nbytes: np.ndarray | None = None) -> np.ndarray:
    """tree64 of each CUDA tensor (all on one device); as _native.tree64_many."""
    lib = _lib()
    count = len(tensors)
    out = np.zeros(count, dtype=np.uint64)
    if not count:
        return out
    dev = tensors[0].device
    if dev.type != "cuda" or any(t.device != dev for t in tensors):
        raise KernelError(-1, "tree64_many: the tensors must all be on one CUDA device")
    keep, ptrs, lens = _native.tree64_many_args(tensors, ptrs, nbytes)
    if ((lens > 0) & (ptrs == 0)).any():
        raise KernelError(-1, "ss2_cuda_tree64_many: bad argument (code -1)")
    nl = np.where(lens == 0, np.uint64(1), (lens + np.uint64(4095)) // np.uint64(4096)).astype(np.uint64)
    base = np.zeros(count + 1, dtype=np.uint64)
    np.cumsum(nl, out=base[1:])
    nleaves = int(base[-1])
    with torch.cuda.device(dev):
        st = _stream(dev)
        tabs = torch.from_numpy(np.concatenate([ptrs, lens, base]).view(np.int64)).to(dev)
        leaves = torch.empty(nleaves, dtype=torch.int64, device=dev)
        res = torch.empty(count, dtype=torch.int64, device=dev)
        d_ptrs, d_lens, d_base = tabs[:count], tabs[count:2 * count], tabs[2 * count:]
        rc = lib.ss2_cuda_tree64_many(d_ptrs.data_ptr(), d_lens.data_ptr(), d_base.data_ptr(), count, nleaves,
                                      leaves.data_ptr(), res.data_ptr(), st)
        _check(rc, "ss2_cuda_tree64_many")
        out[:] = res.cpu().numpy().view(np.uint64)
        del keep
    return out


def tree64(data: torch.Tensor) -> int:
    """tree64 of a contiguous CUDA tensor's bytes."""
    lib = _lib()
    t = data if data.is_contiguous() else data.contiguous()
    dev = t.device
    if dev.type != "cuda":
        raise KernelError(-1, "tree64: not a CUDA tensor")
    nb = t.numel() * t.element_size()
    nl = 1 if nb == 0 else -(-nb // 4096)
    with torch.cuda.device(dev):
        leaves = torch.empty(nl, dtype=torch.int64, device=dev)
        res = torch.empty(1, dtype=torch.int64, device=dev)
        rc = lib.ss2_cuda_tree64(t.data_ptr() if nb else None, nb, leaves.data_ptr(), res.data_ptr(), _stream(dev))
        _check(rc, "ss2_cuda_tree64")
        return int(res.cpu().numpy().view(np.uint64)[0])


# ---------------------------------------------------------------------------------------------------------------------
# self-test: before the Encoder or the Decoder first works on a device, every call runs once on small data there and
# must agree with the CPU kernels, so that a broken build or toolkit shows up as one clear message (and a fallback to
# host copies in the Encoder) instead of wrong bytes

_SELFTESTS: dict = {}
_SELFTEST_LOCK = threading.Lock()


def self_test(device, impl=None) -> str | None:
    """Run scan2, encode2 (order-0 and with classes, delta and raw values), decode2, scatter2, add_scatter2, take2,
    gather2, put2 and tree64_many once on small spaces on ``device`` and compare every result with the CPU kernels.
    None when all agree, else what differed (cached per device; ``SPARSESYNC_CUDA_SELFTEST=0`` skips it). ``impl``:
    the module under test (default: this one; tests pass stand-ins)."""
    from . import config
    if not config.get_bool("SPARSESYNC_CUDA_SELFTEST"):
        return None
    key = (str(device), id(impl))
    with _SELFTEST_LOCK:
        if key not in _SELFTESTS:
            try:
                _SELFTESTS[key] = _self_test(torch.device(device), impl or __import__(__name__, fromlist=["x"]))
            except Exception as exc:  # noqa: BLE001 - reported as the reason
                _SELFTESTS[key] = f"{type(exc).__name__}: {exc}"
        return _SELFTESTS[key]


def _self_test(dev: torch.device, impl) -> str | None:
    from .format import build_freq
    from .space import Space
    g = torch.Generator().manual_seed(20261129)
    for dname, dt, idt in (("bfloat16", torch.bfloat16, torch.int16), ("float32", torch.float32, torch.int32),
                           ("int16", torch.int16, torch.int16)):
        sizes = [1, 4095, 9000, 70001, 3]
        old_c = [(torch.randn(n, generator=g) * 0.05).to(dt) if dt.is_floating_point else
                 torch.randint(-30000, 30000, (n,), generator=g, dtype=dt) for n in sizes]
        new_c = []
        for t in old_c:
            u = t.clone()
            iv = u.view(idt)
            k = max(1, t.numel() // 40)
            at = torch.randint(0, t.numel(), (k,), generator=g)
            iv[at] = iv[at] + torch.randint(1, 5, (k,), generator=g, dtype=idt)
            new_c.append(u)
        names = [f"t{i}" for i in range(len(sizes))]
        old_d, new_d = [t.to(dev) for t in old_c], [t.to(dev) for t in new_c]
        oc, nc_ = Space(dname, names, old_c), Space(dname, names, new_c)
        od, nd = Space(dname, names, old_d), Space(dname, names, new_d)
        for mode in (0, 1):
            want = _native.scan2(oc, nc_, mode, positions=True)
            got = impl.scan2(od, nd, mode, positions=True)
            for a, b, what in zip(want[:5], got[:5], ("counts", "hist", "keys", "total", "pieces")):
                if not np.array_equal(np.asarray(a), np.asarray(b)):
                    return f"scan2 ({dname}, mode {mode}): {what} differ from the CPU kernels'"
            if (want[5] is None) != (got[5] is None) or (want[5] is not None and
                                                          not torch.equal(want[5], got[5].cpu())):
                return f"scan2 ({dname}, mode {mode}): positions differ from the CPU kernels'"
            hist = np.asarray(want[1])
            keys = np.flatnonzero(hist.sum(axis=1))
            for cuts in ([], [int(keys[len(keys) // 3]), int(keys[2 * len(keys) // 3])] if len(keys) > 3 else []):
                if cuts and (len(set(cuts)) < 2 or cuts[0] == 0):
                    continue
                bounds = [0] + cuts + [hist.shape[0]]
                freqs = np.zeros((len(cuts) + 1, 256), dtype=np.uint32)
                for c in range(len(cuts) + 1):
                    h = hist[bounds[c]:bounds[c + 1]].sum(0)
                    if h.sum():
                        freqs[c] = build_freq(h)
                start, end = 7, oc.n - 5
                w_ = _native.encode2(oc, nc_, mode, start, end, 13, cuts, freqs)
                g_ = impl.encode2(od, nd, mode, start, end, 13, cuts, freqs)
                if tuple(w_) != tuple(g_):
                    return f"encode2 ({dname}, mode {mode}, {len(cuts) + 1} classes): bytes differ from the CPU kernels'"
                table, data, ks, vh, nch = w_
                seg = table + data
                wi, wv = _native.decode2(seg, len(table), oc, mode, start, end, 13, cuts, ks, freqs, nch, vh)
                gi, gv = impl.decode2(seg, len(table), od, mode, start, end, 13, cuts, ks, freqs, nch, vh)
                if not (torch.equal(wi, gi.cpu()) and torch.equal(wv, gv.cpu())):
                    return f"decode2 ({dname}, mode {mode}, {len(cuts) + 1} classes): differs from the CPU kernels'"
        # writes: into copies, compared byte for byte afterwards
        idx = torch.unique(torch.randint(0, oc.n, (500,), generator=g))
        vals = torch.randint(0, 256, (idx.numel() * oc.w,), generator=g, dtype=torch.uint8)
        wc, wd = [t.clone() for t in old_c], [t.clone() for t in old_d]
        sc, sd = Space(dname, names, wc), Space(dname, names, wd)
        if not torch.equal(_native.take2(sc, idx), impl.take2(sd, idx.to(dev)).cpu()):
            return f"take2 ({dname}) differs from the CPU kernels'"
        _native.scatter2(sc, idx, vals)
        impl.scatter2(sd, idx.to(dev), vals.to(dev))
        nw, ng = torch.empty_like(vals), torch.empty_like(vals, device=dev)
        _native.add_scatter2(sc, idx, vals, nw)
        impl.add_scatter2(sd, idx.to(dev), vals.to(dev), ng)
        if not torch.equal(nw, ng.cpu()):
            return f"add_scatter2 ({dname}) differs from the CPU kernels'"
        a, b = 100, min(sc.n, 80000)
        if not torch.equal(_native.gather2(sc, a, b), impl.gather2(sd, a, b).cpu()):
            return f"gather2 ({dname}) differs from the CPU kernels'"
        raw = torch.randint(0, 256, ((b - a) * sc.w,), generator=g, dtype=torch.uint8)
        _native.put2(sc, a, b, raw)
        impl.put2(sd, a, b, raw.to(dev))
        for x, y in zip(wc, wd):
            if not torch.equal(x.view(torch.uint8), y.cpu().view(torch.uint8)):
                return f"scatter2 / add_scatter2 / put2 ({dname}): the written tensors differ from the CPU kernels'"
        if not np.array_equal(_native.tree64_many(wc), impl.tree64_many(wd)):
            return f"tree64_many ({dname}) differs from the CPU kernels'"
    return None


__all__ = ["CudaKernelsUnavailable", "available", "self_test", "host_traffic", "unavailable_reason", "scan2", "encode2", "decode2", "gather2",
           "put2", "scatter2", "add_scatter2", "take2", "tree64_many", "tree64", "positions2", "clear_table_cache"]
