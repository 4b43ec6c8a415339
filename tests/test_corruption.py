"""Damaged, reordered, foreign, mismatched and forged payloads: always a SparseSyncError, never a partial change.

Every rejection is checked with ``rejected()``: the expected exception type, the target state bit-identical to
before (torch.equal on integer views and state_digest), the decoder's version unchanged, nothing pending, and a
correct update applied afterwards still works.
"""
from __future__ import annotations

import random

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (examples, assert_state_equal, clone_state, gen, headers, ivw, mutate, random_tensor)
from sparsesync import (BaseMismatch, CorruptPayload, Decoder, Encoder, LayoutMismatch, SparseSyncError,
                        VersionMismatch, state_digest)
from sparsesync.errors import RollbackRefused
from sparsesync.format import HEADER_SEED, MAGIC, PREAMBLE, parse_bucket, update_uid
from sparsesync.kernels import impl

# corruptions of the format-1 structure; format 2: test_format2*.py and bench/fuzz.py
pytestmark = pytest.mark.usefixtures("format1")


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and helpers

def _make_case(values: str):
    g = gen(2024 if values == "delta" else 2025)
    old = {
        "a": random_tensor((9000,), torch.bfloat16, g),
        "b": random_tensor((60, 50), torch.float32, g),
        "c": random_tensor((3000,), torch.int32, g),
        "d": random_tensor((), torch.float64, g),
        "e": random_tensor((6, 7), torch.bool, g),
    }
    new = {
        "a": mutate(old["a"], 0.02, g, "ulp"),      # sparse
        "b": mutate(old["b"], 1.0, g, "bits"),      # dense, split over buckets
        "c": mutate(old["c"], 0.3, g),
        "d": mutate(old["d"], 1.0, g),
        "e": old["e"].clone(),                      # unchanged
    }
    enc = Encoder(old, 0, values=values, bucket_bytes=4096, digest=True)
    upd = enc.encode(new, 1)
    # a second update from the same base to the same version with other content, and the next update (v1 -> v2)
    other_new = {k: mutate(v, 1.0 if k in ("b", "d") else 0.05, g) for k, v in old.items()}
    other = Encoder(old, 0, values=values, bucket_bytes=4096, digest=True).encode(other_new, 1)
    nxt_state = {k: mutate(v, 0.05, g) for k, v in new.items()}
    nxt = enc.encode(nxt_state, 2)
    return Case(old=old, new=new, upd=upd, buckets=list(upd.buckets), other=other, other_new=other_new, nxt=nxt,
                nxt_state=nxt_state, values=values)


class Case(dict):
    def __repr__(self):  # hypothesis prints fixtures of failing examples
        return f"Case({self.get('values')!r}, {len(self.get('buckets', []))} buckets)"


_CASES = {}


@pytest.fixture(scope="module", params=["delta", "raw"])
def case(request):
    if request.param not in _CASES:
        _CASES[request.param] = _make_case(request.param)
    c = _CASES[request.param]
    assert len(c["buckets"]) >= 4
    return c


@pytest.fixture(scope="module")
def dcase():
    if "delta" not in _CASES:
        _CASES["delta"] = _make_case("delta")
    return _CASES["delta"]


def fresh(c, version: int = 0, verify_digest: bool = True):
    dst = clone_state(c["old"])
    return dst, Decoder(dst, version, verify_digest=verify_digest)


def rejected(c, dst, dec, payload, exc=CorruptPayload, match=None, *, exact_type=False, via="apply", then_apply=True):
    """Applying ``payload`` raises ``exc`` and changes nothing; then the correct update still applies."""
    before = clone_state(dst)
    digest = state_digest(dst)
    version = dec.version
    with pytest.raises(exc, match=match) as info:
        if via == "apply":
            dec.apply(payload)
        else:
            for b in payload:
                dec.feed(b)
    if exact_type:
        assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"
    assert isinstance(info.value, SparseSyncError)
    assert dec.version == version
    assert not dec.pending
    after = state_digest(dst)
    assert after == digest
    assert_state_equal(dst, before, digest=False)
    if "old_digest" not in c:
        c["old_digest"] = state_digest(c["old"])
    if then_apply and version == 0 and after == c["old_digest"]:
        dec.apply(c["upd"])
        assert dec.version == 1
        assert_state_equal(dst, c["new"], digest=False)
    return info.value


def flip(b: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(b)
    out[pos] ^= 1 << bit
    return bytes(out)


def split(bucket: bytes):
    """(header map, body) of a bucket."""
    _, hlen, _ = PREAMBLE.unpack_from(bucket, 0)
    hbytes = bucket[PREAMBLE.size:PREAMBLE.size + hlen]
    return msgpack.unpackb(hbytes, raw=False), bytes(bucket[PREAMBLE.size + hlen:])


def pack(m, body: bytes, *, fix_body_hash: bool = True, hlen=None) -> bytes:
    """A bucket with header map (or any msgpack-able object) ``m`` whose checksums are valid."""
    if fix_body_hash and isinstance(m, dict) and "body_hash" in m:
        m = dict(m, body_hash=impl().tree64(body))
    hbytes = msgpack.packb(m, use_bin_type=True) if not isinstance(m, (bytes, bytearray)) else bytes(m)
    hh = impl().h64(hbytes, HEADER_SEED)
    return PREAMBLE.pack(MAGIC, len(hbytes) if hlen is None else hlen, hh) + hbytes + body


def rechain(buckets, edit=None, *, fix_uid: bool = True):
    """Re-pack a whole update after ``edit(i, map, body) -> (map, body)``: body hashes, chain links (``prev``) and,
    with ``fix_uid``, the update id are recomputed, so only the semantic checks can reject the forgery."""
    parts = []
    for i, b in enumerate(buckets):
        m, body = split(b)
        if edit is not None:
            m, body = edit(i, m, body)
        parts.append((m, body))
    if fix_uid:
        m0 = parts[0][0]
        uid = update_uid(m0["layout"], m0["base"], m0["ver"], m0["vals"])
        parts = [(dict(m, uid=uid), body) for m, body in parts]
    out, prev = [], 0
    for m, body in parts:
        m = dict(m, prev=prev)
        bucket = pack(m, body)
        prev = PREAMBLE.unpack_from(bucket, 0)[2]
        out.append(bucket)
    return out


def test_rechain_is_faithful(case):
    """The forging helpers reproduce the encoder's buckets byte for byte (so forged buckets differ only where
    intended)."""
    assert rechain(case["buckets"]) == case["buckets"]
    dst, dec = fresh(case)
    dec.apply(rechain(case["buckets"]))
    assert_state_equal(dst, case["new"])


# ---------------------------------------------------------------------------------------------------------------------
# damaged bytes

@settings(max_examples=examples(200), deadline=None)
@given(data=st.data())
def test_bit_flip_anywhere(case, data):
    bs = case["buckets"]
    i = data.draw(st.integers(0, len(bs) - 1), label="bucket")
    pos = data.draw(st.one_of(st.integers(0, 40), st.integers(0, len(bs[i]) - 1)), label="pos")
    pos = min(pos, len(bs[i]) - 1)
    bit = data.draw(st.integers(0, 7), label="bit")
    bad = list(bs)
    bad[i] = flip(bs[i], pos, bit)
    dst, dec = fresh(case)
    rejected(case, dst, dec, bad, CorruptPayload, exact_type=True)


@settings(max_examples=examples(80), deadline=None)
@given(data=st.data())
def test_random_byte_runs(case, data):
    bs = case["buckets"]
    i = data.draw(st.integers(0, len(bs) - 1), label="bucket")
    pos = data.draw(st.integers(0, len(bs[i]) - 1), label="pos")
    run = data.draw(st.binary(min_size=1, max_size=64), label="bytes")
    bad = bytearray(bs[i])
    end = min(len(bad), pos + len(run))
    bad[pos:end] = run[: end - pos]
    if bytes(bad) == bs[i]:
        bad[pos] ^= 0xFF
    bs2 = list(bs)
    bs2[i] = bytes(bad)
    dst, dec = fresh(case)
    rejected(case, dst, dec, bs2, CorruptPayload, exact_type=True)


@settings(max_examples=examples(50), deadline=None)
@given(data=st.data())
def test_truncated_or_padded_bucket(case, data):
    bs = case["buckets"]
    i = data.draw(st.integers(0, len(bs) - 1), label="bucket")
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.one_of(st.integers(0, 40), st.integers(0, len(bs[i]) - 1)), label="cut")
        bad_bucket = bs[i][:cut]
    else:
        bad_bucket = bs[i] + data.draw(st.binary(min_size=1, max_size=100), label="garbage")
    bad = list(bs)
    bad[i] = bad_bucket
    dst, dec = fresh(case)
    rejected(case, dst, dec, bad, CorruptPayload, exact_type=True)


# ---------------------------------------------------------------------------------------------------------------------
# order, duplicates, losses

@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_shuffled_buckets(case, seed):
    bs = case["buckets"]
    order = list(range(len(bs)))
    random.Random(seed).shuffle(order)
    if order == sorted(order):
        order[0], order[1] = order[1], order[0]
    dst, dec = fresh(case)
    rejected(case, dst, dec, [bs[j] for j in order], CorruptPayload, exact_type=True)


def test_swapped_neighbours_and_reversed(case):
    bs = case["buckets"]
    for j in range(len(bs) - 1):
        bad = list(bs)
        bad[j], bad[j + 1] = bad[j + 1], bad[j]
        dst, dec = fresh(case)
        rejected(case, dst, dec, bad, CorruptPayload, exact_type=True)
    dst, dec = fresh(case)
    rejected(case, dst, dec, bs[::-1], CorruptPayload, exact_type=True)


def test_duplicated_bucket(case):
    bs = case["buckets"]
    for j in range(len(bs) - 1):  # duplicating the last one is the "extra bucket" case below
        dst, dec = fresh(case)
        rejected(case, dst, dec, bs[: j + 1] + [bs[j]] + bs[j + 1:], CorruptPayload, exact_type=True)


def test_dropped_bucket(case):
    bs = case["buckets"]
    for j in range(len(bs) - 1):
        dst, dec = fresh(case)
        rejected(case, dst, dec, bs[:j] + bs[j + 1:], CorruptPayload, exact_type=True)


def test_dropped_last_bucket_is_truncated(case):
    bs = case["buckets"]
    dst, dec = fresh(case)
    rejected(case, dst, dec, bs[:-1], CorruptPayload, match="truncated", exact_type=True)
    dst, dec = fresh(case)
    rejected(case, dst, dec, [], CorruptPayload, match="truncated", exact_type=True)
    dst, dec = fresh(case)
    rejected(case, dst, dec, iter(bs[:2]), CorruptPayload, match="truncated", exact_type=True)


def test_feed_stops_midway_then_abort(case):
    bs = case["buckets"]
    dst, dec = fresh(case)
    before = clone_state(dst)
    for b in bs[:-1]:
        assert dec.feed(b) is False
    assert dec.pending
    assert_state_equal(dst, before)
    with pytest.raises(SparseSyncError):
        dec.apply(case["upd"])  # an update is pending
    assert dec.pending and dec.version == 0
    dec.abort()
    assert not dec.pending and dec.version == 0
    assert_state_equal(dst, before)
    dec.apply(case["upd"])
    assert_state_equal(dst, case["new"])


def test_feed_error_discards_pending(case):
    bs = case["buckets"]
    dst, dec = fresh(case)
    dec.feed(bs[0])
    dec.feed(bs[1])
    rejected(case, dst, dec, [bs[3]], CorruptPayload, via="feed", exact_type=True)
    assert not dec.pending
    assert dec.version == 1  # rejected() applied the correct update afterwards
    # feeding bucket by bucket again after an error restarts cleanly from bucket 0
    dst, dec = fresh(case)
    dec.feed(bs[0])
    with pytest.raises(CorruptPayload):
        dec.feed(bs[0])
    assert not dec.pending
    for b in bs:
        done = dec.feed(b)
    assert done and dec.version == 1
    assert_state_equal(dst, case["new"])


@pytest.mark.parametrize("extra", ["dup_last", "dup_first", "garbage", "next_update"])
def test_extra_bucket_after_last_changes_nothing(case, extra):
    bs = case["buckets"]
    tail = {"dup_last": bs[-1], "dup_first": bs[0], "garbage": b"garbage",
            "next_update": case["nxt"].buckets[0]}[extra]
    dst, dec = fresh(case)
    rejected(case, dst, dec, bs + [tail], CorruptPayload)


def test_extra_bucket_reports_error(case):
    """An extra bucket is reported, never silently ignored."""
    bs = case["buckets"]
    _dst, dec = fresh(case)
    with pytest.raises(CorruptPayload, match="more buckets"):
        dec.apply(bs + [bs[-1]])
    assert not dec.pending


# ---------------------------------------------------------------------------------------------------------------------
# foreign buckets

def test_bucket_from_other_update_same_versions(case):
    """Same base and version, other content: every position of a foreign bucket is caught. (Both updates have the
    same uid, which names the transition; the chain of prev links tells them apart.)"""
    bs, os_ = case["buckets"], case["other"].buckets
    assert case["other"].uid == case["upd"].uid
    n = min(len(bs), len(os_))
    for j in range(n):
        bad = list(bs)
        bad[j] = os_[j]
        if bad == bs:
            continue
        dst, dec = fresh(case)
        rejected(case, dst, dec, bad, CorruptPayload, exact_type=j > 0)
    for j in range(1, n):  # the other update's prefix, then ours
        dst, dec = fresh(case)
        rejected(case, dst, dec, os_[:j] + bs[j:], CorruptPayload, exact_type=True)


def test_bucket_from_other_update_same_uid():
    """Two updates with identical segment plans have the same uid; the chain link (prev) must still catch a
    bucket of one mixed into the other, at every position."""
    g = gen(11)
    old = {"x": random_tensor((12000,), torch.float32, g), "y": random_tensor((3000,), torch.int16, g)}
    new1 = {k: mutate(v, 1.0, g, "bits") for k, v in old.items()}
    new2 = {k: mutate(v, 1.0, g, "bits") for k, v in old.items()}
    u1 = Encoder(old, 0, bucket_bytes=4096).encode(new1, 1)
    u2 = Encoder(old, 0, bucket_bytes=4096).encode(new2, 1)
    assert u1.uid == u2.uid and u1.count == u2.count >= 4, "test needs two updates with the same plan"
    c = Case(old=old, new=new1, upd=u1)
    b1, b2 = u1.buckets, u2.buckets
    for j in range(len(b1)):
        bad = list(b1)
        bad[j] = b2[j]
        dst, dec = fresh(c)
        rejected(c, dst, dec, bad, CorruptPayload, exact_type=True)
    for j in range(1, len(b1)):
        dst, dec = fresh(c)
        rejected(c, dst, dec, b2[:j] + b1[j:], CorruptPayload, exact_type=True)
        dst, dec = fresh(c)
        rejected(c, dst, dec, b1[:j] + b2[j:], CorruptPayload, exact_type=True)
    # each update on its own is fine
    for u, want in ((u1, new1), (u2, new2)):
        dst, dec = fresh(c)
        dec.apply(u)
        assert_state_equal(dst, want)


def test_bucket_from_update_with_other_versions(case):
    bs, nb = case["buckets"], case["nxt"].buckets
    for j in range(1, min(len(bs), len(nb))):
        bad = list(bs)
        bad[j] = nb[j]
        dst, dec = fresh(case)
        rejected(case, dst, dec, bad, CorruptPayload, exact_type=True)
    # the v1 -> v2 update offered to a decoder at v0 is a version mismatch, not corruption
    dst, dec = fresh(case)
    rejected(case, dst, dec, case["nxt"], VersionMismatch, exact_type=True)
    dst, dec = fresh(case)
    rejected(case, dst, dec, [nb[0]] + bs[1:], VersionMismatch, exact_type=True)


# ---------------------------------------------------------------------------------------------------------------------
# version and layout mismatches

@pytest.mark.parametrize("version", [1, 2, 5, 10 ** 12])
def test_wrong_decoder_version(case, version):
    dst, dec = fresh(case, version=version)
    rejected(case, dst, dec, case["upd"], VersionMismatch, exact_type=True, then_apply=False)
    rejected(case, dst, dec, case["buckets"][:1], VersionMismatch, exact_type=True, via="feed")


def test_full_update_needs_no_version_but_a_layout(case):
    """A full update applies at any version up to its own (at its own it re-installs the bytes); above it, it is a
    rollback, refused unless the decoder allows rollbacks."""
    full = Encoder(values=case["values"], bucket_bytes=4096).encode(case["new"], 9)
    for v in (0, 3, 9):
        dst, dec = fresh(case, version=v)
        dec.apply(full)
        assert dec.version == 9
        assert_state_equal(dst, case["new"])
    dst, dec = fresh(case, version=77)
    rejected(case, dst, dec, full, RollbackRefused, exact_type=True, then_apply=False)
    dec.allow_rollback = True
    dec.apply(full)
    assert dec.version == 9
    assert_state_equal(dst, case["new"])
    dst = clone_state(case["old"])
    dst["b"] = torch.zeros(50, 40)
    rejected(case, dst, Decoder(dst, 0), full, LayoutMismatch, exact_type=True)


def _layout_variants(old):
    def with_(**kw):
        s = clone_state(old)
        for k, v in kw.items():
            if v is None:
                del s[k]
            else:
                s[k] = v
        return s
    return {
        "missing_sparse_tensor": with_(a=None),
        "missing_unchanged_tensor": with_(e=None),
        "extra_tensor": with_(zz=torch.zeros(3)),
        "renamed": {("A" if k == "a" else k): v for k, v in clone_state(old).items()},
        "dtype_same_width": with_(a=old["a"].view(torch.float16).clone()),
        "dtype_other_width": with_(c=old["c"].to(torch.int64)),
        "dtype_bool_vs_uint8": with_(e=old["e"].view(torch.uint8).clone()),
        "shape_transposed": with_(b=old["b"].t().contiguous()),
        "shape_flattened": with_(b=old["b"].reshape(-1).clone()),
        "shape_0dim_vs_1": with_(d=old["d"].reshape(1).clone()),
        "shape_other_numel": with_(c=old["c"][:2999].clone()),
    }


@pytest.mark.parametrize("variant", ["missing_sparse_tensor", "missing_unchanged_tensor", "extra_tensor", "renamed",
                                     "dtype_same_width", "dtype_other_width", "dtype_bool_vs_uint8",
                                     "shape_transposed", "shape_flattened", "shape_0dim_vs_1",
                                     "shape_other_numel"])
def test_layout_mismatch(case, variant):
    dst = _layout_variants(case["old"])[variant]
    dec = Decoder(dst, 0)
    rejected(case, dst, dec, case["upd"], LayoutMismatch, exact_type=True)
    # also for a full update, and with the wrong version too (layout is checked first)
    full = Encoder(bucket_bytes=4096).encode(case["new"], 3)
    rejected(case, dst, dec, full, LayoutMismatch, exact_type=True)
    dec5 = Decoder(dst, 5)
    rejected(case, dst, dec5, case["upd"], (LayoutMismatch, VersionMismatch))


# ---------------------------------------------------------------------------------------------------------------------
# base mismatches

def _sparse_changed_positions(c, name):
    hs = headers(c["upd"])
    kinds = {s.kind for h in hs for s in h.segs if s.name == name}
    assert kinds == {"s"}, f"test needs {name!r} coded sparse, got {kinds}"
    diff = ivw(c["old"][name]).reshape(-1) != ivw(c["new"][name]).reshape(-1)
    return diff.nonzero().reshape(-1)


@pytest.mark.parametrize("which", ["first", "last", "middle"])
def test_base_mismatch_at_changed_position_delta(dcase, which):
    pos = _sparse_changed_positions(dcase, "a")
    p = int({"first": pos[0], "last": pos[-1], "middle": pos[len(pos) // 2]}[which])
    for verify in (True, False):
        dst, dec = fresh(dcase, verify_digest=verify)
        ivw(dst["a"]).view(-1)[p] += 1
        rejected(dcase, dst, dec, dcase["upd"], BaseMismatch, exact_type=True)


def test_base_mismatch_in_int_tensor_delta(dcase):
    pos = _sparse_changed_positions(dcase, "c")
    dst, dec = fresh(dcase, verify_digest=False)
    ivw(dst["c"]).view(-1)[int(pos[3])] ^= 1 << 31
    rejected(dcase, dst, dec, dcase["upd"], BaseMismatch, exact_type=True)


@pytest.mark.parametrize("where", ["unchanged_position_of_sparse_tensor", "unchanged_tensor"])
def test_base_mismatch_caught_by_digest_and_rolled_back(case, where):
    """A difference that no values_hash can see (an unchanged element) is caught by the state digest; everything
    already written (dense and sparse segments of every tensor) is rolled back."""
    dst, dec = fresh(case, verify_digest=True)
    if where == "unchanged_tensor":
        ivw(dst["e"]).view(-1)[5] ^= 1
    else:
        diff = ivw(case["old"]["a"]).reshape(-1) != ivw(case["new"]["a"]).reshape(-1)
        p = int((~diff).nonzero()[7])
        ivw(dst["a"]).view(-1)[p] ^= 0x10
    rejected(case, dst, dec, case["upd"], BaseMismatch, exact_type=True)
    # without verification the update applies; the receiver keeps its own difference
    dst2, dec2 = fresh(case, verify_digest=False)
    dst2.update(clone_state(dst))
    dec2 = Decoder(dst2, 0, verify_digest=False)
    dec2.apply(case["upd"])
    assert dec2.version == 1 and state_digest(dst2) != state_digest(case["new"])


def test_base_mismatch_raw_mode_at_changed_position_is_overwritten():
    """In raw mode new values do not depend on the base: a receiver differing only at changed positions ends up
    exactly at the new state (and the digest agrees)."""
    c = _CASES.get("raw") or _make_case("raw")
    pos = _sparse_changed_positions(c, "a")
    dst, dec = fresh(c, verify_digest=True)
    ivw(dst["a"]).view(-1)[pos[:5]] += 3
    dec.apply(c["upd"])
    assert_state_equal(dst, c["new"])


def test_digest_mismatch_rollback_restores_every_byte():
    """Rollback after a digest mismatch restores overlapping-in-time writes of many segments exactly, including
    NaN payloads and -0.0 (checked on integer views)."""
    g = gen(99)
    old = {f"t{i}": random_tensor((2500,), dt, g, special_frac=0.2)
           for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float8_e5m2, torch.int64, torch.float16])}
    new = {k: mutate(v, d, g) for (k, v), d in zip(old.items(), [0.01, 1.0, 0.5, 0.002, 0.3])}
    upd = Encoder(old, 0, bucket_bytes=4096, digest=True).encode(new, 1)
    c = Case(old=old, new=new, upd=upd)
    dst, dec = fresh(c, verify_digest=True)
    ivw(dst["t3"]).view(-1)[-1] ^= 1 if int(ivw(old["t3"])[-1]) == int(ivw(new["t3"])[-1]) else 0
    if state_digest(dst) == state_digest(old):  # last element of t3 changed: spoil an unchanged one instead
        diff = ivw(old["t3"]) != ivw(new["t3"])
        ivw(dst["t3"])[int((~diff).nonzero()[0])] ^= 1
    rejected(c, dst, dec, upd, BaseMismatch, exact_type=True)


# ---------------------------------------------------------------------------------------------------------------------
# forged headers (valid checksums)

def _first_sparse(buckets):
    for i, b in enumerate(buckets):
        m, _ = split(b)
        for j, s in enumerate(m["segs"]):
            if s[3] == "s":
                return i, j
    raise AssertionError("no sparse segment")


def _first_dense(buckets):
    for i, b in enumerate(buckets):
        m, _ = split(b)
        for j, s in enumerate(m["segs"]):
            if s[3] == "d":
                return i, j
    raise AssertionError("no dense segment")


def _set(key, value):
    return lambda m, body, seg: (dict(m, **{key: value}), body)


def _drop(key):
    return lambda m, body, seg: ({k: v for k, v in m.items() if k != key}, body)


def _seg(field, value):
    def f(m, body, seg):
        segs = [list(s) for s in m["segs"]]
        segs[seg][field] = value(segs[seg]) if callable(value) else value
        return dict(m, segs=segs), body
    return f


HEADER_FORGERIES = {
    "v_2": _set("v", 2), "v_missing": _drop("v"), "v_str": _set("v", "1"),
    "uid_short": _set("uid", b"x" * 15), "uid_str": _set("uid", "x" * 16), "uid_none": _set("uid", None),
    "layout_int": _set("layout", 5), "layout_long": _set("layout", b"\0" * 17),
    "vals_xor": _set("vals", "xor"), "vals_bytes": _set("vals", b"delta"),
    "idx_neg": _set("idx", -1), "idx_eq_cnt": lambda m, b, s: (dict(m, idx=m["cnt"]), b),
    "idx_huge": _set("idx", 2 ** 63), "idx_float": _set("idx", 0.0), "idx_bool": _set("idx", False),
    "cnt_zero": _set("cnt", 0), "cnt_neg": _set("cnt", -3), "cnt_huge": _set("cnt", 2 ** 64 - 1),
    "cnt_str": _set("cnt", "4"), "cnt_missing": _drop("cnt"),
    "body_len_huge": _set("body_len", 2 ** 62), "body_len_neg": _set("body_len", -1),
    "body_len_plus1": lambda m, b, s: (dict(m, body_len=m["body_len"] + 1), b),
    "body_len_minus1": lambda m, b, s: (dict(m, body_len=m["body_len"] - 1), b),
    "body_len_list": _set("body_len", [1]),
    "base_neg": _set("base", -1), "base_str": _set("base", "0"), "base_float": _set("base", 0.0),
    "ver_neg": _set("ver", -1), "ver_2_64": _set("ver", 2 ** 64 - 1), "ver_none": _set("ver", None),
    "ntensors_neg": _set("ntensors", -1), "digest_int": _set("digest", 5), "prev_neg": _set("prev", -1),
    "segs_not_list": _set("segs", {"a": 1}), "segs_none": _set("segs", None), "segs_missing": _drop("segs"),
    "segs_empty": _set("segs", []),
    "seg_short": lambda m, b, s: (dict(m, segs=[list(x)[:12] for x in m["segs"]]), b),
    "seg_long": lambda m, b, s: (dict(m, segs=[list(x) + [0] for x in m["segs"]]), b),
    "seg_not_list": lambda m, b, s: (dict(m, segs=["abc" for x in m["segs"]]), b),
    "seg_name_int": _seg(0, 7), "seg_name_unknown": _seg(0, "nope"), "seg_name_bytes": _seg(0, lambda s: s[0].encode()),
    "seg_dtype_complex": _seg(1, "complex64"), "seg_dtype_other": _seg(1, lambda s: "int8" if s[1] != "int8" else "uint8"),
    "seg_dtype_none": _seg(1, None),
    "seg_shape_neg": _seg(2, [-1]), "seg_shape_huge": _seg(2, [2 ** 40, 2 ** 40]), "seg_shape_bool": _seg(2, [True]),
    "seg_shape_nested": _seg(2, [[3]]), "seg_shape_65dims": _seg(2, [1] * 65), "seg_shape_int": _seg(2, 5),
    "seg_shape_other": _seg(2, lambda s: s[2][::-1] + [1]),
    "seg_kind_x": _seg(3, "x"), "seg_kind_list": _seg(3, ["s"]), "seg_kind_flip": _seg(3, lambda s: "d" if s[3] == "s" else "s"),
    "seg_start_neg": _seg(4, -1), "seg_start_after_end": _seg(4, lambda s: s[5] + 1),
    "seg_start_float": _seg(4, lambda s: float(s[4])), "seg_start_plus1": _seg(4, lambda s: s[4] + 1),
    "seg_end_huge": _seg(5, 2 ** 62), "seg_end_minus1": _seg(5, lambda s: s[5] - 1), "seg_end_plus1": _seg(5, lambda s: s[5] + 1),
    "seg_log2c_neg": _seg(6, -1), "seg_log2c_31": _seg(6, 31), "seg_log2c_11": _seg(6, 11),
    "seg_log2c_plus1": _seg(6, lambda s: s[6] + 1), "seg_log2c_minus1": _seg(6, lambda s: s[6] - 1),
    "seg_table_len_huge": _seg(7, 2 ** 40), "seg_table_len_neg": _seg(7, -1), "seg_table_len_plus1": _seg(7, lambda s: s[7] + 1),
    "seg_table_len_minus1": _seg(7, lambda s: max(0, s[7] - 1) if s[7] else 1),
    "seg_off_plus1": _seg(8, lambda s: s[8] + 1), "seg_off_neg": _seg(8, -1), "seg_off_huge": _seg(8, 2 ** 63 - 1),
    "seg_len_plus1": _seg(9, lambda s: s[9] + 1), "seg_len_minus1": _seg(9, lambda s: s[9] - 1),
    "seg_len_huge": _seg(9, 2 ** 63 - 1), "seg_len_neg": _seg(9, -5),
    "seg_freq_str": _seg(10, "abc"), "seg_freq_empty": _seg(10, b""), "seg_freq_bad_sum": _seg(10, b"\x01\x00\x80\x10"),
    "seg_freq_trailing": _seg(10, lambda s: s[10] + b"\x00"), "seg_freq_unsorted": _seg(10, b"\x02\x05\x80\x10\x00\x80\x10"),
    "seg_freq_sym_256": _seg(10, b"\x01\x80\x02\x80\x20"), "seg_freq_zero_f": _seg(10, b"\x02\x00\x00\x01\x80\x20"),
    "seg_freq_varint_long": _seg(10, b"\x81" + b"\x80" * 12),
    "seg_vhash_neg": _seg(11, -1), "seg_vhash_str": _seg(11, "0"), "seg_vhash_min": _seg(11, -2 ** 63), "seg_vhash_float": _seg(11, 1.5),
    "seg_nchanged_neg": _seg(12, -1), "seg_nchanged_plus1": _seg(12, lambda s: s[12] + 1),
    "seg_nchanged_minus1": _seg(12, lambda s: s[12] - 1), "seg_nchanged_huge": _seg(12, 2 ** 62),
}


@pytest.mark.parametrize("target", ["sparse", "dense"])
@pytest.mark.parametrize("name", sorted(HEADER_FORGERIES))
def test_forged_header(dcase, name, target):
    """One header field changed; header and body checksums recomputed (chain and uid left alone): CorruptPayload."""
    bs = dcase["buckets"]
    i, j = _first_sparse(bs) if target == "sparse" else _first_dense(bs)
    m, body = split(bs[i])
    m2, body2 = HEADER_FORGERIES[name](m, body, j)
    bad = list(bs)
    bad[i] = pack(m2, body2)
    if bad[i] == bs[i]:
        pytest.skip("forgery is a no-op for this segment")
    dst, dec = fresh(dcase)
    rejected(dcase, dst, dec, bad, CorruptPayload, exact_type=True)


@pytest.mark.parametrize("target", ["sparse", "dense"])
@pytest.mark.parametrize("name", sorted(n for n in HEADER_FORGERIES if n.startswith("seg_")))
def test_forged_segment_with_valid_chain_and_uid(dcase, name, target):
    """Like test_forged_header, but the whole update is re-chained and its uid recomputed, so only the semantic
    checks can catch the forgery."""
    bs = dcase["buckets"]
    i, j = _first_sparse(bs) if target == "sparse" else _first_dense(bs)

    def edit(k, m, body):
        return HEADER_FORGERIES[name](m, body, j) if k == i else (m, body)

    try:
        bad = rechain(bs, edit)
    except (TypeError, KeyError, IndexError):
        pytest.skip("forgery breaks the uid recomputation itself (caught by test_forged_header)")
    if bad == bs:
        pytest.skip("forgery is a no-op for this segment")
    dst, dec = fresh(dcase)
    seg = split(bs[i])[0]["segs"][j]
    n = dcase["old"][seg[0]].numel()
    if name == "seg_log2c_plus1" and seg[4] == 0 and seg[5] == n and n <= 1 << seg[6]:
        # one chunk covering the whole tensor either way: a different but equivalent encoding of the same update
        dec.apply(bad)
        assert_state_equal(dst, dcase["new"])
        return
    exc = (CorruptPayload, BaseMismatch) if name.startswith("seg_vhash") else CorruptPayload
    rejected(dcase, dst, dec, bad, exc)


def test_forged_values_hash_in_delta_mode_is_a_base_mismatch(dcase):
    """A values_hash mismatch in delta mode cannot be told apart from a wrong base: BaseMismatch, nothing changed."""
    bs = dcase["buckets"]
    i, j = _first_sparse(bs)
    bad = rechain(bs, lambda k, m, b: _seg(11, lambda s: s[11] ^ 1)(m, b, j) if k == i else (m, b))
    dst, dec = fresh(dcase)
    rejected(dcase, dst, dec, bad, BaseMismatch, exact_type=True)


def test_forged_digest_is_rolled_back(case):
    bs = case["buckets"]
    bad = rechain(bs, lambda k, m, b: (dict(m, digest="0" * 64), b) if k == len(bs) - 1 else (m, b))
    dst, dec = fresh(case, verify_digest=True)
    rejected(case, dst, dec, bad, BaseMismatch, exact_type=True)


def test_forged_overlapping_segments(dcase):
    """Segments overlapping inside one bucket or across buckets (all checksums, links and the uid valid)."""
    bs = dcase["buckets"]
    i, j = _first_dense(bs)

    def dup_in_bucket(k, m, body):
        if k != i:
            return m, body
        segs = [list(s) for s in m["segs"]]
        s = list(segs[j])
        s[8] = len(body)
        seg_bytes = body[segs[j][8]: segs[j][8] + segs[j][9]]
        return dict(m, segs=segs + [s], body_len=len(body) + len(seg_bytes)), body + seg_bytes

    dst, dec = fresh(dcase)
    rejected(dcase, dst, dec, rechain(bs, dup_in_bucket), CorruptPayload, match="overlap", exact_type=True)

    # a one-element dense segment of tensor "a" appended to every bucket: the second one overlaps the first
    def overlap_across(k, m, body):
        w = 2
        seg = ["a", "bfloat16", [9000], "d", 17, 18, 0, 0, len(body), w, b"", None, 1]
        return dict(m, segs=list(m["segs"]) + [seg], body_len=len(body) + w), body + b"\x01\x02"

    dst, dec = fresh(dcase)
    rejected(dcase, dst, dec, rechain(bs, overlap_across), CorruptPayload, match="overlap", exact_type=True)


def test_forged_segment_gap_and_overlap_in_body(dcase):
    """Segment byte ranges must tile the body exactly: a gap or an overlap of body bytes is corrupt."""
    bs = dcase["buckets"]
    for i, b in enumerate(bs):
        m, body = split(b)
        if len(m["segs"]) < 2:
            continue
        for delta in (-1, 1):
            segs = [list(s) for s in m["segs"]]
            segs[1][8] += delta
            bad = list(bs)
            bad[i] = pack(dict(m, segs=segs), body)
            dst, dec = fresh(dcase)
            rejected(dcase, dst, dec, bad, CorruptPayload, exact_type=True)
        break
    else:
        pytest.fail("no bucket with two segments")


@pytest.mark.parametrize("hlen", [0, 1, 2 ** 26 + 1, 2 ** 32 - 1])
def test_forged_header_length(dcase, hlen):
    m, body = split(dcase["buckets"][0])
    bad = [pack(m, body, hlen=hlen)] + dcase["buckets"][1:]
    dst, dec = fresh(dcase)
    rejected(dcase, dst, dec, bad, CorruptPayload, exact_type=True)


@pytest.mark.parametrize("header", [b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb([1, 2]), msgpack.packb(5),
                                    msgpack.packb({1: 2}), msgpack.packb({"v": 1}),
                                    msgpack.packb(msgpack.ExtType(1, b"x")),
                                    msgpack.packb({"v": 1, "x": msgpack.ExtType(5, b"abc")}),
                                    b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\x91" * 5000])
def test_forged_header_not_a_valid_map(dcase, header):
    bad = [pack(header, b"")]
    dst, dec = fresh(dcase)
    rejected(dcase, dst, dec, bad, CorruptPayload, exact_type=True)


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(allow_nan=True),
                 st.text(max_size=8), st.binary(max_size=20), st.lists(st.integers(-5, 5000), max_size=4),
                 st.dictionaries(st.text(max_size=3), st.integers(-2 ** 63, 2 ** 64 - 1), max_size=2))
_KEYS = ["v", "uid", "base", "ver", "vals", "idx", "cnt", "layout", "ntensors", "dig", "digest", "body_len",
         "body_hash", "prev", "segs"]


@settings(max_examples=examples(200), deadline=None)
@given(data=st.data())
def test_fuzzed_headers_never_crash(case, data):
    """Random values of random types in random header/segment fields, with every checksum (and optionally the chain
    and uid) recomputed: the decoder raises a SparseSyncError or applies a (forged but well-formed) update, never
    anything else, and a rejected update changes nothing."""
    bs = case["buckets"]
    i = data.draw(st.integers(0, len(bs) - 1), label="bucket")
    m, body = split(bs[i])
    nedits = data.draw(st.integers(1, 3), label="nedits")
    for _ in range(nedits):
        if m.get("segs") and isinstance(m["segs"], list) and data.draw(st.booleans(), label="segment?"):
            segs = [list(s) if isinstance(s, list) else s for s in m["segs"]]
            j = data.draw(st.integers(0, len(segs) - 1), label="seg")
            if isinstance(segs[j], list) and segs[j]:
                f = data.draw(st.integers(0, len(segs[j]) - 1), label="field")
                old_v = segs[j][f]
                if isinstance(old_v, int) and not isinstance(old_v, bool) and data.draw(st.booleans(), label="nudge"):
                    segs[j][f] = old_v + data.draw(st.sampled_from([-2, -1, 1, 2, 4096, -4096, 2 ** 32]), label="by")
                else:
                    segs[j][f] = data.draw(_ANY, label="value")
            m = dict(m, segs=segs)
        else:
            key = data.draw(st.sampled_from(_KEYS), label="key")
            m = dict(m, **{key: data.draw(_ANY, label="value")})
    if data.draw(st.booleans(), label="rechain"):
        try:
            bad = rechain(bs, lambda k, mm, bb: (m, body) if k == i else (mm, bb))
        except Exception:
            bad = list(bs)
            bad[i] = pack(m, body)
    else:
        bad = list(bs)
        bad[i] = pack(m, body)
    dst, dec = fresh(case)
    before = clone_state(dst)
    try:
        dec.apply(bad)
    except SparseSyncError:
        assert dec.version == 0 and not dec.pending
        assert_state_equal(dst, before)
    else:
        assert not dec.pending
    # the decoder is still usable
    dst2, dec2 = fresh(case)
    dec2.apply(case["upd"])
    assert_state_equal(dst2, case["new"])


# ---------------------------------------------------------------------------------------------------------------------
# garbage instead of buckets

@settings(max_examples=examples(60), deadline=None)
@given(junk=st.one_of(st.binary(max_size=200), st.binary(max_size=40).map(lambda b: b"SSYN" + b),
                      st.binary(min_size=12, max_size=60).map(lambda b: b"SSYN" + len(b).to_bytes(4, "little") + b)))
def test_garbage_bucket(case, junk):
    dst, dec = fresh(case)
    rejected(case, dst, dec, [junk], CorruptPayload, exact_type=True, then_apply=False)
    rejected(case, dst, dec, [case["buckets"][0], junk], CorruptPayload, exact_type=True)


@pytest.mark.parametrize("payload", [b"", bytearray(), memoryview(b""), [b""], [b"", b""], "SSYN", [None], [12345],
                                     [b"SSYN"], [b"SSYN\x00\x00\x00\x00"], [b"\x00" * 16], [b"\xff" * 4096],
                                     [[1, 2, 3]]])
def test_empty_and_odd_payloads(case, payload):
    dst, dec = fresh(case)
    rejected(case, dst, dec, payload, CorruptPayload, exact_type=True)


def test_memoryview_of_non_bytes(case):
    """Buckets may be any contiguous bytes-like object; a multi-byte-format memoryview is read as bytes."""
    dst, dec = fresh(case)
    import array
    bs = [array.array("B", b) for b in case["buckets"]]
    dec.apply(bs)
    assert_state_equal(dst, case["new"])
    dst, dec = fresh(case)
    arr = [torch.frombuffer(bytearray(b), dtype=torch.uint8).numpy() for b in case["buckets"]]
    dec.apply(arr)
    assert_state_equal(dst, case["new"])


def test_parse_bucket_accepts_valid_and_rejects_bad_types(case):
    h, _hh, body = parse_bucket(case["buckets"][0])
    assert h.idx == 0 and h.cnt == (1 if len(case["buckets"]) == 1 else 0) and len(body) == h.body_len
    for bad in (None, 5, "abc", object()):
        with pytest.raises(CorruptPayload):
            parse_bucket(bad)


# ---------------------------------------------------------------------------------------------------------------------
# replays and out-of-order versions

def test_replayed_update_is_a_version_mismatch(case):
    dst, dec = fresh(case)
    dec.apply(case["upd"])
    rejected(case, dst, dec, case["upd"], VersionMismatch, exact_type=True)
    dec.apply(case["nxt"])
    assert dec.version == 2
    assert_state_equal(dst, case["nxt_state"])
    rejected(case, dst, dec, case["upd"], VersionMismatch, exact_type=True)
    rejected(case, dst, dec, case["nxt"], VersionMismatch, exact_type=True)


def test_skipped_version_is_a_version_mismatch(case):
    dst, dec = fresh(case)
    rejected(case, dst, dec, case["nxt"], VersionMismatch, exact_type=True, then_apply=False)
    dec.apply(case["upd"])
    dec.apply(case["nxt"])
    assert_state_equal(dst, case["nxt_state"])


def test_replayed_full_update_is_idempotent(case):
    full = Encoder(values=case["values"], bucket_bytes=4096).encode(case["new"], 5)
    dst, dec = fresh(case)
    dec.apply(full)
    dec.apply(full)
    assert dec.version == 5
    assert_state_equal(dst, case["new"])


def test_forged_huge_segment_is_corrupt_not_an_allocation(dcase):
    bs = dcase["buckets"]
    i, j = _first_sparse(bs)

    def edit(k, m, body):
        if k != i:
            return m, body
        segs = [list(s) for s in m["segs"]]
        n = 1 << 40
        segs[j][2], segs[j][5], segs[j][12] = [n], n, 1 << 38  # 2 TiB of staging if trusted
        return dict(m, segs=segs), body

    dst, dec = fresh(dcase)
    rejected(dcase, dst, dec, rechain(bs, edit), CorruptPayload)
