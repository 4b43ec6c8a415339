"""Whole updates against docs/FORMAT.md: an independent decoder (tests/spec.py) reproduces the encoder's output, and
the header, digests and encoder choices are the ones the document describes."""
from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spec
from helpers import DTYPES, examples, gen, ivw, mutate, random_tensor, shapes
from sparsesync import Encoder, state_digest
from sparsesync.digest import layout_digest
import itertools

# pins format 1 against tests/spec.py; format 2: test_format2_reference.py, test_format2.py
pytestmark = pytest.mark.usefixtures("format1")

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def as_spec_state(state: dict) -> dict:
    return {k: (str(t.dtype).replace("torch.", ""), list(t.shape), bytearray(bytes(ivw(t.contiguous()).reshape(-1)
                                                                                  .view(torch.uint8).numpy())))
            for k, t in state.items()}


def _split(bucket):
    return spec.parse_bucket(bucket)


@settings(max_examples=examples(25), deadline=None)
@given(data=st.data(), values=st.sampled_from(["delta", "raw"]), seed=st.integers(0, 2 ** 32 - 1),
       bucket_bytes=st.sampled_from([None, 4096]), full=st.booleans())
def test_independent_decoder_reproduces_updates(data, values, seed, bucket_bytes, full):
    g = gen(seed)
    old, new = {}, {}
    for i in range(data.draw(st.integers(1, 4), label="ntensors")):
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        shape = data.draw(shapes(max_numel=6000), label="shape")
        old[f"t{i}"] = random_tensor(shape, dtype, g)
        new[f"t{i}"] = mutate(old[f"t{i}"], data.draw(st.sampled_from([0.0, 0.002, 0.05, 0.5, 1.0]), label="d"), g)
    enc = Encoder(None if full else old, None if full else 0, values=values, bucket_bytes=bucket_bytes, digest=True)
    upd = enc.encode(new, 3)
    st_ = as_spec_state(old)
    first = spec.apply_update(upd.buckets, st_)
    assert st_ == as_spec_state(new)
    assert first["base"] == (None if full else 0) and first["ver"] == 3 and first["vals"] == values
    assert first["layout"] == spec.layout_digest(st_)
    last, _ = _split(upd.buckets[-1])
    assert last["digest"] == spec.state_digest(st_) == state_digest(new)


def test_encoder_choices_follow_the_spec():
    """Rice parameter: the smallest k minimising n*(k+1) + sum(g >> k); the segment range is chunk aligned and ends at
    min(end_chunk*C, N); nchanged and values_hash are those of FORMAT.md 2."""
    g = gen(5)
    old = {"x": random_tensor((30000,), torch.bfloat16, g), "y": random_tensor((5000,), torch.int64, g)}
    new = {"x": mutate(old["x"], 0.01, g, "ulp"), "y": mutate(old["y"], 0.2, g)}
    upd = Encoder(old, 0).encode(new, 1)
    nsparse = 0
    for b in upd.buckets:
        m, body = _split(b)
        for seg in m["segs"]:
            name, dtype, _shape, kind, start, end, log2c, table_len, off, length, _freq, vhash, nchanged = seg
            if kind != "s":
                continue
            nsparse += 1
            C = 1 << log2c
            N = new[name].numel()
            assert start % C == 0 and end == min(-(-end // C) * C, N)
            o = ivw(old[name]).reshape(-1)
            n_ = ivw(new[name]).reshape(-1)
            changed = (o[start:end] != n_[start:end]).nonzero().reshape(-1) + start
            assert nchanged == changed.numel()
            assert vhash == spec.tree64(bytes(n_[changed].contiguous().view(torch.uint8).numpy()))
            data = body[off:off + length]
            pos = 0
            for c in range(start // C, -(-end // C)):
                n, pos = spec.read_varint(data, pos, table_len)
                if not n:
                    continue
                k = data[pos]
                pos += 1
                _, pos = spec.read_varint(data, pos, table_len)
                _, pos = spec.read_varint(data, pos, table_len)
                rel = [int(p) - c * C for p in changed if c * C <= int(p) < (c + 1) * C]
                gaps = [rel[0]] + [b - a - 1 for a, b in itertools.pairwise(rel)]
                costs = [n * (kk + 1) + sum(gg >> kk for gg in gaps) for kk in range(log2c + 1)]
                assert k == costs.index(min(costs))
            assert pos == table_len
    assert nsparse >= 2


def test_digests_follow_the_spec():
    g = gen(8)
    state = {"b": random_tensor((3, 5), torch.float8_e5m2, g), "a": random_tensor((), torch.float64, g),
             "ünï": random_tensor((0, 2), torch.int16, g), "m": random_tensor((9000,), torch.bool, g)}
    s = as_spec_state(state)
    assert state_digest(state) == spec.state_digest(s)
    assert layout_digest([(k, v[0], tuple(v[1])) for k, v in s.items()]) == spec.layout_digest(s)


def _doc_header_keys() -> set[str]:
    text = FORMAT_MD.read_text()
    section = text[text.index("Header keys"):text.index("Each segment is an array")]
    keys = set()
    for row in re.findall(r"^\|([^|]+)\|", section, flags=re.MULTILINE):
        keys |= set(re.findall(r"`([a-z_]+)`", row))
    return keys


def test_doc_header_keys_are_all_present(multi_bucket_update):
    doc = _doc_header_keys()
    assert {"v", "uid", "base", "ver", "vals", "idx", "cnt", "layout", "ntensors", "digest", "body_len",
            "body_hash", "segs"} <= doc
    for b in multi_bucket_update[2].buckets:
        m, _ = _split(b)
        assert doc <= set(m)


def test_header_keys_are_exactly_the_documented_ones(multi_bucket_update):
    doc = _doc_header_keys()
    for b in multi_bucket_update[2].buckets:
        m, _ = _split(b)
        assert set(m) == doc


def test_uid_as_documented(multi_bucket_update):
    bs = multi_bucket_update[2].buckets
    m0, _ = _split(bs[0])
    assert m0["uid"] == spec.uid_per_doc(m0, bs)


def test_header_is_plain_msgpack_map(multi_bucket_update):
    for b in multi_bucket_update[2].buckets:
        hlen = int.from_bytes(b[4:8], "little")
        m = msgpack.unpackb(b[16:16 + hlen], raw=False, ext_hook=lambda c, d: pytest.fail("extension type"))
        assert isinstance(m, dict)
        assert m["v"] == 1 and len(m["uid"]) == 16 and len(m["layout"]) == 16
        assert m["body_len"] == len(b) - 16 - hlen
