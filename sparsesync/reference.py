"""Pure-PyTorch reference of every native kernel (csrc/sparsesync.h), following docs/FORMAT.md.

Each function here has the same inputs and outputs as its native twin in ``sparsesync._native``; the tests run both on
the same data and compare bit for bit. They are also the fallback when the native library is missing: correct, slow.

Buffers are flat ``torch.uint8`` tensors holding ``n * w`` bytes of bit patterns (``w`` = element width in bytes).
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

MASK64 = (1 << 64) - 1
K0 = 0x9E3779B97F4A7C15
K1 = 0xBF58476D1CE4E5B9
K2 = 0x94D049BB133111EB
K3 = 0xD6E8FEB86659FD93
LEAF = 4096
TREE_SEED = 0x5353594E43
FINE_BLOCK = 4096
RANS_L = 1 << 23
SCALE_BITS = 12
SCALE = 1 << SCALE_BITS
MODE_DELTA = 0
MODE_RAW = 1
MODE_DELTA_DEFERRED = 2   # decode only: output the differences, do not read old values or check the values hash


class KernelError(Exception):
    """A decoding rule of FORMAT.md 4.4 was violated; ``code`` is the matching SS_E* value of csrc/sparsesync.h."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


E_ARG, E_TABLE, E_STREAM, E_POS, E_RANS, E_COUNT, E_HASH = -1, -2, -3, -4, -5, -6, -7
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _s64(x: int) -> int:
    """Python int (mod 2^64) -> signed int64 value, as torch stores it."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


def _srl(x: torch.Tensor, r: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding u64 bit patterns."""
    return (x >> r) & ((1 << (64 - r)) - 1)


def _rotl(x: torch.Tensor, r: int) -> torch.Tensor:
    return (x << r) | _srl(x, 64 - r)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _srl(x, 30)
    x = x * _s64(K1)
    x = x ^ _srl(x, 27)
    x = x * _s64(K2)
    return x ^ _srl(x, 31)


def _as_u8(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    mv = memoryview(data).cast("B")
    if len(mv) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(mv), dtype=torch.uint8)


def _h64_many(rows: torch.Tensor, lengths: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """h64 of many equally padded byte strings at once: rows is [R, 32*m] uint8 (already zero padded)."""
    if rows.shape[1] == 0:
        words = torch.zeros(rows.shape[0], 0, 4, dtype=torch.int64)
    else:
        words = rows.contiguous().view(torch.int64).reshape(rows.shape[0], -1, 4)
    lanes = torch.stack([seeds + _s64((j + 1) * K0) for j in range(4)], dim=1)
    k3 = _s64(K3)
    k1 = _s64(K1)
    for i in range(words.shape[1]):
        lanes = _rotl(lanes + words[:, i, :] * k3, 27) * k1
    h = seeds ^ (lengths * _s64(K0))
    for j in range(4):
        h = _mix(h ^ lanes[:, j])
    return h


def h64(data, seed: int) -> int:
    """FORMAT.md 1.1."""
    buf = _as_u8(data)
    n = buf.numel()
    padded = torch.zeros(max(32, -(-n // 32) * 32) if n else 0, dtype=torch.uint8)
    padded[:n] = buf
    rows = padded.reshape(1, -1)
    out = _h64_many(rows, torch.tensor([n], dtype=torch.int64), torch.tensor([_s64(seed)], dtype=torch.int64))
    return int(out[0]) & MASK64


def tree64(data) -> int:
    """FORMAT.md 1.2: 4096-byte leaves hashed independently, then the array of leaf hashes."""
    buf = _as_u8(data)
    n = buf.numel()
    nleaves = max(1, -(-n // LEAF))
    padded = torch.zeros(nleaves * LEAF, dtype=torch.uint8)
    padded[:n] = buf
    lengths = torch.full((nleaves,), LEAF, dtype=torch.int64)
    lengths[-1] = n - (nleaves - 1) * LEAF
    if n == 0:
        leaves = torch.tensor([_s64(h64(b"", 0))], dtype=torch.int64)
    else:
        # a short last leaf must be hashed with its own padding length (words past its end are zero anyway, but the
        # loop length differs), so hash full leaves together and the tail on its own
        full = nleaves if lengths[-1] == LEAF else nleaves - 1
        parts = []
        if full:
            parts.append(_h64_many(padded[: full * LEAF].reshape(full, LEAF), lengths[:full],
                                   torch.arange(full, dtype=torch.int64)))
        if full < nleaves:
            parts.append(torch.tensor([_s64(h64(buf[full * LEAF:], full))], dtype=torch.int64))
        leaves = torch.cat(parts)
    return h64(leaves.view(torch.uint8), TREE_SEED ^ n)


# ---------------------------------------------------------------------------------------------------------------------
# value symbols (FORMAT.md 4.2)

def _unsigned(bits: torch.Tensor, w: int) -> torch.Tensor:
    """Bit patterns as int64: unsigned values for w < 8, the raw (signed) u64 pattern for w == 8."""
    if bits.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    v = bits.view(_INT_VIEW[w]).to(torch.int64)
    if w < 8:
        v = v & ((1 << (8 * w)) - 1)
    return v


def _bit_length(m: torch.Tensor) -> torch.Tensor:
    """bit_length of int64 tensors read as u64 (a negative value has 64 bits)."""
    nb = torch.zeros_like(m)
    for j in range(64):
        nb += (_srl(m, j) != 0).to(torch.int64)
    return nb


def symbols(old_vals: torch.Tensor, new_vals: torch.Tensor, w: int, mode: int):
    """Symbols, extra-bit values and extra-bit counts of changed elements (int64 tensors from ``_unsigned``)."""
    bits = 8 * w
    if mode == MODE_RAW:
        sym = _srl(new_vals, bits - 8) & 0xFF
        nextra = torch.full_like(sym, bits - 8)
        extra = new_vals & ((1 << (bits - 8)) - 1) if bits > 8 else torch.zeros_like(sym)
        return sym, extra, nextra
    if w < 8:
        d = (new_vals - old_vals) & ((1 << bits) - 1)
        d = torch.where(d >= (1 << (bits - 1)), d - (1 << bits), d)
    else:
        d = new_vals - old_vals  # wraps mod 2^64 == signed 64-bit difference
    neg = (d < 0).to(torch.int64)
    m = torch.where(d < 0, -d, d)  # for INT64_MIN stays negative == 2^63 as u64
    small = (m <= 8) & (m > 0)
    nb = _bit_length(m)
    sym = torch.where(small, 2 * (m - 1) + neg, 16 + nb - 4)
    low = m & ((torch.ones_like(nb) << (nb - 1).clamp(min=0)) - 1)  # low nb-1 bits (1 << 63 wraps, minus 1 is right)
    extra = torch.where(small, 0, neg | (low << 1))
    nextra = torch.where(small, 0, nb)
    return sym, extra, nextra


def _apply_symbol(old: int, sym: int, extra: int, w: int, mode: int) -> int:
    """Inverse of ``symbols`` for one element; returns the new bit pattern as a Python int in [0, 2^B)."""
    bits = 8 * w
    mask = (1 << bits) - 1
    if mode == MODE_RAW:
        return ((sym << (bits - 8)) | extra) & mask
    if sym < 16:
        m, neg = sym // 2 + 1, sym & 1
    else:
        nb = sym - 16 + 4
        neg = extra & 1
        m = (1 << (nb - 1)) | (extra >> 1)
    d = -m if neg else m
    return (old + d) & mask


def extra_bits_for(sym: int, w: int, mode: int) -> int:
    if mode == MODE_RAW:
        return 8 * w - 8
    return 0 if sym < 16 else sym - 16 + 4


def max_symbol(w: int, mode: int) -> int:
    return 255 if mode == MODE_RAW else min(255, 16 + 8 * w - 4)


# ---------------------------------------------------------------------------------------------------------------------
# scan / encode / decode / scatter

def scan(old: torch.Tensor, new: torch.Tensor, w: int, mode: int):
    """Pass 1: (counts per 4096-element fine block [uint32], symbol histogram [uint64, 256], total changed)."""
    ov, nv = _unsigned(old, w), _unsigned(new, w)
    n = ov.numel()
    changed = ov != nv
    nblocks = -(-n // FINE_BLOCK)
    pad = nblocks * FINE_BLOCK - n
    c = torch.nn.functional.pad(changed.to(torch.int32), (0, pad)).reshape(nblocks, FINE_BLOCK).sum(1) \
        if nblocks else torch.zeros(0, dtype=torch.int32)
    hist = np.zeros(256, dtype=np.uint64)
    idx = changed.nonzero().reshape(-1)
    if idx.numel():
        sym, _, _ = symbols(ov[idx], nv[idx], w, mode)
        hist += np.bincount(sym.numpy(), minlength=256).astype(np.uint64)
    return c.numpy().astype(np.uint32), hist, int(idx.numel())


def _cum(freq) -> list[int]:
    cum, acc = [], 0
    for f in freq:
        cum.append(acc)
        acc += int(f)
    return cum


def _varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    """FORMAT.md 3: one canonical unsigned LEB128 from ``buf[pos:end)`` -> (value, position after it). A multi-byte
    varint whose last byte is 0 (a redundant zero group, e.g. 0x80 0x00 for 0) is refused, like a value >= 2^63 or a
    read past ``end`` (KernelError E_TABLE, as ss_decode's SS_ETABLE)."""
    v = shift = 0
    for i in range(10):
        if pos >= end:
            raise KernelError(E_TABLE, "varint runs past the end of the table")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            if v >= 1 << 63:
                raise KernelError(E_TABLE, "varint too large")
            if b == 0 and i > 0:
                raise KernelError(E_TABLE, "varint not in canonical form (redundant zero group)")
            return v, pos
        shift += 7
    raise KernelError(E_TABLE, "varint longer than 10 bytes")


def _rans_encode(syms: list[int], freq, cum) -> bytes:
    x = RANS_L
    emitted = bytearray()
    for s in reversed(syms):
        f, c = int(freq[s]), cum[s]
        x_max = ((RANS_L >> SCALE_BITS) << 8) * f
        while x >= x_max:
            emitted.append(x & 0xFF)
            x >>= 8
        x = ((x // f) << SCALE_BITS) + (x % f) + c
    emitted.reverse()
    return x.to_bytes(4, "little") + bytes(emitted)


class _BitWriter:
    def __init__(self):
        self.acc = 0
        self.nbits = 0

    def put(self, value: int, nbits: int) -> None:
        self.acc |= (value & ((1 << nbits) - 1)) << self.nbits
        self.nbits += nbits

    def getvalue(self) -> bytes:
        return self.acc.to_bytes((self.nbits + 7) // 8, "little")


def choose_k(gaps: torch.Tensor, log2c: int) -> int:
    n = gaps.numel()
    best, best_k = None, 0
    for k in range(log2c + 1):
        cost = n * (k + 1) + int((gaps >> k).sum())
        if best is None or cost < best:
            best, best_k = cost, k
    return best_k


def encode(old: torch.Tensor, new: torch.Tensor, w: int, mode: int, log2c: int, chunk_begin: int, chunk_end: int,
           freq, update_old: bool = False, nchanged_hint: int | None = None):
    """Pass 2 for one sparse segment: (table bytes, stream bytes, values_hash, nchanged). See ss_encode."""
    ov, nv = _unsigned(old, w), _unsigned(new, w)
    n = ov.numel()
    C = 1 << log2c
    start, end = chunk_begin * C, min(chunk_end * C, n)
    seg_changed = (ov[start:end] != nv[start:end]).nonzero().reshape(-1) + start
    cum = _cum(freq)
    table, data = bytearray(), bytearray()
    for c in range(chunk_begin, chunk_end):
        lo, hi = c * C, min((c + 1) * C, n)
        pos = seg_changed[(seg_changed >= lo) & (seg_changed < hi)]
        _varint(table, int(pos.numel()))
        if pos.numel() == 0:
            continue
        rel = pos - lo
        gaps = rel.clone()
        gaps[1:] = rel[1:] - rel[:-1] - 1
        k = choose_k(gaps, log2c)
        sym, extra, nextra = symbols(ov[pos], nv[pos], w, mode)
        syms = sym.tolist()
        if any(int(freq[s]) == 0 for s in syms):
            raise KernelError(E_RANS, "symbol with zero frequency")
        bw = _BitWriter()
        for g, e, ne in zip(gaps.tolist(), extra.tolist(), nextra.tolist()):
            q = g >> k
            bw.put((1 << q) - 1, q + 1)  # q ones then a zero
            bw.put(g, k)
            bw.put(e, ne)
        rans = _rans_encode(syms, freq, cum)
        bits = bw.getvalue()
        table.append(k)
        _varint(table, len(rans))
        _varint(table, len(bits))
        data += rans + bits
    vals = new.view(_INT_VIEW[w])[seg_changed].contiguous()
    vhash = tree64(vals.view(torch.uint8))
    if update_old and seg_changed.numel():
        old.view(_INT_VIEW[w])[seg_changed] = new.view(_INT_VIEW[w])[seg_changed]
    return bytes(table), bytes(data), vhash, int(seg_changed.numel())


class _BitReader:
    def __init__(self, buf: bytes):
        self.value = int.from_bytes(buf, "little")
        self.total = len(buf) * 8
        self.pos = 0

    def get(self, nbits: int) -> int:
        if self.pos + nbits > self.total:
            raise KernelError(E_STREAM, "bit stream overrun")
        v = (self.value >> self.pos) & ((1 << nbits) - 1)
        self.pos += nbits
        return v

    def unary(self, limit: int) -> int:
        rest = self.value >> self.pos
        q = 0
        while True:
            if self.pos + q >= self.total:
                raise KernelError(E_STREAM, "bit stream overrun in unary code")
            if not (rest >> q) & 1:
                break
            q += 1
            if q > limit:
                raise KernelError(E_POS, "unary code runs past the chunk")
        self.pos += q + 1
        return q


def _check_table_end(pos: int, table_len: int, data_pos: int, seg_len: int) -> None:
    """FORMAT.md 4.4: the chunk table is read exactly and its streams exactly fill the segment."""
    if pos != table_len:
        raise KernelError(E_TABLE, "table has trailing bytes")
    if data_pos != seg_len:
        raise KernelError(E_TABLE, "streams do not fill the segment")


def decode(seg, table_len: int, old: torch.Tensor, w: int, mode: int, log2c: int, chunk_begin: int, chunk_end: int,
           freq, nchanged: int, expected_hash: int, idx_out: torch.Tensor | None = None,
           val_out: torch.Tensor | None = None):
    """Decode one sparse segment, enforcing FORMAT.md 4.4. Returns (idx int64 [nchanged], vals uint8 [nchanged*w]),
    written into ``idx_out`` / ``val_out`` when given."""
    buf = bytes(memoryview(seg).cast("B"))
    ov = _unsigned(old, w)
    n = ov.numel()
    if not (12 <= log2c <= 30) or w not in _INT_VIEW or mode not in (0, 1, 2):
        raise KernelError(E_ARG, "bad arguments")
    deferred = mode == MODE_DELTA_DEFERRED
    if deferred:
        mode = MODE_DELTA
    C = 1 << log2c
    if chunk_begin < 0 or chunk_end < chunk_begin or (chunk_end > chunk_begin and (chunk_end - 1) * C >= n):
        raise KernelError(E_ARG, "chunk range outside the tensor")
    if table_len < 0 or table_len > len(buf):
        raise KernelError(E_TABLE, "table length outside the segment")
    freq = [int(f) for f in freq]
    if len(freq) != 256 or sum(freq) != SCALE:
        raise KernelError(E_RANS, "symbol table does not sum to 4096")
    if any(freq[s] for s in range(max_symbol(w, mode) + 1, 256)):
        raise KernelError(E_RANS, "symbol table has symbols above the maximum for this width and mode")
    cum = _cum(freq)
    slot_sym = []
    for s, f in enumerate(freq):
        slot_sym += [s] * f
    # parse the table
    entries, pos, data_pos, total = [], 0, table_len, 0
    for c in range(chunk_begin, chunk_end):
        cnt, pos = read_varint(buf, pos, table_len)
        clen = min((c + 1) * C, n) - c * C
        if cnt > clen:
            raise KernelError(E_TABLE, "more changes than chunk elements")
        if cnt == 0:
            entries.append((c, 0, 0, 0, 0, 0))
            continue
        if pos >= table_len:
            raise KernelError(E_TABLE, "table truncated")
        k = buf[pos]
        pos += 1
        if k > log2c:
            raise KernelError(E_TABLE, "rice parameter too large")
        rl, pos = read_varint(buf, pos, table_len)
        bl, pos = read_varint(buf, pos, table_len)
        entries.append((c, cnt, k, data_pos, rl, bl))
        data_pos += rl + bl
        if data_pos > len(buf):
            raise KernelError(E_TABLE, "streams run past the segment")
        total += cnt
    _check_table_end(pos, table_len, data_pos, len(buf))
    if total != nchanged:
        raise KernelError(E_COUNT, "chunk counts do not add up to nchanged")
    if idx_out is None:
        idx_out = torch.empty(nchanged, dtype=torch.int64)
    vals_out = []
    mask = (1 << (8 * w)) - 1
    o = 0
    for c, cnt, k, dp, rl, bl in entries:
        if cnt == 0:
            continue
        clen = min((c + 1) * C, n) - c * C
        rans = buf[dp: dp + rl]
        if rl < 4:
            raise KernelError(E_STREAM, "rANS stream shorter than its state")
        x = int.from_bytes(rans[:4], "little")
        rp = 4
        syms = []
        for _ in range(cnt):
            slot = x & (SCALE - 1)
            s = slot_sym[slot]
            x = freq[s] * (x >> SCALE_BITS) + slot - cum[s]
            while x < RANS_L:
                if rp >= rl:
                    raise KernelError(E_STREAM, "rANS stream overrun")
                x = (x << 8) | rans[rp]
                rp += 1
            syms.append(s)
        if x != RANS_L or rp != rl:
            raise KernelError(E_RANS, "rANS stream does not end in the initial state")
        br = _BitReader(buf[dp + rl: dp + rl + bl])
        p = -1
        base = c * C
        for s in syms:
            q = br.unary(clen >> k)
            g = (q << k) | br.get(k)
            p += g + 1
            if p >= clen:
                raise KernelError(E_POS, "position outside its chunk")
            e = br.get(extra_bits_for(s, w, mode))
            gi = base + p
            oldv = 0 if deferred else int(ov[gi]) & mask
            idx_out[o] = gi
            vals_out.append(_apply_symbol(oldv, s, e, w, mode))
            o += 1
        if (br.total - br.pos) >= 8 or (br.value >> br.pos) != 0:
            raise KernelError(E_STREAM, "bit stream not consumed exactly")
    raw = b"".join(v.to_bytes(w, "little") for v in vals_out)
    vals = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if not deferred and tree64(vals) != expected_hash:
        raise KernelError(E_HASH, "values_hash mismatch")
    if val_out is not None:
        val_out.copy_(vals)
        vals = val_out
    return idx_out, vals


def scatter(dst: torch.Tensor, w: int, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """dst[idx[i]] = vals[i] (w-byte elements); checks every index before writing anything."""
    view = dst.view(_INT_VIEW[w])
    n = view.numel()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise KernelError(E_POS, "scatter index out of range")
    view[idx] = (vals if vals.storage_offset() % w == 0 else vals.clone()).view(_INT_VIEW[w])  # any alignment


def add_scatter(dst: torch.Tensor, w: int, idx: torch.Tensor, d: torch.Tensor, new_out: torch.Tensor | None = None,
                negate: bool = False) -> None:
    """dst[idx[i]] += d[i] (or -=) modulo 2^(8w); new_out[i] receives the result. Checks indices before writing."""
    view = dst.view(_INT_VIEW[w])
    n = view.numel()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise KernelError(E_POS, "scatter index out of range")
    if new_out is not None and new_out.numel() != idx.numel() * w:
        raise KernelError(E_ARG, "new_out has the wrong size")
    dv = _unsigned(d if d.storage_offset() % w == 0 else d.clone(), w)
    cur = _unsigned(view.view(torch.uint8).view(_INT_VIEW[w])[idx].reshape(-1).view(torch.uint8), w) \
        if idx.numel() else torch.zeros(0, dtype=torch.int64)
    res = cur - dv if negate else cur + dv
    if w < 8:
        res = res & ((1 << (8 * w)) - 1)
        res = torch.where(res >= (1 << (8 * w - 1)), res - (1 << (8 * w)), res)
    res = res.to(_INT_VIEW[w])
    view[idx] = res
    if new_out is not None:
        new_out.view(_INT_VIEW[w])[:] = res


# =====================================================================================================================
# Format version 2 (FORMAT.md 6): spaces, classes and context coding. API: docs/notes/format2.md.

MAX_CLASSES = 32


def _space_locate(space, idx: torch.Tensor) -> torch.Tensor:
    """Tensor number of each space index (int64 tensor)."""
    offs = torch.from_numpy(np.asarray(space.offs, dtype=np.int64))
    return torch.searchsorted(offs, idx, right=True) - 1


def _elem_view(t: torch.Tensor, w: int) -> torch.Tensor:
    """Flat view of a contiguous tensor's elements as signed integers of width w (writes go to the tensor)."""
    from .dtypes import byte_view
    return byte_view(t).view(_INT_VIEW[w])


def _check_idx(space, idx: torch.Tensor) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= space.n):
        raise KernelError(E_POS, "space index out of range")


def _space_read(space, start: int, end: int) -> torch.Tensor:
    """Space elements [start, end) as a fresh uint8 tensor of (end-start)*w bytes."""
    w = space.w
    if end <= start:
        return torch.empty(0, dtype=torch.uint8)
    t0 = int(np.searchsorted(space.offs, start, side="right")) - 1
    t1 = int(np.searchsorted(space.offs, end - 1, side="right")) - 1
    parts = []
    for t in range(t0, t1 + 1):
        lo, hi = int(space.offs[t]), int(space.offs[t + 1])
        a, b = max(start, lo) - lo, min(end, hi) - lo
        parts.append(_elem_view(space.tensors[t], w)[a:b])
    return torch.cat(parts).view(torch.uint8).clone()


def _space_take(space, idx: torch.Tensor) -> torch.Tensor:
    """Values (int view of width w) at space indices idx, any order."""
    w = space.w
    out = torch.empty(idx.numel(), dtype=_INT_VIEW[w])
    if idx.numel() == 0:
        return out
    tid = _space_locate(space, idx)
    for t in torch.unique(tid).tolist():
        sel = (tid == t).nonzero().reshape(-1)
        out[sel] = _elem_view(space.tensors[t], w)[idx[sel] - int(space.offs[t])]
    return out


def _space_write(space, idx: torch.Tensor, vals: torch.Tensor, touched=None) -> None:
    """space[idx[i]] = vals[i] (vals: int view of width w); indices already checked."""
    w = space.w
    if idx.numel() == 0:
        return
    tid = _space_locate(space, idx)
    for t in torch.unique(tid).tolist():
        sel = (tid == t).nonzero().reshape(-1)
        _elem_view(space.tensors[t], w)[idx[sel] - int(space.offs[t])] = vals[sel]
        if touched is not None:
            touched[t] = 1


def _u8_as_int(vals, w: int, count: int) -> torch.Tensor:
    """A bytes-like or uint8 tensor of count*w bytes as an int tensor of width w (copy when misaligned)."""
    v = _as_u8(vals)
    if v.numel() != count * w:
        raise KernelError(E_ARG, "value buffer has the wrong size")
    if v.storage_offset() % w:
        v = v.clone()
    return v.contiguous().view(_INT_VIEW[w])


def keys_of(old_vals: torch.Tensor, w: int, kb: int) -> torch.Tensor:
    """FORMAT.md 6.3: key(x) = (x >> (B-1-kb)) & (2^kb - 1) of int64 bit patterns (from ``_unsigned``)."""
    if kb == 0:
        return torch.zeros_like(old_vals)
    return (old_vals >> (8 * w - 1 - kb)) & ((1 << kb) - 1)


def classes_of(old_vals: torch.Tensor, w: int, kb: int, cuts) -> torch.Tensor:
    """FORMAT.md 6.3: the class of each element = the number of cuts <= key(old)."""
    if not cuts:
        return torch.zeros(old_vals.numel(), dtype=torch.int64)
    keys = keys_of(old_vals, w, kb)
    return torch.bucketize(keys, torch.tensor(list(cuts), dtype=torch.int64), right=True)


def _check_cuts(cuts, kb: int) -> None:
    if len(cuts) + 1 > MAX_CLASSES:
        raise KernelError(E_ARG, "more than 32 classes")
    if cuts and kb == 0:
        raise KernelError(E_ARG, "cuts for a dtype without keys")
    prev = 0
    for c in cuts:
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c <= prev or c >= (1 << kb):
            raise KernelError(E_ARG, "cuts must be strictly increasing ints in [1, 2^kb)")
        prev = c


def positions_cap(n: int) -> int:
    """Most changed elements whose positions scan2(positions=True) returns for a space of n elements (else None)."""
    return n // 8 + 1024


def scan2(old, new, mode: int, positions: bool = False):
    """Pass 1 over a whole space: (counts per fine block [uint32], hist [keys x 256] uint64 of changed elements by
    (key of the OLD value, value symbol), keys [uint64] of ALL elements in fine blocks b % 16 == 0, total changed,
    pieces [int64]: changed elements per tensor of the space); with positions, a sixth entry: the space indices of
    the changed elements (ascending int64 tensor), or None when there are more than positions_cap(n)."""
    w, kb = old.w, old.kb
    if new.w != w or new.n != old.n or mode not in (0, 1, 2):
        raise KernelError(E_ARG, "bad arguments")
    if mode == MODE_DELTA_DEFERRED:
        mode = MODE_DELTA
    n = old.n
    ov, nv = _unsigned(_space_read(old, 0, n), w), _unsigned(_space_read(new, 0, n), w)
    changed = ov != nv
    nblocks = -(-n // FINE_BLOCK)
    pad = nblocks * FINE_BLOCK - n
    counts = torch.nn.functional.pad(changed.to(torch.int64), (0, pad)).reshape(nblocks, FINE_BLOCK).sum(1) \
        if nblocks else torch.zeros(0, dtype=torch.int64)
    nkeys = (1 << kb) if kb else 1
    keys = keys_of(ov, w, kb)
    idx = changed.nonzero().reshape(-1)
    hist = np.zeros((nkeys, 256), dtype=np.uint64)
    if idx.numel():
        sym, _, _ = symbols(ov[idx], nv[idx], w, mode)
        flat = np.bincount((keys[idx] * 256 + sym).numpy(), minlength=nkeys * 256)
        hist += flat.reshape(nkeys, 256).astype(np.uint64)
    sampled = (torch.arange(n, dtype=torch.int64) // FINE_BLOCK) % 16 == 0
    kcount = np.bincount(keys[sampled].numpy(), minlength=nkeys).astype(np.uint64)
    csum = np.concatenate([[0], np.cumsum(changed.numpy(), dtype=np.int64)])
    pieces = np.diff(csum[np.asarray(old.offs, dtype=np.int64)])
    out = counts.numpy().astype(np.uint32), hist, kcount, int(idx.numel()), pieces
    if not positions:
        return out
    return out + (idx if idx.numel() <= positions_cap(n) else None,)


def _pack_fields(value: torch.Tensor, length: torch.Tensor, unary: torch.Tensor) -> bytes:
    """The LSB-first bit stream of FORMAT.md 4.1 holding fields in order: a plain field writes the low ``length`` bits
    of ``value`` (least significant first); a unary field writes ``value`` one-bits then a zero-bit. Zero padded."""
    if value.numel() == 0:
        return b""
    nbits = torch.where(unary, value + 1, length)
    total = int(nbits.sum())
    if total == 0:
        return b""
    offs = torch.cumsum(nbits, 0) - nbits
    field = torch.repeat_interleave(torch.arange(value.numel()), nbits)
    j = torch.arange(total, dtype=torch.int64) - offs[field]
    v = value[field]
    bit = torch.where(unary[field], (j < v).to(torch.int64), (v >> j.clamp(max=63)) & 1)
    nbytes = (total + 7) // 8
    bit = torch.nn.functional.pad(bit, (0, nbytes * 8 - total)).reshape(nbytes, 8)
    packed = (bit << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)
    return packed.numpy().tobytes()


def _rans_encode_classes(syms: list[int], cls: list[int], freqs, cums) -> bytes:
    """FORMAT.md 4.3 / 6.4: rANS of symbols each coded with the table of its class."""
    x = RANS_L
    emitted = bytearray()
    for s, c in zip(reversed(syms), reversed(cls)):
        f, cu = int(freqs[c][s]), cums[c][s]
        x_max = ((RANS_L >> SCALE_BITS) << 8) * f
        while x >= x_max:
            emitted.append(x & 0xFF)
            x >>= 8
        x = ((x // f) << SCALE_BITS) + (x % f) + cu
    emitted.reverse()
    return x.to_bytes(4, "little") + bytes(emitted)


def encode2(old, new, mode: int, start: int, end: int, log2c: int, cuts, freqs, update_old: bool = False,
            nchanged_hint: int | None = None, positions: torch.Tensor | None = None):
    """Pass 2 for one sparse segment of FORMAT.md 6.4 over space elements [start, end):
    (table bytes, stream bytes, ks [K entries, None = class absent], values_hash, nchanged).
    ``positions`` (the changed elements of the range, from scan2) lets native kernels skip the diff; the reference
    ignores it (the result is the same)."""
    w, kb = old.w, old.kb
    cuts = [int(c) for c in cuts]
    if new.w != w or new.n != old.n or mode not in (MODE_DELTA, MODE_RAW) or not (12 <= log2c <= 30) \
            or not (0 <= start < end <= old.n):
        raise KernelError(E_ARG, "bad arguments")
    _check_cuts(cuts, kb)
    K = len(cuts) + 1
    freqs = np.asarray(freqs, dtype=np.int64).reshape(-1, 256)
    if freqs.shape[0] != K:
        raise KernelError(E_ARG, "freqs must have one row per class")
    C = 1 << log2c
    ov = _unsigned(_space_read(old, start, end), w)
    new_raw = _space_read(new, start, end).view(_INT_VIEW[w])
    nv = _unsigned(new_raw.view(torch.uint8), w)
    L = end - start
    cls = classes_of(ov, w, kb, cuts)                       # class of every element (from the OLD values)
    changed = (ov != nv).nonzero().reshape(-1)              # positions relative to start, ascending
    nchanged = int(changed.numel())
    chunk_of = torch.arange(L, dtype=torch.int64) >> log2c
    nchunks = -(-L // C)
    ccls = cls[changed]
    cchunk = chunk_of[changed]
    present = sorted(set(ccls.tolist()))
    ks: list = [None] * K
    sym, extra, nextra = symbols(ov[changed], nv[changed], w, mode)
    for c in present:
        row = freqs[c]
        if row.sum() != SCALE or (row < 0).any():
            raise KernelError(E_RANS, "symbol table does not sum to 4096")
    if nchanged and (torch.from_numpy(freqs)[ccls, sym] == 0).any():
        raise KernelError(E_RANS, "symbol with zero frequency in its class's table")
    # rank of every element inside its (chunk, class) subsequence, and the size of every subsequence
    group = chunk_of * K + cls
    gcount = torch.bincount(group, minlength=nchunks * K)
    order = torch.sort(group, stable=True).indices
    gstart = torch.cumsum(gcount, 0) - gcount
    rank = torch.empty(L, dtype=torch.int64)
    rank[order] = torch.arange(L, dtype=torch.int64) - gstart[group[order]]
    crank, cgroup = rank[changed], group[changed]
    # per changed element: the gap coded after it (the next later gap of its class, or the final gap)
    corder = torch.sort(cgroup, stable=True).indices      # changes grouped by (chunk, class), in position order
    g_sorted, r_sorted = cgroup[corder], crank[corder]
    same_next = torch.zeros_like(g_sorted, dtype=torch.bool)
    same_next[:-1] = g_sorted[1:] == g_sorted[:-1]
    nxt = torch.where(same_next, torch.roll(r_sorted, -1), gcount[g_sorted]) - r_sorted - 1
    next_gap = torch.empty_like(crank)
    next_gap[corder] = nxt
    # first gap of every (chunk, class): rank of the first change, or the whole subsequence when none changed
    first_gap = gcount.clone()
    is_first = torch.ones_like(g_sorted, dtype=torch.bool)
    is_first[1:] = g_sorted[1:] != g_sorted[:-1]
    first_gap[g_sorted[is_first]] = r_sorted[is_first]
    n_per_chunk = torch.bincount(cchunk, minlength=nchunks)
    active = (n_per_chunk > 0).nonzero().reshape(-1)       # chunks with n > 0 code gaps
    # Rice parameter per present class over every gap coded for it in the segment
    for c in present:
        gaps = torch.cat([first_gap.reshape(nchunks, K)[active, c], next_gap[ccls == c]])
        ks[c] = choose_k(gaps, log2c)
    kt = torch.tensor([k if k is not None else 0 for k in ks], dtype=torch.int64)
    cums = [_cum(freqs[c]) if ks[c] is not None else None for c in range(K)]
    ptab = torch.tensor(present, dtype=torch.int64)
    table, data = bytearray(), bytearray()
    lo = 0
    for j in range(nchunks):
        n = int(n_per_chunk[j])
        _varint(table, n)
        if n == 0:
            continue
        sl = slice(lo, lo + n)
        lo += n
        fg = first_gap.reshape(nchunks, K)[j, ptab]
        fk = kt[ptab]
        ek = kt[ccls[sl]]
        eg = next_gap[sl]
        zero = torch.zeros_like(fg)
        # fields: first gaps (unary q, low k bits) of the present classes; then per change: extra, unary q, low k
        head = torch.stack([fg >> fk, fg & ((1 << fk) - 1)], 1)
        head_len = torch.stack([zero, fk], 1)
        head_un = torch.stack([torch.ones_like(fg, dtype=torch.bool), torch.zeros_like(fg, dtype=torch.bool)], 1)
        body = torch.stack([extra[sl], eg >> ek, eg & ((1 << ek) - 1)], 1)
        body_len = torch.stack([nextra[sl], torch.zeros_like(eg), ek], 1)
        ones = torch.ones_like(eg, dtype=torch.bool)
        body_un = torch.stack([~ones, ones, ~ones], 1)
        bits = _pack_fields(torch.cat([head.reshape(-1), body.reshape(-1)]),
                            torch.cat([head_len.reshape(-1), body_len.reshape(-1)]),
                            torch.cat([head_un.reshape(-1), body_un.reshape(-1)]))
        rans = _rans_encode_classes(sym[sl].tolist(), ccls[sl].tolist(), freqs, cums)
        _varint(table, len(rans))
        _varint(table, len(bits))
        data += rans + bits
    newvals = new_raw[changed]
    vhash = tree64(newvals.contiguous().view(torch.uint8))
    if update_old and nchanged:
        _space_write(old, changed + start, newvals)
    return bytes(table), bytes(data), ks, vhash, nchanged


class _BitReader2:
    """LSB-first bit reader over a bytes object, reading only the bytes it needs."""

    def __init__(self, buf: bytes):
        self.buf = buf
        self.total = len(buf) * 8
        self.pos = 0

    def get(self, nbits: int) -> int:
        if nbits == 0:
            return 0
        if self.pos + nbits > self.total:
            raise KernelError(E_STREAM, "bit stream overrun")
        b0 = self.pos >> 3
        b1 = (self.pos + nbits + 7) >> 3
        v = (int.from_bytes(self.buf[b0:b1], "little") >> (self.pos & 7)) & ((1 << nbits) - 1)
        self.pos += nbits
        return v

    def unary(self, limit: int) -> int:
        """Count one-bits up to the next zero-bit (consumed); more than ``limit`` ones -> E_POS."""
        q = 0
        while True:
            if self.pos >= self.total:
                raise KernelError(E_STREAM, "bit stream overrun in unary code")
            byte = self.buf[self.pos >> 3] >> (self.pos & 7)
            avail = 8 - (self.pos & 7)
            ones = (~byte & (byte + 1)).bit_length() - 1   # trailing one-bits of byte
            if ones < avail:
                q += ones
                self.pos += ones + 1
                if q > limit:
                    raise KernelError(E_POS, "gap runs past the end of its chunk")
                return q
            q += avail
            self.pos += avail
            if q > limit:
                raise KernelError(E_POS, "gap runs past the end of its chunk")

    def finish(self) -> None:
        if self.total - self.pos >= 8 or (self.pos < self.total and self.get(self.total - self.pos) != 0):
            raise KernelError(E_STREAM, "bit stream not consumed exactly")


def decode2(seg, table_len: int, old, mode: int, start: int, end: int, log2c: int, cuts, ks, freqs, nchanged: int,
            expected_hash: int, idx_out: torch.Tensor | None = None, val_out: torch.Tensor | None = None):
    """Decode one sparse segment of FORMAT.md 6.4, enforcing 4.4 and 6.5. Returns (idx int64 space indices in position
    order, vals uint8 nchanged*w: new bit patterns, or the differences d in mode 2)."""
    buf = bytes(memoryview(seg).cast("B")) if not isinstance(seg, torch.Tensor) else bytes(seg.numpy())
    w, kb = old.w, old.kb
    cuts = [int(c) for c in cuts]
    if mode not in (0, 1, 2) or not (12 <= log2c <= 30) or not (0 <= start < end <= old.n):
        raise KernelError(E_ARG, "bad arguments")
    _check_cuts(cuts, kb)
    K = len(cuts) + 1
    freqs = np.asarray(freqs, dtype=np.int64).reshape(-1, 256)
    if len(ks) != K:
        raise KernelError(E_ARG, "ks must have one entry per class")
    if freqs.shape[0] != K:
        raise KernelError(E_RANS, "freqs must have one table per class")
    deferred = mode == MODE_DELTA_DEFERRED
    vmode = MODE_DELTA if deferred else mode
    present = [c for c in range(K) if ks[c] is not None]
    maxsym = max_symbol(w, vmode)
    slot_sym, cums, fl = {}, {}, {}
    for c in present:           # class by class: k, then its table
        if not 0 <= int(ks[c]) <= log2c:
            raise KernelError(E_TABLE, "rice parameter too large")
        row = [int(f) for f in freqs[c]]
        if sum(row) != SCALE or any(f < 0 for f in row) or any(row[s] for s in range(maxsym + 1, 256)):
            raise KernelError(E_RANS, "invalid symbol table")
        fl[c] = row
        cums[c] = _cum(row)
        ss = []
        for s, f in enumerate(row):
            ss += [s] * f
        slot_sym[c] = ss
    if not present:
        raise KernelError(E_TABLE, "no class is present")
    L = end - start
    C = 1 << log2c
    nchunks = -(-L // C)
    if not (0 <= table_len <= len(buf)):
        raise KernelError(E_TABLE, "table length outside the segment")
    # chunk table
    entries, pos, data_pos, total = [], 0, table_len, 0
    for j in range(nchunks):
        cnt, pos = read_varint(buf, pos, table_len)
        clen = min(C, L - j * C)
        if cnt > clen:
            raise KernelError(E_TABLE, "more changes than chunk elements")
        if cnt == 0:
            continue
        rl, pos = read_varint(buf, pos, table_len)
        bl, pos = read_varint(buf, pos, table_len)
        entries.append((j, cnt, data_pos, rl, bl))
        data_pos += rl + bl
        if data_pos > len(buf):
            raise KernelError(E_TABLE, "streams run past the segment")
        total += cnt
    _check_table_end(pos, table_len, data_pos, len(buf))
    if nchanged < 1 or total != nchanged:
        raise KernelError(E_COUNT, "chunk counts do not add up to nchanged (or nchanged < 1)")
    need_old = bool(cuts) or vmode == MODE_DELTA and not deferred
    ov = _unsigned(_space_read(old, start, end), w) if need_old else None
    cls = classes_of(ov, w, kb, cuts) if cuts else None
    mask = (1 << (8 * w)) - 1
    out_idx: list[int] = []
    out_val: list[int] = []
    for j, cnt, dp, rl, bl in entries:
        lo = j * C
        clen = min(C, L - lo)
        # positions (relative to the chunk) of every class's elements
        if cuts:
            ccls = cls[lo:lo + clen]
            members = {c: (ccls == c).nonzero().reshape(-1).tolist() for c in present}
        else:
            members = {0: range(clen)}
        rans = buf[dp:dp + rl]
        if rl < 4:
            raise KernelError(E_STREAM, "rANS stream shorter than its state")
        x = int.from_bytes(rans[:4], "little")
        rp = 4
        br = _BitReader2(buf[dp + rl:dp + rl + bl])
        # s_c of the spec as a pointer: the class-c member index of the next changed element. A gap past the chunk's
        # end is reported when the chunk ends (as the spec's walk finds it: s_c > 0 at the end), after every read.
        ptr = {}
        for c in present:
            k = int(ks[c])
            ptr[c] = (br.unary(clen >> k) << k) | br.get(k)
        heap = [(members[c][ptr[c]], c) for c in present if ptr[c] < len(members[c])]
        heapq.heapify(heap)
        done = 0
        while heap:
            p, c = heapq.heappop(heap)
            if done == cnt:
                raise KernelError(E_COUNT, "more changed elements in the chunk than its count")
            done += 1
            row = fl[c]
            slot = x & (SCALE - 1)
            s = slot_sym[c][slot]
            x = row[s] * (x >> SCALE_BITS) + slot - cums[c][s]
            while x < RANS_L:
                if rp >= rl:
                    raise KernelError(E_STREAM, "rANS stream overrun")
                x = (x << 8) | rans[rp]
                rp += 1
            e = br.get(extra_bits_for(s, w, vmode))
            k = int(ks[c])
            g = (br.unary(clen >> k) << k) | br.get(k)
            nptr = ptr[c] + 1 + g
            ptr[c] = nptr
            if nptr < len(members[c]):
                heapq.heappush(heap, (members[c][nptr], c))
            rel = lo + p
            oldv = 0 if deferred or ov is None else int(ov[rel]) & mask
            out_idx.append(start + rel)
            out_val.append(_apply_symbol(oldv, s, e, w, vmode))
        if any(ptr[c] > len(members[c]) for c in present):
            raise KernelError(E_POS, "gap runs past the end of its chunk")
        if done != cnt:
            raise KernelError(E_COUNT, "fewer changed elements in the chunk than its count")
        if x != RANS_L or rp != rl:
            raise KernelError(E_RANS, "rANS stream does not end in the initial state")
        br.finish()
    raw = b"".join(v.to_bytes(w, "little") for v in out_val)
    vals = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if not deferred and tree64(vals) != (expected_hash & MASK64):
        raise KernelError(E_HASH, "values_hash mismatch")
    idx = torch.tensor(out_idx, dtype=torch.int64)
    if idx_out is not None:
        if idx_out.numel() != nchanged:
            raise KernelError(E_ARG, "idx_out has the wrong size")
        idx_out.copy_(idx)
        idx = idx_out
    if val_out is not None:
        if val_out.numel() != nchanged * w:
            raise KernelError(E_ARG, "val_out has the wrong size")
        val_out.copy_(vals)
        vals = val_out
    return idx, vals


def scatter2(dst, idx: torch.Tensor, vals, touched=None) -> None:
    """dst[idx[i]] = vals[i] over a space; every index is checked before anything is written."""
    _check_idx(dst, idx)
    _space_write(dst, idx, _u8_as_int(vals, dst.w, idx.numel()), touched)


def add_scatter2(dst, idx: torch.Tensor, d, new_out: torch.Tensor | None = None, negate: bool = False,
                 touched=None) -> None:
    """dst[idx[i]] += d[i] (or -= with negate) modulo 2^(8w); new_out[i] receives the result."""
    w = dst.w
    _check_idx(dst, idx)
    if new_out is not None and new_out.numel() != idx.numel() * w:
        raise KernelError(E_ARG, "new_out has the wrong size")
    dv = _u8_as_int(d, w, idx.numel())
    cur = _space_take(dst, idx).to(torch.int64)
    res = (cur - dv.to(torch.int64)) if negate else (cur + dv.to(torch.int64))   # int64 wraps modulo 2^64
    if w < 8:
        res = res & ((1 << (8 * w)) - 1)
        res = torch.where(res >= (1 << (8 * w - 1)), res - (1 << (8 * w)), res)
    res = res.to(_INT_VIEW[w])
    _space_write(dst, idx, res, touched)
    if new_out is not None:
        new_out.view(_INT_VIEW[w])[:] = res


def gather2(src, start: int, end: int) -> torch.Tensor:
    """Space elements [start, end) as a fresh uint8 tensor."""
    if not (0 <= start <= end <= src.n):
        raise KernelError(E_ARG, "range outside the space")
    return _space_read(src, start, end)


def put2(dst, start: int, end: int, data, touched=None) -> None:
    """Space elements [start, end) = data ((end-start)*w bytes)."""
    if not (0 <= start <= end <= dst.n):
        raise KernelError(E_ARG, "range outside the space")
    w = dst.w
    vals = _u8_as_int(data, w, end - start)
    if end == start:
        return
    t0 = int(np.searchsorted(dst.offs, start, side="right")) - 1
    t1 = int(np.searchsorted(dst.offs, end - 1, side="right")) - 1
    for t in range(t0, t1 + 1):
        lo, hi = int(dst.offs[t]), int(dst.offs[t + 1])
        a, b = max(start, lo), min(end, hi)
        _elem_view(dst.tensors[t], w)[a - lo:b - lo] = vals[a - start:b - start]
        if touched is not None:
            touched[t] = 1


def take2(src, idx: torch.Tensor) -> torch.Tensor:
    """The current values at space indices idx (count*w bytes), e.g. for undo."""
    _check_idx(src, idx)
    return _space_take(src, idx).contiguous().view(torch.uint8)


def tree64_many(tensors, ptrs=None, nbytes=None) -> np.ndarray:
    """tree64 (FORMAT.md 1.2) of each tensor's bytes. ``ptrs`` / ``nbytes`` (the tensors' addresses and byte counts,
    which a caller may pass to spare the native kernel recomputing them) are not needed here."""
    from .dtypes import byte_view
    return np.array([tree64(byte_view(t.contiguous()) if t.numel() else torch.empty(0, dtype=torch.uint8))
                     for t in tensors], dtype=np.uint64)
