"""Shared helpers and hypothesis strategies of the sparsesync test suite (imported by the test modules).

Everything here works on bit patterns: tensors are compared through integer views of their own width, so NaN payloads,
-0.0 and float8 values compare exactly, and new values are built through integer views too.
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import sparsesync
from sparsesync import Decoder, Encoder, state_digest
from sparsesync.format import parse_bucket
import itertools

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
VALUE_MODES = ["delta", "raw"]

# (sign bit + exponent bits + mantissa bits) of the float formats
FLOAT_FORMATS = {torch.bfloat16: (8, 7), torch.float16: (5, 10), torch.float32: (8, 23), torch.float64: (11, 52),
                 torch.float8_e4m3fn: (4, 3), torch.float8_e5m2: (5, 2)}


def width(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def ivw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as a signed integer tensor of the same width and shape (a view, no copy)."""
    return t.view(INT_OF_WIDTH[t.element_size()])


def to_signed(pattern: int, w: int) -> int:
    bits = 8 * w
    pattern &= (1 << bits) - 1
    return pattern - (1 << bits) if pattern >> (bits - 1) else pattern


def from_patterns(patterns, dtype: torch.dtype, shape=None) -> torch.Tensor:
    """A tensor of ``dtype`` whose elements have the given unsigned bit patterns."""
    w = width(dtype)
    t = torch.tensor([to_signed(p, w) for p in patterns], dtype=INT_OF_WIDTH[w]).view(dtype)
    return t.reshape(shape) if shape is not None else t


def special_patterns(dtype: torch.dtype) -> list[int]:
    """Unsigned bit patterns of the interesting values of ``dtype``: zeros of both signs, infinities, NaNs with
    assorted payloads and signs, subnormals, extreme finite values, integer min/max."""
    w = width(dtype)
    bits = 8 * w
    if dtype == torch.bool:
        return [0, 1]
    top = 1 << (bits - 1)
    allones = (1 << bits) - 1
    pats = {0, 1, 2, top, top | 1, top - 1, top + 1, allones, allones - 1, 0x55 * (allones // 0xFF),
            0xAA * (allones // 0xFF)}
    if dtype in FLOAT_FORMATS:
        e, m = FLOAT_FORMATS[dtype]
        exp_all = ((1 << e) - 1) << m
        one = ((1 << (e - 1)) - 1) << m
        pats |= {exp_all, top | exp_all,                                     # +-inf (NaN in e4m3fn)
                 exp_all | (1 << (m - 1)), top | exp_all | (1 << (m - 1)),   # quiet NaNs
                 exp_all | 1, top | exp_all | 1,                             # signalling NaNs, payload 1
                 exp_all | ((1 << m) - 1), exp_all | (((1 << m) - 1) & 0x5555555555555),  # payload variations
                 (1 << m) - 1, top | ((1 << m) - 1),                         # largest subnormals
                 1 << m, top | (1 << m),                                     # smallest normals
                 exp_all - 1, top | (exp_all - 1),                           # largest finite
                 one, top | one}                                             # +-1.0
    return sorted(p & allones for p in pats)


def specials_tensor(dtype: torch.dtype) -> torch.Tensor:
    return from_patterns(special_patterns(dtype), dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(ivw(a), ivw(b))


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def assert_state_equal(got: dict, want: dict, digest: bool = True) -> None:
    """Bit-exact equality: same names, dtypes, shapes and bit patterns (torch.equal on integer views) and digests."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(ivw(got[k].contiguous()), ivw(want[k].contiguous())), f"tensor {k!r} differs"
    if digest:
        assert state_digest(got) == state_digest(want)


def count_changed(old: dict, new: dict) -> int:
    return sum(int((ivw(old[k].contiguous()) != ivw(new[k].contiguous())).sum()) for k in old)


def headers(update_or_buckets):
    buckets = update_or_buckets.buckets if hasattr(update_or_buckets, "buckets") else update_or_buckets
    return [parse_bucket(b)[0] for b in buckets]


def check_stats(update, old: dict | None, new: dict) -> None:
    """update.stats agrees with the states and with the buckets actually produced."""
    s = update.stats
    buckets = update.buckets
    hs = headers(buckets)
    assert s.buckets == len(buckets) == update.count == hs[-1].cnt   # FORMAT.md 2: only the last bucket counts
    assert all(h.cnt == 0 for h in hs[:-1])
    assert s.wire_bytes == sum(len(b) for b in buckets)
    assert s.header_bytes == sum(len(b) - h.body_len for b, h in zip(buckets, hs))
    assert s.tensors == len(new)
    assert s.elements == sum(t.numel() for t in new.values())
    assert s.dense_bytes == sum(t.numel() * t.element_size() for t in new.values())
    if old is None:
        assert s.changed == s.elements
        changed_names = {k for k, t in new.items() if t.numel()}
    else:
        assert s.changed == count_changed(old, new)
        changed_names = {k for k in new if not torch.equal(ivw(old[k].contiguous()), ivw(new[k].contiguous()))}
    assert s.tensors_changed == len(changed_names)
    if hs[0].v >= 2:       # format 2 segments address dtype spaces (FORMAT.md §6)
        assert {seg.space for h in hs for seg in h.segs} == {str(new[k].dtype)[6:] for k in changed_names}
    else:
        assert {seg.name for h in hs for seg in h.segs} == changed_names
    assert sum(seg.nchanged for h in hs for seg in h.segs if seg.kind == "s") <= s.changed
    assert 0 <= s.dense_tensors <= s.tensors_changed
    assert s.density == (s.changed / s.elements if s.elements else 0.0)
    d = s.as_dict()
    assert d["wire_bytes"] == s.wire_bytes and d["changed"] == s.changed
    str(s)


def check_segments_cover(update, new: dict, old: dict | None) -> None:
    """The segments of all buckets never overlap, stay in range and contain every changed element."""
    ranges: dict[str, list] = {}
    hs = headers(update)
    if hs and hs[0].v >= 2:
        return _check_spaces_cover(hs, new, old)
    for h in hs:
        for seg in h.segs:
            t = new[seg.name]
            assert seg.shape == tuple(t.shape)
            assert 0 <= seg.start < seg.end <= t.numel()
            ranges.setdefault(seg.name, []).append((seg.start, seg.end))
    for name, rs in ranges.items():
        rs.sort()
        for (a0, a1), (b0, b1) in itertools.pairwise(rs):
            assert a1 <= b0, f"overlapping segments in {name}"
        if old is not None:
            diff = (ivw(old[name].contiguous()) != ivw(new[name].contiguous())).reshape(-1).nonzero().reshape(-1)
            covered = torch.zeros(new[name].numel(), dtype=torch.bool)
            for a, b in rs:
                covered[a:b] = True
            assert bool(covered[diff].all())


def _check_spaces_cover(hs, new: dict, old: dict | None) -> None:
    """Format 2: the same, in each dtype's space (its tensors flat, in sorted name order)."""
    flat_new, flat_old = {}, {}
    for k in sorted(new):
        dn = str(new[k].dtype)[6:]
        flat_new.setdefault(dn, []).append(ivw(new[k].contiguous()).reshape(-1))
        if old is not None:
            flat_old.setdefault(dn, []).append(ivw(old[k].contiguous()).reshape(-1))
    ranges: dict[str, list] = {}
    for h in hs:
        for seg in h.segs:
            n = sum(t.numel() for t in flat_new[seg.space])
            assert 0 <= seg.start < seg.end <= n
            ranges.setdefault(seg.space, []).append((seg.start, seg.end))
    for dn, rs in ranges.items():
        rs.sort()
        for (a0, a1), (b0, b1) in itertools.pairwise(rs):
            assert a1 <= b0, f"overlapping segments in space {dn}"
    if old is not None:
        for dn in flat_new:
            diff = (torch.cat(flat_old[dn]) != torch.cat(flat_new[dn])).nonzero().reshape(-1)
            covered = torch.zeros(sum(t.numel() for t in flat_new[dn]), dtype=torch.bool)
            for a, b in ranges.get(dn, []):
                covered[a:b] = True
            assert bool(covered[diff].all())


# ---------------------------------------------------------------------------------------------------------------------
# building states

def random_tensor(shape, dtype: torch.dtype, g: torch.Generator, special_frac: float = 0.02) -> torch.Tensor:
    """Plausible values of ``dtype`` (normal floats, full-range integers) salted with special values."""
    n = math.prod(shape)
    if dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).view(torch.bool)
    elif dtype.is_floating_point:
        t = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    elif dtype == torch.uint8:
        t = torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
    if n and special_frac and dtype != torch.bool:
        sp = ivw(specials_tensor(dtype))
        k = max(1, int(n * special_frac))
        pos = torch.randint(0, n, (k,), generator=g)
        ivw(t)[pos] = sp[torch.randint(0, len(sp), (k,), generator=g)]
    return t.reshape(shape)


def _wrapping_add(iv: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(iv + delta) mod 2^B on signed integer views, computed without relying on overflow behaviour for w < 8."""
    w = iv.element_size()
    if w == 8:
        return iv + delta  # int64 arithmetic wraps in PyTorch
    bits = 8 * w
    r = (iv.to(torch.int64) + delta) & ((1 << bits) - 1)
    r = torch.where(r >= (1 << (bits - 1)), r - (1 << bits), r)
    return r.to(iv.dtype)


def mutate(t: torch.Tensor, density: float, g: torch.Generator, style: str = "mixed") -> torch.Tensor:
    """A copy of ``t`` in which about ``density`` of the elements got new bit patterns.

    Styles: ``ulp`` (+-1..8 on the bit pattern, like bf16 weights after an lr step), ``big`` (large deltas), ``bits``
    (random bit patterns), ``special`` (special values), ``mixed`` (all of them)."""
    new = t.clone().contiguous()
    n = new.numel()
    if n == 0 or density <= 0:
        return new
    flat = ivw(new).reshape(-1)
    w = new.element_size()
    k = n if density >= 1 else round(density * n)
    if k == 0:
        return new
    pos = torch.randperm(n, generator=g)[:k]
    if new.dtype == torch.bool:
        flat[pos] = flat[pos] ^ 1
        return new
    cur = flat[pos].to(torch.int64) if w < 8 else flat[pos]
    styles = ["ulp", "big", "bits", "special"] if style == "mixed" else [style]
    pick = torch.randint(0, len(styles), (k,), generator=g)
    out = cur.clone()
    for i, s in enumerate(styles):
        sel = pick == i
        m = int(sel.sum())
        if not m:
            continue
        if s == "ulp":
            d = torch.randint(1, 9, (m,), generator=g, dtype=torch.int64)
            d = torch.where(torch.rand(m, generator=g) < 0.5, -d, d)
            out[sel] = _wrapping_add(cur[sel].to(flat.dtype), d).to(out.dtype)
        elif s == "big":
            sh = torch.randint(3, 8 * w, (m,), generator=g, dtype=torch.int64)
            d = (torch.randint(1, 1 << 30, (m,), generator=g, dtype=torch.int64) << sh.clamp(max=33)) | 1
            d = torch.where(torch.rand(m, generator=g) < 0.5, -d, d)
            out[sel] = _wrapping_add(cur[sel].to(flat.dtype), d).to(out.dtype)
        elif s == "bits":
            lo = torch.iinfo(INT_OF_WIDTH[w]).min
            hi = torch.iinfo(INT_OF_WIDTH[w]).max
            out[sel] = torch.randint(lo, hi, (m,), generator=g, dtype=torch.int64).to(out.dtype)
        else:
            sp = ivw(specials_tensor(new.dtype)).to(torch.int64)
            out[sel] = sp[torch.randint(0, len(sp), (m,), generator=g)].to(out.dtype)
    flat[pos] = out.to(flat.dtype)
    return new


# ---------------------------------------------------------------------------------------------------------------------
# round trips

def roundtrip(old: dict | None, new: dict, *, values: str = "delta", bucket_bytes: int | None = None,
              via: str = "apply", digest: bool = True, receiver: dict | None = None, version: int = 1):
    """Encode ``new`` against ``old`` (None: full update), apply it to a copy of ``old`` (or ``receiver``) and check
    the result bit for bit. Returns (update, decoder state)."""
    enc = Encoder(old, 0 if old is not None else None, values=values, bucket_bytes=bucket_bytes, digest=digest)
    upd = enc.encode(new, version)
    dst = receiver if receiver is not None else clone_state(old)
    dec = Decoder(dst, 0, verify_digest=digest)
    apply_update(dec, upd, via)
    assert dec.version == version
    assert_state_equal(dst, {k: v.contiguous() for k, v in new.items()})
    if digest:
        assert upd.digest == state_digest(dst)
    check_stats(upd, None if old is None else {k: v.contiguous() for k, v in old.items()},
                {k: v.contiguous() for k, v in new.items()})
    return upd, dst


def apply_update(dec: Decoder, upd, via: str = "apply"):
    if via == "apply":
        return dec.apply(upd)
    if via == "list":
        return dec.apply(list(upd.buckets))
    if via == "iter":
        return dec.apply(iter(upd.buckets))
    if via == "feed":
        bs = upd.buckets
        for i, b in enumerate(bs):
            done = dec.feed(b)
            assert done == (i == len(bs) - 1)
            assert dec.pending == (not done)
        return dec.last_stats
    if via == "bytearray":
        return dec.apply([bytearray(b) for b in upd.buckets])
    if via == "memoryview":
        return dec.apply([memoryview(b) for b in upd.buckets])
    raise ValueError(via)


# ---------------------------------------------------------------------------------------------------------------------
# strategies

BOUNDARY_SIZES = [0, 1, 2, 3, 7, 31, 32, 33, 4095, 4096, 4097, 8191, 8192, 8193, 12288, 16384, 20000]


@st.composite
def shapes(draw, max_numel: int = 20000):
    """Shapes including 0-dim, empty (several ways), 1-D around the 4096-element chunk boundaries and 2-D/3-D."""
    kind = draw(st.sampled_from(["scalar", "empty", "1d", "1d", "2d", "3d"]))
    if kind == "scalar":
        return ()
    if kind == "empty":
        return draw(st.sampled_from([(0,), (3, 0), (0, 5, 2), (2, 0, 7)]))
    if kind == "1d":
        n = draw(st.one_of(st.sampled_from([s for s in BOUNDARY_SIZES if s <= max_numel]),
                           st.integers(0, max_numel)))
        return (n,)
    if kind == "2d":
        a = draw(st.integers(1, 128))
        b = draw(st.integers(0, max_numel // a))
        return (a, b)
    a = draw(st.integers(1, 16))
    b = draw(st.integers(1, 16))
    c = draw(st.integers(0, max(0, max_numel // (a * b))))
    return (a, b, c)


densities = st.one_of(st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.05, 0.3, 0.5, 0.9, 1.0]),
                      st.floats(0.0, 1.0, allow_nan=False))
dtypes = st.sampled_from(DTYPES)
value_modes = st.sampled_from(VALUE_MODES)
seeds = st.integers(0, 2 ** 32 - 1)
styles = st.sampled_from(["mixed", "ulp", "big", "bits", "special"])


def native_kernels() -> bool:
    """Whether this process uses the native kernels (without calling kernels.impl(), which may warn)."""
    from sparsesync import _native, config
    return bool(_native.available) and not config.get_bool("SPARSESYNC_REFERENCE")


def examples(n: int) -> int:
    """max_examples for a property test: n with the native kernels, fewer with the slow pure-PyTorch reference."""
    return n if native_kernels() else max(5, n // 3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


__all__ = [n for n in dir() if not n.startswith("_")] + ["sparsesync"]
