"""Pure-PyTorch reference of every native kernel (csrc/sparsesync.h), following docs/FORMAT.md.

Each function here has the same inputs and outputs as its native twin in ``sparsesync._native``; the tests run both on
the same data and compare bit for bit. They are also the fallback when the native library is missing: correct, slow.

Buffers are flat ``torch.uint8`` tensors holding ``n * w`` bytes of bit patterns (``w`` = element width in bytes).
"""
from __future__ import annotations

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
    if pos != table_len:
        raise KernelError(E_TABLE, "table has trailing bytes")
    if data_pos != len(buf):
        raise KernelError(E_TABLE, "streams do not fill the segment")
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
