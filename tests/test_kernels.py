"""Kernels: the native library (sparsesync._native) against the pure-PyTorch reference, bit for bit, and both
against hand-made vectors that follow docs/FORMAT.md.

Tests comparing the two skip when the native library did not load (the reason is printed); the spec-vector tests
always run on the reference and also on the native kernels when they are there.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spec
from helpers import examples, gen, mutate, random_tensor
from sparsesync import _native, reference
from sparsesync.format import build_freq, pack_freq, unpack_freq
from sparsesync.reference import (E_ARG, E_HASH, E_POS, E_RANS, KernelError, MODE_DELTA, MODE_RAW, max_symbol)

needs_native = pytest.mark.skipif(not _native.available,
                                  reason=f"native library not available: {_native.load_error}")
IMPLS = [pytest.param(reference, id="reference"),
         pytest.param(_native, id="native", marks=needs_native)]
WIDTH_DTYPE = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}
MODES = [MODE_DELTA, MODE_RAW]


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def rand_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=gen(seed), dtype=torch.uint8)


def pair(w: int, n: int, density: float, seed: int, style: str = "mixed"):
    """(old, new) flat uint8 buffers of n elements of width w with about density of them changed."""
    g = gen(seed)
    dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32, 8: torch.int64}[w]
    old = random_tensor((n,), dtype, g)
    new = mutate(old, density, g, style)
    return u8(old).clone(), u8(new).clone()


@pytest.fixture(params=[1, 2, 7])
def threads(request, monkeypatch):
    monkeypatch.setenv("SPARSESYNC_THREADS", str(request.param))
    return request.param


# ---------------------------------------------------------------------------------------------------------------------
# hashes

HASH_LENGTHS = sorted(set(list(range(130)) + [255, 256, 257, 1000, 4064, 4065] +
                          [k * 4096 + d for k in (1, 2, 3) for d in (-33, -32, -31, -1, 0, 1, 31, 32, 33)] +
                          [10000]))


@needs_native
def test_h64_native_matches_reference():
    seeds = [0, 1, 0x48445248, 0x5353594E43, 2 ** 63, 2 ** 64 - 1, 0x0123456789ABCDEF]
    for L in HASH_LENGTHS:
        data = rand_bytes(L, L)
        for seed in seeds:
            r = reference.h64(data, seed)
            assert _native.h64(data, seed) == r, (L, seed)
            assert _native.h64(bytes(data.numpy()), seed) == r


@needs_native
@pytest.mark.usefixtures("threads")
def test_tree64_native_matches_reference():
    lengths = HASH_LENGTHS + [20000, 4096 * 7 + 5, 65536]
    for L in lengths:
        data = rand_bytes(L, 1000 + L)
        r = reference.tree64(data)
        assert _native.tree64(data) == r, L
        assert _native.tree64(bytes(data.numpy())) == r, L
        assert _native.tree64(memoryview(bytearray(data.numpy()))) == r, L


@needs_native
@settings(max_examples=examples(100), deadline=None)
@given(data=st.binary(max_size=9000), seed=st.integers(0, 2 ** 64 - 1))
def test_hashes_native_matches_reference_hypothesis(data, seed):
    assert _native.h64(data, seed) == reference.h64(data, seed)
    assert _native.tree64(data) == reference.tree64(data)


@pytest.mark.parametrize("impl", IMPLS)
def test_hashes_match_the_spec(impl):
    """h64 and tree64 agree with a plain-integer transcription of FORMAT.md 1.1/1.2."""
    for L in [0, 1, 7, 8, 31, 32, 33, 64, 100, 4095, 4096, 4097, 8193]:
        data = bytes(rand_bytes(L, 7 * L).numpy())
        for seed in (0, 0x48445248, 2 ** 64 - 1):
            assert impl.h64(data, seed) == spec.h64(data, seed), (L, seed)
        assert impl.tree64(data) == spec.tree64(data), L


def test_hash_inputs_with_offsets_and_views():
    """Slices of a larger buffer (non-zero storage offset) hash like their bytes."""
    base = rand_bytes(10000, 3)
    for a, b in [(1, 4097), (17, 9000), (4096, 8192), (5, 5)]:
        view = base[a:b]
        want = spec.tree64(bytes(base[a:b].numpy()))
        assert reference.tree64(view) == want
        if _native.available:
            assert _native.tree64(view) == want
            assert _native.h64(view, 9) == spec.h64(bytes(view.numpy()), 9)


# ---------------------------------------------------------------------------------------------------------------------
# scan

SIZES = [0, 1, 2, 4095, 4096, 4097, 8191, 10000, 12289]


@needs_native
@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("mode", MODES, ids=["delta", "raw"])
@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_scan_native_matches_reference(w, mode):
    for n in SIZES:
        for density in (0.0, 0.001, 0.05, 0.5, 1.0):
            old, new = pair(w, n, density, n * 31 + int(density * 1000) + w)
            rc, rh, rt = reference.scan(old, new, w, mode)
            nc, nh, nt = _native.scan(old, new, w, mode)
            assert nt == rt
            assert np.array_equal(np.asarray(nc, dtype=np.int64), np.asarray(rc, dtype=np.int64)), (n, density)
            assert np.array_equal(np.asarray(nh, dtype=np.uint64), np.asarray(rh, dtype=np.uint64)), (n, density)
            truth = int((old.view(-1, w) != new.view(-1, w)).any(1).sum()) if n else 0
            assert rt == truth and int(np.asarray(rc, dtype=np.int64).sum()) == truth
            assert len(rc) == -(-n // 4096)
            assert int(np.asarray(rh, dtype=np.uint64).sum()) == truth
            assert not np.asarray(rh)[max_symbol(w, mode) + 1:].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_symbols_of_the_spec(impl):
    """Symbols of FORMAT.md 4.2 for chosen deltas (delta mode) and top bytes (raw mode)."""
    # w = 2: old 1000 -> new: delta +1 (sym 0), -1 (1), +8 (14), -8 (15), +9 (16 + 4 - 4 = 16), -300 (nb 9 -> 21),
    # -32768 (m = 2^15, nb 16 -> 28), +32767 (nb 15 -> 27)
    olds = [1000] * 8
    news = [1001, 999, 1008, 992, 1009, 700, 1000 - 32768, 1000 + 32767]
    old = torch.tensor(olds, dtype=torch.int32).to(torch.int16)
    new = torch.tensor([(v + 32768) % 65536 - 32768 for v in news], dtype=torch.int32).to(torch.int16)
    counts, hist, total = impl.scan(u8(old), u8(new), 2, MODE_DELTA)
    assert total == 8
    want = {0: 1, 1: 1, 14: 1, 15: 1, 16: 1, 21: 1, 28: 1, 27: 1}
    assert {s: int(c) for s, c in enumerate(np.asarray(hist)) if c} == want
    _counts, hist, total = impl.scan(u8(old), u8(new), 2, MODE_RAW)
    tops = {}
    for v in news:
        s = ((v % 65536) >> 8)
        tops[s] = tops.get(s, 0) + 1
    assert {s: int(c) for s, c in enumerate(np.asarray(hist)) if c} == tops


# ---------------------------------------------------------------------------------------------------------------------
# encode / decode / scatter

def _freq_for(impl, old, new, w, mode):
    _, hist, total = impl.scan(old, new, w, mode)
    return build_freq(hist), total


ENC_CASES = [(n, log2c, density) for n, log2c, density in
             [(1, 12, 1.0), (100, 12, 0.3), (4096, 12, 0.01), (4097, 12, 1.0), (10000, 12, 0.05),
              (10000, 13, 0.2), (10000, 14, 0.002), (20000, 16, 0.01), (12289, 12, 0.5), (9000, 30, 0.1)]]


@needs_native
@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("mode", MODES, ids=["delta", "raw"])
@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_encode_decode_native_matches_reference(w, mode):
    for n, log2c, density in ENC_CASES:
        old, new = pair(w, n, density, n + log2c + w)
        freq, total = _freq_for(reference, old, new, w, mode)
        if total == 0:
            continue
        C = 1 << log2c
        nchunks = -(-n // C)
        ranges = {(0, nchunks), (0, 1), (nchunks - 1, nchunks), (min(1, nchunks - 1), nchunks), (0, 0)}
        for c0, c1 in sorted(ranges):
            r = reference.encode(old, new, w, mode, log2c, c0, c1, freq)
            nat = _native.encode(old, new, w, mode, log2c, c0, c1, freq)
            assert nat[0] == r[0], ("table", n, log2c, c0, c1)
            assert nat[1] == r[1], ("data", n, log2c, c0, c1)
            assert nat[2] == r[2] and nat[3] == r[3], ("hash/nchanged", n, log2c, c0, c1)
            lo, hi = c0 * C, min(c1 * C, n)
            diff = (old.view(-1, w)[lo:hi] != new.view(-1, w)[lo:hi]).any(1).nonzero().reshape(-1) + lo
            assert r[3] == diff.numel()
            assert r[2] == spec.tree64(bytes(new.view(-1, w)[diff].reshape(-1).numpy()))
            if c1 == c0:
                assert r[0] == b"" and r[1] == b"" and r[3] == 0
                continue
            seg = r[0] + r[1]
            for impl in (reference, _native):
                idx, vals = impl.decode(seg, len(r[0]), old, w, mode, log2c, c0, c1, freq, r[3], r[2])
                assert torch.equal(idx, diff), impl.__name__
                assert torch.equal(vals, new.view(-1, w)[diff].reshape(-1)), impl.__name__
            # update_old writes exactly the changed elements of the range, in both implementations
            o1, o2 = old.clone(), old.clone()
            reference.encode(o1, new, w, mode, log2c, c0, c1, freq, update_old=True, nchanged_hint=r[3])
            _native.encode(o2, new, w, mode, log2c, c0, c1, freq, update_old=True, nchanged_hint=r[3])
            want = old.clone()
            want.view(-1, w)[diff] = new.view(-1, w)[diff]
            assert torch.equal(o1, want) and torch.equal(o2, want)


@needs_native
@settings(max_examples=examples(60), deadline=None)
@given(w=st.sampled_from([1, 2, 4, 8]), mode=st.sampled_from(MODES), n=st.integers(1, 9000),
       density=st.floats(0.0005, 1.0), log2c=st.sampled_from([12, 13, 15]), seed=st.integers(0, 2 ** 31),
       style=st.sampled_from(["mixed", "ulp", "bits", "special", "big"]))
def test_encode_decode_parity_hypothesis(w, mode, n, density, log2c, seed, style):
    old, new = pair(w, n, density, seed, style)
    freq, total = _freq_for(_native, old, new, w, mode)
    if total == 0:
        return
    nchunks = -(-n // (1 << log2c))
    r = reference.encode(old, new, w, mode, log2c, 0, nchunks, freq)
    nat = _native.encode(old, new, w, mode, log2c, 0, nchunks, freq, nchanged_hint=total)
    assert nat == r
    seg = r[0] + r[1]
    ri, rv = reference.decode(seg, len(r[0]), old, w, mode, log2c, 0, nchunks, freq, r[3], r[2])
    ni, nv = _native.decode(seg, len(r[0]), old, w, mode, log2c, 0, nchunks, freq, r[3], r[2])
    assert torch.equal(ri, ni) and torch.equal(rv, nv)


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_rejects_symbol_without_frequency(impl):
    old, new = pair(2, 5000, 0.1, 5)
    freq, _ = _freq_for(reference, old, new, 2, MODE_DELTA)
    s = int(np.argmax(freq))
    bad = freq.copy()
    other = next(t for t in range(max_symbol(2, MODE_DELTA) + 1) if bad[t] == 0)
    bad[other] += bad[s]
    bad[s] = 0
    with pytest.raises(KernelError) as info:
        impl.encode(old, new, 2, MODE_DELTA, 12, 0, 2, bad)
    assert info.value.code == E_RANS


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_wrong_hash_or_base_is_E_HASH(impl):
    """The codec turns E_HASH into BaseMismatch (delta mode): a valid stream decoded against another base, or checked
    against another hash, must fail with exactly E_HASH in both implementations."""
    for w in (1, 2, 4, 8):
        old, new = pair(w, 6000, 0.05, 40 + w)
        freq, _total = _freq_for(reference, old, new, w, MODE_DELTA)
        table, data, vh, nch = reference.encode(old, new, w, MODE_DELTA, 12, 0, 2, freq)
        seg = table + data
        with pytest.raises(KernelError) as info:
            impl.decode(seg, len(table), old, w, MODE_DELTA, 12, 0, 2, freq, nch, vh ^ 1)
        assert info.value.code == E_HASH
        diff = (old.view(-1, w) != new.view(-1, w)).any(1).nonzero().reshape(-1)
        other = old.clone()
        other.view(-1, w)[int(diff[len(diff) // 2])] ^= 0x04
        with pytest.raises(KernelError) as info:
            impl.decode(seg, len(table), other, w, MODE_DELTA, 12, 0, 2, freq, nch, vh)
        assert info.value.code == E_HASH


@pytest.mark.parametrize("impl", IMPLS)
def test_scatter(impl):
    for w in (1, 2, 4, 8):
        n = 5000
        dst = rand_bytes(n * w, w)
        g = gen(w)
        idx = torch.randperm(n, generator=g)[:700]
        vals = rand_bytes(700 * w, 100 + w)
        want = dst.clone()
        want.view(-1, w)[idx] = vals.view(-1, w)
        got = dst.clone()
        impl.scatter(got, w, idx, vals)
        assert torch.equal(got, want)
        # an index out of range: nothing is written
        for bad in (n, -1, 2 ** 40):
            idx2 = idx.clone()
            idx2[350] = bad
            got = dst.clone()
            with pytest.raises(KernelError) as info:
                impl.scatter(got, w, idx2, vals)
            assert info.value.code == E_POS
            assert torch.equal(got, dst)
        got = dst.clone()
        impl.scatter(got, w, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8))
        assert torch.equal(got, dst)
        # values at any byte offset of a larger buffer (the decoder's staging buffers are shared by segments of
        # different widths)
        for off in range(1, 8):
            arena = rand_bytes(off + 700 * w + 3, 200 + off)
            vals_u = arena[off: off + 700 * w]
            want = dst.clone()
            want.view(-1, w)[idx] = vals_u.clone().view(-1, w)
            got = dst.clone()
            impl.scatter(got, w, idx, vals_u)
            assert torch.equal(got, want), (w, off)


@needs_native
@pytest.mark.usefixtures("threads")
def test_scatter_native_matches_reference():
    for w in (1, 2, 4, 8):
        n = 70000
        dst = rand_bytes(n * w, 9 + w)
        idx = torch.randperm(n, generator=gen(w))[:30000]
        vals = rand_bytes(30000 * w, 19 + w)
        a, b = dst.clone(), dst.clone()
        reference.scatter(a, w, idx, vals)
        _native.scatter(b, w, idx, vals)
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_rejects_bad_arguments(impl):
    old, new = pair(4, 6000, 0.05, 77)
    freq, _ = _freq_for(reference, old, new, 4, MODE_RAW)
    table, data, vh, nch = reference.encode(old, new, 4, MODE_RAW, 12, 0, 2, freq)
    seg = table + data
    for args in [dict(log2c=11), dict(log2c=31), dict(c1=3), dict(c0=-1), dict(c0=2, c1=1),
                 dict(table_len=len(seg) + 1), dict(table_len=-1), dict(nchanged=nch + 1), dict(nchanged=nch - 1)]:
        a = dict(log2c=12, c0=0, c1=2, table_len=len(table), nchanged=nch)
        a.update(args)
        with pytest.raises(KernelError):
            impl.decode(seg, a["table_len"], old, 4, MODE_RAW, a["log2c"], a["c0"], a["c1"], freq, a["nchanged"], vh)
    bad = freq.copy()
    bad[int(np.argmax(bad))] += 1  # sums to 4097
    with pytest.raises(KernelError):
        impl.decode(seg, len(table), old, 4, MODE_RAW, 12, 0, 2, bad, nch, vh)


# ---------------------------------------------------------------------------------------------------------------------
# corrupted segments: both implementations reject them (codes may differ), or both decode the same thing

_SEGS = {}


def _segment(w: int, mode: int, which: int):
    key = (w, mode, which)
    if key not in _SEGS:
        n, density, log2c = [(6000, 0.04, 12), (9000, 0.3, 12), (3000, 0.01, 13)][which]
        old, new = pair(w, n, density, 500 + 10 * w + mode + which)
        freq, _ = _freq_for(reference, old, new, w, mode)
        nchunks = -(-n // (1 << log2c))
        table, data, vh, nch = reference.encode(old, new, w, mode, log2c, 0, nchunks, freq)
        idx, vals = reference.decode(table + data, len(table), old, w, mode, log2c, 0, nchunks, freq, nch, vh)
        _SEGS[key] = dict(old=old, new=new, freq=freq, table_len=len(table), seg=table + data, vh=vh, nch=nch,
                          log2c=log2c, c1=nchunks, idx=idx, vals=vals)
    return _SEGS[key]


def _run(impl, a):
    try:
        return impl.decode(a["seg"], a["table_len"], a["old"], a["w"], a["mode"], a["log2c"], 0, a["c1"], a["freq"],
                           a["nch"], a["vh"])
    except KernelError as exc:
        return exc


@needs_native
@settings(max_examples=examples(300), deadline=None)
@given(w=st.sampled_from([1, 2, 4, 8]), mode=st.sampled_from(MODES), which=st.integers(0, 2), data=st.data())
def test_corrupted_segments_native_vs_reference(w, mode, which, data):
    s = _segment(w, mode, which)
    a = dict(s, w=w, mode=mode)
    seg = bytearray(s["seg"])
    kind = data.draw(st.sampled_from(["flip", "flip_table", "byte", "truncate", "extend", "table_len", "nchanged",
                                      "hash", "freq", "multi"]), label="kind")
    if kind in ("flip", "multi"):
        for _ in range(data.draw(st.integers(1, 4), label="nflips") if kind == "multi" else 1):
            p = data.draw(st.integers(0, len(seg) - 1), label="pos")
            seg[p] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif kind == "flip_table":
        p = data.draw(st.integers(0, s["table_len"] - 1), label="pos")
        seg[p] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif kind == "byte":
        p = data.draw(st.integers(0, len(seg) - 1), label="pos")
        seg[p] = data.draw(st.integers(0, 255).filter(lambda v: v != seg[p]), label="value")
    elif kind == "truncate":
        seg = seg[: data.draw(st.integers(0, len(seg) - 1), label="cut")]
    elif kind == "extend":
        seg += data.draw(st.binary(min_size=1, max_size=16), label="extra")
    elif kind == "table_len":
        a["table_len"] = s["table_len"] + data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3]), label="by")
    elif kind == "nchanged":
        a["nch"] = max(0, s["nch"] + data.draw(st.sampled_from([-2, -1, 1, 2]), label="by"))
    elif kind == "hash":
        a["vh"] = s["vh"] ^ (1 << data.draw(st.integers(0, 63), label="bit"))
    elif kind == "freq":
        f = s["freq"].astype(np.int64).copy()
        present = [i for i in range(256) if f[i]]
        src = data.draw(st.sampled_from(present), label="from")
        dst = data.draw(st.integers(0, max_symbol(w, mode)), label="to")
        amount = data.draw(st.integers(1, max(1, int(f[src]))), label="amount")
        amount = min(amount, int(f[src]))
        f[src] -= amount
        f[dst] += amount
        a["freq"] = f.astype(np.uint32)
    a["seg"] = bytes(seg)
    r = _run(reference, a)
    n = _run(_native, a)
    unchanged = (a["seg"] == s["seg"] and a["table_len"] == s["table_len"] and a["nch"] == s["nch"] and
                 a["vh"] == s["vh"] and np.array_equal(a["freq"], s["freq"]))
    if isinstance(r, KernelError) or isinstance(n, KernelError):
        assert isinstance(r, KernelError) and isinstance(n, KernelError), \
            f"{kind}: reference -> {r!r}, native -> {n!r}"
        assert not unchanged
        if kind == "hash":
            assert r.code == n.code == E_HASH
        return
    # both accepted: they agree, and the values are the true ones (values_hash), whatever happened to positions
    assert torch.equal(r[0], n[0]) and torch.equal(r[1], n[1])
    assert torch.equal(r[1], s["vals"])


@pytest.mark.parametrize("impl", IMPLS)
def test_corrupted_segments_every_single_bit(impl):
    """Every single-bit flip of a small segment (w=2, delta): rejected, or decoded to exactly the true values."""
    s = _segment(2, MODE_DELTA, 2)
    a = dict(s, w=2, mode=MODE_DELTA)
    accepted = 0
    for p in range(len(s["seg"])):
        for bit in range(8):
            seg = bytearray(s["seg"])
            seg[p] ^= 1 << bit
            res = _run(impl, dict(a, seg=bytes(seg)))
            if not isinstance(res, KernelError):
                accepted += 1
                assert torch.equal(res[1], s["vals"]), (p, bit)
    assert accepted == 0  # delta mode over random old values: any position change alters the values


# ---------------------------------------------------------------------------------------------------------------------
# FORMAT.md by hand

# uint8, delta mode, n = 5, old = [10, 20, 30, 40, 50], new = [11, 20, 30, 37, 50]:
#   changed positions 0 and 3; d = +1 -> symbol 2*(1-1)+0 = 0; d = -3 -> symbol 2*(3-1)+1 = 5; no extra bits.
#   gaps g0 = 0, g1 = 3-0-1 = 2. k: cost(k=0) = 2*1 + 0 + 2 = 4, cost(1) = 2*2 + 0 + 1 = 5, cost(2) = 6  -> k = 0.
#   bit stream (LSB first): g0 = 0 -> "0"; g1 = 2 -> "1","1","0"  => bits 0,1,1,0 -> byte 0b0110 = 0x06, bits_len 1.
#   freq {0: 2048, 5: 2048} (cum 0, 2048): rANS encode from x = 2^23: symbol 5 -> x = (2^23/2048 << 12) + 0 + 2048
#   = 2^24 + 2048; symbol 0 -> x = ((2^24+2048)/2048 << 12) = 8193 << 12 = 0x02001000. No bytes emitted.
#   rANS stream = 00 10 00 02 (rans_len 4). Table: varint n=2, u8 k=0, varint rans_len=4, varint bits_len=1.
HAND_DELTA = dict(
    w=1, mode=MODE_DELTA, log2c=12, old=[10, 20, 30, 40, 50], new=[11, 20, 30, 37, 50],
    freq={0: 2048, 5: 2048}, freq_bytes=bytes([0x02, 0x00, 0x80, 0x10, 0x05, 0x80, 0x10]),
    table=bytes([0x02, 0x00, 0x04, 0x01]), data=bytes([0x00, 0x10, 0x00, 0x02, 0x06]),
    idx=[0, 3], vals=bytes([11, 37]))

# int16 (w = 2), raw mode, n = 3, old = [0, 0, 0], new = [0, 0x1234, 0]:
#   one change at position 1: gap g0 = 1; cost(k=0) = 1 + 1 = 2, cost(1) = 2 + 0 = 2 -> smallest k = 0.
#   symbol = top byte 0x12 = 18, extra = low 8 bits 0x34.
#   bits: gap 1 -> "1","0"; extra 0x34 LSB first -> 0,0,1,0,1,1,0,0  => byte0 = 1,0,0,0,1,0,1,1 = 0xD1, byte1 = 0x00.
#   freq {18: 4096}: rANS x = 2^23 -> ((2^23/4096) << 12) + 0 = 2^23: stream 00 00 80 00.
HAND_RAW = dict(
    w=2, mode=MODE_RAW, log2c=12, old=[0, 0, 0], new=[0, 0x1234, 0],
    freq={18: 4096}, freq_bytes=bytes([0x01, 0x12, 0x80, 0x20]),
    table=bytes([0x01, 0x00, 0x04, 0x02]), data=bytes([0x00, 0x00, 0x80, 0x00, 0xD1, 0x00]),
    idx=[1], vals=bytes([0x34, 0x12]))

# int32 (w = 4), delta mode, n = 4100 (two chunks at log2c = 12: 4096 + 4):
#   chunk 0: no change; chunk 1: position 4097 (relative 1), old 5 -> new 5 + 300 (m = 300, nb = 9, symbol 21).
#   extra bits: neg = 0, then the low 8 bits of 300 (0x2C) LSB first.
#   gap 1: cost(k=0) = 1 + 1 = 2, cost(k=1) = 2 + 0 = 2 -> k = 0: bits "1","0", then 0, then 0,0,1,1,0,1,0,0 (0x2C)
#   => stream bits 1,0,0,0,0,1,1,0 | 1,0,0 -> byte0 = 0b01100001 = 0x61, byte1 = 0x01.
#   table: chunk 0 -> varint 0; chunk 1 -> varint 1, k 0, rans_len 4, bits_len 2.
HAND_TWO_CHUNKS = dict(
    w=4, mode=MODE_DELTA, log2c=12, old=[5] * 4100, new=[5] * 4097 + [305, 5, 5],
    freq={21: 4096}, freq_bytes=bytes([0x01, 0x15, 0x80, 0x20]),
    table=bytes([0x00, 0x01, 0x00, 0x04, 0x02]), data=bytes([0x00, 0x00, 0x80, 0x00, 0x61, 0x01]),
    idx=[4097], vals=(305).to_bytes(4, "little"))


def _hand_tensors(case):
    dt = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[case["w"]]
    old = u8(torch.tensor(case["old"], dtype=torch.int64).to(dt))
    new = u8(torch.tensor(case["new"], dtype=torch.int64).to(dt))
    freq = np.zeros(256, dtype=np.uint32)
    for s, f in case["freq"].items():
        freq[s] = f
    return old, new, freq


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [HAND_DELTA, HAND_RAW, HAND_TWO_CHUNKS], ids=["delta_u8", "raw_i16", "two_chunks"])
def test_hand_made_segment(impl, case):
    """A segment written byte by byte from FORMAT.md decodes, and encodes, to exactly these bytes."""
    old, new, freq = _hand_tensors(case)
    w, mode, log2c = case["w"], case["mode"], case["log2c"]
    nchunks = -(-len(case["old"]) // (1 << log2c))
    vhash = spec.tree64(case["vals"])
    # decode the hand-written bytes
    idx, vals = impl.decode(case["table"] + case["data"], len(case["table"]), old, w, mode, log2c, 0, nchunks, freq,
                            len(case["idx"]), vhash)
    assert idx.tolist() == case["idx"]
    assert bytes(vals.numpy()) == case["vals"]
    # the independent spec decoder agrees
    out = spec.decode_sparse(case["table"] + case["data"], len(case["table"]), bytes(old.numpy()), w,
                             "delta" if mode == MODE_DELTA else "raw", log2c, 0, len(case["old"]),
                             len(case["old"]), case["freq"], len(case["idx"]), vhash)
    assert [i for i, _ in out] == case["idx"]
    # the encoder produces exactly these bytes
    table, data, vh, nch = impl.encode(old, new, w, mode, log2c, 0, nchunks, freq)
    assert (table, data, vh, nch) == (case["table"], case["data"], vhash, len(case["idx"]))
    # symbol table bytes
    assert pack_freq(freq) == case["freq_bytes"]
    assert np.array_equal(unpack_freq(case["freq_bytes"], max_symbol(w, mode)), freq)
    # and the scan finds the symbols the freq table was built for
    _, hist, total = impl.scan(old, new, w, mode)
    assert total == len(case["idx"])
    assert {s for s in range(256) if hist[s]} == set(case["freq"])
    assert np.array_equal(build_freq(hist), freq)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_made_segment_violations(impl):
    """Each rule of FORMAT.md 4.4 broken in the hand-made segment is rejected."""
    c = HAND_DELTA
    old, _new, freq = _hand_tensors(c)
    vhash = spec.tree64(c["vals"])
    good = c["table"] + c["data"]

    def dec(seg, table_len=4, nch=2, f=freq, vh=vhash):
        return impl.decode(seg, table_len, old, 1, MODE_DELTA, 12, 0, 1, f, nch, vh)

    dec(good)
    bad_cases = {
        "padding bit set": good[:-1] + bytes([0x06 | 0x80]),
        "bit stream one byte too long": bytes([0x02, 0x00, 0x04, 0x02]) + c["data"] + b"\x00",
        "rANS stream one byte too long": bytes([0x02, 0x00, 0x05, 0x01]) + c["data"][:4] + b"\x00" + c["data"][4:],
        "rANS final state not L": bytes([0x02, 0x00, 0x04, 0x01]) + bytes([0x01, 0x10, 0x00, 0x02, 0x06]),
        "k > log2c": bytes([0x02, 13, 0x04, 0x01]) + c["data"],
        "count larger than chunk": bytes([0x06, 0x00, 0x04, 0x01]) + c["data"],
        "position outside the chunk": good[:-1] + bytes([0b011110]),  # gap 2 -> 4: position 5 >= 5 elements
        "streams shorter than the table says": good[:-1],
        "trailing byte after the streams": good + b"\x00",
        "varint longer than 10 bytes": bytes([0x82] + [0x80] * 10 + [0x00]) + c["data"],
    }
    for what, seg in bad_cases.items():
        tl = 4 if what != "varint longer than 10 bytes" else 12
        with pytest.raises(KernelError):
            dec(seg, table_len=tl)
            pytest.fail(what)
    with pytest.raises(KernelError):
        dec(good, nch=1)
    with pytest.raises(KernelError):
        dec(good, nch=3)
    with pytest.raises(KernelError) as info:
        dec(good, vh=vhash ^ 1)
    assert info.value.code == E_HASH
    with pytest.raises(KernelError):
        dec(good, table_len=3)
    assert E_ARG < 0


@pytest.mark.skipif(not _native.available, reason="native library not built")
@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_deferred_delta_decode_and_add_scatter_match_reference(w):
    """Decode mode 2 (differences only) + add_scatter == mode 0 (new values), natively and in the reference;
    add_scatter with negate undoes it exactly."""
    g = torch.Generator().manual_seed(w)
    n = 50_000
    iv = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w]
    old = torch.randint(-100, 100, (n,), generator=g, dtype=torch.int64).to(iv)
    new = old.clone()
    idx = torch.randperm(n, generator=g)[:700]
    new[idx] += torch.randint(-40, 40, (700,), generator=g, dtype=torch.int64).to(iv)
    new[idx[:3]] = torch.tensor([-1, 0, 1], dtype=iv)   # wrap-around differences
    ob, nb = old.view(torch.uint8), new.view(torch.uint8)
    counts, hist, total = reference.scan(ob, nb, w, 0)
    from sparsesync.format import build_freq
    freq = build_freq(hist)
    table, data, vhash, nch = reference.encode(ob, nb, w, 0, 12, 0, -(-n // 4096), freq)
    seg = table + data
    for kern in (reference, _native):
        i0, v0 = kern.decode(seg, len(table), ob, w, 0, 12, 0, -(-n // 4096), freq, nch, vhash)
        i2, d2 = kern.decode(seg, len(table), ob, w, 2, 12, 0, -(-n // 4096), freq, nch, 0)
        assert torch.equal(i0, i2)
        dst = old.clone()
        out = torch.empty(nch * w, dtype=torch.uint8)
        kern.add_scatter(dst.view(torch.uint8), w, i2, d2, out)
        assert torch.equal(out, v0) and torch.equal(dst, new)
        assert kern.tree64(out) == vhash
        kern.add_scatter(dst.view(torch.uint8), w, i2, d2, None, negate=True)
        assert torch.equal(dst, old)
        bad = i2.clone()
        bad[-1] = n
        with pytest.raises(reference.KernelError):
            kern.add_scatter(dst.view(torch.uint8), w, bad, d2)
        assert torch.equal(dst, old)                        # nothing written on a bad index
