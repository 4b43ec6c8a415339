"""CUDA format-2 kernels (sparsesync.kernels_cuda over csrc/device2.cu) against the CPU kernels (sparsesync._native).

Every gpu-marked test builds random spaces on the host (all dtypes, densities from 0.1% to 100%, NaN payloads, +-0,
+-inf, tensors of 1 element, several tensors per space, sizes at the 4096-element block and chunk borders), copies
them to the device and checks that each kernels_cuda call returns exactly what the _native call returns on the host
copy: bytes, integer views, torch.equal. Also: segments encoded on the GPU decode on the CPU to the same state and the
reverse; malformed segments and indices are refused on the device with the CPU's error codes and without a write
outside the outputs; tree64_many agrees.

Without a CUDA device the gpu tests are skipped (conftest.py) and the tests at the end check that the module imports,
says why it is unavailable and raises a clear error when called.

SPARSESYNC_GPU_SELFCHECK=1 runs the gpu tests on the CPU with _native standing in for kernels_cuda (a check of the
tests themselves on machines without a GPU). SPARSESYNC_GPU_TEST_SCALE (default 1) scales the number of cases.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from sparsesync import _native, kernels_cuda
from sparsesync.format import build_freq
from sparsesync.reference import KernelError
from sparsesync.space import Space
from spacegen import class_freqs as _class_freqs
from spacegen import cuts_for, mutate, random_values

SELF = os.environ.get("SPARSESYNC_GPU_SELFCHECK", "") not in ("", "0")
SCALE = float(os.environ.get("SPARSESYNC_GPU_TEST_SCALE", "1") or 1)
IMPL = _native if SELF else kernels_cuda
DEV = "cpu" if SELF else "cuda"


def GPU(fn):
    """gpu marker (and a clean skip without a device or without the CUDA kernels)."""
    if SELF:
        return pytest.mark.skipif(not _native.available, reason="native library not available")(fn)
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(fn)
    fn = pytest.mark.skipif(torch.cuda.is_available() and not kernels_cuda.available(),
                            reason=f"CUDA kernels unavailable: {kernels_cuda.unavailable_reason()}")(fn)
    return pytest.mark.gpu(fn)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
          "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8": torch.int8,
          "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8}
SIZES = [1, 1, 2, 3, 63, 64, 65, 700, 4095, 4096, 4097, 8191, 8192, 12289, 20000]
DENSITIES = [0.001, 0.006, 0.01, 0.03, 0.3, 1.0]


def _n(k: int) -> int:
    return max(1, int(round(k * SCALE)))


# ---------------------------------------------------------------------------------------------------------------------
# data

def _random_values(n: int, dt, g: torch.Generator) -> torch.Tensor:
    return random_values(n, dt, g, specials=True)


def _mutate(old: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    return mutate(old, density, g, flips=True)


class Case:
    """A pair of spaces on the host and their copies on the device."""

    def __init__(self, dtype_name: str, sizes: list[int], density: float, seed: int):
        dt = DTYPES[dtype_name]
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.sizes, self.density, self.seed = dtype_name, sizes, density, seed
        self.names = [f"t{i:05d}" for i in range(len(sizes))]
        self.old_c = [_random_values(s, dt, g) for s in sizes]
        self.new_c = [_mutate(t, density, g) for t in self.old_c]
        self.old_g = [t.to(DEV) for t in self.old_c]
        self.new_g = [t.to(DEV) for t in self.new_c]

    def spaces(self, clone_old: bool = False):
        """(old cpu, new cpu, old gpu, new gpu) spaces; clone_old: fresh copies of the old tensors (to be written)."""
        oc = [t.clone() for t in self.old_c] if clone_old else self.old_c
        og = [t.clone() for t in self.old_g] if clone_old else self.old_g
        return (Space(self.dtype, self.names, oc), Space(self.dtype, self.names, self.new_c),
                Space(self.dtype, self.names, og), Space(self.dtype, self.names, self.new_g))

    def __repr__(self):
        return f"Case({self.dtype}, {len(self.sizes)} tensors, n={sum(self.sizes)}, d={self.density}, seed={self.seed})"


def _sizes(rng: random.Random, lo: int = 1, hi: int = 6) -> list[int]:
    return [rng.choice(SIZES) for _ in range(rng.randint(lo, hi))]


def _cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    names = list(DTYPES)
    out = []
    for i in range(count):
        out.append(Case(names[i % len(names)], _sizes(rng), rng.choice(DENSITIES), seed * 1000 + i))
    return out


def _flat_bytes(tensors: list[torch.Tensor]) -> bytes:
    return b"".join(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def _cpu(t):
    return None if t is None else t.cpu()


def _cuts(kb: int, rng: random.Random) -> list[int]:
    return cuts_for(kb, rng, rng.choice([1, 1, 2, 3, 5, 32])) if kb else []


def _code(fn, *a, **k):
    try:
        return 0, fn(*a, **k)
    except KernelError as exc:
        return exc.code, None


# ---------------------------------------------------------------------------------------------------------------------
# scan

@GPU
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_scan2_equal(mode):
    for case in _cases(_n(22), 100 + mode):
        oc, nc, og, ng = case.spaces()
        c = _native.scan2(oc, nc, mode, positions=True)
        g = IMPL.scan2(og, ng, mode, positions=True)
        assert np.array_equal(c[0], g[0]) and c[0].dtype == g[0].dtype, case
        assert np.array_equal(c[1], g[1]) and c[1].dtype == g[1].dtype and c[1].shape == g[1].shape, case
        assert np.array_equal(c[2], g[2]) and c[2].dtype == g[2].dtype, case
        assert c[3] == g[3], case
        assert np.array_equal(c[4], g[4]) and c[4].dtype == g[4].dtype, case
        assert (c[5] is None) == (g[5] is None), case
        if c[5] is not None:
            assert g[5].device.type == DEV and g[5].dtype == torch.int64
            assert torch.equal(c[5], _cpu(g[5])), case
        g2 = IMPL.scan2(og, ng, mode)
        assert len(g2) == 5 and g2[3] == c[3]


@GPU
def test_scan2_large_multi_block():
    """A space of a few million elements over many tensors (the scan's grid-stride loop, block counts, pieces)."""
    rng = random.Random(7)
    sizes = [rng.choice([1, 4095, 4097, 65536, 300001]) for _ in range(max(4, int(24 * min(1.0, SCALE))))]
    case = Case("bfloat16", sizes, 0.006, 77)
    oc, nc, og, ng = case.spaces()
    for mode in (0, 1):
        c = _native.scan2(oc, nc, mode, positions=True)
        g = IMPL.scan2(og, ng, mode, positions=True)
        for a, b in zip(c[:5], g[:5]):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert torch.equal(c[5], _cpu(g[5]))


# ---------------------------------------------------------------------------------------------------------------------
# encode / decode

def _segments(n: int, log2c: int, rng: random.Random) -> list[tuple[int, int]]:
    C = 1 << log2c
    segs = [(0, n)]
    for _ in range(3):
        s = rng.randrange(n)
        segs.append((s, rng.randint(s + 1, n)))
    if n > C:  # chunk borders
        b = rng.randrange(1, n // C + 1) * C
        for s, e in ((b - 1, min(n, b + 1)), (b, min(n, b + C)), (max(0, b - C), b), (0, b), (b, n)):
            if s < e:
                segs.append((s, e))
    return segs


def _encode_params(case: Case, oc, nc, mode: int, rng: random.Random):
    scan_mode = 1 if mode == 1 else 0
    hist = _native.scan2(oc, nc, scan_mode)[1]
    cuts = _cuts(oc.kb, rng)
    return cuts, _class_freqs(hist, cuts)


def _positions_in(idx: torch.Tensor | None, s: int, e: int):
    if idx is None:
        return None
    a = int(torch.searchsorted(idx, s))
    b = int(torch.searchsorted(idx, e))
    return idx[a:b]


@GPU
@pytest.mark.parametrize("mode", [0, 1])
def test_encode2_equal(mode):
    rng = random.Random(200 + mode)
    for case in _cases(_n(22), 200 + mode):
        oc, nc, og, ng = case.spaces()
        cuts, freqs = _encode_params(case, oc, nc, mode, rng)
        idx_c = _native.scan2(oc, nc, 0, positions=True)[5]
        idx_g = IMPL.scan2(og, ng, 0, positions=True)[5]
        log2c = rng.choice([12, 12, 13])
        for s, e in _segments(oc.n, log2c, rng):
            pc, pg = _positions_in(idx_c, s, e), _positions_in(idx_g, s, e)
            c = _code(_native.encode2, oc, nc, mode, s, e, log2c, cuts, freqs, positions=pc)
            g = _code(IMPL.encode2, og, ng, mode, s, e, log2c, cuts, freqs, positions=pg)
            assert c == g, (case, s, e, log2c, cuts)
            g2 = _code(IMPL.encode2, og, ng, mode, s, e, log2c, cuts, freqs)  # positions found on the device
            assert c == g2, (case, s, e, log2c, cuts)
            c3 = _code(_native.encode2, oc, nc, mode, s, e, log2c, cuts, freqs, positions=pc,
                       nchanged_hint=1)  # the retry path with a too small capacity
            assert c3 == c


@GPU
def test_encode2_update_old():
    rng = random.Random(300)
    for case in _cases(_n(11), 300):
        oc, nc, og, ng = case.spaces(clone_old=True)
        cuts, freqs = _encode_params(case, oc, nc, 0, rng)
        s = rng.randrange(oc.n)
        e = rng.randint(s + 1, oc.n)
        c = _code(_native.encode2, oc, nc, 0, s, e, 12, cuts, freqs, update_old=True)
        g = _code(IMPL.encode2, og, ng, 0, s, e, 12, cuts, freqs, update_old=True)
        assert c == g, case
        if DEV == "cuda":
            torch.cuda.synchronize()
        assert _flat_bytes(oc.tensors) == _flat_bytes(og.tensors), case


@GPU
def test_encode2_errors_equal():
    """Positions that are not the changed elements, not ascending or outside the range: the CPU's codes."""
    rng = random.Random(400)
    for case in _cases(_n(11), 400):
        oc, nc, og, ng = case.spaces()
        cuts, freqs = _encode_params(case, oc, nc, 0, rng)
        idx = _native.scan2(oc, nc, 0, positions=True)[5]
        if idx is None or idx.numel() < 3:
            continue
        n = oc.n
        unchanged = [i for i in range(min(n, 64)) if i not in set(idx[:64].tolist())]
        bad = [idx.flip(0), torch.cat([idx, idx[-1:]]), torch.cat([idx, torch.tensor([n])])]
        if unchanged:
            bad.append(torch.sort(torch.cat([idx, torch.tensor(unchanged[:1])])).values)
        for pos in bad:
            c = _code(_native.encode2, oc, nc, 0, 0, n, 12, cuts, freqs, positions=pos)
            g = _code(IMPL.encode2, og, ng, 0, 0, n, 12, cuts, freqs, positions=pos.to(DEV))
            assert c[0] != 0 and c[0] == g[0], (case, c[0], g[0])
        zero = np.zeros_like(freqs)  # tables without the symbols: SS_ERANS
        c = _code(_native.encode2, oc, nc, 0, 0, n, 12, cuts, zero, positions=idx)
        g = _code(IMPL.encode2, og, ng, 0, 0, n, 12, cuts, zero, positions=idx.to(DEV))
        assert c[0] == g[0] == -5


def _expected_after(case: Case, s: int, e: int) -> bytes:
    """The old space's bytes with elements [s, e) taken from new."""
    oc, nc = Space(case.dtype, case.names, case.old_c), Space(case.dtype, case.names, case.new_c)
    ob, nb = bytearray(_flat_bytes(oc.tensors)), _flat_bytes(nc.tensors)
    w = oc.w
    ob[s * w:e * w] = nb[s * w:e * w]
    return bytes(ob)


@GPU
@pytest.mark.parametrize("mode", [0, 1])
def test_decode2_cross(mode):
    """GPU-encoded segments decode on the CPU to the new state and CPU-encoded ones on the GPU; decode2 outputs equal
    (modes 0/1, and 2 with add_scatter2 for delta segments)."""
    rng = random.Random(500 + mode)
    for case in _cases(_n(16), 500 + mode):
        oc, nc, og, ng = case.spaces()
        cuts, freqs = _encode_params(case, oc, nc, mode, rng)
        log2c = rng.choice([12, 13])
        for s, e in _segments(oc.n, log2c, rng)[:4]:
            tbl, data, ks, vh, nch = IMPL.encode2(og, ng, mode, s, e, log2c, cuts, freqs)
            if nch == 0:
                continue
            seg = tbl + data
            args = (seg, len(tbl), None, mode, s, e, log2c, cuts, ks, freqs, nch, vh)
            ic, vc = _native.decode2(*args[:2], oc, *args[3:])
            ig, vg = IMPL.decode2(*args[:2], og, *args[3:])
            assert ig.device.type == DEV and vg.device.type == DEV
            assert torch.equal(ic, _cpu(ig)) and torch.equal(vc, _cpu(vg)), (case, s, e)
            # apply: CPU and GPU
            oc2, _, og2, _ = case.spaces(clone_old=True)
            _native.scatter2(oc2, ic, vc)
            IMPL.scatter2(og2, ig, vg)
            want = _expected_after(case, s, e)
            assert _flat_bytes(oc2.tensors) == want and _flat_bytes(og2.tensors) == want, (case, s, e)
            if mode == 0:  # deferred delta: differences, then add_scatter2
                _, dd = IMPL.decode2(*args[:2], og, 2, *args[4:])
                _, dc = _native.decode2(*args[:2], oc, 2, *args[4:])
                assert torch.equal(dc, _cpu(dd))
                _, _, og3, _ = case.spaces(clone_old=True)
                new_out = torch.empty_like(vg)
                IMPL.add_scatter2(og3, ig, dd, new_out=new_out)
                assert torch.equal(_cpu(new_out), vc)
                assert _flat_bytes(og3.tensors) == want
                IMPL.add_scatter2(og3, ig, dd, negate=True)  # undo
                assert _flat_bytes(og3.tensors) == _flat_bytes(case.old_c)


def _corrupt(seg: bytes, table_len: int, rng: random.Random):
    b = bytearray(seg)
    kind = rng.randrange(6)
    if kind == 0 and b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:
        del b[rng.randrange(len(b)):]
    elif kind == 2:
        b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
    elif kind == 3:
        table_len += rng.choice([-1, 1])
    elif kind == 4 and b:
        i = rng.randrange(len(b))
        b[i] = rng.randrange(256)
    else:  # a byte in the chunk table
        if table_len:
            b[rng.randrange(table_len)] ^= 1 << rng.randrange(8)
    return bytes(b), table_len


@GPU
def test_decode2_malformed_refused_in_bounds():
    """Corrupted segments: the GPU returns the CPU's code (or the same result) and writes nothing outside idx_out /
    val_out (canaries around both, the space unchanged)."""
    rng = random.Random(600)
    checked = 0
    for case in _cases(_n(11), 600):
        oc, nc, og, ng = case.spaces()
        mode = rng.choice([0, 1])
        cuts, freqs = _encode_params(case, oc, nc, mode, rng)
        tbl, data, ks, vh, nch = _native.encode2(oc, nc, mode, 0, oc.n, 12, cuts, freqs)
        if nch == 0:
            continue
        before = _flat_bytes(og.tensors)
        for _ in range(_n(12)):
            seg, tl = _corrupt(tbl + data, len(tbl), rng)
            nchg = nch + rng.choice([0, 0, 0, 0, 1, -1])
            if nchg < 0:
                continue
            dmode = rng.choice([mode, mode, 2]) if mode == 0 else mode
            c = _code(_native.decode2, seg, tl, oc, dmode, 0, oc.n, 12, cuts, ks, freqs, nchg, vh)
            pad = 40
            ib = torch.full((nchg + 2 * pad,), -7, dtype=torch.int64, device=DEV)
            vb = torch.full(((nchg + 2 * pad) * oc.w,), 0xA5, dtype=torch.uint8, device=DEV)
            g = _code(IMPL.decode2, seg, tl, og, dmode, 0, oc.n, 12, cuts, ks, freqs, nchg, vh,
                      idx_out=ib[pad:pad + nchg], val_out=vb[pad * oc.w:(pad + nchg) * oc.w])
            assert c[0] == g[0], (case, c[0], g[0])
            if c[0] == 0:
                assert torch.equal(c[1][0], _cpu(g[1][0])) and torch.equal(c[1][1], _cpu(g[1][1]))
            ibc, vbc = ib.cpu(), vb.cpu()
            assert (ibc[:pad] == -7).all() and (ibc[pad + nchg:] == -7).all()
            assert (vbc[:pad * oc.w] == 0xA5).all() and (vbc[(pad + nchg) * oc.w:] == 0xA5).all()
            checked += 1
        assert _flat_bytes(og.tensors) == before
    assert checked > 0


# ---------------------------------------------------------------------------------------------------------------------
# dense ranges and indices

@GPU
def test_gather_put_equal():
    rng = random.Random(700)
    for case in _cases(_n(22), 700):
        oc, _, og, _ = case.spaces(clone_old=True)
        n = oc.n
        for _ in range(4):
            s = rng.randrange(n + 1)
            e = rng.randint(s, n)
            a, b = _native.gather2(oc, s, e), IMPL.gather2(og, s, e)
            assert b.device.type == DEV and torch.equal(a, _cpu(b)), (case, s, e)
            data = torch.randint(0, 256, ((e - s) * oc.w,), dtype=torch.uint8)
            tc = np.zeros(len(oc.names), dtype=np.uint8)
            tg = np.zeros(len(og.names), dtype=np.uint8)
            _native.put2(oc, s, e, data, touched=tc)
            IMPL.put2(og, s, e, data.to(DEV), touched=tg)
            assert np.array_equal(tc, tg), (case, s, e)
            assert _flat_bytes(oc.tensors) == _flat_bytes(og.tensors)
            IMPL.put2(og, s, e, data.numpy().tobytes())  # host bytes are copied over
        with pytest.raises(KernelError):
            IMPL.gather2(og, 0, n + 1)


@GPU
def test_indexed_equal():
    rng = random.Random(800)
    for case in _cases(_n(22), 800):
        oc, _, og, _ = case.spaces(clone_old=True)
        n, w = oc.n, oc.w
        for _ in range(3):
            k = rng.randint(0, n)
            idx = torch.randperm(n)[:k]
            if rng.random() < 0.5:
                idx = torch.sort(idx).values
            idx_g = idx.to(DEV)
            assert torch.equal(_native.take2(oc, idx), _cpu(IMPL.take2(og, idx_g)))
            vals = torch.randint(0, 256, (k * w,), dtype=torch.uint8)
            tc = np.zeros(len(oc.names), dtype=np.uint8)
            tg = np.zeros(len(og.names), dtype=np.uint8)
            _native.scatter2(oc, idx, vals, touched=tc)
            IMPL.scatter2(og, idx_g, vals.to(DEV), touched=tg)
            assert np.array_equal(tc, tg) and _flat_bytes(oc.tensors) == _flat_bytes(og.tensors), case
            d = torch.randint(0, 256, (k * w,), dtype=torch.uint8)
            neg = rng.random() < 0.5
            oc_out, og_out = torch.empty(k * w, dtype=torch.uint8), torch.empty(k * w, dtype=torch.uint8, device=DEV)
            tc[:] = 0
            tg[:] = 0
            _native.add_scatter2(oc, idx, d, new_out=oc_out, negate=neg, touched=tc)
            IMPL.add_scatter2(og, idx_g, d.to(DEV), new_out=og_out, negate=neg, touched=tg)
            assert np.array_equal(tc, tg) and torch.equal(oc_out, _cpu(og_out))
            assert _flat_bytes(oc.tensors) == _flat_bytes(og.tensors), case
        # a bad index: SS_EPOS, nothing written
        before = _flat_bytes(og.tensors)
        for bad in (n, -1):
            idx = torch.tensor([0, bad, min(1, n - 1)][: 2 if n == 1 else 3], dtype=torch.int64)
            vals = torch.zeros(idx.numel() * w, dtype=torch.uint8)
            for fn, args in ((IMPL.scatter2, (og, idx.to(DEV), vals.to(DEV))),
                             (IMPL.add_scatter2, (og, idx.to(DEV), vals.to(DEV))),
                             (IMPL.take2, (og, idx.to(DEV)))):
                with pytest.raises(KernelError) as ei:
                    fn(*args)
                assert ei.value.code == -4
        assert _flat_bytes(og.tensors) == before


# ---------------------------------------------------------------------------------------------------------------------
# tree64

@GPU
def test_tree64_many_equal():
    g = torch.Generator().manual_seed(900)
    lens = [0, 1, 7, 8, 31, 32, 33, 4095, 4096, 4097, 8192, 12289, 100000, 1 << 20]
    base = torch.randint(0, 256, (sum(lens) + 64,), generator=g, dtype=torch.uint8)
    base_g = base.to(DEV)
    for shift in (0, 1, 3, 8):  # unaligned starts take the byte-wise leaf path
        tc, tg, at = [], [], shift
        for ln in lens:
            tc.append(base[at:at + ln])
            tg.append(base_g[at:at + ln])
            at += ln
        a = _native.tree64_many(tc)
        b = IMPL.tree64_many(tg)
        assert a.dtype == b.dtype == np.uint64 and np.array_equal(a, b), shift
    # typed tensors of several dtypes
    ts = [_random_values(s, DTYPES[d], g) for d, s in zip(DTYPES, SIZES)]
    assert np.array_equal(_native.tree64_many(ts), IMPL.tree64_many([t.to(DEV) for t in ts]))
    assert IMPL.tree64_many([]).shape == (0,)
    if not SELF:
        one = base_g[: 3 * 4096 + 5]
        assert kernels_cuda.tree64(one) == int(_native.tree64_many([base[: 3 * 4096 + 5]])[0])


@GPU
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPARSESYNC_GPU_BIG", "") in ("", "0"),
                    reason="set SPARSESYNC_GPU_BIG=1 (a 2.2e9-element space: 4.4 GB on the device and on the host)")
def test_indices_beyond_2_31():
    """64-bit indexing: a uint8 space of 3 + 2^31 + 10,000 elements with changes on both sides of 2^31."""
    big = (1 << 31) + 10_000
    sizes = [3, big]
    n = sum(sizes)
    old_c = [torch.arange(3, dtype=torch.uint8), torch.zeros(big, dtype=torch.uint8)]
    new_c = [t.clone() for t in old_c]
    flat_pos = [1, 4096 * 7 + 5, (1 << 31) - 2, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, (1 << 31) + 4097, n - 1]
    for v in flat_pos:
        t, i = (0, v) if v < 3 else (1, v - 3)
        new_c[t][i] = new_c[t][i] + 1 + (v % 5)
    names = ["a", "b"]
    oc, nc = Space("uint8", names, old_c), Space("uint8", names, new_c)
    og, ng = Space("uint8", names, [t.to(DEV) for t in old_c]), Space("uint8", names, [t.to(DEV) for t in new_c])
    c = _native.scan2(oc, nc, 0, positions=True)
    g = IMPL.scan2(og, ng, 0, positions=True)
    for a, b in zip(c[:5], g[:5]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert _cpu(g[5]).tolist() == flat_pos == c[5].tolist()
    freqs = build_freq(c[1].sum(0)).reshape(1, 256)
    for s, e in ((0, n), ((1 << 31) - 10, n), ((1 << 31) + 1, (1 << 31) + 5000)):
        pc = _positions_in(c[5], s, e)
        enc_c = _native.encode2(oc, nc, 0, s, e, 20, [], freqs, positions=pc)
        enc_g = IMPL.encode2(og, ng, 0, s, e, 20, [], freqs, positions=pc.to(DEV))
        assert enc_c == enc_g, (s, e)
        tbl, data, ks, vh, nch = enc_g
        ig, vg = IMPL.decode2(tbl + data, len(tbl), og, 0, s, e, 20, [], ks, freqs, nch, vh)
        assert _cpu(ig).tolist() == pc.tolist()
    assert torch.equal(_native.gather2(nc, (1 << 31) - 100, (1 << 31) + 100),
                       _cpu(IMPL.gather2(ng, (1 << 31) - 100, (1 << 31) + 100)))
    idx = torch.tensor(flat_pos, dtype=torch.int64)
    assert torch.equal(_native.take2(nc, idx), _cpu(IMPL.take2(ng, idx.to(DEV))))
    IMPL.scatter2(og, idx.to(DEV), IMPL.take2(ng, idx.to(DEV)))
    assert torch.equal(_cpu(og.tensors[1]), new_c[1])
    assert np.array_equal(_native.tree64_many(new_c), IMPL.tree64_many(ng.tensors))


# ---------------------------------------------------------------------------------------------------------------------
# without a GPU

def test_bindings_resolve_when_compiled():
    """A library built with CUDA exports every ss2_cuda_* call (they cannot run without a device)."""
    if not _native.available:
        pytest.skip("native library not available")
    if _native.cuda_load_error is not None:
        assert "CUDA" in _native.cuda_load_error or "native library" in _native.cuda_load_error
        pytest.skip(_native.cuda_load_error)
    for name in _native._CUDA_SIGNATURES:
        assert getattr(_native.lib, name).restype is not None or name == "ss2_cuda_abi"
    assert _native.lib.ss2_cuda_abi() == 1
    assert _native.lib.ss2_cuda_device_count() >= 0
    assert b"" != _native.lib.ss2_cuda_error_string(-1000 - 100)


def test_unavailable_without_gpu_says_why():
    if kernels_cuda.available():
        pytest.skip("CUDA kernels are available here")
    why = kernels_cuda.unavailable_reason()
    assert isinstance(why, str) and why
    sp = Space("float32", ["a"], [torch.zeros(3)])
    for fn, args in ((kernels_cuda.scan2, (sp, sp, 0)), (kernels_cuda.gather2, (sp, 0, 1)),
                     (kernels_cuda.tree64_many, ([torch.zeros(3)],)),
                     (kernels_cuda.encode2, (sp, sp, 0, 0, 3, 12, [], np.zeros((1, 256), np.uint32)))):
        with pytest.raises(kernels_cuda.CudaKernelsUnavailable) as ei:
            fn(*args)
        assert why in str(ei.value)


@GPU
def test_state_digest_is_the_same_on_either_device():
    """sparsesync.state_digest of a state on the GPU (hashed there, no host copy) equals that of its CPU copy, also
    for a state spread over the host and the device."""
    from sparsesync import state_digest
    g = torch.Generator().manual_seed(7)
    cpu = {f"layer.{i}.w": random_values(s, dt, g, specials=True)
           for i, (s, dt) in enumerate([(4096, torch.bfloat16), (1, torch.float32), (12289, torch.float16),
                                        (5000, torch.int64), (0, torch.bfloat16), (4097, torch.float8_e5m2)])}
    want = state_digest(cpu)
    assert state_digest({k: v.to(DEV) for k, v in cpu.items()}) == want
    mixed = {k: (v.to(DEV) if i % 2 else v) for i, (k, v) in enumerate(cpu.items())}
    assert state_digest(mixed) == want
    changed = {k: v.clone() for k, v in cpu.items()}
    changed["layer.0.w"].view(torch.int16)[7] ^= 1
    assert state_digest({k: v.to(DEV) for k, v in changed.items()}) != want
