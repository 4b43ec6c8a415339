"""Planning of format-2 updates (FORMAT.md §6): which ranges of a space go dense or sparse, with which chunk size,
and which classes of base keys the sparse segments use. Everything here is an estimate from the scan's statistics:
it decides sizes, never correctness (the kernels code whatever they are given exactly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .format import build_freq
from .reference import extra_bits_for, max_symbol
from .space import MAX_CLASSES

FINE = 4096                   # scan block (elements)
CHUNK_TARGET = 4096           # about this many changes per chunk (parallel decode granularity)
MIN_LOG2C, MAX_LOG2C = 12, 30
SPLIT_ZERO_BLOCKS = 256       # a sparse run is cut where this many fine blocks in a row have no change
DENSE_MARGIN = 256            # a run goes dense only if that saves more than this many bytes
TABLE_SHARE = 0.3             # planning: the part of a value table a position class is charged (tables are shared)


def _rice_bits(p: np.ndarray) -> np.ndarray:
    """Expected bits per coded gap of the best Rice code for geometric gaps with change probability p (vector)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0)
    q = 1.0 - p
    k = np.arange(31, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        qk = q[:, None] ** (2.0 ** k)[None, :]
        bits = 1.0 + k[None, :] + np.where(qk < 1, qk / (1.0 - qk), np.inf)
    return bits.min(axis=1)


def _entropy_rows(h: np.ndarray) -> np.ndarray:
    """Total bits (count x entropy) of each row of a histogram matrix."""
    h = np.asarray(h, dtype=np.float64)
    tot = h.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = h / np.where(tot > 0, tot, 1)[:, None]
        lg = np.where(h > 0, np.log2(np.where(p > 0, p, 1)), 0.0)
    return -(h * lg).sum(axis=1)


def extra_bits_table(w: int, mode: int) -> np.ndarray:
    """Extra bits (FORMAT.md §4.2) of each value symbol."""
    return np.array([extra_bits_for(s, w, mode) if s <= max_symbol(w, mode) else 0 for s in range(256)],
                    dtype=np.float64)


@dataclass
class ClassPlan:
    cuts: list                # FORMAT.md §6.3
    freqs: np.ndarray         # (K, 256) uint32
    bits_per_change: float    # estimated coded bits per changed element (positions + values + extra bits)
    context: bool             # cuts are used (decode reads the base)


def plan_classes(hist: np.ndarray, keys: np.ndarray, key_scale: float, n: int, w: int, mode: int,
                 context: bool | None) -> ClassPlan:
    """Choose classes for a space from the scan's (key, symbol) histogram of changes and its sampled key counts.

    ``context``: None = by estimated size, True = use classes whenever the dtype has keys, False = one class.
    Greedy: every occurring key starts as its own class; adjacent classes merge while merging costs fewer position
    bits than a class costs (its final gaps, Rice parameter and cut), and until at most MAX_CLASSES remain. Then
    neighbouring classes share value tables while a table of their own would not pay for itself.
    """
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    sym = hist.sum(axis=0)
    ext = extra_bits_table(w, mode)
    extra = float((sym * ext).sum())
    nchunks = max(1.0, total / CHUNK_TARGET)
    o0_bits = float(_rice_bits(np.array([total / max(n, 1)]))[0] * total + _entropy_rows(sym[None, :])[0] + extra)
    o0 = ClassPlan([], build_freq(sym)[None, :], o0_bits / max(total, 1), False)
    if context is False or hist.shape[0] == 1 or total == 0:
        return o0
    chg = hist.sum(axis=1)
    cnt = np.maximum(np.asarray(keys, dtype=np.float64) * key_scale, chg)
    occ = np.flatnonzero(cnt > 0)
    used = np.flatnonzero(sym)          # the symbols that occur (the planning below works on them only)
    hist_u = hist[:, used]
    if occ.size <= 1:
        return o0 if context is None else ClassPlan([], o0.freqs, o0.bits_per_change, False)
    # position classes. Units: [first key, n elements, changes, symbol histogram]
    first = occ.copy()
    un = cnt[occ].copy()
    uc = chg[occ].copy()
    uh = hist_u[occ].copy()
    nseg = max(1.0, nchunks / 64)

    def cost(n_, c_, h_):
        """Bits of classes: positions, values (as if with a table of its own) and what a present class costs
        besides: its final gap in every chunk, its Rice parameter and cut in every segment, and part of a value
        table (neighbours may share one; decided below)."""
        present = c_ > 0
        pos = np.where(present, _rice_bits_lut(np.where(n_ > 0, c_ / np.maximum(n_, 1), 1.0)) * c_, 0.0)
        finals = np.where(present, nchunks * (2.0 + np.log2(np.maximum(n_ / np.maximum(c_, 1), 1.0))), 0.0)
        table = np.where(present, TABLE_SHARE * 8.0 * (2 + 2 * (h_ > 0).sum(axis=1)) * nseg, 0.0)
        return pos + finals + np.where(present, 24.0 * nseg, 8.0 * nseg) + _entropy_rows(h_) + table

    cur = cost(un, uc, uh)
    while first.size > 1:
        mn, mc = un[:-1] + un[1:], uc[:-1] + uc[1:]
        delta = cost(mn, mc, uh[:-1] + uh[1:]) - cur[:-1] - cur[1:]
        j = int(np.argmin(delta))
        if delta[j] > 0 and first.size <= MAX_CLASSES:
            break
        un = np.concatenate([un[:j], mn[j:j + 1], un[j + 2:]])
        uc = np.concatenate([uc[:j], mc[j:j + 1], uc[j + 2:]])
        uh = np.concatenate([uh[:j], uh[j:j + 1] + uh[j + 1:j + 2], uh[j + 2:]])
        first = np.concatenate([first[:j + 1], first[j + 2:]])
        cur = np.concatenate([cur[:j], cost(mn[j:j + 1], mc[j:j + 1], uh[j:j + 1]), cur[j + 2:]])
    if first.size == 1:
        return o0 if context is None else ClassPlan([], o0.freqs, o0.bits_per_change, False)
    # value tables: neighbouring present classes share one (FORMAT.md §6.3: an empty table refers back) while a
    # table of its own would save fewer bits than it costs
    groups = [[i] for i in range(first.size) if uc[i] > 0]
    gh = [uh[g[0]].copy() for g in groups]

    def table_bits(h):
        return 8.0 * (2 + 2 * int((h > 0).sum())) * nseg

    while len(groups) > 1:
        ent = _entropy_rows(np.stack(gh))
        merged = _entropy_rows(np.stack([gh[i] + gh[i + 1] for i in range(len(gh) - 1)]))
        gain = merged - ent[:-1] - ent[1:] - np.array([table_bits(gh[i + 1]) for i in range(len(gh) - 1)])
        j = int(np.argmin(gain))
        if gain[j] > 0:
            break
        groups[j] += groups.pop(j + 1)
        gh[j] = gh[j] + gh.pop(j + 1)
    val_bits = float(_entropy_rows(np.stack(gh)).sum()) + sum(table_bits(h) for h in gh)
    own_vals = _entropy_rows(uh) + np.where(uc > 0, TABLE_SHARE * 8.0 * (2 + 2 * (uh > 0).sum(axis=1)) * nseg, 0.0)
    ctx_bits = float(cur.sum() - own_vals.sum() + val_bits + extra)
    if context is None and ctx_bits >= 0.97 * o0_bits:
        return o0
    cuts = [int(k) for k in first[1:]]
    freqs = np.zeros((first.size, 256), dtype=np.uint32)
    for g, h in zip(groups, gh):
        full = np.zeros(256, dtype=np.float64)
        full[used] = h
        f = build_freq(full)
        for i in g:
            freqs[i] = f
    return ClassPlan(cuts, freqs, ctx_bits / max(total, 1), True)


def _class_stats(cuts, hist: np.ndarray, cnt: np.ndarray):
    """(elements, changes, symbol histogram) per class of ``cuts``."""
    bounds = [0] + list(cuts) + [hist.shape[0]]
    spans = list(zip(bounds[:-1], bounds[1:]))
    return (np.array([cnt[a:b].sum() for a, b in spans]), np.array([hist[a:b].sum() for a, b in spans]),
            np.stack([hist[a:b].sum(axis=0) for a, b in spans]))


def plan_bits(plan: ClassPlan, hist: np.ndarray, keys: np.ndarray, key_scale: float, n: int,
              ref: tuple | None = None) -> float:
    """Estimated bits of positions and values (extra bits left out; tables not counted) of a range with these
    statistics coded with ``plan``'s classes and tables. Positions: by the range's own densities per class, or, with
    ``ref`` = (hist, element counts per key) of the whole run the range is pooled into, by that run's densities (its
    Rice parameters), i.e. the cross-entropy that a range pays for sharing them."""
    hist = np.asarray(hist, dtype=np.float64)
    if hist.sum() == 0:
        return 0.0
    if plan.cuts:
        cnt = np.maximum(np.asarray(keys, dtype=np.float64) * key_scale, hist.sum(axis=1))
        ne, ce, hc = _class_stats(plan.cuts, hist, cnt)
    else:
        ne, ce, hc = np.array([float(n)]), np.array([hist.sum()]), hist.sum(axis=0)[None, :]
    if ref is None:
        pos = float(np.where(ce > 0, _rice_bits(np.where(ne > 0, ce / np.maximum(ne, 1), 1.0)) * ce, 0.0).sum())
    else:
        rh, rc = ref
        if plan.cuts:
            rn, rce, _ = _class_stats(plan.cuts, rh, rc)
        else:
            rn, rce = np.array([rc.sum()]), np.array([rh.sum()])
        p = np.clip(rce / np.maximum(rn, 1), 1e-12, 1 - 1e-12)
        pos = float((-(ce * np.log2(p)) - (ne - ce) * np.log2(1 - p)).sum() * 1.01)
    with np.errstate(divide="ignore"):
        cost = -np.log2(np.maximum(plan.freqs[:len(ce)].astype(np.float64), 0.5) / 4096.0)
    return pos + float((hc * cost).sum())


def tables_bits(plan: ClassPlan) -> float:
    """Header bits of a plan's class entries in one segment (cuts, Rice parameters, distinct tables)."""
    bits, last = 0.0, None
    for f in plan.freqs:
        if not f.any():
            bits += 8
            continue
        same = last is not None and np.array_equal(f, last)
        bits += 24 + (0 if same else 8.0 * (2 + 2 * int((f > 0).sum())))
        last = f
    return bits


@dataclass
class Region:
    """A run of a space coded one way: ``kind`` "d" (dense) or "s" (sparse) over elements [start, end)."""
    kind: str
    start: int
    end: int
    nchanged: int
    log2c: int = 0
    chunk_counts: np.ndarray | None = None


def plan_regions(counts: np.ndarray, n: int, w: int, bits_per_change: float) -> list[Region]:
    """Cut a space (fine-block change counts from the scan) into dense and sparse regions.

    A fine block is cheaper dense when its changes, coded at about ``bits_per_change`` plus the position cost of its
    density, take more than its raw bytes; runs of such blocks go dense when that saves more than DENSE_MARGIN bytes.
    Sparse runs drop blocks without change at their ends and are cut at long stretches without change."""
    counts = np.asarray(counts, dtype=np.int64)
    nb = counts.size
    if nb == 0:
        return []
    blen = np.full(nb, FINE, dtype=np.int64)
    blen[-1] = n - FINE * (nb - 1)
    dens = counts / blen
    sparse_bytes = counts * (_rice_bits_lut(dens) + bits_per_change) / 8.0 + 2
    dense_bytes = blen * w
    gain = sparse_bytes - dense_bytes
    dense = gain > 0
    regions: list[Region] = []
    # runs of equal flags
    edges = np.flatnonzero(np.diff(dense.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [nb]])
    flags = dense[starts]
    # a dense run that saves too little is coded sparse with its neighbours
    for i in range(len(starts)):
        if flags[i] and gain[starts[i]:ends[i]].sum() <= DENSE_MARGIN:
            flags[i] = False
    # merge equal neighbours again, then emit
    b0 = 0
    for i in range(len(starts)):
        if i + 1 < len(starts) and flags[i + 1] == flags[i]:
            continue
        b1 = int(ends[i])
        if flags[i]:
            s, e = b0 * FINE, min(b1 * FINE, n)
            regions.append(Region("d", s, e, int(counts[b0:b1].sum())))
        else:
            regions.extend(_sparse_runs(counts, b0, b1, n))
        b0 = b1
    return regions


def _sparse_runs(counts: np.ndarray, b0: int, b1: int, n: int) -> list[Region]:
    nz = np.flatnonzero(counts[b0:b1]) + b0
    if nz.size == 0:
        return []
    out = []
    cut = np.flatnonzero(np.diff(nz) > SPLIT_ZERO_BLOCKS)
    lo = 0
    for hi in list(cut) + [nz.size - 1]:
        s, e = int(nz[lo]), int(nz[hi]) + 1
        c = counts[s:e]
        total = int(c.sum())
        length = min(e * FINE, n) - s * FINE
        density = total / length
        log2c = int(round(math.log2(CHUNK_TARGET / density))) if density < 1 else MIN_LOG2C
        log2c = max(MIN_LOG2C, min(MAX_LOG2C, log2c, max(MIN_LOG2C, (length - 1).bit_length())))
        per = 1 << (log2c - 12)
        padded = np.zeros(-(-c.size // per) * per, dtype=np.int64)
        padded[:c.size] = c
        out.append(Region("s", s * FINE, min(e * FINE, n), total, log2c, padded.reshape(-1, per).sum(1)))
        lo = hi + 1
    return out


_LUT = None


def _rice_bits_lut(dens: np.ndarray) -> np.ndarray:
    """Position bits per change at each density (interpolated on a log grid; vectorised)."""
    global _LUT
    if _LUT is None:
        grid = np.logspace(-9, 0, 400)
        _LUT = (np.log10(grid), _rice_bits(grid))
    x = np.log10(np.clip(dens, 1e-9, 1.0))
    return np.interp(x, _LUT[0], _LUT[1])
