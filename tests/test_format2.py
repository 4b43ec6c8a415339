"""Format 2 through the codec (FORMAT.md §6): spaces, context classes, negotiation and what stays true of format 1.

Every result is checked bit for bit (integer views) against the state the encoder was given, and decoded a second
time by the independent decoder of tests/spec.py written from FORMAT.md alone.
"""
from __future__ import annotations

import pytest
import torch

import spec
from helpers import (assert_state_equal, clone_state, gen, ivw, mutate, native_kernels, random_tensor)
from sparsesync import (BaseMismatch, CorruptPayload, Decoder, Encoder, LayoutMismatch, SparseSyncError,
                        state_digest)
from sparsesync.codec import full_update
from sparsesync.format import parse_bucket


def weights(n: int, g: torch.Generator, dtype=torch.bfloat16, scale: float = 0.02) -> torch.Tensor:
    """Weight-like values: normal with a spread of magnitudes, so that exponents (the context) vary."""
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


def adam_like_step(t: torch.Tensor, g: torch.Generator, step: float = 2e-4) -> torch.Tensor:
    """What an lr step does to bf16 weights: every fp32 master moves by about ``step``; the bf16 copy changes where it
    crosses a rounding boundary, so small weights change often and large ones rarely (positions depend on values)."""
    master = t.to(torch.float64)
    moved = master + step * torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.02
    return moved.to(t.dtype)


def mixed_state(g: torch.Generator, ntensors: int = 300) -> dict:
    sizes = [int(x) for x in torch.randint(0, 3000, (ntensors,), generator=g)]
    state = {}
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int32, torch.float8_e4m3fn, torch.bool]
    for i, n in enumerate(sizes):
        dt = dtypes[i % len(dtypes)]
        state[f"layers.{i:04d}.w"] = random_tensor((n,), dt, g, special_frac=0.01)
    state["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    state["empty"] = torch.empty(0, 7, dtype=torch.float32)
    state["embed"] = weights(70_000, g).reshape(700, 100)
    return state


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def spec_apply(buckets, before: dict) -> dict:
    st = {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape), bytearray(_bytes(v))) for k, v in before.items()}
    spec.apply_update(buckets, st)
    return st


def spec_equal(st: dict, want: dict) -> None:
    for k, v in want.items():
        assert bytes(st[k][2]) == _bytes(v), f"spec decoder: tensor {k!r} differs"


@pytest.mark.parametrize("values", ["delta", "raw"])
@pytest.mark.parametrize("context", [None, True, False])
def test_many_mixed_tensors_round_trip_bit_exact(values, context):
    g = gen(1)
    old = mixed_state(g)
    new = {k: mutate(v, 0.02, g) for k, v in old.items()}
    enc = Encoder(old, 0, values=values, digest=True, context=context, bucket_bytes=8192)
    upd = enc.encode(new, 1)
    hs = [parse_bucket(b)[0] for b in upd.buckets]
    assert all(h.v == 2 for h in hs)
    # a handful of segments per space, not one per tensor
    nseg = sum(len(h.segs) for h in hs)
    assert nseg < len(old) / 2, nseg
    dst = clone_state(old)
    st = Decoder(dst, 0).apply(upd)
    assert st.digest_verified
    assert_state_equal(dst, new)
    assert upd.digest == state_digest(dst)
    changed = {k for k in old if not torch.equal(ivw(old[k]), ivw(new[k]))}
    assert set(st.tensors) == changed
    assert upd.stats.changed == sum(int((ivw(old[k]) != ivw(new[k])).sum()) for k in old)
    assert upd.stats.tensors_changed == len(changed)
    spec_equal(spec_apply(upd.buckets, old), new)


def test_context_coding_is_used_and_beats_order0_on_weight_like_updates():
    g = gen(2)
    old = {f"experts.{i}.w": weights(4096, g).reshape(64, 64) for i in range(64)}
    new = {k: adam_like_step(v, g) for k, v in old.items()}
    sizes = {}
    for ctx in (False, True, None):
        enc = Encoder(old, 0, context=ctx)
        upd = enc.encode(new, 1)
        segs = [s for b in upd.buckets for s in parse_bucket(b)[0].segs if s.kind == "s"]
        assert segs
        assert all(bool(s.cuts) == (ctx is True) for s in segs) or ctx is None
        dst = clone_state(old)
        Decoder(dst, 0).apply(upd)
        assert_state_equal(dst, new, digest=False)
        spec_equal(spec_apply(upd.buckets, old), new)
        sizes[ctx] = upd.stats.wire_bytes
    assert sizes[True] < 0.9 * sizes[False], sizes
    assert sizes[None] <= sizes[False]


def test_tensors_with_many_changes_are_planned_alone_from_the_next_update():
    g = gen(12)
    state = {"a": weights(100_000, g), "b": weights(200_000, g, scale=0.5), "c": weights(50_000, g)}
    enc = Encoder(state, 0, context=True)
    dst = clone_state(state)
    dec = Decoder(dst, 0)
    starts = []
    for v in range(1, 4):
        state = {k: adam_like_step(t, g, 2e-3) for k, t in state.items()}
        upd = enc.encode(state, v)
        dec.apply(upd)
        assert_state_equal(dst, state, digest=False)
        starts.append({s.start for b in upd.buckets for s in parse_bucket(b)[0].segs})
    # the first update (after a pooled scan): every tensor changed enough to be scanned and planned alone (their
    # gains are recorded); adjacent runs are then merged back where one segment costs less than two
    # (plan2.merge_runs: here the tensors are alike), so segments start at 0 or where "b" and "c" start in the space;
    # later updates keep alone only the tensors for which that paid
    assert starts[0] == {0} or {100_000, 300_000} <= starts[0]
    assert set(enc._gains["bfloat16"]) == {0, 1, 2}
    assert starts[1] == {0} or {100_000, 300_000} <= starts[1]


def test_many_much_changed_tensors_keep_the_run_count_bounded():
    g = gen(13)
    state = {f"experts.{i:03d}.w": weights(20_000, g) for i in range(150)}
    enc = Encoder(state, 0)
    dst = clone_state(state)
    dec = Decoder(dst, 0)
    for v in range(1, 3):
        state = {k: mutate(t, 0.08, g, "ulp") for k, t in state.items()}
        upd = enc.encode(state, v)
        dec.apply(upd)
        assert_state_equal(dst, state, digest=False)
    nseg = sum(len(parse_bucket(b)[0].segs) for b in upd.buckets)
    assert nseg <= 2 * 64 + 1 + 8, nseg


def test_dense_range_over_an_unchanged_tensor_counts_only_changed_tensors():
    """Regression (found by hypothesis): two 0-dim tensors share one dense range; only the changed one is counted
    in UpdateStats.dense_tensors, and the unchanged one is not named as written."""
    old = {"w#0": torch.tensor(0.5, dtype=torch.bfloat16), "w#1": torch.tensor(0.25, dtype=torch.bfloat16)}
    new = {"w#0": old["w#0"].clone(), "w#1": torch.tensor(-3.0, dtype=torch.bfloat16)}
    upd = Encoder(old, 0).encode(new, 1)
    assert upd.stats.tensors_changed == 1 and upd.stats.dense_tensors == 1
    dst = clone_state(old)
    st = Decoder(dst, 0).apply(upd)
    assert_state_equal(dst, new)
    assert set(st.tensors) <= {"w#0", "w#1"} and "w#1" in st.tensors


def test_format1_still_written_and_read():
    g = gen(3)
    old = mixed_state(g, 40)
    new = {k: mutate(v, 0.05, g) for k, v in old.items()}
    upd = Encoder(old, 0, format=1, digest=True).encode(new, 1)
    assert all(parse_bucket(b)[0].v == 1 for b in upd.buckets)
    dst = clone_state(old)
    Decoder(dst, 0).apply(upd)
    assert_state_equal(dst, new)


def test_full_update_format2_and_streamed_encoder_sequence():
    g = gen(4)
    s0 = mixed_state(g, 60)
    up = full_update(s0, 3, bucket_bytes=4096, digest=True)
    dst = {k: torch.zeros_like(v) for k, v in s0.items()}
    dec = Decoder(dst, 0)
    dec.apply(up)
    assert dec.version == 3
    assert_state_equal(dst, s0)
    enc = Encoder(None, digest=True, bucket_bytes=4096)
    cur = s0
    dst2 = {k: torch.zeros_like(v) for k, v in s0.items()}
    dec2 = Decoder(dst2, 0)
    for v in range(1, 5):
        upd = enc.encode(cur, v, stream=True)
        for b in upd.iter_buckets():
            dec2.feed(b)
        assert dec2.version == v
        assert_state_equal(dst2, cur)
        cur = {k: mutate(t, 0.01 * v, g) for k, t in cur.items()}


def test_fast_path_follows_in_place_changes_and_new_tensors():
    g = gen(5)
    state = {f"t{i}": weights(5000, g) for i in range(50)}
    enc = Encoder(state, 0)
    dst = clone_state(state)
    dec = Decoder(dst, 0)
    for v in range(1, 4):
        for k in list(state)[::3]:
            state[k].copy_(adam_like_step(state[k], g))           # in place
        state["t1"] = mutate(state["t1"], 0.5, g)                # a new tensor object under an old name
        dec.apply(enc.encode(state, v))
        assert_state_equal(dst, state)
    bad = dict(state)
    bad["t2"] = bad["t2"][:100].clone()
    with pytest.raises(LayoutMismatch):
        enc.encode(bad, 9)
    assert enc.version == 3
    dec.apply(enc.encode(state, 4))
    assert_state_equal(dst, state)


def test_aliased_receiver_tensors_apply_once():
    g = gen(6)
    w = weights(8192, g).reshape(128, 64)
    old = {"embed": w, "lm_head": w, "other": weights(100, g)}
    new_w = mutate(w, 0.05, g, "ulp")
    new = {"embed": new_w, "lm_head": new_w, "other": mutate(old["other"], 0.3, g)}
    upd = Encoder({k: v.clone() for k, v in old.items()}, 0, digest=True).encode(new, 1)
    shared = w.clone()
    dst = {"embed": shared, "lm_head": shared, "other": old["other"].clone()}
    Decoder(dst, 0).apply(upd)
    assert torch.equal(ivw(shared), ivw(new_w))


def test_layout_mismatch_is_named_by_digest():
    g = gen(7)
    old = {"a": weights(100, g), "b": weights(200, g)}
    upd = Encoder(old, 0).encode({k: mutate(v, 0.1, g) for k, v in old.items()}, 1)
    other = {"a": old["a"].clone(), "c": old["b"].clone()}
    with pytest.raises(LayoutMismatch, match="another tensor layout"):
        Decoder(other, 0).apply(upd)
    assert torch.equal(ivw(other["a"]), ivw(old["a"]))


def test_wrong_base_is_detected_and_nothing_changes():
    g = gen(8)
    old = {f"t{i}": weights(3000, g) for i in range(20)}
    new = {k: adam_like_step(v, g) for k, v in old.items()}
    upd = Encoder(old, 0, context=True).encode(new, 1)
    dst = clone_state(old)
    flat = ivw(dst["t3"]).reshape(-1)
    changed = torch.nonzero(ivw(old["t3"]) != ivw(new["t3"])).reshape(-1)
    flat[changed[0]] += 1                   # the receiver's base differs at a changed element
    before = clone_state(dst)
    with pytest.raises(SparseSyncError):
        Decoder(dst, 0).apply(upd)
    assert_state_equal(dst, before, digest=False)


def test_other_base_under_context_coding_is_a_base_mismatch():
    """Classes come from the base: a receiver whose base differs at an element the update does not change decodes
    other classes, and the streams no longer fit. That is reported as BaseMismatch, and nothing changes."""
    g = gen(11)
    w = weights(20000, g)
    new = adam_like_step(w, g, 5e-3)
    upd = Encoder({"w": w}, 0, context=True, digest=True).encode({"w": new}, 1)
    assert any(s.cuts for b in upd.buckets for s in parse_bucket(b)[0].segs)
    unchanged = torch.nonzero(ivw(w) == ivw(new)).reshape(-1)
    recv = w.clone()
    ivw(recv)[unchanged[:50]] ^= 1 << 14                 # the top exponent bit: other classes
    before = recv.clone()
    with pytest.raises(BaseMismatch):
        Decoder({"w": recv}, 0).apply(upd)
    assert torch.equal(ivw(recv), ivw(before))


def test_every_single_byte_corruption_is_refused_and_changes_nothing():
    g = gen(9)
    old = {f"t{i}": weights(600, g) for i in range(30)}
    new = {k: adam_like_step(v, g, 1e-3) for k, v in old.items()}
    upd = Encoder(old, 0, context=True, digest=True).encode(new, 1)
    (bucket,) = upd.buckets
    dst = clone_state(old)
    dec = Decoder(dst, 0)
    step = max(1, len(bucket) // 700)
    for pos in range(0, len(bucket), step):
        bad = bytearray(bucket)
        bad[pos] ^= 0x5A
        with pytest.raises((CorruptPayload, BaseMismatch, LayoutMismatch, SparseSyncError)):
            dec.apply(bytes(bad))
        assert dec.version == 0
    assert_state_equal(dst, old)
    dec.apply(bucket)
    assert_state_equal(dst, new)


@pytest.mark.skipif(not native_kernels(), reason="needs the native library")
def test_reference_and_native_codecs_write_identical_buckets(monkeypatch):
    g = gen(10)
    old = mixed_state(g, 80)
    new = {k: mutate(v, 0.03, g) for k, v in old.items()}
    a = Encoder(old, 0, digest=True, bucket_bytes=8192).encode(new, 1).buckets
    monkeypatch.setenv("SPARSESYNC_REFERENCE", "1")
    b = Encoder(old, 0, digest=True, bucket_bytes=8192).encode(new, 1).buckets
    assert a == b
    dst = clone_state(old)
    Decoder(dst, 0).apply(b)
    assert_state_equal(dst, new)
