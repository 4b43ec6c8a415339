"""The host/device per-chunk coders (csrc/ss_hd.h, run over a segment by csrc/chunk_hd.cpp: ss2_hd_encode /
ss2_hd_decode) against the optimized CPU kernels (csrc/format2.cpp: ss2_encode / ss2_decode).

The CUDA kernels (csrc/chunk_hd_device.cu) run the very same ss_hd.h functions, one thread per chunk, so these CPU
tests check the logic the GPU runs: for the same segment and plan the hd encoder writes exactly the bytes (Rice
parameters, values hash, count) of ss2_encode, the hd decoder returns exactly what ss2_decode returns, malformed
segments get the same verdict (and error code) from both without crashes, and tree64 through the shared leaf hash
equals tree64.

Skipped (with the reason) when the loaded library predates the ss2_hd_* symbols, so an old build never fails CI.
"""
from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from sparsesync import _native, reference
from sparsesync.reference import KernelError
from sparsesync.space import KEY_BITS, Space
from spacegen import INT_OF_WIDTH, sizes, spaces
from spacegen import class_freqs as _class_freqs
from spacegen import cuts_for as _cuts_for
from spacegen import varint as _varint
from spacegen import ints as _ints
from spacegen import random_values as _random_values
from spacegen import width as _width

pytestmark = [
    pytest.mark.skipif(not _native.available, reason=f"native library not available: {_native.load_error}"),
    pytest.mark.skipif(_native.available and not _native.hd_available(),
                       reason=f"no host/device coders in the loaded library: {getattr(_native, 'hd_load_error', '')}"),
]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
          "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8": torch.int8,
          "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8}
# (exponent bits, mantissa bits) of the float dtypes: for NaN payloads, infinities and signed zeros
FLOAT_FIELDS = {"bfloat16": (8, 7), "float16": (5, 10), "float32": (8, 23), "float64": (11, 52),
                "float8_e4m3fn": (4, 3), "float8_e5m2": (5, 2)}
DENSITIES = [0.0001, 0.001, 0.01, 0.05, 0.2, 0.5]


# ---------------------------------------------------------------------------------------------------------------------
# data

def _signed(v: int, w: int) -> int:
    v &= (1 << (8 * w)) - 1
    return v - (1 << (8 * w)) if v >= 1 << (8 * w - 1) else v


def _special_patterns(dtype_name: str, rng: random.Random, count: int) -> list[int]:
    """Bit patterns of NaNs with random payloads, +-inf and +-0.0 (floats), or extreme integers."""
    w = _width(DTYPES[dtype_name])
    B = 8 * w
    out = []
    for _ in range(count):
        sign = rng.getrandbits(1) << (B - 1)
        if dtype_name in FLOAT_FIELDS:
            e, m = FLOAT_FIELDS[dtype_name]
            top = ((1 << e) - 1) << m
            kind = rng.randrange(3)
            if kind == 0:
                out.append(sign | top | rng.randrange(1, 1 << m))  # NaN payload
            elif kind == 1:
                out.append(sign | top)  # inf (a NaN for e4m3fn, whose max exponent holds numbers)
            else:
                out.append(sign)  # +-0.0
        else:
            out.append(rng.choice([0, 1, (1 << B) - 1, 1 << (B - 1), (1 << (B - 1)) - 1]))
    return [_signed(v, w) for v in out]


def _sizes(n_total: int, rng: random.Random, small: bool) -> list[int]:
    return sizes(n_total, rng, small, (1, 1, 2, 3, 63, 64, 65, 100, 4095, 4096, 4097, 700))


def _spaces(dtype_name: str, sizes: list[int], density: float, seed: int, specials: bool = True):
    old, new = spaces(dtype_name, DTYPES[dtype_name], sizes, density, seed)
    rng = random.Random(seed)
    if specials:  # special patterns in old, in new, and changes between two of them (e.g. NaN payload changes)
        for o, nw in zip(old.tensors, new.tensors):
            io, inw = _ints(o), _ints(nw)
            cnt = max(1, int(o.numel() * min(density, 0.05)))
            for _ in range(cnt if rng.random() < 0.5 else 0):
                i = rng.randrange(o.numel())
                a, b = _special_patterns(dtype_name, rng, 2)
                r = rng.randrange(3)
                if r == 0:
                    io[i] = a  # old special, new keeps what mutate gave (or the same special: unchanged)
                elif r == 1:
                    inw[i] = b
                else:
                    io[i], inw[i] = a, b
    return old, new


def _changed(old: Space, new: Space, start: int, end: int) -> torch.Tensor:
    ov = old.flat().view(INT_OF_WIDTH[old.w])
    nv = new.flat().view(INT_OF_WIDTH[new.w])
    return (ov[start:end] != nv[start:end]).nonzero().reshape(-1) + start


def _outcome(fn, *args, **kw):
    """("ok", comparable result) or ("err", code)."""
    try:
        r = fn(*args, **kw)
    except KernelError as exc:
        return "err", exc.code
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], torch.Tensor):
        return "ok", (r[0].tolist(), bytes(r[1].numpy().tobytes()))
    return "ok", r


# ---------------------------------------------------------------------------------------------------------------------
# encode / decode agreement

def _compare_segment(old: Space, new: Space, mode: int, start: int, end: int, log2c: int, cuts, freqs,
                     use_positions: bool) -> int:
    """Asserts agreement on one segment; returns the number of changes."""
    pos = _changed(old, new, start, end) if use_positions else None
    want = _native.encode2(old, new, mode, start, end, log2c, cuts, freqs, positions=pos)
    got = _native.hd_encode2(old, new, mode, start, end, log2c, cuts, freqs, positions=pos)
    assert got == want, (old.dtype, mode, start, end, log2c, cuts)
    table, data, ks, vh, nch = want
    if nch == 0:
        return 0
    seg = table + data
    for dmode in ([mode, 2] if mode == 0 else [mode]):
        a = _native.decode2(seg, len(table), old, dmode, start, end, log2c, cuts, ks, freqs, nch, vh)
        b = _native.hd_decode2(seg, len(table), old, dmode, start, end, log2c, cuts, ks, freqs, nch, vh)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])
    return nch


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", [0, 1])
def test_hd_matches_native(dtype_name, mode):
    rng = random.Random(zlib.crc32(f"{dtype_name}/{mode}".encode()))
    kb = KEY_BITS.get(dtype_name, 0)
    cases = 0
    for trial in range(6):
        density = DENSITIES[trial % len(DENSITIES)]
        small = trial % 2 == 0
        old, new = _spaces(dtype_name, _sizes(rng.randint(9000, 30000), rng, small), density, rng.randint(0, 10**6))
        _counts, hist, _keys, _total, _pieces = _native.scan2(old, new, mode)
        for K in ([1, 2, 5, 32] if kb else [1]):
            cuts = _cuts_for(kb, rng, K)
            freqs = _class_freqs(hist, cuts)
            log2c = rng.choice([12, 12, 13, 14])
            r = rng.random()
            if r < 0.15:  # a short segment (possibly one element)
                start = rng.randrange(old.n)
                end = min(old.n, start + rng.choice([1, 2, 5, 4097]))
            else:
                start = rng.randint(0, min(5000, old.n - 1))
                end = max(start + 1, old.n - rng.randint(0, 3000))
            _compare_segment(old, new, mode, start, end, log2c, cuts, freqs, use_positions=trial % 3 == 1)
            cases += 1
    assert cases >= 6


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "float8_e4m3fn", "int32"])
def test_chunk_boundaries_and_empty_chunks(dtype_name):
    """Changes exactly at the first and last element of chunks, runs of empty chunks, a last chunk of one element."""
    kb = KEY_BITS.get(dtype_name, 0)
    C = 1 << 12
    n = 9 * C + 1
    dt = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(1)
    o = _random_values(n, dt, g)
    nw = o.clone()
    iv = _ints(nw)
    for i in [0, C - 1, C, 2 * C - 1, 5 * C, 5 * C + 1, 9 * C - 1, 9 * C]:  # chunks 3, 4, 6, 7 stay empty
        iv[i] = iv[i] + 1 if int(iv[i]) != (1 << (8 * _width(dt) - 1)) - 1 else 0
    old, new = Space(dtype_name, ["a"], [o]), Space(dtype_name, ["a"], [nw])
    rng = random.Random(2)
    for mode in (0, 1):
        _c, hist, _k, total, _p = _native.scan2(old, new, mode)
        assert total == 8
        for K in ([1, 3, 32] if kb else [1]):
            cuts = _cuts_for(kb, rng, K)
            freqs = _class_freqs(hist, cuts)
            for start, end in [(0, n), (1, n), (0, n - 1), (C - 1, 2 * C + 1), (3 * C, 5 * C), (n - 1, n)]:
                for pos in (False, True):
                    _compare_segment(old, new, mode, start, end, 12, cuts, freqs, use_positions=pos)


def test_single_element_tensors_and_no_change():
    rng = random.Random(4)
    for dtype_name in ["bfloat16", "float64", "uint8", "int64"]:
        kb = KEY_BITS.get(dtype_name, 0)
        old, new = _spaces(dtype_name, [1] * 300, 0.3, 5)
        _c, hist, _k, _t, _p = _native.scan2(old, new, 0)
        cuts = _cuts_for(kb, rng, 4)
        freqs = _class_freqs(hist, cuts)
        for start, end in [(0, 300), (7, 8), (299, 300)]:
            for mode in (0, 1):
                _c, hist, _k, _t, _p = _native.scan2(old, new, mode)
                _compare_segment(old, new, mode, start, end, 12, cuts, _class_freqs(hist, cuts), rng.random() < 0.5)
        # no change at all: an all-zero chunk table, no streams, every class absent
        same = Space(dtype_name, old.names, [t.clone() for t in old.tensors])
        for use_pos in (False, True):
            assert _compare_segment(old, same, 0, 0, 300, 12, cuts, freqs, use_pos) == 0


def test_encoder_errors_agree():
    rng = random.Random(6)
    old, new = _spaces("bfloat16", _sizes(20000, rng, small=True), 0.02, 6)
    _c, hist, _k, _t, _p = _native.scan2(old, new, 0)
    cuts = [118, 124, 127]
    freqs = _class_freqs(hist, cuts)
    pos = _changed(old, new, 0, old.n)
    bad = freqs.copy()
    c = int(np.nonzero(bad.sum(1))[0][0])
    bad[c, int(np.argmax(bad[c]))] = 0
    unchanged = int(next(i for i in range(old.n) if i not in set(pos.tolist())))
    cases = [
        dict(freqs=bad),                                                   # a used symbol without frequency
        dict(positions=torch.sort(torch.cat([pos, torch.tensor([unchanged])])).values),  # an unchanged position
        dict(positions=pos.flip(0)),                                       # not increasing
        dict(positions=torch.cat([pos, pos[-1:]])),                        # repeated
        dict(cuts=[5, 5], freqs=np.zeros((3, 256), np.uint32)),            # bad cuts
        dict(cuts=[256], freqs=np.zeros((2, 256), np.uint32)),
        dict(positions=pos, start=int(pos[3]) + 1),                        # positions before start
    ]
    for kw in cases:
        args = dict(start=0, end=old.n, cuts=cuts, freqs=freqs)
        args.update(kw)
        a = _outcome(_native.encode2, old, new, 0, args["start"], args["end"], 12, args["cuts"], args["freqs"],
                     positions=args.get("positions"))
        b = _outcome(_native.hd_encode2, old, new, 0, args["start"], args["end"], 12, args["cuts"], args["freqs"],
                     positions=args.get("positions"))
        assert a == b and a[0] == "err", kw
    # update_old and a too small hint (the wrapper retries with the reported sizes)
    o1 = Space("bfloat16", old.names, [t.clone() for t in old.tensors])
    o2 = Space("bfloat16", old.names, [t.clone() for t in old.tensors])
    r1 = _native.encode2(o1, new, 0, 100, old.n, 12, cuts, freqs, update_old=True, nchanged_hint=1)
    r2 = _native.hd_encode2(o2, new, 0, 100, old.n, 12, cuts, freqs, update_old=True, nchanged_hint=1)
    assert r1 == r2
    assert torch.equal(o1.flat(), o2.flat())
    assert not torch.equal(o1.flat(), old.flat())


# ---------------------------------------------------------------------------------------------------------------------
# malformed segments: the same verdict (and result) from both decoders, never a crash

def _mutations(seg: bytes, table_len: int, rng: random.Random, count: int):
    """(segment bytes, table_len) variants: truncations, bit flips, byte changes, insertions, deletions."""
    n = len(seg)
    for _ in range(count):
        r = rng.random()
        b = bytearray(seg)
        tl = table_len
        if r < 0.15:
            b = b[:rng.randrange(n)]
            tl = min(tl, len(b)) if rng.random() < 0.5 else tl
        elif r < 0.55:
            for _ in range(rng.choice([1, 1, 2, 3])):
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
        elif r < 0.7:
            i = rng.randrange(n)
            b[i] = rng.randrange(256)
        elif r < 0.8:
            i = rng.randrange(n + 1)
            b[i:i] = bytes([rng.randrange(256)])
            if i < tl and rng.random() < 0.5:
                tl += 1
        elif r < 0.9:
            i = rng.randrange(n)
            del b[i]
            if i < tl and rng.random() < 0.5:
                tl -= 1
        else:  # flips in the tail (bit streams) only
            i = rng.randrange(max(table_len, n - 16), n)
            b[i] ^= 1 << rng.randrange(8)
        yield bytes(b), tl


def _parse(seg: bytes, table_len: int, nch: int):
    """[n, rans, bits] per chunk of a valid segment."""
    pos, dp, out = 0, table_len, []
    for _ in range(nch):
        n, pos = reference.read_varint(seg, pos, table_len)
        if not n:
            out.append([0, b"", b""])
            continue
        rl, pos = reference.read_varint(seg, pos, table_len)
        bl, pos = reference.read_varint(seg, pos, table_len)
        out.append([n, seg[dp:dp + rl], seg[dp + rl:dp + rl + bl]])
        dp += rl + bl
    assert pos == table_len and dp == len(seg)
    return out


def _build(chunks, pad: int | None = None) -> tuple[bytes, int]:
    """Segment bytes and table_len from [n, rans, bits] entries; pad = index of one n coded non-canonically."""
    table, data = bytearray(), bytearray()
    for j, (n, r, b) in enumerate(chunks):
        v = _varint(n)
        if j == pad:  # a redundant zero group
            v = bytes(v[:-1]) + bytes([v[-1] | 0x80, 0])
        table += v
        if n:
            table += _varint(len(r)) + _varint(len(b))
            data += r + b
    return bytes(table + data), len(table)


def _structured(seg: bytes, table_len: int, nch: int, rng: random.Random, count: int):
    """Targeted damage that random byte changes rarely produce, with a consistent chunk table: a rANS stream or a bit
    stream one byte longer (zero or random), a nonzero padding bit, a non-canonical varint, one change moved from one
    chunk's count to another's, two chunks' streams swapped. Yields (segment, table_len, nchanged delta)."""
    base = _parse(seg, table_len, nch)
    nz = [j for j, c in enumerate(base) if c[0]]
    for _ in range(count):
        ch = [list(c) for c in base]
        j = rng.choice(nz)
        r = rng.randrange(8)
        dn, pad = 0, None
        if r == 0:
            ch[j][1] += bytes([rng.choice([0, rng.randrange(256)])])
        elif r == 1:
            ch[j][2] += bytes([rng.choice([0, rng.randrange(256)])])
        elif r == 2 and ch[j][2]:
            b = bytearray(ch[j][2])
            b[-1] |= 0x80 >> rng.randrange(3)
            ch[j][2] = bytes(b)
        elif r == 3:
            pad = rng.randrange(len(ch))
        elif r == 4:  # n +- 1 in one chunk (nchanged follows)
            dn = rng.choice([-1, 1])
            if ch[j][0] + dn == 0:
                dn = 1
            ch[j][0] += dn
        elif r == 5 and len(nz) > 1:  # one change moved between chunks (nchanged unchanged)
            a, b2 = rng.sample(nz, 2)
            if ch[a][0] > 1:
                ch[a][0] -= 1
                ch[b2][0] += 1
        elif r == 6 and len(nz) > 1:
            a, b2 = rng.sample(nz, 2)
            ch[a][1:], ch[b2][1:] = ch[b2][1:], ch[a][1:]
        else:  # the bit stream one byte shorter or one zero byte longer at the rANS end
            if len(ch[j][2]) > 1 and rng.random() < 0.5:
                ch[j][2] = ch[j][2][:-1]
            else:
                ch[j][1] = ch[j][1][:4] + b"\x00" + ch[j][1][4:]
        s, tl = _build(ch, pad)
        yield s, tl, dn


@pytest.mark.parametrize("dtype_name,K", [("bfloat16", 1), ("bfloat16", 5), ("float32", 32), ("float16", 3),
                                           ("int16", 1), ("uint8", 1), ("float64", 4), ("float8_e5m2", 6)])
def test_malformed_segments_same_verdict(dtype_name, K):
    rng = random.Random(zlib.crc32(f"{dtype_name}/{K}".encode()))
    kb = KEY_BITS.get(dtype_name, 0)
    old, new = _spaces(dtype_name, _sizes(rng.randint(9000, 14000), rng, small=True), rng.choice([0.003, 0.02, 0.1]),
                       rng.randint(0, 10**6))
    checked = refused = 0
    for mode in (0, 1):
        _c, hist, _k, _t, _p = _native.scan2(old, new, mode)
        cuts = _cuts_for(kb, rng, K)
        freqs = _class_freqs(hist, cuts)
        start, end = rng.randint(0, 100), old.n - rng.randint(0, 100)
        table, data, ks, vh, nch = _native.encode2(old, new, mode, start, end, 12, cuts, freqs)
        assert nch > 0
        seg = table + data
        for dmode in ([0, 2] if mode == 0 else [1]):
            variants = list(_mutations(seg, len(table), rng, 220))
            # plus argument damage: nchanged, Rice parameters, hash
            variants_args = [(seg, len(table), nch + d, ks, vh) for d in (-1, 1)]
            for c in range(len(ks)):
                k2 = list(ks)
                k2[c] = None if ks[c] is not None else rng.randint(0, 12)
                variants_args.append((seg, len(table), nch, k2, vh))
                if ks[c] is not None:
                    for kk in (ks[c] + 1, max(0, ks[c] - 1), 13):
                        k3 = list(ks)
                        k3[c] = kk
                        variants_args.append((seg, len(table), nch, k3, vh))
            variants_args.append((seg, len(table), nch, ks, vh ^ 1))
            for s, tl in variants:
                variants_args.append((s, tl, nch, ks, vh))
            nchunks = -(-(end - start) // 4096)
            for s, tl, dn in _structured(seg, len(table), nchunks, rng, 120):
                variants_args.append((s, tl, nch + dn, ks, vh))
            for s, tl, n2, k2, h in variants_args:
                a = _outcome(_native.decode2, s, tl, old, dmode, start, end, 12, cuts, k2, freqs, n2, h)
                b = _outcome(_native.hd_decode2, s, tl, old, dmode, start, end, 12, cuts, k2, freqs, n2, h)
                assert a == b, (dmode, len(s), tl, n2, k2)
                checked += 1
                refused += a[0] == "err"
    assert checked > 400 and refused > checked // 2


# ---------------------------------------------------------------------------------------------------------------------
# hashes

LEAF = 4096
SIZES = [0, 1, 7, 8, 31, 32, 33, 63, 64, 65, LEAF - 1, LEAF, LEAF + 1, 2 * LEAF - 1, 2 * LEAF, 2 * LEAF + 1,
         3 * LEAF + 5, 4 * LEAF - 32, 4 * LEAF + 31, 17 * LEAF + 100, 65 * LEAF + 3]


@pytest.mark.parametrize("size", SIZES)
def test_tree64_via_hd_leaves(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    want = _native.tree64(data)
    assert _native.hd_tree64(data) == want
    leaves = _native.hd_tree64_leaves(data)
    nl = 1 if size == 0 else -(-size // LEAF)
    assert leaves.size == nl
    for i in sorted({0, nl // 2, nl - 1}):
        assert int(leaves[i]) == _native.h64(data[i * LEAF:(i + 1) * LEAF], i)
    assert _native.h64(leaves.tobytes(), size ^ 0x5353594E43) == want
    if size <= 4 * LEAF + 31:
        assert reference.tree64(data) == want


def test_h64_all_short_lengths():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    for n in range(0, 200):
        seed = int(rng.integers(0, 1 << 63)) * 2 + n % 2
        assert _native.hd_h64(data[:n], seed) == _native.h64(data[:n], seed)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "int32"])
def test_fully_changed_chunks(dtype_name):
    """Every element changed (n = chunk length, gaps all 0), and a table claiming one change more than the chunk has."""
    dt = DTYPES[dtype_name]
    kb = KEY_BITS.get(dtype_name, 0)
    n = 4096 + 10
    o = _random_values(n, dt, torch.Generator().manual_seed(3))
    nw = o.clone()
    iv = _ints(nw)
    iv[iv == (1 << (8 * _width(dt) - 1)) - 1] = 0
    iv += 1
    old, new = Space(dtype_name, ["a"], [o]), Space(dtype_name, ["a"], [nw])
    rng = random.Random(8)
    for mode in (0, 1):
        _c, hist, _k, total, _p = _native.scan2(old, new, mode)
        assert total == n
        for K in ([1, 4] if kb else [1]):
            cuts = _cuts_for(kb, rng, K)
            freqs = _class_freqs(hist, cuts)
            _compare_segment(old, new, mode, 0, n, 12, cuts, freqs, use_positions=False)
            table, data, ks, vh, nch = _native.encode2(old, new, mode, 0, n, 12, cuts, freqs)
            chunks = _parse(table + data, len(table), 2)
            for j in (0, 1):
                ch = [list(c) for c in chunks]
                ch[j][0] += 1  # n = chunk length + 1
                s, tl = _build(ch)
                a = _outcome(_native.decode2, s, tl, old, mode, 0, n, 12, cuts, ks, freqs, nch + 1, vh)
                b = _outcome(_native.hd_decode2, s, tl, old, mode, 0, n, 12, cuts, ks, freqs, nch + 1, vh)
                assert a == b == ("err", -2)
            for s, tl, dn in _structured(table + data, len(table), 2, rng, 100):
                a = _outcome(_native.decode2, s, tl, old, mode, 0, n, 12, cuts, ks, freqs, nch + dn, vh)
                b = _outcome(_native.hd_decode2, s, tl, old, mode, 0, n, 12, cuts, ks, freqs, nch + dn, vh)
                assert a == b
