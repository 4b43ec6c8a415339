"""Format version 2 kernels (docs/FORMAT.md 6, docs/notes/format2.md): the pure-PyTorch reference round trips, a
hand-derived bit stream, the independent decoder of tests/spec.py, refusals of malformed segments, and (when the
native library has the version-2 kernels) native against reference byte for byte."""
from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest
import torch

import spec
from helpers import gen, ivw, mutate, random_tensor
from sparsesync import _native, reference as R
from sparsesync.format import build_freq, pack_freq
from sparsesync.reference import (E_ARG, E_COUNT, E_HASH, E_POS, E_RANS, E_STREAM, E_TABLE, KernelError,
                                  MODE_DELTA, MODE_DELTA_DEFERRED, MODE_RAW)
from sparsesync.space import Space, key_bits

INTV = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn, torch.int32]


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_space(dtype, tensors, names=None) -> Space:
    names = names or [f"t{i:04d}" for i in range(len(tensors))]
    return Space(dname(dtype), names, tensors)


def clone_space(sp: Space) -> Space:
    return Space(sp.dtype, list(sp.names), [t.clone() for t in sp.tensors])


def flat_int(sp: Space) -> torch.Tensor:
    return sp.flat().view(INTV[sp.w]).clone()


def space_pair(dtype, sizes, density, seed, style="mixed"):
    """(old, new) spaces of tensors of the given sizes (shapes vary: flat, 2-d, 0-dim)."""
    g = gen(seed)
    olds, news = [], []
    for i, n in enumerate(sizes):
        shape = () if n == 1 and i % 2 else ((n,) if n % 3 else (3, n // 3))
        o = random_tensor(shape, dtype, g)
        olds.append(o)
        news.append(mutate(o, density, g, style))
    return make_space(dtype, olds), make_space(dtype, news)


def class_freqs(old: Space, new: Space, mode: int, cuts) -> np.ndarray:
    """Per-class symbol tables from scan2's (key, symbol) histogram."""
    _, hist, _, _, _ = R.scan2(old, new, mode)
    K = len(cuts) + 1
    cls_of_key = np.searchsorted(np.array(cuts, dtype=np.int64), np.arange(hist.shape[0]), side="right")
    out = np.zeros((K, 256), dtype=np.uint32)
    for c in range(K):
        out[c] = build_freq(hist[cls_of_key == c].sum(0))
    return out


def cuts_from_keys(old: Space, new: Space, mode: int, n: int) -> list[int]:
    """Cuts chosen from the key distribution of the changed elements (quantiles of their keys)."""
    _, hist, _, _, _ = R.scan2(old, new, mode)
    per_key = hist.sum(1).astype(np.float64)
    if per_key.sum() == 0:
        return []
    cdf = np.cumsum(per_key) / per_key.sum()
    cuts = sorted({int(np.searchsorted(cdf, q)) for q in np.linspace(0, 1, n + 2)[1:-1]} - {0})
    return [c for c in cuts if c < hist.shape[0]]


def expected(old: Space, new: Space, start: int, end: int):
    o, nw = flat_int(old), flat_int(new)
    idx = (o[start:end] != nw[start:end]).nonzero().reshape(-1) + start
    return idx, nw[idx]


def spec_cls(ks, freqs):
    return [None if k is None else [k, pack_freq(freqs[c])] for c, k in enumerate(ks)]


# ---------------------------------------------------------------------------------------------------------------------
# round trips through the reference

CASES = [  # dtype, sizes, density, log2c, start/end fractions
    (torch.bfloat16, [5000, 1, 7000, 300, 9000, 2], 0.03, 12, (0.0, 1.0)),
    (torch.bfloat16, [20000], 0.5, 13, (0.1, 0.83)),
    (torch.float32, [3000] * 5 + [1], 0.05, 12, (0.05, 0.95)),
    (torch.float16, [100] * 90, 0.1, 12, (0.013, 0.7)),
    (torch.float8_e4m3fn, [4097, 4095, 1, 8191], 0.2, 12, (0.0, 1.0)),
    (torch.int32, [6000, 6001], 0.02, 12, (0.3, 1.0)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", [MODE_DELTA, MODE_RAW, MODE_DELTA_DEFERRED])
@pytest.mark.parametrize("cutstyle", ["none", "keys"])
def test_roundtrip(case, mode, cutstyle):
    dtype, sizes, density, log2c, (f0, f1) = CASES[case]
    old, new = space_pair(dtype, sizes, density, seed=case * 7 + mode)
    emode = MODE_DELTA if mode == MODE_DELTA_DEFERRED else mode
    kb = key_bits(old.dtype)
    if cutstyle == "keys" and kb == 0:
        pytest.skip("no keys for this dtype")
    cuts = cuts_from_keys(old, new, emode, 4) if cutstyle == "keys" else []
    freqs = class_freqs(old, new, emode, cuts)
    start, end = int(old.n * f0), max(int(old.n * f1), int(old.n * f0) + 1)
    table, data, ks, vh, nch = R.encode2(old, new, emode, start, end, log2c, cuts, freqs)
    want_idx, want_vals = expected(old, new, start, end)
    assert nch == want_idx.numel() > 0
    assert len(ks) == len(cuts) + 1 and any(k is not None for k in ks)
    assert vh == spec.tree64(bytes(want_vals.view(torch.uint8).numpy()))
    idx, vals = R.decode2(table + data, len(table), old, mode, start, end, log2c, cuts, ks, freqs, nch, vh)
    assert torch.equal(idx, want_idx)
    if mode == MODE_DELTA_DEFERRED:
        dst = clone_space(old)
        new_out = torch.empty(nch * old.w, dtype=torch.uint8)
        R.add_scatter2(dst, idx, vals, new_out=new_out)
        assert torch.equal(new_out.view(INTV[old.w]), want_vals)
        assert R.tree64(new_out) == vh
    else:
        assert torch.equal(vals.view(INTV[old.w]), want_vals)
    # update_old: the same segment, and old then holds the new values at the changed elements only
    upd = clone_space(old)
    assert R.encode2(upd, new, emode, start, end, log2c, cuts, freqs, update_old=True) == (table, data, ks, vh, nch)
    want = flat_int(old)
    want[want_idx] = want_vals
    assert torch.equal(flat_int(upd), want)


def test_per_class_rice_parameter_follows_the_rule():
    """k of each present class is the smallest k minimising sum((g >> k) + k + 1) over first, later and final gaps
    of the chunks with n > 0 (recomputed here from positions and classes)."""
    old, new = space_pair(torch.bfloat16, [30000], 0.02, seed=3, style="ulp")
    cuts = cuts_from_keys(old, new, 0, 3)
    freqs = class_freqs(old, new, 0, cuts)
    start, end, log2c = 777, 29000, 12
    _, _, ks, _, _ = R.encode2(old, new, 0, start, end, log2c, cuts, freqs)
    o, nw = flat_int(old), flat_int(new)
    key = ((o.to(torch.int64) & 0xFFFF) >> 7) & 0xFF
    cls = torch.bucketize(key, torch.tensor(cuts), right=True)
    C = 1 << log2c
    gaps = {c: [] for c in range(len(cuts) + 1)}
    present = set(cls[start:end][(o[start:end] != nw[start:end])].tolist())
    for lo in range(start, end, C):
        hi = min(lo + C, end)
        ch = (o[lo:hi] != nw[lo:hi])
        if not ch.any():
            continue
        for c in present:
            flags = ch[cls[lo:hi] == c].tolist()
            run = 0
            for f in flags:
                if f:
                    gaps[c].append(run)
                    run = 0
                else:
                    run += 1
            gaps[c].append(run)
    for c in range(len(cuts) + 1):
        if c not in present:
            assert ks[c] is None
            continue
        costs = [sum((g >> k) + k + 1 for g in gaps[c]) for k in range(log2c + 1)]
        assert ks[c] == costs.index(min(costs))


# ---------------------------------------------------------------------------------------------------------------------
# a hand-derived vector (FORMAT.md 6.4)
#
# bfloat16 space of 16 elements in two tensors (5 + 11), cuts = [127]: key = exponent, class 1 iff exponent >= 127.
# Old values: 0x3F00 (0.5, exponent 126, class 0) or 0x3F80 (1.0, exponent 127, class 1):
#   position: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
#   class:    0 0 1 0 1 1 0 0 1 0  0  0  1  1  0  0
# class 0 members: positions 0 1 3 6 7 9 10 11 14 15 (10); class 1 members: 2 4 5 8 12 13 (6).
# Changes (delta): pos 1 +1 (sym 0), pos 4 -1 (sym 1), pos 9 +9 (m=9 > 8: nb=4, sym 16, extra: neg=0 then the low 3
# bits of 9 = 001), pos 12 +1 (sym 0).
# Class 0: changes at member ranks 1 and 5 -> gaps: first 1, later 5-1-1 = 3, final 10-5-1 = 4.
#   k: cost(k) = sum(g>>k) + 3(k+1): k=0: 8+3 = 11, k=1: 3+6 = 9, k=2: 1+9 = 10 -> k = 1.
# Class 1: changes at ranks 1 and 4 -> gaps: first 1, later 4-1-1 = 2, final 6-4-1 = 1.
#   k=0: 4+3 = 7, k=1: 1+6 = 7 (tie: the smallest) -> k = 0.
# Bit stream (Rice: q ones, a zero, low k bits):
#   first gaps: class 0 g=1 k=1: 0|1       class 1 g=1 k=0: 1 0
#   pos 1 (class 0, no extra), next gap 3 (k=1): 1 0 | 1
#   pos 4 (class 1, no extra), next gap 2 (k=0): 1 1 0
#   pos 9 (class 0, extra 0,1,0,0), final gap 4 (k=1): 1 1 0 | 0
#   pos 12 (class 1, no extra), final gap 1 (k=0): 1 0
#   bits: 0 1 1 0 1 0 1 1 | 1 0 0 1 0 0 1 1 | 0 0 1 0 (+ 4 zero padding bits) -> bytes D6 C9 04
# rANS (tables: class 0 {0: 2048, 16: 2048}, class 1 {0: 2048, 1: 2048}; no renormalisation below 2^30), symbols
# coded in reverse: x = 2^23 -> pos 12 (f 2048, c 0): 2^24 -> pos 9 (c 2048): 2^25 + 2048 -> pos 4 (c 2048):
# 16385*4096 + 2048 = 67115008 -> pos 1 (c 0): 32771*4096 = 134230016 = 0x08003000 -> stream 00 30 00 08.
# Chunk table: n=4, rans_len=4, bits_len=3 -> 04 04 03.

HAND_CLASSES = [0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0]
HAND_DELTAS = {1: 1, 4: -1, 9: 9, 12: 1}
HAND_TABLE = bytes([0x04, 0x04, 0x03])
HAND_DATA = bytes([0x00, 0x30, 0x00, 0x08, 0xD6, 0xC9, 0x04])


def hand_spaces():
    old = torch.tensor([0x3F80 if c else 0x3F00 for c in HAND_CLASSES], dtype=torch.int16)
    new = old.clone()
    for p, d in HAND_DELTAS.items():
        new[p] += d
    o, n = old.view(torch.bfloat16), new.view(torch.bfloat16)
    return (make_space(torch.bfloat16, [o[:5].clone(), o[5:].clone()]),
            make_space(torch.bfloat16, [n[:5].clone(), n[5:].clone()]), new)


def hand_freqs():
    f = np.zeros((2, 256), dtype=np.uint32)
    f[0, 0] = f[0, 16] = 2048
    f[1, 0] = f[1, 1] = 2048
    return f


def test_hand_vector_encode_decode_spec():
    old, new, new_int = hand_spaces()
    freqs = hand_freqs()
    table, data, ks, vh, nch = R.encode2(old, new, 0, 0, 16, 12, [127], freqs)
    assert (table, data, ks, nch) == (HAND_TABLE, HAND_DATA, [1, 0], 4)
    pos = sorted(HAND_DELTAS)
    want_vals = new_int[pos]
    assert vh == spec.tree64(bytes(want_vals.view(torch.uint8).numpy()))
    idx, vals = R.decode2(HAND_TABLE + HAND_DATA, 3, old, 0, 0, 16, 12, [127], [1, 0], freqs, 4, vh)
    assert idx.tolist() == pos and torch.equal(vals.view(torch.int16), want_vals)
    out = spec.decode_sparse2(HAND_TABLE + HAND_DATA, 3, bytes(old.flat().numpy()), 2, 8, "delta", 12, 0, 16, [127],
                              spec_cls([1, 0], freqs), 4, vh)
    assert out == [(p, int(v) & 0xFFFF) for p, v in zip(pos, want_vals.tolist())]


def _bits(fields) -> bytes:
    """LSB-first bit stream from ('r', g, k) Rice codes and ('b', value, nbits) plain fields."""
    acc = nb = 0
    for f in fields:
        if f[0] == "r":
            _, g, k = f
            q = g >> k
            acc |= ((1 << q) - 1) << nb
            nb += q + 1
            acc |= (g & ((1 << k) - 1)) << nb
            nb += k
        else:
            acc |= f[1] << nb
            nb += f[2]
    return acc.to_bytes((nb + 7) // 8, "little")


def _hand_bits(final0=4, first0=1, final1=1):
    return _bits([("r", first0, 1), ("r", 1, 0), ("r", 3, 1), ("r", 2, 0), ("b", 0b0010, 4), ("r", final0, 1),
                  ("r", final1, 0)])


def _refused(seg, table_len, ks=(1, 0), cuts=(127,), nchanged=4, log2c=12, mode=0, vh=None):
    """The reference and the spec decoder both refuse the segment; returns the reference's error code."""
    old, _, new_int = hand_spaces()
    freqs = hand_freqs()
    if vh is None:
        vh = spec.tree64(bytes(new_int[sorted(HAND_DELTAS)].view(torch.uint8).numpy()))
    with pytest.raises(KernelError) as ei:
        R.decode2(seg, table_len, old, mode, 0, 16, log2c, list(cuts), list(ks), freqs[:len(ks)], nchanged, vh)
    with pytest.raises(spec.SpecError):
        spec.decode_sparse2(bytes(seg), table_len, bytes(old.flat().numpy()), 2, 8, "delta", log2c, 0, 16,
                            list(cuts), spec_cls(list(ks), freqs), nchanged, vh)
    return ei.value.code


def test_hand_bits_helper_matches():
    assert _hand_bits() == HAND_DATA[4:]


# a final gap too short leaves class-0 elements that the walk takes as changes beyond n (E_COUNT, found as the
# (n+1)-th change appears); a gap too long leaves s_c > 0 at the chunk's end (E_POS, checked before the count)
@pytest.mark.parametrize("final0,code", [(3, E_COUNT), (5, E_POS), (9, E_POS)])
def test_final_gap_too_short_or_too_long_is_refused(final0, code):
    bits = _hand_bits(final0=final0)
    seg = bytes([4, 4, len(bits)]) + HAND_DATA[:4] + bits
    assert _refused(seg, 3) == code


@pytest.mark.parametrize("first0,final1,code", [(12, 1, E_POS), (1, 2, E_POS), (1, 0, E_COUNT)])
def test_gap_past_the_chunk_is_refused(first0, final1, code):
    bits = _hand_bits(first0=first0, final1=final1)
    seg = bytes([4, 4, len(bits)]) + HAND_DATA[:4] + bits
    assert _refused(seg, 3) == code


def test_malformed_hand_segments_are_refused():
    seg = HAND_TABLE + HAND_DATA
    assert _refused(seg, 3, ks=(13, 0)) == E_TABLE                   # k > log2c
    assert _refused(seg, 3, ks=(1, 13)) == E_TABLE
    assert _refused(seg, 3, ks=(None, None)) == E_TABLE              # no present class
    assert _refused(seg, 3, ks=(1, None)) == E_POS                   # class 1's changes have no class
    assert _refused(seg, 3, ks=(None, 0)) == E_POS
    assert _refused(seg, 3, cuts=(0,)) == E_ARG                      # bad cuts
    assert _refused(seg, 3, cuts=(256,)) == E_ARG
    assert _refused(seg + b"\0", 3) == E_TABLE                       # streams do not fill the segment
    assert _refused(seg[:-1], 3) == E_TABLE
    assert _refused(bytes([4, 4, 4]) + HAND_DATA + b"\0", 3) == E_STREAM   # bit stream not consumed exactly
    assert _refused(bytes([4, 4, 3]) + HAND_DATA[:6] + b"\x14", 3) == E_STREAM  # a padding bit set
    assert _refused(seg, 3, nchanged=5) == E_COUNT
    assert _refused(bytes([3, 4, 3]) + HAND_DATA, 3, nchanged=3) == E_COUNT
    assert _refused(bytes([4, 0x84, 0x00, 3]) + HAND_DATA, 4) == E_TABLE  # non-canonical varint
    assert _refused(seg, 3, vh=12345) == E_HASH
    bad = bytearray(seg)
    bad[4] ^= 0x10
    _refused(bytes(bad), 3)                                          # damaged rANS state
    _refused(seg, 3, log2c=11)


def test_bad_cuts_and_tables_refused_by_encoder():
    old, new, _ = hand_spaces()
    freqs = hand_freqs()
    for cuts in ([0], [5, 5], [6, 5], [256], list(range(1, 33))):
        K = len(cuts) + 1
        with pytest.raises(KernelError) as ei:
            R.encode2(old, new, 0, 0, 16, 12, cuts, np.zeros((K, 256), dtype=np.uint32))
        assert ei.value.code == E_ARG
    zero1 = freqs.copy()
    zero1[1] = 0
    with pytest.raises(KernelError) as ei:           # class 1 has changes but no table
        R.encode2(old, new, 0, 0, 16, 12, [127], zero1)
    assert ei.value.code == E_RANS
    missing = freqs.copy()
    missing[0, 16], missing[0, 0] = 0, 4096          # class 0's symbol 16 has no frequency
    with pytest.raises(KernelError) as ei:
        R.encode2(old, new, 0, 0, 16, 12, [127], missing)
    assert ei.value.code == E_RANS
    iold, inew = space_pair(torch.int32, [5000], 0.1, seed=1)
    with pytest.raises(KernelError) as ei:           # int32 has no keys: no cuts
        R.encode2(iold, inew, 0, 0, 5000, 12, [1], np.zeros((2, 256), dtype=np.uint32))
    assert ei.value.code == E_ARG
    with pytest.raises(KernelError):                 # empty range / outside the space
        R.encode2(old, new, 0, 5, 5, 12, [127], freqs)
    with pytest.raises(KernelError):
        R.encode2(old, new, 0, 0, 17, 12, [127], freqs)


# ---------------------------------------------------------------------------------------------------------------------
# the independent decoder of tests/spec.py on reference-built segments

@pytest.mark.parametrize("dtype,mode,ncuts,seed", [
    (torch.bfloat16, MODE_DELTA, 3, 1), (torch.bfloat16, MODE_RAW, 0, 2), (torch.float32, MODE_DELTA, 5, 3),
    (torch.float16, MODE_RAW, 2, 4), (torch.float8_e4m3fn, MODE_DELTA, 2, 5), (torch.int32, MODE_DELTA, 0, 6)])
def test_spec_decoder_agrees(dtype, mode, ncuts, seed):
    old, new = space_pair(dtype, [3000, 1, 6000, 2500], 0.08, seed=seed)
    cuts = cuts_from_keys(old, new, mode, ncuts) if key_bits(old.dtype) else []
    freqs = class_freqs(old, new, mode, cuts)
    start, end = 1001, old.n - 3
    table, data, ks, vh, nch = R.encode2(old, new, mode, start, end, 12, cuts, freqs)
    vals_name = "raw" if mode == MODE_RAW else "delta"
    out = spec.decode_sparse2(table + data, len(table), bytes(old.flat().numpy()), old.w, old.kb, vals_name, 12, start,
                              end, cuts, spec_cls(ks, freqs), nch, vh)
    idx, vals = R.decode2(table + data, len(table), old, mode, start, end, 12, cuts, ks, freqs, nch, vh)
    mask = (1 << (8 * old.w)) - 1
    assert out == [(i, v & mask) for i, v in zip(idx.tolist(), vals.view(INTV[old.w]).tolist())]


def _bucket_v2(state_spec: dict, segs, body: bytes, vals: str) -> bytes:
    """One version-2 bucket (the whole update) built from FORMAT.md 2 and 6 with spec.py's hashes."""
    layout = spec.layout_digest(state_spec)
    uid = hashlib.blake2b(layout + msgpack.packb([0, 1, vals], use_bin_type=True), digest_size=32).digest()[:16]
    header = {"v": 2, "uid": uid, "base": 0, "ver": 1, "vals": vals, "idx": 0, "cnt": 1, "layout": layout,
              "ntensors": len(state_spec), "dig": False, "digest": None, "body_len": len(body),
              "body_hash": spec.tree64(body), "prev": 0, "segs": segs}
    hb = msgpack.packb(header, use_bin_type=True)
    return b"SSYN" + len(hb).to_bytes(4, "little") + spec.h64(hb, 0x48445248).to_bytes(8, "little") + hb + body


def test_spec_apply_update_v2():
    """A version-2 update of two spaces (sparse with cuts, dense, sparse without cuts) applied by spec.apply_update."""
    g = gen(11)
    state = {"a.w": random_tensor((40, 100), torch.bfloat16, g), "b.w": random_tensor((3000,), torch.bfloat16, g),
             "c": random_tensor((7, 300), torch.int32, g), "a.e": torch.empty(0, dtype=torch.bfloat16),
             "d": random_tensor((), torch.bfloat16, g)}
    newst = {k: mutate(v, 0.05, g, "ulp") for k, v in state.items()}
    spaces_old, spaces_new = {}, {}
    for dt in (torch.bfloat16, torch.int32):
        names = sorted(k for k, v in state.items() if v.dtype == dt)
        spaces_old[dt] = make_space(dt, [state[k] for k in names], names)
        spaces_new[dt] = make_space(dt, [newst[k] for k in names], names)
    segs, parts, off = [], [], 0
    bo, bn = spaces_old[torch.bfloat16], spaces_new[torch.bfloat16]
    cuts = cuts_from_keys(bo, bn, 0, 3)
    freqs = class_freqs(bo, bn, 0, cuts)
    for s, e in [(0, 2500), (2600, bo.n)]:
        table, data, ks, vh, nch = R.encode2(bo, bn, 0, s, e, 12, cuts, freqs)
        segs.append(["bfloat16", "s", s, e, 12, len(table), off, len(table) + len(data), cuts,
                     spec_cls(ks, freqs), vh, nch])
        parts.append(table + data)
        off += len(table) + len(data)
    dense = bytes(R.gather2(bn, 2500, 2600).numpy())
    segs.insert(1, ["bfloat16", "d", 2500, 2600, 0, 0, off, len(dense), [], [], None, 100])
    # move the dense part to its place in the body: segments tile the body in array order
    p0 = parts[0]
    segs[1][6] = len(p0)
    segs[2][6] = len(p0) + len(dense)
    parts = [p0, dense, parts[1]]
    io, inew = spaces_old[torch.int32], spaces_new[torch.int32]
    freqs_i = class_freqs(io, inew, 0, [])
    table, data, ks, vh, nch = R.encode2(io, inew, 0, 0, io.n, 12, [], freqs_i)
    segs.append(["int32", "s", 0, io.n, 12, len(table), sum(map(len, parts)), len(table) + len(data), [],
                 spec_cls(ks, freqs_i), vh, nch])
    parts.append(table + data)
    body = b"".join(parts)
    st = {k: (dname(v.dtype), list(v.shape), bytearray(bytes(ivw(v.contiguous()).reshape(-1).view(torch.uint8)
                                                              .numpy()))) for k, v in state.items()}
    spec.apply_update([_bucket_v2(st, segs, body, "delta")], st)
    for k, v in newst.items():
        assert bytes(st[k][2]) == bytes(ivw(v.contiguous()).reshape(-1).view(torch.uint8).numpy()), k
    # a segment reaching past its space, and overlapping segments, are refused
    bad1 = ([["int32", "d", 0, io.n + 1, 0, 0, 0, (io.n + 1) * 4, [], [], None, io.n + 1]], b"\0" * ((io.n + 1) * 4))
    bad2 = ([segs[0], ["bfloat16", "d", 2400, 2500, 0, 0, len(p0), 200, [], [], None, 100]], p0 + b"\0" * 200)
    for bad_segs, bad_body in (bad1, bad2):
        with pytest.raises(spec.SpecError):
            spec.apply_update([_bucket_v2(st, bad_segs, bad_body, "delta")], st)


# ---------------------------------------------------------------------------------------------------------------------
# scan2 / scatter / gather / put / take / tree64_many of the reference against plain torch

def test_scan2_reference():
    old, new = space_pair(torch.bfloat16, [30000, 3, 40000], 0.05, seed=9)
    counts, hist, keys, total, _pieces = R.scan2(old, new, 0)
    o, n = flat_int(old).to(torch.int64) & 0xFFFF, flat_int(new).to(torch.int64) & 0xFFFF
    ch = o != n
    assert total == int(ch.sum()) == int(hist.sum()) == int(counts.sum())
    assert counts.dtype == np.uint32 and hist.dtype == np.uint64 and keys.dtype == np.uint64
    assert hist.shape == (256, 256) and keys.shape == (256,) and counts.shape == (-(-old.n // 4096),)
    key = (o >> 7) & 0xFF
    assert counts.tolist() == [int(ch[b * 4096:(b + 1) * 4096].sum()) for b in range(counts.size)]
    sample = (torch.arange(old.n) // 4096) % 16 == 0
    assert keys.tolist() == torch.bincount(key[sample], minlength=256).tolist()
    assert hist.sum(1).tolist() == torch.bincount(key[ch], minlength=256).tolist()
    ic, ih, ik, it, _ip = R.scan2(*space_pair(torch.int32, [5000], 0.1, seed=2), 1)
    assert ih.shape == (1, 256) and ik.shape == (1,) and int(ik[0]) == 4096 and it == int(ih.sum())


def test_scatter_gather_put_take_reference():
    old, new = space_pair(torch.float32, [10, 1, 500, 7, 3000], 0.3, seed=4)
    n = old.n
    dst = clone_space(old)
    idx = torch.tensor([0, 9, 10, 11, 400, 510, n - 1, 600], dtype=torch.int64)
    vals = flat_int(new)[idx]
    touched = np.zeros(len(dst.tensors), dtype=np.uint8)
    R.scatter2(dst, idx, vals.view(torch.uint8), touched=touched)
    want = flat_int(old)
    want[idx] = vals
    assert torch.equal(flat_int(dst), want) and touched.tolist() == [1, 1, 1, 0, 1]
    assert torch.equal(R.take2(dst, idx).view(torch.int32), vals)
    assert torch.equal(R.gather2(dst, 5, 520).view(torch.int32), want[5:520])
    with pytest.raises(KernelError) as ei:
        R.scatter2(dst, torch.tensor([0, n]), vals[:2].contiguous().view(torch.uint8))
    assert ei.value.code == E_POS and torch.equal(flat_int(dst), want)
    with pytest.raises(KernelError):
        R.scatter2(dst, torch.tensor([-1]), vals[:1].contiguous().view(torch.uint8))
    d = torch.tensor([1, -1, 2 ** 31 - 1, -5, 7, 0, 1, 3], dtype=torch.int32)
    out = torch.empty(len(idx) * 4, dtype=torch.uint8)
    R.add_scatter2(dst, idx, d.view(torch.uint8), new_out=out)
    added = ((want[idx].to(torch.int64) + d.to(torch.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)
    assert torch.equal(out.view(torch.int32), added)
    R.add_scatter2(dst, idx, d.view(torch.uint8), negate=True)
    assert torch.equal(flat_int(dst), want)
    touched[:] = 0
    R.put2(dst, 8, 515, flat_int(new)[8:515].view(torch.uint8), touched=touched)
    want[8:515] = flat_int(new)[8:515]
    assert torch.equal(flat_int(dst), want) and touched.tolist() == [1, 1, 1, 1, 0]
    R.put2(dst, 0, n, bytes(new.flat().numpy()))
    assert torch.equal(flat_int(dst), flat_int(new))


def test_tree64_many_reference():
    g = gen(1)
    ts = [random_tensor((n,), torch.bfloat16, g) for n in (0, 1, 2048, 2049, 10000)] + \
        [torch.tensor(3.5), torch.zeros(0, 4, dtype=torch.float32), random_tensor((33,), torch.int64, g)]
    got = R.tree64_many(ts)
    assert got.dtype == np.uint64
    assert got.tolist() == [spec.tree64(bytes(ivw(t.contiguous()).reshape(-1).view(torch.uint8).numpy()))
                            for t in ts]


# ---------------------------------------------------------------------------------------------------------------------
# native against reference, byte for byte

V2_NAMES = ["scan2", "encode2", "decode2", "scatter2", "add_scatter2", "gather2", "put2", "take2", "tree64_many"]


def _need_native(*names):
    if not _native.available:
        pytest.skip(f"native library not available: {_native.load_error}")
    missing = [n for n in names if not hasattr(_native, n)]
    if missing:
        pytest.skip(f"native library lacks {missing}")


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", [MODE_DELTA, MODE_RAW])
@pytest.mark.parametrize("cutstyle", ["none", "keys"])
def test_native_matches_reference(case, mode, cutstyle):
    _need_native("scan2", "encode2", "decode2")
    dtype, sizes, density, log2c, (f0, f1) = CASES[case]
    old, new = space_pair(dtype, sizes, density, seed=case * 5 + mode + 100)
    if cutstyle == "keys" and key_bits(old.dtype) == 0:
        pytest.skip("no keys for this dtype")
    rs, ns = R.scan2(old, new, mode), _native.scan2(old, new, mode)
    for a, b in zip(rs[:3], ns[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert rs[3] == ns[3] and np.array_equal(rs[4], ns[4])
    cuts = cuts_from_keys(old, new, mode, 4) if cutstyle == "keys" else []
    freqs = class_freqs(old, new, mode, cuts)
    start, end = int(old.n * f0), max(int(old.n * f1), int(old.n * f0) + 1)
    ref = R.encode2(old, new, mode, start, end, log2c, cuts, freqs)
    nat = _native.encode2(old, new, mode, start, end, log2c, cuts, freqs, nchanged_hint=ref[4])
    assert nat[0] == ref[0] and nat[1] == ref[1] and list(nat[2]) == list(ref[2]) and nat[3:] == ref[3:]
    table, data, ks, vh, nch = ref
    for dmode in ([mode, MODE_DELTA_DEFERRED] if mode == MODE_DELTA else [mode]):
        ri, rv = R.decode2(table + data, len(table), old, dmode, start, end, log2c, cuts, ks, freqs, nch, vh)
        ni, nv = _native.decode2(table + data, len(table), old, dmode, start, end, log2c, cuts, ks, freqs, nch, vh)
        assert torch.equal(ri, ni) and torch.equal(rv, nv)
    # update_old through both
    a, b = clone_space(old), clone_space(old)
    R.encode2(a, new, mode, start, end, log2c, cuts, freqs, update_old=True)
    _native.encode2(b, new, mode, start, end, log2c, cuts, freqs, update_old=True)
    assert torch.equal(flat_int(a), flat_int(b))


def test_native_refuses_what_the_reference_refuses():
    _need_native("decode2")
    old, _, new_int = hand_spaces()
    freqs = hand_freqs()
    vh = spec.tree64(bytes(new_int[sorted(HAND_DELTAS)].view(torch.uint8).numpy()))
    ni, nv = _native.decode2(HAND_TABLE + HAND_DATA, 3, old, 0, 0, 16, 12, [127], [1, 0], freqs, 4, vh)
    assert ni.tolist() == sorted(HAND_DELTAS)
    cases = []
    for final0 in (3, 5):
        bits = _hand_bits(final0=final0)
        cases.append((bytes([4, 4, len(bits)]) + HAND_DATA[:4] + bits, {}))
    seg = HAND_TABLE + HAND_DATA
    cases += [(seg, {"ks": [13, 0]}), (seg, {"ks": [None, None]}), (seg, {"ks": [1, None]}),
              (seg, {"cuts": [0]}), (seg + b"\0", {}), (seg, {"vh": 1}), (seg, {"nchanged": 5})]
    for s, kw in cases:
        args = dict(ks=[1, 0], cuts=[127], nchanged=4, vh=vh)
        args.update(kw)
        codes = []
        for impl in (R, _native):
            with pytest.raises(KernelError) as ei:
                impl.decode2(s, 3, old, 0, 0, 16, 12, args["cuts"], args["ks"], freqs, args["nchanged"], args["vh"])
            codes.append(ei.value.code)
        assert codes[0] == codes[1], (kw, codes)


def test_native_scatter_family_matches_reference():
    _need_native("scatter2", "add_scatter2", "gather2", "put2", "take2", "tree64_many")
    old, new = space_pair(torch.bfloat16, [10, 1, 500, 7, 3000, 4096], 0.3, seed=8)
    idx = (flat_int(old) != flat_int(new)).nonzero().reshape(-1)
    idx = torch.cat([idx[idx >= 600], idx[idx < 600]])       # two segments' outputs concatenated
    vals = flat_int(new)[idx].contiguous().view(torch.uint8)
    outs = []
    for impl in (R, _native):
        dst = clone_space(old)
        touched = np.zeros(len(dst.tensors), dtype=np.uint8)
        impl.scatter2(dst, idx, vals, touched=touched)
        taken = impl.take2(dst, idx)
        d = (torch.arange(idx.numel(), dtype=torch.int16) * 37 - 500).view(torch.uint8)
        new_out = torch.empty(idx.numel() * 2, dtype=torch.uint8)
        impl.add_scatter2(dst, idx, d, new_out=new_out, negate=True)
        got = impl.gather2(dst, 3, dst.n - 2)
        t2 = np.zeros(len(dst.tensors), dtype=np.uint8)
        impl.put2(dst, 505, 520, new.flat()[505 * 2:520 * 2].clone(), touched=t2)
        outs.append((flat_int(dst), touched.copy(), taken, new_out, got, t2.copy()))
        with pytest.raises(KernelError) as ei:
            impl.scatter2(dst, torch.tensor([0, dst.n]), vals[:4].clone())
        assert ei.value.code == E_POS
    for a, b in zip(*outs):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b))
    ts = [t for t in old.tensors] + [torch.empty(0, dtype=torch.int64), torch.tensor(1.0)]
    assert np.array_equal(R.tree64_many(ts), _native.tree64_many(ts))


def test_native_and_reference_agree_on_random_and_damaged_segments():
    """All dtypes, random cuts and ranges: identical encodings; damaged segments refused with the same code."""
    _need_native("encode2", "decode2")
    import random
    dts = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
           torch.int8, torch.int16, torch.int64, torch.uint8, torch.bool]
    for seed in range(len(dts) * 2):
        r = random.Random(seed)
        dt = dts[seed % len(dts)]
        mode = seed // len(dts) % 2
        old, new = space_pair(dt, [r.choice([1, 100, 4096, 5000]) for _ in range(r.randint(1, 4))],
                              r.choice([0.01, 0.2, 1.0]), seed, r.choice(["mixed", "ulp", "bits"]))
        kb = key_bits(old.dtype)
        cuts = sorted(r.sample(range(1, 1 << kb), min(r.randint(1, 6), (1 << kb) - 1))) if kb and seed % 3 else []
        freqs = class_freqs(old, new, mode, cuts)
        start = r.randint(0, old.n - 1)
        end = r.randint(start + 1, old.n)
        log2c = r.choice([12, 13])
        ref = R.encode2(old, new, mode, start, end, log2c, cuts, freqs)
        nat = _native.encode2(old, new, mode, start, end, log2c, cuts, freqs)
        assert (nat[0], nat[1], list(nat[2]), nat[3], nat[4]) == ref, (seed, dt)
        table, data, ks, vh, nch = ref
        if nch == 0:
            continue
        seg = table + data
        for _ in range(12):
            s, kk, n = bytearray(seg), list(ks), nch
            kind = r.randint(0, 3)
            if kind == 0:
                i = r.randrange(len(s))
                s[i] ^= 1 << r.randrange(8)
            elif kind == 1:
                s = s[:r.randrange(len(s))]
            elif kind == 2:
                c = r.randrange(len(kk))
                kk[c] = None if kk[c] is not None else r.randint(0, log2c)
            else:
                n += r.choice([-1, 1])
            res = []
            for impl in (R, _native):
                try:
                    i_, v_ = impl.decode2(bytes(s), len(table), old, mode, start, end, log2c, cuts, kk, freqs, n, vh)
                    res.append((i_.tolist(), bytes(v_.numpy())))
                except KernelError as exc:
                    res.append(exc.code)
            assert res[0] == res[1], (seed, dt, kind)
