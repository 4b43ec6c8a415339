"""Native format-2 kernels (csrc/format2.cpp through sparsesync._native): scan2, encode2, decode2, scatter2,
add_scatter2, gather2, put2, take2, tree64_many.

Checks: round trips against torch-computed expectations (bit patterns through integer views), byte-exact agreement
of encode2 with a small, literal pure-Python transcription of FORMAT.md §6 (`_spec_encode` / `_spec_decode` below,
independent of the kernels and of sparsesync.reference), validity of every single-byte corruption of a segment, and
identical results with the SIMD paths on and off.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sparsesync import _native, reference
from sparsesync.reference import E_HASH, KernelError
from sparsesync.space import KEY_BITS, Space
from spacegen import INT_OF_WIDTH
from spacegen import ints as _ints
from spacegen import random_values as _random_values
from spacegen import spaces as _spaces_of
from spacegen import sizes as _sizes
from spacegen import class_freqs as _class_freqs
from spacegen import cuts_for as _cuts_for
from spacegen import varint as _varint
from spacegen import width as _width

pytestmark = pytest.mark.skipif(not _native.available, reason=f"native library not available: {_native.load_error}")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
          "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8": torch.int8,
          "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8}
RANS_L = 1 << 23


@pytest.fixture(params=[1, 0], ids=["simd", "portable"])
def simd(request):
    prev = _native.lib.ss_simd(-1)
    _native.lib.ss_simd(request.param)
    yield request.param
    _native.lib.ss_simd(1 if prev else 0)


@pytest.fixture(params=[1, 2])
def threads(request, monkeypatch):
    monkeypatch.setenv("SPARSESYNC_THREADS", str(request.param))
    return request.param


# ---------------------------------------------------------------------------------------------------------------------
# data

def _spaces(dtype_name: str, sizes: list[int], density: float, seed: int):
    return _spaces_of(dtype_name, DTYPES[dtype_name], sizes, density, seed)


def _key(x: int, w: int, kb: int) -> int:
    return (x >> (8 * w - 1 - kb)) & ((1 << kb) - 1) if kb else 0


def _patterns(sp: Space) -> list[int]:
    return [int(v) & ((1 << (8 * sp.w)) - 1) for v in _ints(sp.flat().view(INT_OF_WIDTH[sp.w])).tolist()]


def _symbol(o: int, nw: int, w: int, mode: int):
    """(symbol, extra value, extra bit count) of FORMAT.md 4.2."""
    B = 8 * w
    if mode == 1:
        return nw >> (B - 8), nw & ((1 << (B - 8)) - 1), B - 8
    d = (nw - o) % (1 << B)
    neg = 1 if d >= 1 << (B - 1) else 0
    m = (1 << B) - d if neg else d
    if m <= 8:
        return 2 * (m - 1) + neg, 0, 0
    nb = m.bit_length()
    return 16 + nb - 4, neg | ((m & ((1 << (nb - 1)) - 1)) << 1), nb


# ---------------------------------------------------------------------------------------------------------------------
# FORMAT.md §6 transcribed literally (small inputs only)

def _spec_encode(old: list[int], new: list[int], w: int, kb: int, mode: int, start: int, end: int, log2c: int,
                 cuts: list[int], freqs: np.ndarray):
    C = 1 << log2c
    K = len(cuts) + 1

    def cls(x):
        k = _key(x, w, kb)
        return sum(1 for c in cuts if c <= k)

    chunks = [(s, min(s + C, end)) for s in range(start, end, C)]
    present = sorted({cls(old[i]) for i in range(start, end) if old[i] != new[i]})
    # gaps per chunk and class: the runs of unchanged class-c elements around its changed ones
    per_chunk = []
    gaps = {c: [] for c in present}
    for cs, ce in chunks:
        ch = [i for i in range(cs, ce) if old[i] != new[i]]
        if not ch:
            per_chunk.append(None)
            continue
        cg = {}
        for c in present:
            run, seq = 0, []
            for i in range(cs, ce):
                if cls(old[i]) != c:
                    continue
                if old[i] != new[i]:
                    seq.append(run)
                    run = 0
                else:
                    run += 1
            seq.append(run)  # the final gap
            cg[c] = seq
            gaps[c] += seq
        per_chunk.append((ch, cg))
    ks = [None] * K
    for c in present:
        costs = [sum((g >> k) + k + 1 for g in gaps[c]) for k in range(log2c + 1)]
        ks[c] = costs.index(min(costs))
    table, data, vals = bytearray(), bytearray(), []
    for pc in per_chunk:
        if pc is None:
            table += _varint(0)
            continue
        ch, cg = pc
        acc, nbits = 0, 0

        def put(v, nb):
            nonlocal acc, nbits
            acc |= (v & ((1 << nb) - 1)) << nbits
            nbits += nb

        def rice(g, k):
            q = g >> k
            put((1 << q) - 1, q)
            put(0, 1)
            put(g, k)

        nxt = {c: 1 for c in present}
        for c in present:
            rice(cg[c][0], ks[c])
        syms = []
        for i in ch:
            c = cls(old[i])
            s, e, ne = _symbol(old[i], new[i], w, mode)
            if freqs[c][s] == 0:
                raise KernelError(-5, "symbol without frequency")
            syms.append((c, s))
            put(e, ne)
            rice(cg[c][nxt[c]], ks[c])
            nxt[c] += 1
            vals.append(new[i])
        bits = acc.to_bytes((nbits + 7) // 8, "little")
        x, emitted = RANS_L, bytearray()
        for c, s in reversed(syms):
            f = int(freqs[c][s])
            cum = int(freqs[c][:s].sum())
            while x >= ((RANS_L >> 12) << 8) * f:
                emitted.append(x & 0xFF)
                x >>= 8
            x = ((x // f) << 12) + (x % f) + cum
        emitted.reverse()
        rans = x.to_bytes(4, "little") + bytes(emitted)
        table += _varint(len(ch)) + _varint(len(rans)) + _varint(len(bits))
        data += rans + bits
    vh = reference.tree64(b"".join(v.to_bytes(w, "little") for v in vals))
    return bytes(table), bytes(data), ks, vh, len(vals)


class _Corrupt(Exception):
    pass


def _spec_decode(seg: bytes, table_len: int, old: list[int], w: int, kb: int, mode: int, start: int, end: int,
                 log2c: int, cuts: list[int], ks: list, freqs: np.ndarray, nchanged: int):
    """(indices, new patterns) or _Corrupt; the values hash is not checked here."""
    C = 1 << log2c
    B = 8 * w
    present = [c for c, k in enumerate(ks) if k is not None]
    classes = [sum(1 for c in cuts if c <= _key(x, w, kb)) for x in old[start:end]]
    cums = {c: np.concatenate([[0], np.cumsum(freqs[c].astype(np.int64))]).tolist() for c in present}

    pos, dp, entries = 0, table_len, []
    for cs in range(start, end, C):
        ce = min(cs + C, end)
        try:
            n, pos = reference.read_varint(seg, pos, table_len)
            if n > ce - cs:
                raise _Corrupt("n")
            if n:
                rl, pos = reference.read_varint(seg, pos, table_len)
                bl, pos = reference.read_varint(seg, pos, table_len)
                entries.append((cs, ce, n, dp, rl, bl))
                dp += rl + bl
        except KernelError as exc:
            raise _Corrupt("varint") from exc
    if pos != table_len or dp != len(seg) or sum(e[2] for e in entries) != nchanged:
        raise _Corrupt("table")
    idx, vals = [], []
    for cs, ce, n, dp, rl, bl in entries:
        rans, bits = seg[dp:dp + rl], seg[dp + rl:dp + rl + bl]
        if rl < 4:
            raise _Corrupt("rans")
        x, rp = int.from_bytes(rans[:4], "little"), 4
        val, nb, bp = int.from_bytes(bits, "little"), 8 * bl, 0

        def get(k):
            nonlocal bp
            if bp + k > nb:
                raise _Corrupt("bits")
            v = (val >> bp) & ((1 << k) - 1)
            bp += k
            return v

        def gap(k):
            q = 0
            while get(1):
                q += 1
                if q > (ce - cs) >> k:
                    raise _Corrupt("unary")
            return (q << k) | get(k)

        s_c = {c: gap(ks[c]) for c in present}
        found = 0
        for i in range(cs, ce):
            c = classes[i - start]
            if c not in s_c:
                continue
            if s_c[c] > 0:
                s_c[c] -= 1
                continue
            if found == n:
                raise _Corrupt("count")
            cum = cums[c]
            slot = x & 4095
            s = 0
            while cum[s + 1] <= slot:
                s += 1
            x = (cum[s + 1] - cum[s]) * (x >> 12) + slot - cum[s]
            while x < RANS_L:
                if rp >= rl:
                    raise _Corrupt("rans overrun")
                x = (x << 8) | rans[rp]
                rp += 1
            ne = B - 8 if mode == 1 else (0 if s < 16 else s - 12)
            e = get(ne)
            if mode == 1:
                nv = (s << (B - 8)) | e
            else:
                if s < 16:
                    m, neg = s // 2 + 1, s & 1
                else:
                    neg, m = e & 1, (1 << (s - 13)) | (e >> 1)
                nv = (old[i] + (-m if neg else m)) % (1 << B)
            idx.append(i)
            vals.append(nv)
            found += 1
            s_c[c] = gap(ks[c])
        if any(v != 0 for v in s_c.values()) or found != n:
            raise _Corrupt("end")
        if nb - bp >= 8 or (val >> bp) != 0 or x != RANS_L or rp != rl:
            raise _Corrupt("exact")
    return idx, vals


# ---------------------------------------------------------------------------------------------------------------------
# helpers around the native calls

def _expected(old: Space, new: Space, start: int, end: int):
    ov = old.flat().view(INT_OF_WIDTH[old.w])
    nv = new.flat().view(INT_OF_WIDTH[new.w])
    ch = (ov[start:end] != nv[start:end]).nonzero().reshape(-1) + start
    return ch, ov[ch], nv[ch]


def _roundtrip(old: Space, new: Space, mode: int, start: int, end: int, log2c: int, cuts: list[int], freqs,
               hint=None):
    emode = 0 if mode == 2 else mode
    table, data, ks, vh, nch = _native.encode2(old, new, emode, start, end, log2c, cuts, freqs, nchanged_hint=hint)
    ch, ov, nv = _expected(old, new, start, end)
    assert nch == ch.numel()
    assert len(ks) == len(cuts) + 1
    if nch == 0:
        return table, data, ks, vh, nch
    seg = table + data
    idx, vals = _native.decode2(seg, len(table), old, mode, start, end, log2c, cuts, ks, freqs, nch, vh)
    assert torch.equal(idx, ch)
    w = old.w
    got = vals.view(INT_OF_WIDTH[w])
    if mode == 2:  # differences: old + d == new
        assert torch.equal((ov.to(torch.int64) + got.to(torch.int64)).to(INT_OF_WIDTH[w]) if w < 8
                           else ov + got, nv)
    else:
        assert torch.equal(got, nv)
    return table, data, ks, vh, nch


# ---------------------------------------------------------------------------------------------------------------------
# tests

CASES = [("bfloat16", 0.01), ("float16", 0.05), ("float32", 0.02), ("float64", 0.03), ("float8_e4m3fn", 0.05),
         ("float8_e5m2", 0.1), ("int8", 0.05), ("int16", 0.02), ("int32", 0.3), ("int64", 0.02), ("uint8", 0.01)]


@pytest.mark.parametrize("dtype_name,density", CASES)
def test_roundtrip_modes_and_cuts(dtype_name, density, simd):
    rng = random.Random(hash(dtype_name) & 0xFFFF)
    kb = KEY_BITS.get(dtype_name, 0)
    for small in (True, False):
        old, new = _spaces(dtype_name, _sizes(rng.randint(20000, 40000), rng, small), density, rng.randint(0, 10**6))
        for mode in (0, 1):
            _counts, hist, _keys, _total, _pieces = _native.scan2(old, new, mode)
            for K in ([1, 2, 5, 17, 24, 32] if kb else [1]):
                cuts = _cuts_for(kb, rng, K)
                freqs = _class_freqs(hist, cuts)
                start = rng.randint(0, 5000)
                end = old.n - rng.randint(0, 3000)
                log2c = rng.choice([12, 12, 13, 20])
                _roundtrip(old, new, mode, start, end, log2c, cuts, freqs)
                if mode == 0:  # deferred: same stream, differences out
                    _roundtrip(old, new, 2, start, end, log2c, cuts, freqs)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "float8_e4m3fn", "float64", "int16", "uint8"])
@pytest.mark.parametrize("mode", [0, 1])
def test_encode_matches_literal_spec(dtype_name, mode, simd):
    """encode2's bytes, Rice parameters, hash and count equal a literal transcription of FORMAT.md §6; decode2 and the
    transcription's decoder agree."""
    rng = random.Random(7 + mode)
    kb = KEY_BITS.get(dtype_name, 0)
    for trial in range(3):
        sizes = _sizes(rng.randint(5000, 9000), rng, small=trial != 1)
        old, new = _spaces(dtype_name, sizes, rng.choice([0.003, 0.02, 0.2]), rng.randint(0, 10**6))
        _c, hist, _k, _t, _p = _native.scan2(old, new, mode)
        cuts = _cuts_for(kb, rng, [1, 3, 8, 12, 20][(2 * trial + mode) % 5])  # 1..3 vectors of classes
        freqs = _class_freqs(hist, cuts)
        start, end = rng.randint(0, 300), old.n - rng.randint(0, 300)
        po, pn = _patterns(old), _patterns(new)
        got = _native.encode2(old, new, mode, start, end, 12, cuts, freqs)
        want = _spec_encode(po, pn, old.w, old.kb, mode, start, end, 12, cuts, freqs)
        assert got == want
        table, data, ks, vh, nch = got
        if nch:
            idx, vals = _spec_decode(table + data, len(table), po, old.w, old.kb, mode, start, end, 12, cuts, ks,
                                     freqs, nch)
            nidx, nvals = _native.decode2(table + data, len(table), old, mode, start, end, 12, cuts, ks, freqs, nch,
                                          vh)
            assert nidx.tolist() == idx
            assert [int(v) & ((1 << (8 * old.w)) - 1) for v in nvals.view(INT_OF_WIDTH[old.w]).tolist()] == vals


def test_k_rule_and_absent_classes():
    """Classes without changes are reported as None, and k is the smallest minimiser of the §6.4 cost."""
    # bfloat16, key = exponent: class 0 = keys < 100 (tiny values), class 1 = [100, 130), class 2 = >= 130
    n = 8192
    x = torch.full((n,), 1.0, dtype=torch.bfloat16)  # exponent 127 -> class 1
    x[::3] = 1e-30  # exponent < 100 -> class 0
    y = x.clone()
    y[5] = 2.0   # class 1 element (index 5: 5 % 3 != 0)
    y[4000] = 1.5  # 4000 % 3 == 1 -> class 1
    old, new = Space("bfloat16", ["a"], [x]), Space("bfloat16", ["a"], [y])
    _c, hist, _k, total, _p = _native.scan2(old, new, 0)
    assert total == 2
    cuts = [100, 130]
    freqs = _class_freqs(hist, cuts)
    table, data, ks, vh, nch = _native.encode2(old, new, 0, 0, n, 12, cuts, freqs)
    assert ks[0] is None and ks[2] is None and ks[1] is not None
    want = _spec_encode(_patterns(old), _patterns(new), 2, 8, 0, 0, n, 12, cuts, freqs)
    assert (table, data, ks, vh, nch) == want


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "int8", "float8_e5m2", "float64"])
def test_scan2_matches_torch(dtype_name, simd):
    rng = random.Random(3)
    old, new = _spaces(dtype_name, _sizes(50000, rng, small=True), 0.03, 11)
    w, kb = old.w, old.kb
    po, pn = _patterns(old), _patterns(new)
    changed = torch.tensor([a != b for a, b in zip(po, pn)])
    for mode in (0, 1):
        counts, hist, keys, total, pieces = _native.scan2(old, new, mode)
        csum = np.concatenate([[0], np.cumsum(changed.numpy(), dtype=np.int64)])
        assert pieces.dtype == np.int64 and pieces.tolist() == np.diff(csum[old.offs]).tolist()
        nb = -(-old.n // 4096)
        pad = torch.zeros(nb * 4096, dtype=torch.int64)
        pad[:old.n] = changed.to(torch.int64)
        assert counts.tolist() == pad.reshape(nb, 4096).sum(1).tolist()
        assert total == int(changed.sum())
        want = np.zeros(((1 << kb) if kb else 1, 256), dtype=np.uint64)
        for i in changed.nonzero().reshape(-1).tolist():
            want[_key(po[i], w, kb), _symbol(po[i], pn[i], w, mode)[0]] += 1
        assert np.array_equal(hist, want)
        wk = np.zeros((1 << kb) if kb else 1, dtype=np.uint64)
        for b in range(0, nb, 16):
            for i in range(b * 4096, min(old.n, b * 4096 + 4096)):
                wk[_key(po[i], w, kb)] += 1
        assert np.array_equal(keys, wk)


def test_update_old_and_errors():
    rng = random.Random(5)
    old, new = _spaces("bfloat16", _sizes(30000, rng, small=True), 0.02, 5)
    _c, hist, _k, _t, _p = _native.scan2(old, new, 0)
    cuts = [120, 126]
    freqs = _class_freqs(hist, cuts)
    before = old.flat().clone()
    # a symbol without frequency in its class's table: SS_ERANS, old untouched
    bad = freqs.copy()
    c = int(np.nonzero(bad.sum(1))[0][0])
    s = int(np.argmax(bad[c]))
    bad[c, s] = 0
    bad[c, (s + 1) % 28] += 0  # keep the table invalid (sum != 4096) or without s: either is SS_ERANS
    with pytest.raises(KernelError) as ei:
        _native.encode2(old, new, 0, 0, old.n, 12, cuts, bad, update_old=True)
    assert ei.value.code == -5
    assert torch.equal(old.flat(), before)
    # a too small hint still works (the wrapper retries with the sizes the kernel reports)
    r1 = _native.encode2(old, new, 0, 100, old.n, 12, cuts, freqs, nchanged_hint=1)
    r2 = _native.encode2(old, new, 0, 100, old.n, 12, cuts, freqs, update_old=True)
    assert r1 == r2
    ov = old.flat().view(torch.int16)
    nv = new.flat().view(torch.int16)
    assert torch.equal(ov[100:], nv[100:]) and torch.equal(ov[:100], before.view(torch.int16)[:100])
    # bad cuts / ks
    with pytest.raises(KernelError):
        _native.encode2(old, new, 0, 0, old.n, 12, [5, 5], np.zeros((3, 256), np.uint32))
    with pytest.raises(KernelError):
        _native.encode2(old, new, 0, 0, old.n, 12, [256], np.zeros((2, 256), np.uint32))


def test_decode_rejects_bad_class_arguments():
    rng = random.Random(9)
    old, new = _spaces("bfloat16", _sizes(20000, rng, small=False), 0.02, 9)
    _c, hist, _k, _t, _p = _native.scan2(old, new, 0)
    cuts = [118, 124, 127]
    freqs = _class_freqs(hist, cuts)
    table, data, ks, vh, nch = _native.encode2(old, new, 0, 0, old.n, 13, cuts, freqs)
    seg = table + data

    def dec(**kw):
        a = dict(seg=seg, table_len=len(table), old=old, mode=0, start=0, end=old.n, log2c=13, cuts=cuts, ks=ks,
                 freqs=freqs, nchanged=nch, expected_hash=vh)
        a.update(kw)
        return _native.decode2(**a)

    dec()
    for kw, code in [(dict(ks=[None] * 4), -2), (dict(ks=[14 if k is not None else None for k in ks]), -2),
                     (dict(cuts=[124, 118, 127]), -1), (dict(cuts=[0, 118, 124]), -1), (dict(nchanged=nch + 1), -6),
                     (dict(expected_hash=vh ^ 1), E_HASH), (dict(end=old.n + 1), -1), (dict(start=1), None),
                     (dict(log2c=12), None), (dict(mode=1), None)]:
        with pytest.raises(KernelError) as ei:
            dec(**kw)
        if code is not None:
            assert ei.value.code == code, kw
    f2 = freqs.copy()
    c = next(c for c, k in enumerate(ks) if k is not None)
    f2[c, 255] += 1
    f2[c, int(np.argmax(f2[c, :255]))] -= 1
    with pytest.raises(KernelError) as ei:  # a symbol above the largest of the mode
        dec(freqs=f2)
    assert ei.value.code == -5


@pytest.mark.parametrize("cuts", [[], [120, 125, 127]])
@pytest.mark.parametrize("mode", [0, 1])
def test_every_corrupted_byte(cuts, mode, simd):
    """Every single-byte change of a segment is rejected; a hash failure only for streams the literal decoder finds
    valid (with values different from the true ones)."""
    rng = random.Random(21)
    old, new = _spaces("bfloat16", _sizes(6000, rng, small=True), 0.004, 21)
    _c, hist, _k, _t, _p = _native.scan2(old, new, mode)
    freqs = _class_freqs(hist, cuts)
    start, end = 7, old.n - 3
    table, data, ks, vh, nch = _native.encode2(old, new, mode, start, end, 12, cuts, freqs)
    seg = table + data
    po = _patterns(old)
    _ch, _ov, truth = _expected(old, new, start, end)
    truth_vals = [int(v) & 0xFFFF for v in truth.tolist()]
    for p in range(len(seg)):
        for x in (1, rng.randint(2, 255)):
            bad = bytearray(seg)
            bad[p] ^= x
            bad = bytes(bad)
            try:
                _native.decode2(bad, len(table), old, mode, start, end, 12, cuts, ks, freqs, nch, vh)
                raise AssertionError(f"corruption at byte {p} (^{x:#x}) accepted")
            except KernelError as exc:
                code = exc.code
            try:
                _idx, vals = _spec_decode(bad, len(table), po, 2, 8, mode, start, end, 12, cuts, ks, freqs, nch)
                spec_ok = True
            except _Corrupt:
                spec_ok = False
            if code == E_HASH:
                assert spec_ok and vals != truth_vals, (p, x)
            else:
                assert not spec_ok, (p, x, code)


def test_simd_and_threads_identical(threads):
    rng = random.Random(13)
    for dtype_name in ("bfloat16", "float32", "float8_e4m3fn", "float64", "float16"):
        old, new = _spaces(dtype_name, _sizes(60000, rng, small=True), 0.02, 13)
        kb = old.kb
        res = []
        for lvl in (1, 0):
            _native.lib.ss_simd(lvl)
            try:
                sc = _native.scan2(old, new, 0)
                cuts = _cuts_for(kb, random.Random(1), 9)
                freqs = _class_freqs(sc[1], cuts)
                enc = _native.encode2(old, new, 0, 33, old.n, 12, cuts, freqs)
                dec = _native.decode2(enc[0] + enc[1], len(enc[0]), old, 0, 33, old.n, 12, cuts, enc[2], freqs,
                                      enc[4], enc[3])
                res.append((sc, enc, dec))
            finally:
                _native.lib.ss_simd(1)
        (s1, e1, d1), (s0, e0, d0) = res
        assert all(np.array_equal(a, b) for a, b in zip(s1[:3] + s1[4:], s0[:3] + s0[4:])) and s1[3] == s0[3]
        assert e1 == e0
        assert torch.equal(d1[0], d0[0]) and torch.equal(d1[1], d0[1])


# ---------------------------------------------------------------------------------------------------------------------
# positions: scan2(positions=True) collects the changed elements' indices; encode2(positions=...) codes from them

def _diff_idx(old: Space, new: Space) -> torch.Tensor:
    ov = old.flat().view(INT_OF_WIDTH[old.w])
    nv = new.flat().view(INT_OF_WIDTH[new.w])
    return (ov != nv).nonzero().reshape(-1)


def _pos_slice(idx: torch.Tensor, start: int, end: int) -> torch.Tensor:
    lo, hi = torch.searchsorted(idx, torch.tensor([start, end])).tolist()
    return idx[lo:hi]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "int8", "float64"])
def test_scan2_positions(dtype_name, simd, threads):
    rng = random.Random(31)
    for small, n_total, density in ((True, 30000, 0.03), (False, 8_400_000 // _width(DTYPES[dtype_name]), 0.002),
                                    (True, 20000, 0.0)):
        old, new = _spaces(dtype_name, _sizes(n_total, rng, small), density, rng.randint(0, 10**6))
        want = _diff_idx(old, new)
        for mode in (0, 1):
            plain = _native.scan2(old, new, mode)
            got = _native.scan2(old, new, mode, positions=True)
            assert len(plain) == 5 and len(got) == 6
            assert all(np.array_equal(a, b) for a, b in zip(plain[:3] + plain[4:], got[:3] + got[4:5]))
            assert plain[3] == got[3] == want.numel()
            assert got[5] is not None and got[5].dtype == torch.int64 and torch.equal(got[5], want)
            ref = reference.scan2(old, new, mode, positions=True)
            assert torch.equal(ref[5], want) and ref[3] == got[3]


def test_scan2_positions_capacity(simd, monkeypatch):
    """More changes than the capacity: idx None (native and reference, same rule), everything else unchanged."""
    rng = random.Random(32)
    old, new = _spaces("bfloat16", _sizes(40000, rng, small=True), 0.3, 32)  # 30% > 1/8 + 1024/n
    want = _diff_idx(old, new)
    assert want.numel() > old.n // 8 + 1024
    got = _native.scan2(old, new, 0, positions=True)
    assert got[5] is None and got[3] == want.numel()
    plain = _native.scan2(old, new, 0)
    assert all(np.array_equal(a, b) for a, b in zip(plain[:3] + plain[4:], got[:3] + got[4:5]))
    assert reference.scan2(old, new, 0, positions=True)[5] is None
    # exactly at the capacity: produced; one below: not
    total = want.numel()
    monkeypatch.setattr(_native, "positions_cap", lambda n: total)
    assert torch.equal(_native.scan2(old, new, 0, positions=True)[5], want)
    monkeypatch.setattr(_native, "positions_cap", lambda n: total - 1)
    assert _native.scan2(old, new, 0, positions=True)[5] is None


POS_CASES = [("bfloat16", 0.01), ("bfloat16", 0.0007), ("float16", 0.05), ("float32", 0.3), ("float64", 0.03),
             ("float8_e4m3fn", 0.05), ("float8_e5m2", 0.1), ("int16", 0.02), ("int64", 0.02), ("uint8", 0.01)]


@pytest.mark.parametrize("dtype_name,density", POS_CASES)
def test_encode2_positions_identical(dtype_name, density, simd):
    """encode2 with positions = without (and = the reference): bytes, ks, hash, count, and update_old."""
    rng = random.Random(hash((dtype_name, density)) & 0xFFFF)
    kb = KEY_BITS.get(dtype_name, 0)
    for small in (True, False):
        old, new = _spaces(dtype_name, _sizes(rng.randint(20000, 40000), rng, small), density, rng.randint(0, 10**6))
        for mode in (0, 1):
            sc = _native.scan2(old, new, mode, positions=True)
            idx = _diff_idx(old, new)
            assert (sc[5] is None) == (idx.numel() > old.n // 8 + 1024)
            assert sc[5] is None or torch.equal(sc[5], idx)
            for K in ([1, 2, 8, 32] if kb else [1]):
                cuts = _cuts_for(kb, rng, K)
                freqs = _class_freqs(sc[1], cuts)
                for start, end in ((0, old.n), (rng.randint(1, 5000), old.n - rng.randint(1, 3000)),
                                   (rng.randint(0, old.n // 2), None)):
                    if end is None:  # a short sub-range
                        end = min(old.n, start + rng.randint(1, 9000))
                    log2c = rng.choice([12, 12, 13, 20])
                    pos = _pos_slice(idx, start, end)
                    want = _native.encode2(old, new, mode, start, end, log2c, cuts, freqs)
                    got = _native.encode2(old, new, mode, start, end, log2c, cuts, freqs, positions=pos)
                    assert got == want
                    if K in (1, 8) and want[4] < 3000:
                        assert reference.encode2(old, new, mode, start, end, log2c, cuts, freqs, positions=pos) == want
    # update_old through positions writes exactly what the plain path writes
    old2 = Space(old.dtype, old.names, [t.clone() for t in old.tensors])
    cuts = _cuts_for(kb, rng, 5)
    freqs = _class_freqs(_native.scan2(old, new, 0)[1], cuts)
    start, end = 17, old.n - 5
    pos = _pos_slice(idx, start, end)
    a = _native.encode2(old, new, 0, start, end, 12, cuts, freqs, update_old=True)
    b = _native.encode2(old2, new, 0, start, end, 12, cuts, freqs, update_old=True, positions=pos)
    assert a == b and torch.equal(old.flat(), old2.flat())
    assert torch.equal(_diff_idx(old, new), torch.cat([idx[idx < start], idx[idx >= end]]))


def test_encode2_positions_threads(threads, simd):
    """Large enough for several workers and many chunks (some without changes)."""
    rng = random.Random(41)
    old, new = _spaces("bfloat16", _sizes(3_000_000, rng, small=False), 0.004, 41)
    sc = _native.scan2(old, new, 0, positions=True)
    for cuts in ([], [100, 118, 121, 123, 124, 125, 126]):
        freqs = _class_freqs(sc[1], cuts)
        for start, end in ((0, old.n), (12345, old.n - 999)):
            pos = _pos_slice(sc[5], start, end)
            want = _native.encode2(old, new, 0, start, end, 12, cuts, freqs)
            assert _native.encode2(old, new, 0, start, end, 12, cuts, freqs, positions=pos) == want


@pytest.mark.parametrize("cuts", [[], [120, 126]])
def test_encode2_bad_positions(cuts, simd):
    rng = random.Random(51)
    old, new = _spaces("bfloat16", _sizes(30000, rng, small=True), 0.02, 51)
    sc = _native.scan2(old, new, 0, positions=True)
    freqs = _class_freqs(sc[1], cuts)
    start, end = 100, old.n - 100
    pos = _pos_slice(sc[5], start, end)
    assert pos.numel() > 10
    before = old.flat().clone()
    unchanged = next(i for i in range(start, end) if i not in set(pos.tolist()))

    def enc(p):
        return _native.encode2(old, new, 0, start, end, 12, cuts, freqs, update_old=True, positions=p)

    swapped = pos.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    dup = torch.cat([pos[:5], pos[4:]])
    cases = [(swapped, -1), (dup, -1), (torch.cat([torch.tensor([start - 1]), pos]), -1),
             (torch.cat([pos, torch.tensor([end])]), -1), (torch.cat([pos, torch.tensor([old.n + 7])]), -1),
             (torch.cat([torch.tensor([-1]), pos]), -1), (pos.flip(0), -1),
             (torch.sort(torch.cat([pos, torch.tensor([unchanged])])).values, -6)]
    for p, code in cases:
        with pytest.raises(KernelError) as ei:
            enc(p)
        assert ei.value.code == code, (p[:8], code)
        assert torch.equal(old.flat(), before)  # nothing written on failure
    with pytest.raises(KernelError):
        enc(pos.to(torch.int32))
    # an empty list: a range without changes (nothing coded, nothing written)
    table, data, ks, vh, nch = enc(torch.zeros(0, dtype=torch.int64))
    assert nch == 0 and all(k is None for k in ks) and torch.equal(old.flat(), before)
    # not contiguous: the wrapper makes a contiguous copy
    wide = torch.stack([pos, pos], 1)[:, 0]
    assert not wide.is_contiguous()
    assert enc(wide)[4] == pos.numel()


# ---------------------------------------------------------------------------------------------------------------------
# apply kernels

def _space_of(tensors, dtype_name="bfloat16"):
    return Space(dtype_name, [f"t{i:05d}" for i in range(len(tensors))], tensors)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "int8", "int64"])
def test_scatter_add_take_gather_put(dtype_name, threads):
    rng = random.Random(17)
    g = torch.Generator().manual_seed(17)
    dt = DTYPES[dtype_name]
    w = _width(dt)
    sizes = _sizes(70000, rng, small=True)
    tensors = [_random_values(s, dt, g) for s in sizes]
    sp = _space_of(tensors, dtype_name)
    ref = sp.flat().view(INT_OF_WIDTH[w]).clone()
    n = sp.n
    # indices in several ascending runs (outputs of several segments concatenated), unique
    perm = torch.randperm(n, generator=g)[:5000]
    idx = torch.cat([perm[:2000].sort().values, perm[2000:].sort().values])
    vals = _random_values(idx.numel(), dt, g).reshape(-1).view(torch.uint8).clone() if w > 1 else \
        torch.randint(0, 256, (idx.numel(),), generator=g, dtype=torch.uint8)
    vals = vals.reshape(-1).view(torch.uint8)
    # take
    assert torch.equal(_native.take2(sp, idx).view(INT_OF_WIDTH[w]), ref[idx])
    # scatter with touched
    touched = np.zeros(len(tensors), dtype=np.uint8)
    _native.scatter2(sp, idx, vals, touched)
    ref[idx] = vals.view(INT_OF_WIDTH[w])
    assert torch.equal(sp.flat().view(INT_OF_WIDTH[w]), ref)
    want_t = np.zeros(len(tensors), dtype=np.uint8)
    want_t[np.searchsorted(sp.offs, idx.numpy(), side="right") - 1] = 1
    assert np.array_equal(touched, want_t)
    # add_scatter (+ and -), new_out
    d = torch.randint(0, 256, (idx.numel() * w,), generator=g, dtype=torch.uint8)
    new_out = torch.empty(idx.numel() * w, dtype=torch.uint8)
    touched[:] = 0
    _native.add_scatter2(sp, idx, d, new_out=new_out, touched=touched)
    dv = d.view(INT_OF_WIDTH[w])
    if w < 8:
        exp = ((ref[idx].to(torch.int64) + dv.to(torch.int64)) & ((1 << (8 * w)) - 1))
        exp = torch.where(exp >= 1 << (8 * w - 1), exp - (1 << (8 * w)), exp).to(INT_OF_WIDTH[w])
    else:
        exp = ref[idx] + dv
    ref[idx] = exp
    assert torch.equal(sp.flat().view(INT_OF_WIDTH[w]), ref)
    assert torch.equal(new_out.view(INT_OF_WIDTH[w]), exp)
    assert np.array_equal(touched, want_t)
    _native.add_scatter2(sp, idx, d, negate=True)
    ref[idx] = vals.view(INT_OF_WIDTH[w])
    assert torch.equal(sp.flat().view(INT_OF_WIDTH[w]), ref)
    # a bad index: nothing written
    for bad in (n, -1):
        idx2 = idx.clone()
        idx2[len(idx2) // 2] = bad
        before = sp.flat().clone()
        for fn in (lambda: _native.scatter2(sp, idx2, vals), lambda: _native.add_scatter2(sp, idx2, d),
                   lambda: _native.take2(sp, idx2)):
            with pytest.raises(KernelError) as ei:
                fn()
            assert ei.value.code == -4
        assert torch.equal(sp.flat(), before)
    # gather / put over ranges crossing pieces
    for a, b in [(0, n), (5, 6), (3, n - 2), (n // 3, n // 3 + 9999), (n, n)]:
        got = _native.gather2(sp, a, b)
        assert torch.equal(got, sp.flat()[a * w:b * w])
        data = torch.randint(0, 256, ((b - a) * w,), generator=g, dtype=torch.uint8)
        touched = np.zeros(len(tensors), dtype=np.uint8)
        _native.put2(sp, a, b, data, touched)
        flat = sp.flat()
        assert torch.equal(flat[a * w:b * w], data)
        want_t = np.zeros(len(tensors), dtype=np.uint8)
        if b > a:
            want_t[np.searchsorted(sp.offs, a, side="right") - 1:np.searchsorted(sp.offs, b - 1, side="right")] = 1
        assert np.array_equal(touched, want_t)
        _native.put2(sp, a, b, bytes(data.numpy()))  # bytes-like input
        assert torch.equal(sp.flat()[a * w:b * w], data)
    with pytest.raises(KernelError):
        _native.gather2(sp, 0, n + 1)


def test_tree64_many_batches_small_tensors(threads, simd):
    """Many small tensors of a few lengths (leaves hashed 8 of one length at a time across tensors, more lengths
    than batch slots, tails of every size), large ones split into leaf ranges: each hash equals tree64 of the
    tensor alone, and a sample equals the pure-PyTorch reference."""
    from sparsesync import reference
    rng = random.Random(11)
    lengths = [0, 1, 31, 32, 33, 2048, 4095, 4096, 4097, 8191, 12288, 5000]
    bufs = [torch.randint(0, 256, (rng.choice(lengths),), dtype=torch.uint8) for _ in range(700)]
    bufs += [torch.randint(0, 256, (4096 * 70 + 13,), dtype=torch.uint8),
             torch.randint(0, 256, (300,), dtype=torch.uint8)]
    rng.shuffle(bufs)
    got = _native.tree64_many(bufs).tolist()
    assert got == [_native.tree64(b) for b in bufs]
    for i in range(0, len(bufs), 37):
        assert got[i] == reference.tree64(bufs[i]), i


def test_tree64_many(threads):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.empty(0, dtype=torch.float32), torch.randn(1, generator=g).to(torch.bfloat16)]
    for s in [1, 7, 1023, 1024, 1025, 2048, 2049, 4096 * 9 + 5, 100000, 3, 8192]:
        tensors.append(torch.randn(s, generator=g).to(random.Random(s).choice(list(DTYPES.values()))
                                                      if s != 100000 else torch.float32))
    tensors.append(torch.randn(33, 7, generator=g)[:, 2])  # not contiguous
    got = _native.tree64_many(tensors)
    want = [_native.tree64(t.contiguous().reshape(-1).view(torch.uint8)) if t.numel() else _native.tree64(b"")
            for t in tensors]
    assert got.dtype == np.uint64 and got.tolist() == want
    assert _native.tree64_many([]).tolist() == []
