"""state_digest: exact identity of names, dtypes, shapes and bytes; independent of order and memory layout."""
from __future__ import annotations

import hashlib
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spec
from helpers import (DTYPE_IDS, DTYPES, dtypes, examples, from_patterns, gen, ivw, random_tensor, seeds, shapes,
                     special_patterns, width)
from sparsesync import state_digest


def flipped(t: torch.Tensor, elem: int, bit: int) -> torch.Tensor:
    out = t.clone()
    iv = ivw(out).view(-1)
    w = out.element_size()
    if bit == 8 * w - 1:
        iv[elem] ^= torch.iinfo(iv.dtype).min  # the sign bit
    else:
        iv[elem] ^= 1 << bit
    return out


def test_order_independent():
    g = gen(1)
    items = [(f"t{i}", random_tensor((i * 37 % 50,), DTYPES[i % len(DTYPES)], g)) for i in range(12)]
    want = state_digest(dict(items))
    for seed in range(5):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        assert state_digest(dict(shuffled)) == want
        assert state_digest(shuffled) == want          # iterable of pairs
        assert state_digest(iter(shuffled)) == want


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_single_bit_flip_changes_the_digest(dtype):
    g = gen(2)
    n = 5000  # more than one 4096-byte tree64 leaf for every width
    t = random_tensor((n,), dtype, g)
    if dtype != torch.bool:
        sp = from_patterns(special_patterns(dtype), dtype)
        ivw(t)[: len(sp)] = ivw(sp)
    state = {"x": t, "other": torch.arange(5)}
    base = state_digest(state)
    seen = {base}
    w = width(dtype)
    for elem in sorted({0, 1, len(special_patterns(dtype)) - 1, 4096 // w - 1, 4096 // w, n // 2, n - 1}):
        for bit in range(8 * w):
            if dtype == torch.bool and bit > 0:
                continue  # a bool holds 0 or 1
            d = state_digest(dict(state, x=flipped(t, elem, bit)))
            assert d not in seen, (elem, bit)
            seen.add(d)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.is_floating_point], ids=str)
def test_nan_payloads_and_signed_zeros_are_distinguished(dtype):
    pats = special_patterns(dtype)
    digests = {state_digest({"x": from_patterns([p], dtype, ())}) for p in pats}
    assert len(digests) == len(pats)
    assert state_digest({"x": torch.tensor([0.0], dtype=torch.float32).to(dtype)}) != \
        state_digest({"x": torch.tensor([-0.0], dtype=torch.float32).to(dtype)})
    nan = torch.tensor(float("nan"), dtype=torch.float32).to(dtype)
    other_nan = nan.clone()
    ivw(other_nan).fill_(int(ivw(nan)) ^ 1)   # flip the lowest payload bit
    assert torch.isnan(other_nan.float()) or dtype == torch.float8_e4m3fn
    assert state_digest({"x": nan}) != state_digest({"x": other_nan})


SAME_WIDTH = {1: [torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2, torch.bool],
              2: [torch.int16, torch.float16, torch.bfloat16], 4: [torch.int32, torch.float32],
              8: [torch.int64, torch.float64]}


@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_dtype_with_same_bytes_changes_the_digest(w):
    raw = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1] * 3, dtype=torch.uint8)  # valid bools too
    digests = set()
    for dt in SAME_WIDTH[w]:
        t = raw.view(dt)
        digests.add(state_digest({"x": t}))
    assert len(digests) == len(SAME_WIDTH[w])


def test_shape_with_same_bytes_changes_the_digest():
    t = torch.arange(24, dtype=torch.float32)
    shapes_ = [(24,), (2, 12), (12, 2), (4, 6), (6, 4), (2, 3, 4), (24, 1), (1, 24), (1, 1, 24)]
    digests = {state_digest({"x": t.reshape(s)}) for s in shapes_}
    assert len(digests) == len(shapes_)
    one = torch.tensor(5.0)
    assert len({state_digest({"x": one.reshape(s)}) for s in [(), (1,), (1, 1)]}) == 3
    e = torch.empty(0)
    assert len({state_digest({"x": e.reshape(s)}) for s in [(0,), (0, 5), (5, 0), (0, 0), (1, 0)]}) == 5


def test_names_change_the_digest():
    a, b = torch.arange(4), torch.arange(4) + 1
    ds = [state_digest(s) for s in [{"a": a}, {"b": a}, {"a ": a}, {"ä": a}, {"": a}, {"a": a, "b": b},
                                    {"a": b, "b": a}, {"ab": a, "": b}, {"a": a, "bb": b}, {"ab": a, "b": b}]]
    assert len(set(ds)) == len(ds)
    assert state_digest({}) == hashlib.blake2b(b"", digest_size=32).hexdigest()


@settings(max_examples=examples(60), deadline=None)
@given(dtype=dtypes, shape=shapes(max_numel=5000), seed=seeds, data=st.data())
def test_digest_properties_hypothesis(dtype, shape, seed, data):
    g = gen(seed)
    t = random_tensor(shape, dtype, g)
    d = state_digest({"t": t})
    assert d == spec.state_digest({"t": (str(dtype).replace("torch.", ""), list(shape),
                                         bytes(ivw(t).reshape(-1).view(torch.uint8).numpy()))})
    assert state_digest({"t": t.clone()}) == d
    if t.numel():
        elem = data.draw(st.integers(0, t.numel() - 1), label="elem")
        bit = data.draw(st.integers(0, 0 if dtype == torch.bool else 8 * t.element_size() - 1), label="bit")
        assert state_digest({"t": flipped(t, elem, bit)}) != d
    if t.dim() >= 2:
        nc = t.transpose(0, 1).contiguous().transpose(0, 1)   # same values, transposed memory
        assert state_digest({"t": nc}) == d


def test_noncontiguous_equals_contiguous_copy():
    g = gen(4)
    for dtype in DTYPES:
        big = random_tensor((40, 60), dtype, g)
        for view in (big.t(), big[:, ::3], big[::2, 5:50:7], big.t()[3:9], big[7, 1::2],
                     big.unsqueeze(0).expand(2, 40, 60)):
            assert not view.is_contiguous()
            assert state_digest({"v": view}) == state_digest({"v": view.contiguous()}), (dtype, view.shape)


def test_bad_states():
    with pytest.raises(ValueError):
        state_digest([("a", torch.zeros(1)), ("a", torch.zeros(1))])
    with pytest.raises(TypeError):
        state_digest({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError):
        state_digest({"n": [1, 2, 3]})


@pytest.mark.gpu
def test_digest_is_device_independent():
    g = gen(5)
    state = {k: random_tensor((1000,), dt, g) for k, dt in zip("abcd", [torch.bfloat16, torch.float32, torch.int8,
                                                                       torch.bool])}
    assert state_digest({k: v.cuda() for k, v in state.items()}) == state_digest(state)
