"""Encoder, Decoder, state_digest and sessions on CUDA tensors (gpu-marked: skipped without a device).

The same states on the host and on the GPU: the GPU encoder's buckets must equal the CPU encoder's byte for byte, GPU
decoders must reach the encoder's state bit for bit (integer views, torch.equal), a state split between host memory
and the GPU must round-trip, and a GPU trainer must feed CPU receivers and the reverse through Sender / Receiver.
tests/test_device_paths.py runs the same flows on emulated devices on every machine. SPARSESYNC_GPU_SELFCHECK=1 runs
this file on the CPU with every tensor on one emulated device (a check of the tests themselves).
"""
from __future__ import annotations

import os

import pytest
import torch

import sparsesync as ss
from sparsesync import kernels, kernels_cuda
from sparsesync.errors import BaseMismatch
from spacegen import ints, mutate, random_values

SELF = os.environ.get("SPARSESYNC_GPU_SELFCHECK", "") not in ("", "0")
if SELF:
    pytestmark = []
else:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        pytest.mark.skipif(torch.cuda.is_available() and not kernels_cuda.available(),
                           reason=f"CUDA kernels unavailable: {kernels_cuda.unavailable_reason()}"),
    ]


@pytest.fixture(autouse=True)
def _selfcheck():
    if not SELF:
        yield
        return
    from test_device_paths import Emu
    kernels._emulation = Emu(lambda t: "fake:0")
    yield
    kernels._emulation = None

DTYPES = (torch.bfloat16, torch.bfloat16, torch.float32, torch.float16, torch.int32, torch.float8_e4m3fn)


def _state(seed: int, n: int = 30) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        rows, cols = (1 + (i * 7) % 40, (1, 64, 700, 4096, 5000)[i % 5])
        out[f"model.layers.{i:02d}.w"] = random_values(rows * cols, DTYPES[i % len(DTYPES)], g,
                                                      specials=True).reshape(rows, cols)
    return out


def _step(state: dict, density: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: mutate(t.reshape(-1), density, g, flips=True).reshape(t.shape) for n, t in state.items()}


def _to(state: dict, where) -> dict:
    if SELF:
        return {n: t.clone() for n, t in state.items()}
    return {n: t.to(where(n) if callable(where) else where) for n, t in state.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(ints(a[n].cpu()), ints(b[n].cpu())) for n in a)


def _versions(seed: int, n: int = 4) -> list[dict]:
    s = [_state(seed)]
    for v in range(1, n):
        s.append(_step(s[-1], (0.003, 0.02, 0.5)[v % 3], seed * 100 + v))
    return s


@pytest.mark.parametrize("values", ["delta", "raw"])
@pytest.mark.parametrize("context", [None, True, False])
def test_gpu_encoder_makes_the_cpu_encoders_bytes(values, context):
    states = _versions(1)
    cpu = ss.Encoder(states[0], 0, values=values, context=context, digest=True, bucket_bytes=1 << 16)
    gpu = ss.Encoder(_to(states[0], "cuda"), 0, values=values, context=context, digest=True, bucket_bytes=1 << 16)
    mirror = _to(states[0], "cuda")
    dec = ss.Decoder(mirror, 0)
    assert dec.formats == (2,)
    for v, s in enumerate(states[1:], 1):
        want = cpu.encode(s, version=v)
        got = gpu.encode(_to(s, "cuda"), version=v)
        assert got.buckets == want.buckets, f"version {v}"
        assert got.digest == want.digest
        dec.apply(got)
        assert _equal(mirror, s)
        assert ss.state_digest(mirror) == ss.state_digest(s)
    assert all(t.is_cuda or SELF for t in gpu.snapshot.values())


def test_gpu_full_update_and_state_split_between_host_and_gpu():
    states = _versions(2)
    where = lambda n: "cuda" if int(n.split(".")[2]) % 3 else "cpu"      # noqa: E731
    enc = ss.Encoder(digest=True, bucket_bytes=1 << 15)
    other = lambda n: "cpu" if int(n.split(".")[2]) % 2 else "cuda"     # noqa: E731
    mirror = _to({n: torch.zeros_like(t) for n, t in states[0].items()}, other)
    dec = ss.Decoder(mirror, 0)
    for v, s in enumerate(states, 1):
        dec.apply(enc.encode(_to(s, where), version=v))
        assert _equal(mirror, s), f"version {v}"


def test_gpu_decoder_refuses_a_wrong_base_and_changes_nothing():
    states = _versions(3, 2)
    u = ss.Encoder(_to(states[0], "cuda"), 0, digest=True).encode(_to(states[1], "cuda"), version=1)
    wrong = _to(_step(states[0], 0.01, 77), "cuda")
    before = {n: t.clone() for n, t in wrong.items()}
    dec = ss.Decoder(wrong, 0)
    with pytest.raises(BaseMismatch):
        dec.apply(u)
    assert _equal(wrong, before) and dec.version == 0


def test_gpu_trainer_feeds_cpu_receiver_and_cpu_trainer_feeds_gpu_receiver():
    states = _versions(4)
    for src, dst in (("cuda", "cpu"), ("cpu", "cuda")):
        mirror = _to(states[0], dst)
        with ss.Receiver(mirror, "tcp://127.0.0.1:0", token="gpu-test-token") as r:
            with ss.Sender([r.address], token="gpu-test-token", digest=True, base=_to(states[0], src),
                           base_version=0) as snd:
                for v, s in enumerate(states[1:], 1):
                    snd.push(_to(s, src), version=v)
                    assert r.wait_for(v, timeout=60)
                    assert _equal(mirror, s), (src, dst, v)


def test_gpu_encoder_with_a_pinned_host_snapshot():
    """snapshot="pinned": the snapshot sits in pinned host memory, the CUDA kernels read it across PCIe; the bytes
    are still the CPU encoder's, and the stats count the snapshot bytes the kernels covered."""
    states = _versions(5)
    cpu = ss.Encoder(states[0], 0, digest=True)
    gpu = ss.Encoder(_to(states[0], "cuda"), 0, digest=True, snapshot="pinned")
    if not SELF:
        assert all(t.is_cpu and t.is_pinned() for t in gpu.snapshot.values())
    for v, s in enumerate(states[1:], 1):
        want = cpu.encode(s, version=v)
        got = gpu.encode(_to(s, "cuda"), version=v)
        assert got.buckets == want.buckets, f"version {v}"
        if not SELF:
            assert got.stats.snapshot_host_bytes >= got.stats.dense_bytes     # at least one read of the snapshot
    assert gpu.same_as_snapshot(_to(states[-1], "cuda"))


def test_gpu_encoder_drops_to_format_1_on_the_host():
    states = _versions(6)
    cpu = ss.Encoder(states[0], 0)
    gpu = ss.Encoder(_to(states[0], "cuda"), 0)
    assert gpu.encode(_to(states[1], "cuda"), version=1).buckets == cpu.encode(states[1], version=1).buckets
    cpu.format = gpu.format = 1          # what a Sender does for a receiver that reads only format 1
    assert gpu.encode(_to(states[2], "cuda"), version=2).buckets == cpu.encode(states[2], version=2).buckets
    assert not gpu.on_device and all(t.is_cpu for t in gpu.snapshot.values())
    cpu.format = gpu.format = 2
    assert gpu.encode(_to(states[3], "cuda"), version=3).buckets == cpu.encode(states[3], version=3).buckets
