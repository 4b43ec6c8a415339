"""Format 2 planning: adjacent runs of a space merged when one segment with shared classes and tables is estimated
cheaper than two (plan2.merge_runs, Encoder._merged).

Checks: merges happen on states made for it (many tensors with their own change rates and scales); every update
decodes bit-exact with the Decoder and with the independent decoder of tests/spec.py; the bytes do not depend on
whether the scan returned the changed positions (the CUDA scan keeps fewer than the CPU one, and both encoders must
write the same bytes), and merging never costs bytes against planning every run alone.
"""
from __future__ import annotations

import random

import pytest
import torch

import sparsesync as ss
import sparsesync._native as native
import sparsesync.codec as codec
import spec
from test_spec import as_spec_state

pytestmark = pytest.mark.skipif(not native.available, reason="native library not available")


def _step(t, dens, g, scale):
    n = t.numel()
    k = min(n, int(n * dens))
    if k == 0:
        return t.clone()
    idx = torch.randperm(n, generator=g)[:k]
    f = t.float().reshape(-1).clone()
    f[idx] += torch.randn(k, generator=g) * scale * f[idx].abs().clamp_min(1e-3)
    return f.reshape(t.shape).to(t.dtype)


def _case(seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    state, dens = {}, {}
    for i in range(rng.randint(4, 12)):
        dt = rng.choice([torch.float16, torch.float32]) if rng.random() < 0.25 else torch.bfloat16
        n = rng.choice([4096, 20000, 70000, 150000])
        state[f"t{i:02d}"] = (torch.randn(n, generator=g) * rng.choice([0.01, 0.1, 1.0])).to(dt)
        dens[f"t{i:02d}"] = rng.choice([0, 0.003, 0.02, 0.05, 0.2])
    steps, cur = [state], state
    for _ in range(4):
        cur = {k: _step(t, dens[k] * rng.choice([0.5, 1, 2]), g, rng.choice([0.01, 0.1])) for k, t in cur.items()}
        steps.append(cur)
    return steps, rng.choice([None, True]), rng.choice(["delta", "delta", "raw"]), rng.choice([None, 65536])


def _encode_all(steps, context, values, bucket_bytes):
    enc = ss.Encoder(steps[0], 0, context=context, values=values, bucket_bytes=bucket_bytes)
    return [enc.encode(s, version=v) for v, s in enumerate(steps[1:], 1)]


@pytest.fixture
def merges(monkeypatch):
    count = [0]
    real = codec.Encoder._merged

    def counting(self, sp, old, runs, cps, ctx):
        out = real(self, sp, old, runs, cps, ctx)
        count[0] += len(out[0]) < len(runs)
        return out
    monkeypatch.setattr(codec.Encoder, "_merged", counting)
    return count


@pytest.mark.parametrize("seed", range(8))
def test_merged_runs_decode_exactly_and_do_not_depend_on_positions(seed, merges, monkeypatch):
    steps, context, values, bb = _case(seed)
    ups = _encode_all(steps, context, values, bb)
    recv = {k: v.clone() for k, v in steps[0].items()}
    dec = ss.Decoder(recv, 0)
    st = as_spec_state(steps[0])
    for u, s in zip(ups, steps[1:]):
        spec.apply_update(u.buckets, st)
        assert st == as_spec_state(s)
        dec.apply(u)
        assert as_spec_state(recv) == as_spec_state(s)
    # the scan returns no positions at all: the same bytes
    monkeypatch.setattr(native, "positions_cap", lambda n: 0)
    again = _encode_all(steps, context, values, bb)
    assert [u.buckets for u in again] == [u.buckets for u in ups]


def test_merging_happens_and_never_costs_bytes(merges, monkeypatch):
    total_merged = total_alone = 0
    for seed in range(8):
        steps, context, values, bb = _case(100 + seed)
        total_merged += sum(u.stats.wire_bytes for u in _encode_all(steps, context, values, bb))
    assert merges[0] > 0, "no update merged runs: the test states no longer exercise merging"
    monkeypatch.setattr(codec.Encoder, "_merged", lambda self, sp, old, runs, cps, ctx: (runs, cps))
    for seed in range(8):
        steps, context, values, bb = _case(100 + seed)
        total_alone += sum(u.stats.wire_bytes for u in _encode_all(steps, context, values, bb))
    assert total_merged <= total_alone
