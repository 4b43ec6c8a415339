"""The device paths of the Encoder and the Decoder (tensors in GPU memory), run on machines without a GPU.

`sparsesync.kernels` has a test hook (``_emulation``): an object saying which device each tensor is on
(``device_of``) and which module implements the device kernel calls (``kernels``). Here the devices are pretend
(``"fake:0"``, ``"fake:1"``, or host memory, decided by a tensor's first dimension, so that the Encoder's snapshot
clones sit where their originals do) and the device kernels are the CPU ones behind a checking shim: every call must
get spaces that lie on ONE pretend device (never host memory, never two devices), and the shim counts calls. What
this proves: the Encoder and the Decoder send every piece of work to the kernels of the device holding it, cut work
at device borders, decode segments that span devices on the host, undo across devices, and make exactly the CPU
encoder's bytes for a state on one device. What it cannot prove: that the CUDA kernels themselves work (that is
tests/test_gpu_kernels.py on a GPU).
"""
from __future__ import annotations

import collections
import random

import pytest
import torch

import sparsesync as ss
from sparsesync import _native, kernels
from sparsesync.errors import BaseMismatch, InvalidArgument
from spacegen import ints, mutate, random_values

pytestmark = pytest.mark.skipif(not _native.available, reason="native library not available")


class _Shim:
    """kernels_cuda's calls, done by the CPU kernels, refusing spaces that are not on exactly one pretend device."""

    def __init__(self, emu):
        self.emu = emu
        self.calls = collections.Counter()

    def _one_device(self, sp, what):
        devs = {self.emu.device_of(t) for t in sp.tensors}
        assert len(devs) == 1 and None not in devs, f"{what}: a device kernel got a space on {devs}"
        return devs.pop()

    def __getattr__(self, name):
        fn = getattr(_native, name)

        def call(*a, **k):
            self.calls[name] += 1
            spaces = [x for x in a if hasattr(x, "druns")]
            if len({self._one_device(sp, name) for sp in spaces}) > 1:
                raise AssertionError(f"{name}: spaces on different devices")
            if name in ("tree64_many",):
                devs = {self.emu.device_of(t) for t in a[0]}
                assert len(devs) == 1 and None not in devs, f"tree64_many over {devs}"
            return fn(*a, **k)
        return call


class Emu:
    def __init__(self, rule):
        self.rule = rule
        self.kernels = _Shim(self)

    def device_of(self, t):
        return self.rule(t)


@pytest.fixture
def emu():
    def install(rule):
        e = Emu(rule)
        kernels._emulation = e
        return e
    yield install
    kernels._emulation = None


ONE = lambda t: "fake:0"                                                          # noqa: E731
HOST = lambda t: None                                                             # noqa: E731
MIXED = lambda t: (None, "fake:0", "fake:1")[t.shape[0] % 3] if t.dim() == 2 else "fake:0"    # noqa: E731
MIXED2 = lambda t: ("fake:1", None, "fake:0")[t.shape[0] % 3] if t.dim() == 2 else "fake:1"   # noqa: E731


def _state(seed: int, ntensors: int = 24) -> dict:
    """bf16, fp32 and int32 tensors of shapes (rows, cols); rows cycle through the three pretend placements."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = {}
    for i in range(ntensors):
        dt = (torch.bfloat16, torch.bfloat16, torch.float32, torch.int32)[i % 4]
        rows = rng.choice([3, 4, 5, 6, 7, 8, 30, 31, 32])
        cols = rng.choice([1, 100, 700, 1500])
        out[f"layer.{i:02d}.w"] = random_values(rows * cols, dt, g, specials=True).reshape(rows, cols)
    out["norm"] = random_values(64, torch.float32, g).reshape(64)        # 1-D: always on the first pretend device
    return out


def _step(state: dict, density: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: mutate(t.reshape(-1), density, g, flips=True).reshape(t.shape) for n, t in state.items()}


def _clone(state):
    return {n: t.clone() for n, t in state.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(ints(a[n]), ints(b[n])) for n in a)


def _versions(seed, n=4, density=0.02):
    s = [_state(seed)]
    for v in range(1, n):
        s.append(_step(s[-1], density if v % 3 else 0.4, seed * 100 + v))
    return s


@pytest.mark.parametrize("snapshot", ["device", "pinned"])
@pytest.mark.parametrize("values", ["delta", "raw"])
@pytest.mark.parametrize("context", [None, False, True])
def test_one_device_makes_the_cpu_encoders_bytes_and_applies_there(emu, values, context, snapshot):
    states = _versions(1)
    kernels._emulation = None
    host_enc = ss.Encoder(states[0], 0, values=values, context=context, digest=True, bucket_bytes=1 << 14)
    want = [host_enc.encode(s, version=v).buckets for v, s in enumerate(states[1:], 1)]
    e = emu(ONE)
    enc = ss.Encoder(_clone(states[0]), 0, values=values, context=context, digest=True, bucket_bytes=1 << 14,
                     snapshot=snapshot)
    mirror = _clone(states[0])
    dec = ss.Decoder(mirror, 0)
    assert dec.formats == (2,) and dec.devices == ["fake:0"]
    for v, s in enumerate(states[1:], 1):
        u = enc.encode(s, version=v)
        assert u.buckets == want[v - 1], f"version {v}: the device path's bytes differ from the CPU encoder's"
        dec.apply(u)
        assert _equal(mirror, s) and dec.version == v
        assert ss.state_digest(mirror) == u.digest
    assert e.kernels.calls["scan2"] and e.kernels.calls["encode2"] and e.kernels.calls["decode2"]
    assert e.kernels.calls["tree64_many"]          # the digests were computed by the device kernels too


@pytest.mark.parametrize("seed,snapshot", [(2, "device"), (3, "device"), (2, "pinned")])
def test_state_spread_over_devices_and_host_round_trips(emu, seed, snapshot):
    e = emu(MIXED)
    states = _versions(seed, n=5)
    enc = ss.Encoder(None if snapshot == "pinned" else _clone(states[0]), 0 if snapshot != "pinned" else None,
                     digest=True, bucket_bytes=1 << 13, snapshot=snapshot)
    if snapshot == "pinned":        # the first update is a full one (a snapshot made by encode, not by the base)
        enc.encode(states[0], version=0)
    mirror, host_mirror = _clone(states[0]), _clone(states[0])
    dec = ss.Decoder(mirror, 0)
    assert dec.devices == ["fake:0", "fake:1"]
    for v, s in enumerate(states[1:], 1):
        u = enc.encode(s, version=v)
        dec.apply(u)
        assert _equal(mirror, s)
        # the same bytes apply on the host, to the same result
        e.rule = HOST
        hd = ss.Decoder(host_mirror, v - 1)
        hd.apply(u)
        assert _equal(host_mirror, s)
        e.rule = MIXED
    assert e.kernels.calls["encode2"] and e.kernels.calls["decode2"]


def test_segments_across_devices_decode_on_the_host(emu):
    """A host encoder cuts segments without regard to the receiver's devices; the receiver spans devices."""
    e = emu(HOST)
    states = _versions(4, n=4, density=0.05)
    enc = ss.Encoder(_clone(states[0]), 0, digest=True)       # whole spaces in one segment each
    updates = [enc.encode(s, version=v) for v, s in enumerate(states[1:], 1)]
    assert not e.kernels.calls                                  # all host so far
    e.rule = MIXED2
    mirror = _clone(states[0])
    dec = ss.Decoder(mirror, 0)
    for v, (u, s) in enumerate(zip(updates, states[1:]), 1):
        dec.apply(u)
        assert _equal(mirror, s), f"version {v}"
    assert e.kernels.calls["gather2"]           # base values of spanning segments were fetched device by device
    assert e.kernels.calls["scatter2"]


def test_wrong_base_across_devices_changes_nothing(emu):
    emu(MIXED)
    states = _versions(5, n=3)
    enc = ss.Encoder(_clone(states[0]), 0, digest=True)
    u = enc.encode(states[1], version=1)
    other = _step(states[0], 0.01, 999)          # not the encoder's base
    mirror = _clone(other)
    dec = ss.Decoder(mirror, 0)
    with pytest.raises(BaseMismatch):
        dec.apply(u)
    assert _equal(mirror, other) and dec.version == 0


def test_digest_mismatch_rolls_back_on_every_device(emu):
    """Raw values and dense ranges are written, then the digest fails: everything is undone, device by device."""
    emu(MIXED)
    states = _versions(6, n=3, density=0.3)
    enc = ss.Encoder(_clone(states[0]), 0, values="raw", digest=True)
    u = enc.encode(states[1], version=1)
    base = _clone(states[0])
    # the receiver's base differs from the encoder's in one element that the update does not touch, so the values
    # decode and apply, and only the final digest can tell
    name = "layer.03.w"
    flat = ints(base[name])
    changed = (ints(states[1][name]) != ints(states[0][name])).nonzero().reshape(-1).tolist()
    j = next(i for i in range(flat.numel()) if i not in set(changed))
    flat[j] ^= 1
    before = _clone(base)
    dec = ss.Decoder(base, 0)
    with pytest.raises(BaseMismatch, match="rolled back"):
        dec.apply(u)
    assert _equal(base, before) and dec.version == 0


def test_device_decoder_refuses_format_1_and_announces_format_2(emu):
    emu(ONE)
    states = _versions(7, n=2)
    kernels._emulation = None
    u1 = ss.Encoder(states[0], 0, format=1).encode(states[1], version=1)
    emu(ONE)
    mirror = _clone(states[0])
    dec = ss.Decoder(mirror, 0)
    with pytest.raises(InvalidArgument, match="format 1"):
        dec.apply(u1)
    assert _equal(mirror, states[0]) and dec.version == 0
    r = ss.Receiver(_clone(states[0]), "tcp://127.0.0.1:0", allow_unauthenticated=True)
    try:
        r.start()
        info = ss.probe(r.address, allow_unauthenticated=True)
        assert info["formats"] == [2]
    finally:
        r.stop()


def test_snapshot_option_is_checked():
    with pytest.raises(InvalidArgument, match="snapshot"):
        ss.Encoder(snapshot="pinned-ish")


def test_non_cuda_device_tensors_are_refused():
    with pytest.raises(InvalidArgument, match="host memory or on CUDA"):
        ss.Decoder({"t": torch.zeros(4, device="meta")})


def test_a_format_1_peer_moves_the_encoder_to_the_host(emu):
    """A session drops to format 1 for a receiver that reads only format 1: the device encoder then codes on the
    host from then on (and back in format 2 too), with the right bytes."""
    e = emu(ONE)
    states = _versions(8, n=4)
    enc = ss.Encoder(_clone(states[0]), 0, digest=True)
    mirror = _clone(states[0])
    dec = ss.Decoder(mirror, 0)            # an emulated-device decoder reads format 2 only: use a host one for v1
    kernels._emulation = None
    host_mirror = _clone(states[0])
    hdec = ss.Decoder(host_mirror, 0)
    kernels._emulation = e
    hdec.apply(enc.encode(states[1], version=1))
    enc.format = 1
    calls = e.kernels.calls["scan2"] + e.kernels.calls["encode2"]
    u = enc.encode(states[2], version=2)
    kernels._emulation = None
    hdec.apply(u)
    assert _equal(host_mirror, states[2]) and not enc.on_device
    kernels._emulation = e
    # format 1 ran on the host kernels only (digests of host tensors count as device work under the emulation)
    assert e.kernels.calls["scan2"] + e.kernels.calls["encode2"] == calls
    enc.format = 2
    u = enc.encode(states[3], version=3)
    kernels._emulation = None
    hdec.apply(u)
    assert _equal(host_mirror, states[3])
    del dec, mirror


def test_sender_passes_the_snapshot_option(emu):
    emu(ONE)
    states = _versions(9, n=2)
    with ss.Sender([], allow_unauthenticated=True, base=_clone(states[0]), base_version=0, snapshot="pinned",
                   quorum=0) as snd:
        assert snd.encoder.pinned and snd.encoder.on_device
    with pytest.raises(InvalidArgument, match="snapshot"):
        ss.Sender([], allow_unauthenticated=True, snapshot="gpu", quorum=0)
