"""The CUDA kernels' self-test (kernels_cuda.self_test), which runs before the Encoder or the Decoder first works on
a device: checked here on the CPU, with the CPU kernels standing in for the device ones (it must pass) and with
deliberately broken stand-ins (it must name the broken call)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from sparsesync import _native, kernels_cuda

pytestmark = pytest.mark.skipif(not _native.available, reason="native library not available")


def _broken(name, wrap):
    mod = types.SimpleNamespace(**{n: getattr(_native, n) for n in (
        "scan2", "encode2", "decode2", "scatter2", "add_scatter2", "take2", "gather2", "put2", "tree64_many")})
    setattr(mod, name, wrap(getattr(_native, name)))
    return mod


def _flip_data(fn):
    def f(*a, **k):
        table, data, ks, vh, nch = fn(*a, **k)
        return table, (bytes([data[0] ^ 1]) + data[1:]) if data else data, ks, vh, nch
    return f


def _later_index(fn):
    def f(*a, **k):
        idx, vals = fn(*a, **k)
        idx = idx.clone()
        if idx.numel():
            idx[-1] += 1
        return idx, vals
    return f


def _skip_first(fn):
    def f(sp, idx, *a, **k):
        return fn(sp, idx[1:], *[x[sp.w:] if torch.is_tensor(x) else x for x in a[:1]], *a[1:], **k)
    return f


def _hist_off(fn):
    def f(*a, **k):
        out = list(fn(*a, **k))
        out[1] = out[1].copy()
        out[1][0, 0] += 1
        return tuple(out)
    return f


def _hash_off(fn):
    def f(*a, **k):
        return fn(*a, **k) ^ np.uint64(1)
    return f


def test_self_test_passes_on_agreeing_kernels():
    assert kernels_cuda._self_test(torch.device("cpu"), _native) is None


@pytest.mark.parametrize("name,wrap", [("encode2", _flip_data), ("decode2", _later_index), ("scatter2", _skip_first),
                                       ("scan2", _hist_off), ("tree64_many", _hash_off)])
def test_self_test_names_a_broken_call(name, wrap):
    why = kernels_cuda._self_test(torch.device("cpu"), _broken(name, wrap))
    assert why is not None and name in why, why


def test_self_test_result_is_cached_and_can_be_skipped(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels_cuda, "_self_test", lambda dev, impl: calls.append(dev) or "boom")
    kernels_cuda._SELFTESTS.clear()
    try:
        assert kernels_cuda.self_test("cpu", _native) == "boom"
        assert kernels_cuda.self_test("cpu", _native) == "boom" and len(calls) == 1
        monkeypatch.setenv("SPARSESYNC_CUDA_SELFTEST", "0")
        assert kernels_cuda.self_test("cpu", _native) is None
    finally:
        kernels_cuda._SELFTESTS.clear()
