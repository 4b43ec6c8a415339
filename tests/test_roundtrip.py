"""Round trips: whatever the encoder is given, the decoder reproduces it bit for bit."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (examples, DTYPE_IDS, DTYPES, VALUE_MODES, apply_update, assert_state_equal, bits_equal, check_segments_cover,
                     check_stats, clone_state, densities, dtypes, from_patterns, gen, headers, ivw, mutate,
                     random_tensor, roundtrip, seeds, shapes, special_patterns, styles, value_modes)
from sparsesync import Decoder, Encoder, LayoutMismatch, state_digest

# every round trip in both wire formats
pytestmark = pytest.mark.usefixtures("wire_format")


# ---------------------------------------------------------------------------------------------------------------------
# single tensors, everything drawn by hypothesis

def _target(h, seg) -> str:
    """What a segment addresses: a tensor name (format 1) or a dtype space (format 2)."""
    return seg.name if h.v == 1 else seg.space


def _key(hs, name: str, state: dict) -> str:
    """The segment target holding tensor ``name`` in this update's format."""
    return name if hs[0].v == 1 else str(state[name].dtype)[6:]


@settings(max_examples=examples(200), deadline=None)
@given(dtype=dtypes, shape=shapes(), density=densities, values=value_modes, seed=seeds, style=styles,
       via=st.sampled_from(["apply", "feed", "list"]))
def test_roundtrip_single_tensor(dtype, shape, density, values, seed, style, via):
    g = gen(seed)
    old = {"t": random_tensor(shape, dtype, g)}
    new = {"t": mutate(old["t"], density, g, style)}
    upd, _ = roundtrip(old, new, values=values, via=via)
    check_segments_cover(upd, new, old)
    assert upd.base_version == 0 and upd.version == 1 and upd.values == values


@settings(max_examples=examples(50), deadline=None)
@given(data=st.data(), ntensors=st.integers(1, 6), values=value_modes, seed=seeds,
       bucket_bytes=st.sampled_from([None, 4096, 5000, 16384]))
def test_roundtrip_state(data, ntensors, values, seed, bucket_bytes):
    """Several tensors of different dtypes/shapes/densities at once (some unchanged, some empty)."""
    g = gen(seed)
    old, new = {}, {}
    for i in range(ntensors):
        dtype = data.draw(dtypes, label=f"dtype{i}")
        shape = data.draw(shapes(max_numel=8000), label=f"shape{i}")
        density = data.draw(densities, label=f"density{i}")
        name = data.draw(st.sampled_from(["w", "layers.0.q.weight", "ünï/cøde", "", "a" * 40]), label=f"name{i}")
        name = f"{name}#{i}"
        old[name] = random_tensor(shape, dtype, g)
        new[name] = mutate(old[name], density, g)
    upd, _ = roundtrip(old, new, values=values, bucket_bytes=bucket_bytes)
    check_segments_cover(upd, new, old)


@settings(max_examples=examples(40), deadline=None)
@given(dtype=dtypes, shape=shapes(max_numel=10000), seed=seeds, values=value_modes)
def test_full_update_roundtrip(dtype, shape, seed, values):
    """An Encoder without base makes a full update; it reproduces the state on a receiver holding anything."""
    g = gen(seed)
    new = {"t": random_tensor(shape, dtype, g), "z": random_tensor((17,), torch.int16, g)}
    receiver = {k: torch.zeros_like(v) for k, v in new.items()}
    upd, _ = roundtrip(None, new, values=values, receiver=receiver)
    assert upd.base_version is None
    check_segments_cover(upd, new, None)
    assert all(seg.kind == "d" for h in headers(upd) for seg in h.segs)


# ---------------------------------------------------------------------------------------------------------------------
# special values

@pytest.mark.parametrize("values", VALUE_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_special_value_transitions(dtype, values):
    """Every transition between two special bit patterns (NaN payloads, -0.0, +-inf, subnormals, int min/max...),
    including the largest possible delta d = -2^(B-1)."""
    pats = special_patterns(dtype)
    a = [p for p in pats for _ in pats]
    b = [q for _ in pats for q in pats]
    old = {"t": from_patterns(a, dtype)}
    new = {"t": from_patterns(b, dtype)}
    upd, _dst = roundtrip(old, new, values=values)
    assert upd.stats.changed == sum(x != y for x, y in zip(a, b))
    # the same again on a 2-D tensor where only the specials change, inside a larger unchanged tensor
    g = gen(7)
    big_old = random_tensor((50, 97), dtype, g, special_frac=0)
    big_new = big_old.clone()
    flat = ivw(big_new).reshape(-1)
    pos = torch.randperm(big_new.numel(), generator=g)[: len(b)]
    flat[pos] = ivw(new["t"])
    roundtrip({"t": big_old}, {"t": big_new}, values=values)


@pytest.mark.parametrize("values", VALUE_MODES)
@pytest.mark.parametrize("w,dtype", [(1, torch.int8), (2, torch.int16), (4, torch.int32), (8, torch.int64)])
def test_extreme_deltas(w, dtype, values):
    """min <-> max, 0 <-> min (d = -2^(B-1): m = 2^(B-1)), and +-1..+-9 around the wrap-around point."""
    info = torch.iinfo(dtype)
    pairs = [(info.min, info.max), (info.max, info.min), (0, info.min), (info.min, 0), (-1, info.max),
             (info.max, -1), (info.min + 1, info.max), (5, 5 - 8), (5, 5 + 8), (5, 5 + 9), (5, 5 - 9),
             (info.max - 3, info.max), (info.min + 3, info.min)]
    old = {"t": torch.tensor([p[0] for p in pairs], dtype=dtype)}
    new = {"t": torch.tensor([p[1] for p in pairs], dtype=dtype)}
    roundtrip(old, new, values=values)
    wrap_old = torch.full((40,), info.max, dtype=dtype)
    wrap_new = wrap_old.clone()
    ivw(wrap_new)[:20] = torch.arange(20, dtype=dtype) + info.min  # max -> min + j: delta 1 + j across the wrap
    roundtrip({"t": wrap_old}, {"t": wrap_new}, values=values)


# ---------------------------------------------------------------------------------------------------------------------
# version chains

@settings(max_examples=examples(12), deadline=None)
@given(seed=seeds, values=value_modes, bucket_bytes=st.sampled_from([None, 4096]), digest=st.booleans(),
       stream=st.booleans())
def test_version_chain(seed, values, bucket_bytes, digest, stream):
    """v1..v10 through one encoder and one decoder; the digests match at every step (including a no-change step,
    a full-change step and a step that changes only one element)."""
    g = gen(seed)
    state = {
        "w": random_tensor((70, 90), torch.bfloat16, g),
        "b": random_tensor((90,), torch.float32, g),
        "f8": random_tensor((500,), torch.float8_e4m3fn, g),
        "i": random_tensor((3, 4), torch.int64, g),
        "s": random_tensor((), torch.float16, g),
    }
    enc = Encoder(state, 0, values=values, bucket_bytes=bucket_bytes, digest=digest)
    dst = clone_state(state)
    dec = Decoder(dst, 0, verify_digest=digest)
    plan = [0.003, 0.01, 0.0, 1.0, 0.2, "one", 0.003, 0.5, 0.001, 0.05]
    for v, density in enumerate(plan, start=1):
        prev = clone_state(state)
        if density == "one":
            state["w"] = state["w"].clone()
            ivw(state["w"]).view(-1)[123] += 1
        else:
            state = {k: mutate(t, density, g) for k, t in state.items()}
        upd = enc.encode(state, v, stream=stream)
        assert upd.base_version == v - 1 and upd.version == v
        if stream:
            for b in upd.iter_buckets():
                dec.feed(b)
        else:
            dec.apply(upd)
            check_stats(upd, prev, state)
        assert dec.version == v
        assert state_digest(dst) == state_digest(state)
        if digest:
            assert upd.digest == state_digest(state)
        assert_state_equal(dst, state)
        if density == 0.0:
            assert upd.stats.changed == 0 and upd.stats.tensors_changed == 0
            assert all(not h.segs for h in headers(upd))


def test_unchanged_update_advances_version(small_state):
    old, _ = small_state
    enc = Encoder(old, 4)
    upd = enc.encode(clone_state(old), 5)
    assert upd.stats.changed == 0 and upd.count == 1 and upd.stats.buckets == 1
    dst = clone_state(old)
    dec = Decoder(dst, 4)
    stats = dec.apply(upd)
    assert dec.version == 5 and stats.version == 5 and stats.base_version == 4 and stats.changed == 0
    assert_state_equal(dst, old)


# ---------------------------------------------------------------------------------------------------------------------
# full updates

@pytest.mark.parametrize("values", VALUE_MODES)
def test_full_update_accepted_at_any_version(small_state, values):
    old, new = small_state
    enc = Encoder(values=values, digest=True)
    full = enc.encode(new, 7)
    assert full.base_version is None and full.version == 7
    check_stats(full, None, new)
    g = gen(3)
    # any version up to the update's own; above it only when rollbacks are allowed (test_hardening_codec.py)
    receivers = [(clone_state(old), 0), ({k: torch.zeros_like(v) for k, v in new.items()}, 3),
                 ({k: random_tensor(tuple(v.shape), v.dtype, g) for k, v in new.items()}, 1000),
                 (clone_state(new), 7)]
    nxt = {k: mutate(v, 0.01, g) for k, v in new.items()}
    delta = enc.encode(nxt, 8)
    assert delta.base_version == 7
    for dst, version in receivers:
        dec = Decoder(dst, version, verify_digest=True, allow_rollback=version > 7)
        dec.apply(full)
        assert dec.version == 7
        assert_state_equal(dst, new)
        dec.apply(delta)  # the encoder continues with delta updates from the full one
        assert dec.version == 8
        assert_state_equal(dst, nxt)


def test_full_update_from_list_of_pairs_any_order(small_state):
    _, new = small_state
    items = sorted(new.items(), reverse=True)
    upd = Encoder().encode(items, 1)
    dst = {k: torch.empty_like(v) for k, v in sorted(new.items())}
    Decoder(dst, 1).apply(upd)
    assert_state_equal(dst, new)


def test_state_in_another_order_than_base(small_state):
    old, new = small_state
    enc = Encoder(old, 0)
    upd = enc.encode(dict(reversed(list(new.items()))), 1)
    dst = clone_state(old)
    Decoder(dst).apply(upd)
    assert_state_equal(dst, new)


def test_encoder_rejects_other_layout(small_state):
    old, new = small_state
    enc = Encoder(old, 0)
    bad = dict(new)
    bad["bias"] = bad["bias"].to(torch.float64)
    with pytest.raises(LayoutMismatch):
        enc.encode(bad, 1)
    bad = {k: v for k, v in new.items() if k != "ids"}
    with pytest.raises(LayoutMismatch):
        enc.encode(bad, 1)


# ---------------------------------------------------------------------------------------------------------------------
# many buckets

@pytest.mark.parametrize("via", ["apply", "list", "iter", "feed", "bytearray", "memoryview"])
def test_small_buckets(multi_bucket_update, via):
    old, new, upd = multi_bucket_update
    hs = headers(upd)
    assert len(hs) == upd.count >= 3
    assert [h.idx for h in hs] == list(range(len(hs)))
    assert all(h.uid == upd.uid for h in hs)
    assert [h.cnt for h in hs] == [0] * (len(hs) - 1) + [len(hs)]
    per_tensor = {}
    for h in hs:
        for seg in h.segs:
            per_tensor.setdefault(_target(h, seg), set()).add(h.idx)
    assert len(per_tensor[_key(hs, "b", new)]) >= 2, "a dense tensor must be split across buckets"
    assert any(len(h.segs) >= 2 for h in hs), "some bucket should hold several segments"
    assert {seg.kind for h in hs for seg in h.segs} == {"d", "s"}
    dst = clone_state(old)
    dec = Decoder(dst, 0, verify_digest=True)
    if via == "feed":
        before = clone_state(dst)
        for b in upd.buckets[:-1]:
            assert dec.feed(b) is False
            assert dec.pending and dec.version == 0
            assert_state_equal(dst, before)  # nothing changes before the last bucket is verified
        assert dec.feed(upd.buckets[-1]) is True
        assert not dec.pending
    else:
        apply_update(dec, upd, via)
    assert dec.version == 1
    assert_state_equal(dst, new)
    st_ = dec.last_stats
    assert st_.buckets == upd.count and st_.wire_bytes == upd.stats.wire_bytes and st_.version == 1
    assert st_.changed == sum(seg.nchanged for h in hs for seg in h.segs)


@settings(max_examples=examples(12), deadline=None)
@given(seed=seeds, values=value_modes, bucket_bytes=st.sampled_from([4096, 4100, 6000, 9000]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float64, torch.uint8]),
       density=st.sampled_from([0.02, 0.3, 1.0]))
def test_tensor_split_across_buckets(seed, values, bucket_bytes, dtype, density):
    g = gen(seed)
    old = {"x": random_tensor((20000,), dtype, g), "y": random_tensor((5, 500), torch.int16, g)}
    new = {k: mutate(v, density, g) for k, v in old.items()}
    upd, _ = roundtrip(old, new, values=values, bucket_bytes=bucket_bytes, via="feed")
    check_segments_cover(upd, new, old)
    hs = headers(upd)
    if density == 1.0:  # 20000 elements of >= 1 byte, all changed: cannot fit one bucket of <= 9000 bytes
        assert len({h.idx for h in hs for s in h.segs if _target(h, s) == _key(hs, "x", new)}) >= 2
    for h in hs:  # format 1: sparse segments are chunk aligned, dense ones are not necessarily
        for s in h.segs:
            if s.kind == "s" and h.v == 1:
                assert s.start % (1 << s.log2c) == 0
                assert s.end % (1 << s.log2c) == 0 or s.end == new[s.name].numel()


def test_streamed_update(multi_bucket_update):
    old, new, _ = multi_bucket_update
    enc = Encoder(old, 0, bucket_bytes=4096, digest=True)
    upd = enc.encode(new, 1, stream=True)
    assert not upd.complete
    dst = clone_state(old)
    dec = Decoder(dst, 0, verify_digest=True)
    n = 0
    for b in upd.iter_buckets():
        n += 1
        done = dec.feed(b)
    assert done and n == upd.count and upd.complete
    assert_state_equal(dst, new)
    # a second streamed update: the encoder finishes an unfinished stream before the next encode
    nxt = {k: mutate(v, 0.1, gen(5)) for k, v in new.items()}
    upd2 = enc.encode(nxt, 2, stream=True)
    nxt2 = {k: mutate(v, 0.1, gen(6)) for k, v in nxt.items()}
    upd3 = enc.encode(nxt2, 3)
    assert upd2.complete
    dec.apply(upd2)
    dec.apply(upd3)
    assert_state_equal(dst, nxt2)


def test_bucket_bytes_validation():
    with pytest.raises(ValueError):
        Encoder(bucket_bytes=4095)
    with pytest.raises(ValueError):
        Encoder(values="xor")
    with pytest.raises(ValueError):
        Encoder(base_version=3)


# ---------------------------------------------------------------------------------------------------------------------
# non-contiguous inputs

@settings(max_examples=examples(40), deadline=None)
@given(dtype=dtypes, rows=st.integers(1, 90), cols=st.integers(0, 90), density=densities, values=value_modes,
       seed=seeds)
def test_noncontiguous_inputs(dtype, rows, cols, density, values, seed):
    """Transposed / strided views given to Encoder(base) and encode() are read in their logical (row-major) order."""
    g = gen(seed)
    base_t = random_tensor((cols, rows), dtype, g).t()          # logical shape (rows, cols), transposed memory
    new_c = mutate(base_t.contiguous(), density, g)
    new_t = new_c.t().contiguous().t()                          # same values, transposed memory
    big = random_tensor((rows, 2 * cols + 1), dtype, g)
    strided_old = big[:, ::2]                                   # every other column
    strided_new = mutate(strided_old.contiguous(), density, g)
    old = {"t": base_t, "s": strided_old}
    new = {"t": new_t, "s": strided_new}
    if rows > 1 and cols > 1:
        assert not base_t.is_contiguous() and not new_t.is_contiguous()
    enc = Encoder(old, 0, values=values, digest=True)
    upd = enc.encode(new, 1)
    dst = {k: v.contiguous().clone() for k, v in old.items()}
    dec = Decoder(dst, 0, verify_digest=True)
    dec.apply(upd)
    want = {"t": new_c, "s": strided_new}
    assert_state_equal(dst, want)
    assert state_digest(new) == state_digest(want)
    assert upd.stats.changed == sum(int((ivw(old[k].contiguous()) != ivw(want[k])).sum()) for k in old)
    # full update from non-contiguous input
    full = Encoder().encode(new, 2)
    dst2 = {k: torch.zeros_like(v).contiguous() for k, v in want.items()}
    Decoder(dst2, 1).apply(full)
    assert_state_equal(dst2, want)


def test_decoder_rejects_noncontiguous_target():
    t = torch.zeros(4, 5).t()
    with pytest.raises(ValueError):
        Decoder({"t": t})


def test_encoder_snapshot_is_a_copy(small_state):
    """Mutating the caller's tensors after Encoder(base)/encode() does not change what the encoder thinks receivers
    hold."""
    old, new = small_state
    mine = clone_state(old)
    enc = Encoder(mine, 0)
    for t in mine.values():
        ivw(t).view(-1)[:1] ^= 1 if t.numel() else 0
    upd = enc.encode(new, 1)
    dst = clone_state(old)
    Decoder(dst).apply(upd)
    assert_state_equal(dst, new)
    nxt = {k: mutate(v, 0.1, gen(1)) for k, v in new.items()}
    keep = clone_state(nxt)
    upd2 = enc.encode(nxt, 2)
    for t in nxt.values():
        ivw(t).view(-1)[:] = 0
    upd3 = enc.encode(clone_state(keep), 3)
    Decoder(dst, 1).apply(upd2)
    assert_state_equal(dst, keep)
    d = Decoder(dst, 2)
    d.apply(upd3)
    assert d.version == 3 and upd3.stats.changed == 0


def test_dense_tensor_split_after_sparse_segment():
    """Regression: a dense tensor split over buckets after a sparse segment in the same bucket got float start/end
    (the bucket fill level became a float) and encode() raised TypeError."""
    old = {"a": torch.zeros(9000, dtype=torch.bfloat16), "b": torch.zeros(2000)}
    new = {"a": old["a"].clone(), "b": torch.randn(2000, generator=gen(0))}
    new["a"][::100] = 1.0
    upd, _ = roundtrip(old, new, bucket_bytes=4096)
    for h in headers(upd):
        for s in h.segs:
            assert type(s.start) is int and type(s.end) is int


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64], ids=str)
def test_one_element_views_with_odd_strides(dtype):
    """Regression: 1-element tensors count as contiguous whatever their strides (x[:1, ::5], expand(1, 1)), and
    byte_view() then failed with RuntimeError ("stride(-1) must be 1") in the encoder and the decoder."""
    src = random_tensor((3, 10), dtype, gen(1))
    old = {"t": src[:1, 2::5][:, :1], "e": src[1, 4].expand(1, 1), "s": src[2, 0]}
    nxt = mutate(src, 1.0, gen(2))
    new = {"t": nxt[:1, 2::5][:, :1], "e": nxt[1, 4].expand(1, 1), "s": nxt[2, 0]}
    assert old["t"].stride()[-1] != 1 and old["e"].stride() == (0, 0)
    for values in VALUE_MODES:
        roundtrip(old, new, values=values)
    # a decoder whose 1-element target is such a view updates the underlying buffer in place
    enc = Encoder(old, 0)
    upd = enc.encode(new, 1)
    buf = src.clone()
    dst = {"t": buf[:1, 2::5][:, :1], "e": buf[1:2, 4:5], "s": buf[2, 0]}
    Decoder(dst).apply(upd)
    assert bits_equal(buf[0, 2], nxt[0, 2]) and bits_equal(buf[1, 4], nxt[1, 4]) and bits_equal(buf[2, 0], nxt[2, 0])
    assert_state_equal(dst, {k: v.contiguous() for k, v in new.items()})


@pytest.fixture(params=["native", "reference"])
def kernels_in_use(request, monkeypatch):
    """Run a test with each kernel implementation (SPARSESYNC_REFERENCE is read at every kernel call)."""
    from sparsesync import _native, kernels, reference
    if request.param == "native":
        if not _native.available:
            pytest.skip(f"native library not available: {_native.load_error}")
        monkeypatch.setenv("SPARSESYNC_REFERENCE", "0")
        assert kernels.impl() is _native
    else:
        monkeypatch.setenv("SPARSESYNC_REFERENCE", "1")
        assert kernels.impl() is reference
    return request.param


@pytest.mark.parametrize("values", VALUE_MODES)
def test_mixed_width_sparse_segments_in_one_bucket(kernels_in_use, values):
    """Regression: sparse segments of different widths in one bucket share one staging buffer; a 2-byte segment with
    an odd change count left the next (8-byte) segment's values at an unaligned offset, and the reference scatter
    raised RuntimeError in the middle of the commit, after the first tensor had already been written."""
    old = {"a": torch.zeros(10, dtype=torch.bfloat16), "b": torch.zeros(10, dtype=torch.int64),
           "c": torch.zeros(10, dtype=torch.int8), "d": torch.zeros(10, dtype=torch.float32),
           "e": torch.zeros(10, dtype=torch.float16)}
    new = clone_state(old)
    new["a"][0] = 1.0
    new["b"][0] = 1
    new["c"][3] = 5
    new["d"][1] = 2.0
    new["e"][7] = -1.0
    upd, _ = roundtrip(old, new, values=values)
    hs = headers(upd)
    kinds = {_target(hs[0], s): s.kind for s in hs[0].segs}
    assert len(hs) == 1 and kinds[_key(hs, "a", new)] == kinds[_key(hs, "b", new)] == kinds[_key(hs, "d", new)] == \
        "s", kinds
    # and in a chain, where the decoder reuses its staging buffers
    enc = Encoder(old, 0, values=values)
    dst = clone_state(old)
    dec = Decoder(dst, 0)
    state = clone_state(old)
    for v in range(1, 6):
        state = {k: mutate(t, 0.1 * v, gen(v)) for k, t in state.items()}
        dec.apply(enc.encode(state, v))
        assert_state_equal(dst, state)


@settings(max_examples=examples(15), deadline=None)
@given(data=st.data(), values=value_modes, seed=seeds)
def test_roundtrip_state_both_kernels(data, values, seed):
    """Many small tensors of mixed widths in few buckets, through the kernels of this run and the reference."""
    from sparsesync import _native
    g = gen(seed)
    old, new = {}, {}
    for i in range(data.draw(st.integers(2, 8), label="ntensors")):
        dtype = data.draw(dtypes, label=f"dtype{i}")
        old[f"t{i}"] = random_tensor((data.draw(st.integers(1, 300), label=f"n{i}"),), dtype, g)
        new[f"t{i}"] = mutate(old[f"t{i}"], data.draw(st.sampled_from([0.01, 0.05, 0.2]), label=f"d{i}"), g)
    import os
    prev = os.environ.get("SPARSESYNC_REFERENCE")
    try:
        for ref in (["0", "1"] if _native.available else ["1"]):
            os.environ["SPARSESYNC_REFERENCE"] = ref
            roundtrip(old, new, values=values)
    finally:
        if prev is None:
            os.environ.pop("SPARSESYNC_REFERENCE", None)
        else:
            os.environ["SPARSESYNC_REFERENCE"] = prev


def test_decoder_updates_parameters_and_shared_buffers_in_place(kernels_in_use):
    """Receivers apply to nn.Parameters (requires_grad) and to tensors that are views into one flat buffer."""
    torch.manual_seed(0)
    src, dst_model = torch.nn.Linear(64, 48), torch.nn.Linear(64, 48)
    dst_model.load_state_dict(src.state_dict())
    enc = Encoder(dict(src.named_parameters()), 0, digest=True)
    with torch.no_grad():
        src.weight[::3, ::5] += 0.01
        src.bias.copy_(torch.randn(48))
    upd = enc.encode(dict(src.named_parameters()), 1)
    params = dict(dst_model.named_parameters())
    Decoder(params, 0, verify_digest=True).apply(upd)
    assert_state_equal({k: v.detach() for k, v in params.items()},
                       {k: v.detach() for k, v in src.named_parameters()})
    assert all(p.requires_grad for p in dst_model.parameters())
    dst_model(torch.randn(2, 64)).sum().backward()  # autograd still works on the updated parameters
    # views into one flat buffer
    flat_old = random_tensor((1000,), torch.float32, gen(3))
    flat_new = mutate(flat_old, 0.05, gen(4))
    split = lambda b: {"a": b[:400].view(20, 20), "b": b[400:700], "c": b[700:]}
    upd = Encoder(split(flat_old), 0).encode(split(flat_new), 1)
    buf = flat_old.clone()
    Decoder(split(buf), 0).apply(upd)
    assert bits_equal(buf, flat_new)


def test_api_validation(small_state):
    old, new = small_state
    for bad in (-1, 1.0, True, "1", None):
        with pytest.raises(ValueError):
            Encoder(old, bad if bad is not None else -5)
        with pytest.raises(ValueError):
            Encoder(old, 0).encode(new, bad)
        with pytest.raises(ValueError):
            Decoder(clone_state(old), bad)
    with pytest.raises(ValueError):
        Encoder([("a", torch.zeros(2)), ("a", torch.zeros(2))])
    with pytest.raises(ValueError):
        Encoder().encode([("a", torch.zeros(2)), ("a", torch.zeros(2))], 1)
    with pytest.raises(ValueError):
        Decoder([("a", torch.zeros(2)), ("a", torch.zeros(2))])
    with pytest.raises(TypeError):
        Encoder().encode({"c": torch.zeros(2, dtype=torch.complex64)}, 1)
    with pytest.raises(TypeError):
        Encoder().encode({"x": [1.0, 2.0]}, 1)
    with pytest.raises(TypeError):
        Encoder().encode({5: torch.zeros(2)}, 1)
    with pytest.raises(TypeError):
        Decoder({"c": torch.zeros(2, dtype=torch.complex64)})


def test_requires_grad_inputs_to_the_encoder():
    """Parameters and non-leaf tensors with autograd history are read by value."""
    w = torch.nn.Parameter(torch.randn(30, 40))
    enc = Encoder({"w": w}, 0)
    dst = {"w": w.detach().clone()}
    with torch.no_grad():
        w[3, 4] += 1
    upd = enc.encode({"w": w * 1}, 1)  # a non-leaf tensor with grad history
    assert upd.stats.changed == 1
    Decoder(dst, 0).apply(upd)
    assert_state_equal(dst, {"w": w.detach()})


def test_feed_does_not_keep_references_to_the_callers_buffer():
    g = gen(0)
    old = {"x": torch.randint(-2 ** 31, 2 ** 31 - 1, (3000,), generator=g, dtype=torch.int32)}
    new = {"x": torch.randint(-2 ** 31, 2 ** 31 - 1, (3000,), generator=g, dtype=torch.int32)}  # sent dense
    upd = Encoder(old, 0, bucket_bytes=4096).encode(new, 1)
    assert upd.count >= 3 and {s.kind for h in headers(upd) for s in h.segs} == {"d"}
    dst = clone_state(old)
    dec = Decoder(dst, 0)
    buf = bytearray(max(len(b) for b in upd.buckets))  # one receive buffer, reused for every bucket
    for b in upd.buckets:
        buf[: len(b)] = b
        dec.feed(memoryview(buf)[: len(b)])
    assert dec.version == 1
    assert_state_equal(dst, new)


@pytest.mark.parametrize("values", VALUE_MODES)
def test_tied_weights(kernels_in_use, values):
    """Two names for one tensor (tied embeddings): decoded against the old values, written twice, and rolled back
    exactly when the digest check fails."""
    from sparsesync import BaseMismatch
    W = random_tensor((100, 64), torch.bfloat16, gen(0))
    old = {"embed": W, "lm_head": W, "b": torch.zeros(5)}
    W2 = mutate(W, 0.05, gen(1), "ulp")
    new = {"embed": W2, "lm_head": W2, "b": torch.ones(5)}
    upd = Encoder(old, 0, values=values, digest=True).encode(new, 1)
    R = W.clone()
    dec = Decoder({"embed": R, "lm_head": R, "b": torch.zeros(5)}, 0, verify_digest=True)
    dec.apply(upd)
    assert bits_equal(R, W2)
    # receiver differs at an element no segment touches: only the digest sees it; everything is rolled back
    R = W.clone()
    unchanged = int(((ivw(W) == ivw(W2)).reshape(-1)).nonzero()[0])
    ivw(R).view(-1)[unchanged] ^= 1
    before = R.clone()
    b = torch.zeros(5)
    dec = Decoder({"embed": R, "lm_head": R, "b": b}, 0, verify_digest=True)
    with pytest.raises(BaseMismatch):
        dec.apply(upd)
    assert bits_equal(R, before) and bits_equal(b, torch.zeros(5)) and dec.version == 0
