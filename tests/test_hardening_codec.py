"""Issue 6 "Never stale, never silent", codec part: versions identify bytes, no silent rollback, digests on every
update kind, precise layout errors, one error family, linear checks, bounded staging memory, no undetected
truncation, a strict (canonical) wire format, logging, documentation, and the fuzz machinery.

Every refusal is checked with ``refused()``: the expected exception, nothing pending, the decoder's version and every
tensor bit for bit (integer views) unchanged.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import struct
import time
from pathlib import Path

import msgpack
import pytest
import torch
import sparsesync

import spec
from helpers import assert_state_equal, clone_state, gen, ivw, mutate, random_tensor
from test_corruption import pack, rechain, split
from sparsesync import Decoder, Encoder, SparseSyncError, state_digest
from sparsesync import _native, reference
from sparsesync.codec import ApplyStats, Update, UpdateStats, full_update
from sparsesync.digest import layout_digest
from sparsesync.dtypes import check_tensor, name_of
from sparsesync.errors import (BaseMismatch, CorruptPayload, InvalidArgument, InvalidType, LayoutMismatch,
                               RollbackRefused, VersionConflict, VersionMismatch)
from sparsesync.format import HEADER_KEYS, HEADER_SEED, MAGIC, PREAMBLE, parse_bucket, unpack_freq
from sparsesync.kernels import impl

# pins format-1 segments; the behaviour is shared with format 2 (test_format2.py)
pytestmark = pytest.mark.usefixtures("format1")

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def make_state(seed: int = 1) -> dict:
    g = gen(seed)
    return {"a": random_tensor((9000,), torch.bfloat16, g), "b": random_tensor((60, 50), torch.float32, g),
            "c": random_tensor((3000,), torch.int32, g), "d": random_tensor((), torch.float64, g),
            "e": random_tensor((6, 7), torch.bool, g)}


def make_new(old: dict, seed: int = 2) -> dict:
    g = gen(seed)
    dens = {"a": 0.02, "b": 1.0, "c": 0.3, "d": 1.0, "e": 0.0}
    return {k: mutate(v, dens[k], g) if dens[k] else v.clone() for k, v in old.items()}


def refused(dec: Decoder, payload, exc, match=None, via: str = "apply"):
    """``payload`` is refused with ``exc`` and the decoder's state, version and pending flag do not change."""
    before = clone_state(dec.state)
    version = dec.version
    with pytest.raises(exc, match=match) as info:
        if via == "apply":
            dec.apply(payload)
        else:
            for b in payload:
                dec.feed(b)
    assert isinstance(info.value, SparseSyncError)
    assert dec.version == version and not dec.pending
    assert_state_equal(dec.state, before)
    return info.value


def snapshot_bits(enc: Encoder) -> dict:
    return {k: ivw(v).clone() for k, v in enc.snapshot.items()}


def same_bits(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def one_bucket(update: Update) -> bytes:
    assert update.count == 1
    return update.buckets[0]


def repack_raw(bucket: bytes, hbytes: bytes) -> bytes:
    """The bucket with its header bytes replaced by ``hbytes`` (header checksum recomputed, body unchanged)."""
    _, hlen, _ = PREAMBLE.unpack_from(bucket, 0)
    body = bucket[PREAMBLE.size + hlen:]
    return PREAMBLE.pack(MAGIC, len(hbytes), impl().h64(hbytes, HEADER_SEED)) + hbytes + body


def header_bytes(bucket: bytes) -> bytes:
    _, hlen, _ = PREAMBLE.unpack_from(bucket, 0)
    return bucket[PREAMBLE.size:PREAMBLE.size + hlen]


@pytest.fixture(scope="module")
def case():
    old = make_state()
    new = make_new(old)
    upd = Encoder(old, 0, bucket_bytes=4096, digest=True).encode(new, 1)
    assert upd.count >= 3
    return {"old": old, "new": new, "upd": upd, "buckets": list(upd.buckets)}


@pytest.fixture(scope="module")
def single():
    """A one-bucket delta update with a sparse segment (for header edits that leave the chain alone)."""
    old = make_state(5)
    new = make_new(old, 6)
    upd = Encoder(old, 0, digest=True).encode(new, 1)
    m, _ = split(one_bucket(upd))
    assert any(s[3] == "s" for s in m["segs"])
    return {"old": old, "new": new, "upd": upd, "bucket": one_bucket(upd)}


def fresh(c, version: int = 0, **kw):
    dst = clone_state(c["old"])
    return dst, Decoder(dst, version, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# item 1: a version identifies bytes

def test_encode_same_version_again_is_a_version_conflict(case):
    old, new = case["old"], case["new"]
    enc = Encoder(old, 0, bucket_bytes=4096)
    enc.encode(new, 3)
    snap = snapshot_bits(enc)
    other = make_new(new, 9)
    with pytest.raises(VersionConflict, match=r"version 3 was already encoded.*encoder is at version 3"):
        enc.encode(other, 3)
    assert enc.version == 3 and same_bits(snapshot_bits(enc), snap)
    # the encoder goes on from the state of version 3
    upd = enc.encode(other, 4)
    dst = clone_state(new)
    Decoder(dst, 3).apply(upd)
    assert_state_equal(dst, other)


def test_encode_lower_version_is_a_version_conflict(case):
    old, new = case["old"], case["new"]
    enc = Encoder(old, 5)
    snap = snapshot_bits(enc)
    for v in (0, 4, 5):
        with pytest.raises(VersionConflict) as info:
            enc.encode(new, v)
        assert f"version {v}" in str(info.value) and "version 5" in str(info.value)
    assert enc.version == 5 and same_bits(snapshot_bits(enc), snap)
    # a full encoder takes any first version, then only higher ones
    enc = Encoder()
    enc.encode(new, 7)
    with pytest.raises(VersionConflict, match="version 2"):
        enc.encode(new, 2)


def test_version_conflict_does_not_finish_or_spoil_a_pending_stream(case):
    old, new = case["old"], case["new"]
    enc = Encoder(old, 0, bucket_bytes=4096)
    upd = enc.encode(new, 1, stream=True)
    it = upd.iter_buckets()
    first = next(it)
    with pytest.raises(VersionConflict):
        enc.encode(new, 1)
    assert not upd.complete
    dst = clone_state(old)
    Decoder(dst, 0).apply([first, *it])
    assert_state_equal(dst, new)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1", None, 2 ** 63])
def test_bad_versions_are_invalid_arguments(case, bad):
    old, new = case["old"], case["new"]
    v = bad if bad is not None else -5
    with pytest.raises(InvalidArgument, match=re.escape(repr(v))):
        Encoder(old, v)
    enc = Encoder(old, 0)
    with pytest.raises(InvalidArgument):
        enc.encode(new, bad)
    assert enc.version == 0
    with pytest.raises(InvalidArgument):
        Decoder(clone_state(old), bad)


def test_same_as_snapshot_is_bitwise(case):
    old = case["old"]
    assert Encoder().same_as_snapshot(old) is False          # no snapshot yet
    enc = Encoder(old, 0)
    assert enc.same_as_snapshot(clone_state(old)) is True
    assert enc.same_as_snapshot(list(reversed(list(clone_state(old).items())))) is True
    x = clone_state(old)
    ivw(x["b"]).view(-1)[7] ^= 1                            # one bit
    assert enc.same_as_snapshot(x) is False
    # -0.0 == 0.0 and NaN != NaN as floats; bit patterns decide
    z = {"f": torch.tensor([0.0, float("nan")])}
    enc = Encoder(z, 0)
    assert enc.same_as_snapshot({"f": torch.tensor([-0.0, float("nan")])}) is False
    assert enc.same_as_snapshot({"f": torch.tensor([0.0, float("nan")])}) is True
    nan2 = torch.tensor([0.0, float("nan")])
    ivw(nan2)[1] ^= 1                                       # another NaN payload
    assert enc.same_as_snapshot({"f": nan2}) is False
    # other layouts are not the same bytes
    assert enc.same_as_snapshot({"f": torch.zeros(3)}) is False
    assert enc.same_as_snapshot({"g": torch.tensor([0.0, float("nan")])}) is False
    assert enc.same_as_snapshot({"f": torch.tensor([0.0, float("nan")]).double()}) is False
    assert enc.same_as_snapshot({}) is False
    # non-contiguous input is compared in its logical order
    enc = Encoder({"m": torch.arange(6.0).reshape(2, 3)}, 0)
    assert enc.same_as_snapshot({"m": torch.arange(6.0).reshape(3, 2).t().contiguous().t().t()}) is False
    assert enc.same_as_snapshot({"m": torch.arange(6.0).reshape(3, 2).t().t().reshape(2, 3)}) is True
    assert enc.same_as_snapshot({"m": torch.arange(6.0).reshape(2, 3).t().contiguous().t()}) is True


def test_same_as_snapshot_sees_the_finished_stream(case):
    old, new = case["old"], case["new"]
    enc = Encoder(old, 0, bucket_bytes=4096)
    upd = enc.encode(new, 1, stream=True)
    assert not upd.complete
    assert enc.same_as_snapshot(new) is True and enc.same_as_snapshot(old) is False
    assert upd.complete


# ---------------------------------------------------------------------------------------------------------------------
# item 2: no silent rollback

def test_full_update_to_a_lower_version_is_refused(case):
    full = Encoder(bucket_bytes=4096).encode(case["new"], 3)
    dst, dec = fresh(case, 5)
    err = refused(dec, full, RollbackRefused)
    assert "5" in str(err) and "3" in str(err)
    assert isinstance(err, VersionMismatch)
    refused(dec, full.buckets[:1], RollbackRefused, via="feed")


def test_full_update_rollback_when_allowed_is_logged(case, caplog):
    full = Encoder(bucket_bytes=4096).encode(case["new"], 3)
    dst, dec = fresh(case, 5, allow_rollback=True)
    with caplog.at_level(logging.DEBUG, logger="sparsesync"):
        stats = dec.apply(full)
    assert dec.version == 3 and stats.kind == "full" and stats.previous_version == 5
    assert_state_equal(dst, case["new"])
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "sparsesync"]
    assert len(warn) == 1 and "5" in warn[0].getMessage() and "3" in warn[0].getMessage()


def test_full_update_to_the_same_version_reinstalls_the_bytes(case, caplog):
    full = Encoder(bucket_bytes=4096).encode(case["new"], 5)
    dst = {k: torch.zeros_like(v) for k, v in case["new"].items()}
    dec = Decoder(dst, 5)
    with caplog.at_level(logging.DEBUG, logger="sparsesync"):
        stats = dec.apply(full)
    assert dec.version == 5 and stats.kind == "full" and stats.previous_version == 5
    assert_state_equal(dst, case["new"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(r.levelno == logging.DEBUG and "full update" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ver", [0, -1])
def test_delta_that_does_not_increase_the_version_is_corrupt(case, ver):
    """A delta whose ver <= base is malformed (the encoder never makes one): CorruptPayload, also with
    allow_rollback (it is not a rollback request, it is a broken update)."""
    bs = case["buckets"]
    bad = rechain(bs, lambda k, m, b: (dict(m, ver=ver if ver >= 0 else 0, base=0 if ver >= 0 else 1), b))
    for version in (0, 1):
        dst, dec = fresh(case, version, allow_rollback=True)
        refused(dec, bad, CorruptPayload, match="versions must increase")


def test_apply_stats_kind_and_previous_version(case):
    dst, dec = fresh(case, 0)
    st = dec.apply(case["upd"])
    assert (st.kind, st.previous_version, st.base_version, st.version) == ("delta", 0, 0, 1)
    full = Encoder(bucket_bytes=4096).encode(case["new"], 9)
    st = dec.apply(full)
    assert (st.kind, st.previous_version, st.base_version, st.version) == ("full", 1, None, 9)


# ---------------------------------------------------------------------------------------------------------------------
# item 3: the digest on every update kind

@pytest.mark.parametrize("stream", [True, False])
def test_full_update_function_carries_and_checks_the_digest(case, stream):
    new = case["new"]
    upd = full_update(new, 4, bucket_bytes=4096, stream=stream, digest=True)
    bs = list(upd.buckets)
    assert upd.digest == state_digest(new)
    assert parse_bucket(bs[-1])[0].digest == state_digest(new)
    assert all(parse_bucket(b)[0].dig for b in bs)
    dst, dec = fresh(case, 2)
    st = dec.apply(bs)
    assert st.digest_verified and dec.version == 4
    assert_state_equal(dst, new)
    # a wrong digest on the full update is caught and rolled back
    bad = rechain(bs, lambda k, m, b: (dict(m, digest="0" * 64), b) if k == len(bs) - 1 else (m, b))
    dst, dec = fresh(case, 2)
    refused(dec, bad, BaseMismatch)
    # without digest=True nothing is carried
    assert full_update(new, 4, bucket_bytes=4096).digest is None


# ---------------------------------------------------------------------------------------------------------------------
# item 4: layout mismatches name the tensor

def _full(case, version=3):
    return Encoder(bucket_bytes=4096).encode(case["new"], version)


def test_layout_mismatch_names_the_differing_tensor_of_the_first_bucket(case):
    dst = clone_state(case["old"])
    dst["a"] = torch.zeros(9000, dtype=torch.float16)
    err = refused(Decoder(dst, 0), _full(case), LayoutMismatch)
    assert "'a'" in str(err) and "bfloat16[9000]" in str(err) and "float16[9000]" in str(err)
    dst = {("A" if k == "a" else k): v for k, v in clone_state(case["old"]).items()}
    err = refused(Decoder(dst, 0), _full(case), LayoutMismatch)
    assert "'a'" in str(err) and "does not hold" in str(err)


def test_layout_mismatch_beyond_the_first_bucket_is_stated_precisely(case):
    """The tensor that differs is not in the first bucket: the message says that the first bucket's tensors match
    and gives both tensor counts (and the update is still refused)."""
    full = _full(case)
    first = {s.name for s in parse_bucket(full.buckets[0])[0].segs}
    assert "e" not in first
    dst = clone_state(case["old"])
    del dst["e"]
    err = refused(Decoder(dst, 0), full, LayoutMismatch)
    msg = str(err)
    assert "first bucket" in msg and "match" in msg
    assert "5 tensors" in msg and "holds 4" in msg
    assert "'a'" in msg                       # names what it compared


def test_layout_mismatch_names_a_tensor_the_full_update_lacks(case):
    """This decoder holds a tensor between two that the first bucket of a full update carries back to back (or before
    the first): the message names it."""
    full = Encoder(bucket_bytes=1 << 19).encode(case["new"], 3)
    first = [s.name for s in parse_bucket(full.buckets[0])[0].segs]
    assert full.count > 1 and first[:2] == ["a", "b"]
    dst = {}
    for k, v in clone_state(case["old"]).items():
        dst[k] = v
        if k == "a":
            dst["a2"] = torch.zeros(3, 4)
    err = refused(Decoder(dst, 0), full, LayoutMismatch)
    assert "'a2'" in str(err) and "float32[3, 4]" in str(err)
    # and at the very beginning
    dst = {"a0": torch.zeros(5, dtype=torch.int8), **clone_state(case["old"])}
    err = refused(Decoder(dst, 0), full, LayoutMismatch)
    assert "'a0'" in str(err)
    # a full update in one bucket carries every tensor it has: what it lacks is named for certain
    one = Encoder().encode(case["new"], 3)
    assert one.count == 1
    dst = {**clone_state(case["old"]), "zz": torch.zeros(2, dtype=torch.int16)}
    err = refused(Decoder(dst, 0), one, LayoutMismatch)
    assert "'zz'" in str(err) and "int16[2]" in str(err) and "does not carry" in str(err)


def test_ntensors_must_match_the_decoder(single):
    b = single["bucket"]
    m, body = split(b)
    bad = rechain([b], lambda k, mm, bb: (dict(mm, ntensors=mm["ntensors"] + 1), bb))
    dst, dec = fresh(single)
    err = refused(dec, bad, LayoutMismatch)
    assert str(m["ntensors"] + 1) in str(err) and str(m["ntensors"]) in str(err)


# ---------------------------------------------------------------------------------------------------------------------
# item 5: every refusal is a SparseSyncError

def _refusals():
    t = torch.zeros(4)
    ok = {"t": t}
    return {
        "decoder_noncontiguous": lambda: Decoder({"t": torch.zeros(4, 4).t()}),
        "decoder_not_cpu": lambda: Decoder({"t": torch.zeros(4, device="meta")}),
        "decoder_duplicate": lambda: Decoder([("t", torch.zeros(2)), ("t", torch.zeros(2))]),
        "decoder_name_not_str": lambda: Decoder({5: torch.zeros(2)}),
        "decoder_not_a_tensor": lambda: Decoder({"t": [1, 2]}),
        "decoder_complex": lambda: Decoder({"t": torch.zeros(2, dtype=torch.complex64)}),
        "decoder_state_not_iterable": lambda: Decoder(5),
        "decoder_items_not_pairs": lambda: Decoder([("t", torch.zeros(2), 3)]),
        "encoder_values": lambda: Encoder(values="xor"),
        "encoder_bucket_bytes_small": lambda: Encoder(bucket_bytes=100),
        "encoder_bucket_bytes_float": lambda: Encoder(bucket_bytes=1e6),
        "encoder_bucket_bytes_bool": lambda: Encoder(bucket_bytes=True),
        "encoder_base_version_without_base": lambda: Encoder(base_version=3),
        "encoder_duplicate_base": lambda: Encoder([("t", t), ("t", t)]),
        "encoder_duplicate_state": lambda: Encoder().encode([("t", t), ("t", t)], 1),
        "encoder_name_not_str": lambda: Encoder().encode({3: t}, 1),
        "encoder_not_a_tensor": lambda: Encoder().encode({"t": 3.0}, 1),
        "encoder_complex": lambda: Encoder().encode({"t": torch.zeros(2, dtype=torch.complex64)}, 1),
        "encoder_state_not_iterable": lambda: Encoder().encode(None, 1),
        "encoder_layout": lambda: Encoder(ok, 0).encode({"u": t}, 1),
        "encoder_meta_tensor": lambda: Encoder().encode({"t": torch.zeros(3, device="meta")}, 1),
        "encoder_sparse_tensor": lambda: Encoder().encode({"t": torch.zeros(3).to_sparse()}, 1),
        "decoder_sparse_tensor": lambda: Decoder({"t": torch.zeros(3).to_sparse()}),
        "decoder_apply_not_iterable": lambda: Decoder(ok).apply(5),
        "same_as_snapshot_not_a_tensor": lambda: Encoder(ok, 0).same_as_snapshot({"t": 1}),
        "full_update_duplicate": lambda: full_update([("t", t), ("t", t)], 1),
        "check_tensor": lambda: check_tensor("x", "not a tensor"),
        "name_of": lambda: name_of(torch.complex128),
        "state_digest_duplicate": lambda: state_digest([("t", t), ("t", t)]),
        "state_digest_not_a_tensor": lambda: state_digest({"t": 1}),
        "layout_digest_bad": lambda: layout_digest([("t", "float32")]),
        "unpack_freq": lambda: unpack_freq(b"\x01\x05", 20),
        "parse_bucket": lambda: parse_bucket(object()),
        "pack_freq_varint": lambda: __import__("sparsesync.format", fromlist=["_put_varint"])._put_varint(
            bytearray(), -1),
    }


@pytest.mark.parametrize("name", sorted(_refusals()))
def test_every_codec_refusal_is_a_sparsesync_error(name):
    with pytest.raises(SparseSyncError) as info:
        _refusals()[name]()
    # argument errors keep their standard base classes
    if isinstance(info.value, InvalidType):
        assert isinstance(info.value, TypeError)
    if isinstance(info.value, InvalidArgument):
        assert isinstance(info.value, ValueError)


def test_argument_errors_keep_standard_types():
    with pytest.raises(ValueError):
        Decoder({"t": torch.zeros(4, 4).t()})
    with pytest.raises(TypeError):
        Encoder().encode({"t": torch.zeros(2, dtype=torch.complex64)}, 1)
    with pytest.raises(InvalidType, match="complex64"):
        Encoder().encode({"t": torch.zeros(2, dtype=torch.complex64)}, 1)
    with pytest.raises(InvalidArgument, match="'t'"):
        Decoder({"t": torch.zeros(4, 4).t()})


def test_tensor_changed_while_streaming_is_a_sparsesync_error():
    """A tensor changed between planning and encoding (a streamed update whose caller broke the contract) is
    reported as a SparseSyncError, not a kernel error."""
    g = gen(21)
    old = {"x": random_tensor((4096 * 40,), torch.bfloat16, g)}
    new = {"x": mutate(old["x"], 0.05, g, "ulp")}
    enc = Encoder(old, 0, bucket_bytes=4096)
    upd = enc.encode(new, 1, stream=True)
    it = upd.iter_buckets()
    next(it)
    changed = (ivw(old["x"]) != ivw(new["x"])).nonzero().reshape(-1)
    ivw(new["x"])[changed[-10:]] ^= 0x4000          # far from +-1 ulp: symbols the plan never counted
    with pytest.raises(SparseSyncError, match="changed between planning and encoding"):
        for _ in it:
            pass


# ---------------------------------------------------------------------------------------------------------------------
# item 6: linear checks; no empty segments

def _dense_segment(name, dtype, shape, start, end, off, w):
    return [name, dtype, list(shape), "d", start, end, 0, 0, off, (end - start) * w, b"", None, end - start]


def test_empty_dense_segment_is_refused(case):
    bs = case["buckets"]

    def add_empty(k, m, body):
        if k:
            return m, body
        # tensor "e" is in no other segment: only the emptiness is wrong
        return dict(m, segs=list(m["segs"]) + [_dense_segment("e", "bool", [6, 7], 17, 17, len(body), 1)]), body

    bad = rechain(bs, add_empty)
    dst, dec = fresh(case)
    refused(dec, bad, CorruptPayload, match="empty")
    with pytest.raises(spec.SpecError, match="empty"):
        spec.apply_update(bad, _spec_state(case["old"]))


def _many_segments_bucket(n_segments: int, order: str):
    """One-bucket full update of a tensor of n_segments int8 elements made of one-element dense segments."""
    n = n_segments
    state = {"t": torch.zeros(n, dtype=torch.int8)}
    new = {"t": torch.arange(n, dtype=torch.int64).remainder(127).to(torch.int8)}
    base = Encoder().encode(new, 1)
    m, _ = split(one_bucket(base))
    starts = list(range(n))
    if order == "descending":
        starts = starts[::-1]
    elif order == "overlap_at_end":
        starts = starts + [0]
    segs, body = [], bytearray()
    raw = ivw(new["t"]).view(torch.uint8).numpy().tobytes()
    for s in starts:
        segs.append(_dense_segment("t", "int8", [n], s, s + 1, len(body), 1))
        body += raw[s:s + 1]
    bucket = pack(dict(m, segs=segs, body_len=len(body), digest=None, dig=False), bytes(body))
    return state, new, bucket


@pytest.mark.parametrize("order", ["descending", "overlap_at_end"])
def test_many_segments_are_checked_in_linear_time(order, record_property):
    """32,000 one-element segments: out of order or overlapping is refused (the old pairwise overlap check took
    ~32 s here; the per-tensor ascending rule is linear)."""
    state, new, bucket = _many_segments_bucket(32_000, order)
    dec = Decoder(state, 0)
    t0 = time.perf_counter()
    refused(dec, [bucket], CorruptPayload, match="overlap")
    record_property("refusal_seconds", time.perf_counter() - t0)


def test_many_ascending_segments_apply(record_property):
    state, new, bucket = _many_segments_bucket(32_000, "ascending")
    dec = Decoder(state, 0)
    t0 = time.perf_counter()
    dec.apply([bucket])
    record_property("apply_seconds", time.perf_counter() - t0)
    assert_state_equal(state, new)


# ---------------------------------------------------------------------------------------------------------------------
# item 7: staging memory is bounded

def arena_bytes(dec: Decoder) -> int:
    return sum(t.numel() * t.element_size() for entry in dec._arena if entry is not None for t in entry)


def _sparse_chain():
    """An update of many buckets, each with sparse segments (so each bucket stages through the arena)."""
    g = gen(77)
    old = {"x": random_tensor((4096 * 300,), torch.bfloat16, g)}
    new = {"x": mutate(old["x"], 0.3, g, "ulp")}
    upd = Encoder(old, 0, bucket_bytes=4096).encode(new, 1)
    hs = [parse_bucket(b)[0] for b in upd.buckets]
    assert len(hs) >= 40 and all(any(s.kind == "s" for s in h.segs) for h in hs)
    return old, new, upd


def test_arena_is_bounded_after_a_refused_update():
    old, new, upd = _sparse_chain()
    bs = upd.buckets
    small_old = {"x": old["x"].clone()}
    dec = Decoder(small_old, 0)
    refused(dec, bs[:-1], CorruptPayload, match="truncated")          # many buckets staged, then refused
    assert len(dec._arena) == 0 and arena_bytes(dec) == 0
    # after a successful update the arena keeps (at most) what that update used; a refused longer one adds nothing
    dec.apply(bs)
    kept = len(dec._arena)
    held = arena_bytes(dec)
    assert kept <= len(bs)
    nxt = {"x": mutate(new["x"], 0.02, gen(5), "ulp")}
    enc = Encoder(new, 1, bucket_bytes=1 << 20)
    short = enc.encode(nxt, 2)
    assert short.count < len(bs)
    # a successful shorter update trims the arena to its own bucket count
    dec.apply(short)
    assert len(dec._arena) <= short.count
    assert arena_bytes(dec) <= 4 * held + (1 << 16)


def test_arena_does_not_grow_with_many_chained_empty_buckets(case):
    """Chained buckets that carry nothing: refused at once (only the last bucket may be empty), arena untouched.
    The old decoder staged 100,000 of them and kept one arena entry each (129 MB)."""
    bs = case["buckets"]
    m0, b0 = split(bs[0])
    chain, prev = [], 0
    for i in range(2000):
        m = dict(m0, idx=i, cnt=0, segs=[], body_len=0, prev=prev, digest=None)
        b = pack(m, b"")
        prev = PREAMBLE.unpack_from(b, 0)[2]
        chain.append(b)
    dst, dec = fresh(case)
    refused(dec, chain, CorruptPayload)
    assert len(dec._arena) == 0 and arena_bytes(dec) == 0


def test_arena_is_bounded_after_abort_and_stage_errors():
    old, new, upd = _sparse_chain()
    bs = upd.buckets
    dec = Decoder({"x": old["x"].clone()}, 0)
    for b in bs[:-1]:
        dec.stage(b)
    assert len(dec._arena) > 10
    dec.abort()
    assert len(dec._arena) == 0 and arena_bytes(dec) == 0
    for b in bs[:20]:
        dec.feed(b)
    with pytest.raises(CorruptPayload):
        dec.feed(bs[5])
    assert len(dec._arena) == 0 and arena_bytes(dec) == 0


# ---------------------------------------------------------------------------------------------------------------------
# item 8: an update that says it has a digest must have one

def test_forged_early_count_is_refused_when_the_update_carries_a_digest(case):
    """The attacker sets cnt = k+1 on bucket k and recomputes its checksums: the update would end early, without
    the digest check. Every bucket says the update carries a digest, so the missing digest is an error."""
    bs = case["buckets"]
    for k in range(len(bs) - 1):
        m, body = split(bs[k])
        forged = pack(dict(m, cnt=k + 1), body)
        dst, dec = fresh(case)
        refused(dec, bs[:k] + [forged], CorruptPayload, match="digest")
        for verify in (True, False):
            dst, dec = fresh(case, verify_digest=verify)
            refused(dec, bs[:k] + [forged], CorruptPayload, match="digest")


def test_every_bucket_says_whether_the_update_carries_a_digest(case):
    for b in case["buckets"]:
        assert parse_bucket(b)[0].dig is True
    for b in Encoder(case["old"], 0, bucket_bytes=4096).encode(case["new"], 1).buckets:
        h = parse_bucket(b)[0]
        assert h.dig is False and h.digest is None


@pytest.mark.parametrize("forgery", ["digest_on_non_last", "dig_false_on_one", "dig_false_everywhere_keep_digest",
                                     "digest_not_hex", "digest_upper", "digest_short", "dig_int", "dig_missing"])
def test_digest_field_rules(case, forgery):
    bs = case["buckets"]
    last = len(bs) - 1

    def edit(k, m, b):
        if forgery == "digest_on_non_last" and k == 1:
            return dict(m, digest="0" * 64), b
        if forgery == "dig_false_on_one" and k == 1:
            return dict(m, dig=False), b
        if forgery == "dig_false_everywhere_keep_digest":
            return dict(m, dig=False), b
        if forgery == "digest_not_hex" and k == last:
            return dict(m, digest="g" * 64), b
        if forgery == "digest_upper" and k == last:
            return dict(m, digest=m["digest"].upper()), b
        if forgery == "digest_short" and k == last:
            return dict(m, digest=m["digest"][:63]), b
        if forgery == "dig_int":
            return dict(m, dig=1), b
        if forgery == "dig_missing":
            return {kk: v for kk, v in m.items() if kk != "dig"}, b
        return m, b

    dst, dec = fresh(case)
    refused(dec, rechain(bs, edit), CorruptPayload)


def test_dig_false_everywhere_without_digest_applies(case):
    """Dropping the digest from a whole update (every bucket re-chained) is a different, digest-less update: it is
    accepted, and bit-exact (the content is untouched)."""
    bs = case["buckets"]
    bad = rechain(bs, lambda k, m, b: (dict(m, dig=False, digest=None), b))
    dst, dec = fresh(case)
    st = dec.apply(bad)
    assert not st.digest_verified
    assert_state_equal(dst, case["new"])


# ---------------------------------------------------------------------------------------------------------------------
# item 9: one canonical encoding

@pytest.mark.parametrize("value", [True, 1.0, 3, 0, "1", None])
def test_format_version_must_be_the_integer_1(single, value):
    bad = rechain([single["bucket"]], lambda k, m, b: (dict(m, v=value), b))
    dst, dec = fresh(single)
    refused(dec, bad, CorruptPayload, match="format version")


def test_format1_segments_under_version_2_are_refused(single):
    bad = rechain([single["bucket"]], lambda k, m, b: (dict(m, v=2), b))
    dst, dec = fresh(single)
    refused(dec, bad, CorruptPayload, match="12-element array")


@pytest.mark.parametrize("where", ["end", "start", "middle"])
def test_unknown_header_key_is_refused(single, where):
    def edit(k, m, b):
        items = list(m.items())
        pos = {"end": len(items), "start": 0, "middle": 5}[where]
        items.insert(pos, ("extra", 1))
        return dict(items), b
    bad = rechain([single["bucket"]], edit)
    dst, dec = fresh(single)
    refused(dec, bad, CorruptPayload, match="header keys")


def test_header_keys_in_another_order_are_refused(single):
    bad = rechain([single["bucket"]], lambda k, m, b: (dict(reversed(list(m.items()))), b))
    dst, dec = fresh(single)
    refused(dec, bad, CorruptPayload, match="header keys")


def test_header_keys_are_the_documented_ones(single):
    m, _ = split(single["bucket"])
    assert tuple(m) == HEADER_KEYS


def _widen(hbytes: bytes, key: bytes, old: bytes, new: bytes) -> bytes:
    needle = bytes([0xA0 | len(key)]) + key + old
    assert hbytes.count(needle) == 1, (key, old)
    return hbytes.replace(needle, bytes([0xA0 | len(key)]) + key + new)


@pytest.mark.parametrize("variant", ["idx_uint64", "idx_uint8", "v_int16", "cnt_uint32", "key_str8", "map16",
                                     "nil_digest_as_str", "duplicate_key"])
def test_noncanonical_header_encodings_are_refused(single, variant):
    b = single["bucket"]
    h = header_bytes(b)
    if variant == "idx_uint64":
        h2 = _widen(h, b"idx", b"\x00", b"\xcf" + b"\x00" * 8)
    elif variant == "idx_uint8":
        h2 = _widen(h, b"idx", b"\x00", b"\xcc\x00")
    elif variant == "v_int16":
        h2 = _widen(h, b"v", b"\x01", b"\xd1\x00\x01")
    elif variant == "cnt_uint32":
        h2 = _widen(h, b"cnt", b"\x01", b"\xce\x00\x00\x00\x01")
    elif variant == "key_str8":
        assert h.count(b"\xa3ver") == 1
        h2 = h.replace(b"\xa3ver", b"\xd9\x03ver")
    elif variant == "map16":
        assert h[0] == 0x80 | len(HEADER_KEYS)
        h2 = b"\xde" + struct.pack(">H", len(HEADER_KEYS)) + h[1:]
    elif variant == "nil_digest_as_str":   # the last bucket's digest as a str8 (d9) instead of fixstr/str8 minimal
        i = h.index(b"\xa6digest") + 7
        assert h[i] == 0xD9 and h[i + 1] == 64
        h2 = h[:i] + b"\xda\x00\x40" + h[i + 2:]
    else:                                  # "idx" twice: the map says 16 entries, the dict keeps 15
        h2 = b"\xde\x00\x10" + h[1:] + b"\xa3idx\x00"
    assert h2 != h
    assert msgpack.unpackb(h2, raw=False) is not None
    bad = repack_raw(b, h2)
    dst, dec = fresh(single)
    refused(dec, [bad], CorruptPayload)
    with pytest.raises(spec.SpecError):
        spec.parse_bucket(bad)


def _noncanonical_table(table: bytes) -> bytes:
    """The chunk table with its first varint written with one redundant zero group (e.g. 0x05 -> 0x85 0x00)."""
    v, pos = reference.read_varint(table, 0, len(table))
    enc = bytearray()
    x = v
    while True:
        enc.append((x & 0x7F) | 0x80)
        x >>= 7
        if not x:
            break
    enc.append(0x00)
    return bytes(enc) + table[pos:]


def test_noncanonical_varints_are_refused_by_both_kernels():
    g = gen(3)
    n = 20000
    old = random_tensor((n,), torch.bfloat16, g)
    new = mutate(old, 0.01, g, "ulp")
    ob, nb = ivw(old).view(torch.uint8), ivw(new).view(torch.uint8)
    _, hist, _ = reference.scan(ob, nb, 2, 0)
    from sparsesync.format import build_freq
    freq = build_freq(hist)
    nchunks = -(-n // 4096)
    table, data, vhash, nch = reference.encode(ob.clone(), nb, 2, 0, 12, 0, nchunks, freq)
    bad_table = _noncanonical_table(table)
    kernels = [reference] + ([_native] if _native.available else [])
    for kern in kernels:
        kern.decode(table + data, len(table), ob, 2, 0, 12, 0, nchunks, freq, nch, vhash)   # the canonical one
        with pytest.raises(reference.KernelError) as info:
            kern.decode(bad_table + data, len(bad_table), ob, 2, 0, 12, 0, nchunks, freq, nch, vhash)
        assert info.value.code == reference.E_TABLE, kern
    # every position of a varint: 0x80 0x00 for 0, 0xff 0x80 0x00, ...
    for raw in (b"\x80\x00", b"\x81\x00", b"\xff\x80\x00", b"\x80\x80\x80\x00"):
        with pytest.raises(reference.KernelError) as info:
            reference.read_varint(raw, 0, len(raw))
        assert info.value.code == reference.E_TABLE
        with pytest.raises(spec.SpecError):
            spec.read_varint(raw, 0, len(raw))
    for good, want in ((b"\x00", 0), (b"\x7f", 127), (b"\x80\x01", 128), (b"\xff\x7f", 16383)):
        assert reference.read_varint(good, 0, len(good)) == (want, len(good))
        assert spec.read_varint(good, 0, len(good)) == (want, len(good))


def test_noncanonical_varint_in_a_symbol_table_is_refused():
    good = b"\x01\x05\x80\x20"
    assert unpack_freq(good, 20)[5] == 4096
    for bad in (b"\x81\x00\x05\x80\x20", b"\x01\x85\x00\x80\x20", b"\x01\x05\x80\xa0\x00"):
        with pytest.raises(CorruptPayload):
            unpack_freq(bad, 20)
        with pytest.raises(spec.SpecError):
            spec.parse_freq(bad)


def _edit_chunk_table(k, m, body):
    """First sparse segment: its chunk table's first varint gets a redundant zero group (lengths and offsets fixed)."""
    segs = [list(x) for x in m["segs"]]
    j = next(i for i, x in enumerate(segs) if x[3] == "s")
    s = segs[j]
    off, ln, tl = s[8], s[9], s[7]
    seg_bytes = body[off:off + ln]
    new_table = _noncanonical_table(seg_bytes[:tl])
    grow = len(new_table) - tl
    body2 = body[:off] + new_table + seg_bytes[tl:] + body[off + ln:]
    s[7], s[9] = tl + grow, ln + grow
    for later in segs[j + 1:]:
        later[8] += grow
    return dict(m, segs=segs, body_len=len(body2)), body2


def _edit_symbol_table(k, m, body):
    """First sparse segment: its symbol table's count gets a redundant zero group."""
    segs = [list(x) for x in m["segs"]]
    j = next(i for i, x in enumerate(segs) if x[3] == "s")
    f = segs[j][10]
    count, pos = reference.read_varint(f, 0, len(f))
    assert count < 128
    segs[j][10] = bytes([count | 0x80, 0x00]) + f[pos:]
    return dict(m, segs=segs), body


@pytest.mark.parametrize("kernels", ["native", "reference"])
@pytest.mark.parametrize("where", ["chunk_table", "symbol_table"])
def test_noncanonical_varint_in_an_update_is_refused(single, where, kernels, monkeypatch):
    if kernels == "native" and not _native.available:
        pytest.skip("native library not built")
    monkeypatch.setenv("SPARSESYNC_REFERENCE", "1" if kernels == "reference" else "0")
    bad = rechain([single["bucket"]], _edit_chunk_table if where == "chunk_table" else _edit_symbol_table)
    dst, dec = fresh(single)
    refused(dec, bad, CorruptPayload)
    with pytest.raises(spec.SpecError):
        spec.apply_update(bad, _spec_state(single["old"]))


def _spec_state(state: dict) -> dict:
    return {k: (str(v.dtype).replace("torch.", ""), list(v.shape),
                bytearray(ivw(v.contiguous()).reshape(-1).view(torch.uint8).numpy().tobytes()))
            for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# item 10: logging

def test_codec_logs_its_decisions_at_debug(case, caplog):
    old, new = case["old"], case["new"]
    with caplog.at_level(logging.DEBUG, logger="sparsesync"):
        upd = Encoder(old, 0, bucket_bytes=4096, digest=True).encode(new, 1)
        full = Encoder(digest=True).encode(new, 1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "sparsesync" and r.levelno == logging.DEBUG]
    dense = {sg.name for b in upd.buckets for sg in parse_bucket(b)[0].segs if sg.kind == "d"}
    assert dense
    for name in dense:                                                  # every dense fallback is logged
        assert any(f"{name!r}" in m and "dense" in m for m in msgs), (name, msgs)
    assert any("full update" in m for m in msgs), msgs
    assert any("digest" in m for m in msgs), msgs
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sparsesync"):
        dst, dec = fresh(case, 0)
        dec.apply(upd)
    msgs = [r.getMessage() for r in caplog.records if r.name == "sparsesync" and r.levelno == logging.DEBUG]
    assert any("digest" in m and "verified" in m for m in msgs), msgs
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sparsesync"):
        dst, dec = fresh(case, 0)
        dec.apply(full)
    msgs = [r.getMessage() for r in caplog.records if r.name == "sparsesync" and r.levelno == logging.DEBUG]
    assert any("full update" in m for m in msgs), msgs


# ---------------------------------------------------------------------------------------------------------------------
# item 11: documentation

@pytest.mark.parametrize("obj", [Encoder, Update, Decoder, UpdateStats, ApplyStats, full_update, state_digest,
                                 sparsesync.Sender, sparsesync.Receiver, sparsesync.PushStats, sparsesync.PeerResult])
def test_public_api_is_documented_and_annotated(obj):
    assert inspect.getdoc(obj), obj
    members = [(obj.__name__, obj)] if inspect.isfunction(obj) else \
        [(n, m) for n, m in vars(obj).items() if not n.startswith("_")]
    for name, member in members:
        fn = member.fget if isinstance(member, property) else member.__func__ if isinstance(member, staticmethod) \
            else member
        if not callable(fn):
            continue
        assert inspect.getdoc(member if not isinstance(member, staticmethod) else fn), f"{obj.__name__}.{name}"
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, f"{obj.__name__}.{name} return"
        for p in sig.parameters.values():
            if p.name in ("self", "cls"):
                continue
            assert p.annotation is not inspect.Parameter.empty, f"{obj.__name__}.{name}({p.name})"
    if inspect.isclass(obj):
        init = vars(obj).get("__init__")
        if init is not None:
            for p in inspect.signature(init).parameters.values():
                assert p.name == "self" or p.annotation is not inspect.Parameter.empty, f"{obj.__name__}({p.name})"


# ---------------------------------------------------------------------------------------------------------------------
# item 12: UpdateStats when nothing changed

def test_update_stats_print_sensibly_when_nothing_changed(case):
    old = case["old"]
    s = Encoder(old, 0).encode(clone_state(old), 1).stats
    assert s.changed == 0
    text = str(s)
    assert "inf" not in text and "0.0x" not in text and "nan" not in text.lower()
    assert "no element changed" in text
    empty = Encoder().encode({"z": torch.zeros(0)}, 1).stats
    text = str(empty)
    assert "inf" not in text and "0.0x" not in text and "nan" not in text.lower()
    # a normal update still prints its figures
    assert "B/changed" in str(case["upd"].stats) and "x vs dense" in str(case["upd"].stats)


# ---------------------------------------------------------------------------------------------------------------------
# item 13: the fuzz machinery (small count; bench/fuzz.py runs a million)

def _load_fuzz():
    path = ROOT / "bench" / "fuzz.py"
    spec_ = importlib.util.spec_from_file_location("sparsesync_bench_fuzz", path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    return mod


def test_fuzz_machinery_quick(tmp_path):
    fuzz = _load_fuzz()
    result = fuzz.run(count=2000, seed=12345, workers=1, out=tmp_path, reference_share=0.02, quiet=True)
    assert result["count"] == 2000
    assert result["failures"] == [], result["failures"][:3]
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 2000
    assert outcomes.get("CorruptPayload", 0) > 0 and outcomes.get("accepted-exact", 0) > 0
    assert set(result["kinds"]) >= {"bitflip", "truncate", "pad", "splice", "duplicate", "reorder", "drop",
                                    "header_field", "segment_field", "varint", "symbol_table", "chunk_table"}
    assert result["reference_payloads"] > 0
    assert (tmp_path / "fuzz.json").exists() and (tmp_path / "fuzz.txt").exists()
