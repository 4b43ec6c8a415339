"""Random test data for the format-2 kernel tests (native, host/device coders, CUDA): values of every dtype, sparse
mutations of their bit patterns, and tensor sizes around chunk and leaf borders. Deterministic for a generator."""
from __future__ import annotations

import random

import numpy as np
import torch

from sparsesync.format import build_freq
from sparsesync.space import Space

INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SMALL_SIZES = (1, 2, 3, 63, 64, 65, 100, 4095, 4097, 700)


def width(dt) -> int:
    return torch.empty(0, dtype=dt).element_size()


def ints(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns as a signed integer tensor of the same width (flat)."""
    return t.reshape(-1).view(INT_OF_WIDTH[t.element_size()])


def random_values(n: int, dt, g: torch.Generator, specials: bool = False) -> torch.Tensor:
    """``n`` values of dtype ``dt`` over a wide range of magnitudes; ``specials``: floats also get NaN (two payloads),
    +-0 and +-inf at about 2% of the elements (n >= 4)."""
    if dt.is_floating_point:
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
        t = x.to(dt)
        if specials and n >= 4:
            k = max(1, n // 50)
            at = torch.randint(0, n, (k,), generator=g)
            vals = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), float("-inf")])
            t[at] = vals[torch.randint(0, 5, (k,), generator=g)].to(dt)
            iv = ints(t)
            at2 = torch.randint(0, n, (max(1, k // 4),), generator=g)
            iv[at2] = (-1 if dt != torch.float8_e4m3fn else 0x7F)  # all-ones pattern: a NaN with a full payload
        return t
    if dt == torch.uint8:
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    w = width(dt)
    lo, hi = (-(1 << 63), (1 << 63) - 1) if w == 8 else (-(1 << (8 * w - 1)), 1 << (8 * w - 1))
    return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64).to(dt)


def mutate(old: torch.Tensor, density: float, g: torch.Generator, flips: bool = False) -> torch.Tensor:
    """A copy with about ``density`` of the elements changed: small integer steps of the bit pattern and random new
    patterns (large differences); ``flips``: also sign flips (0.0 -> -0.0, NaN -> NaN of the other sign)."""
    new = old.clone()
    iv = ints(new)
    m = torch.rand(iv.numel(), generator=g) < density
    k = int(m.sum())
    if not k:
        return new
    w = old.element_size()
    small = torch.randint(1, 9, (k,), generator=g, dtype=torch.int64) * (torch.randint(0, 2, (k,), generator=g) * 2 - 1)
    big = torch.randint(-(1 << 62), 1 << 62, (k,), generator=g, dtype=torch.int64)
    old_v = iv[m].to(torch.int64)
    if flips:
        sign = torch.full((k,), 1 << (8 * w - 1) if w < 8 else 0, dtype=torch.int64)
        r = torch.rand(k, generator=g)
        nv = torch.where(r < 0.6, old_v + small, torch.where(r < 0.9, old_v + big, old_v ^ sign))
    else:
        nv = old_v + torch.where(torch.rand(k, generator=g) < 0.7, small, big)
    nv = torch.where(nv == old_v, nv + 1, nv)
    if w < 8:
        nv = nv & ((1 << (8 * w)) - 1)
        nv = torch.where(nv >= (1 << (8 * w - 1)), nv - (1 << (8 * w)), nv)
    iv[m] = nv.to(iv.dtype)
    return new


def sizes(n_total: int, rng: random.Random, small: bool, choices=SMALL_SIZES) -> list[int]:
    """Tensor sizes adding up to ``n_total``: from ``choices`` (``small``) or uniform in 1..9000."""
    out, left = [], n_total
    while left > 0:
        s = min(rng.choice(choices) if small else rng.randint(1, 9000), left)
        out.append(s)
        left -= s
    return out


def spaces(dtype_name: str, dt, sizes_: list[int], density: float, seed: int) -> tuple[Space, Space]:
    """(old Space, new Space) of dtype ``dt`` over tensors of the given sizes (names sorted = creation order)."""
    g = torch.Generator().manual_seed(seed)
    olds = [random_values(s, dt, g) for s in sizes_]
    news = [mutate(t, density, g) for t in olds]
    names = [f"t{i:06d}" for i in range(len(sizes_))]
    return Space(dtype_name, names, olds), Space(dtype_name, names, news)


def cuts_for(kb: int, rng: random.Random, nclasses: int) -> list[int]:
    """Random class cuts for ``nclasses`` classes of ``kb``-bit keys (none without keys)."""
    if kb == 0 or nclasses <= 1:
        return []
    return sorted(rng.sample(range(1, 1 << kb), min(nclasses - 1, (1 << kb) - 1)))


def class_freqs(hist: np.ndarray, cuts: list[int]) -> np.ndarray:
    """Per-class value tables from a (key x symbol) histogram (absent classes: all zero)."""
    bounds = [0] + list(cuts) + [hist.shape[0]]
    out = np.zeros((len(cuts) + 1, 256), dtype=np.uint32)
    for c in range(len(cuts) + 1):
        h = hist[bounds[c]:bounds[c + 1]].sum(0)
        if h.sum():
            out[c] = build_freq(h)
    return out


def varint(v: int) -> bytes:
    """LEB128 varint (FORMAT.md)."""
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)
