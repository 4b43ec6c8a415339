"""Planning of format-2 updates (FORMAT.md §6): which runs of a space's tensors are planned together, which ranges
go dense or sparse, with which chunk size, and which classes of base keys and which value tables the sparse segments
use. Everything here is an estimate from the scan's statistics: it decides sizes, never correctness (the kernels code
whatever they are given exactly). The estimates count what a segment's header costs (its fields, its classes, its
value tables) in the bytes msgpack writes, so that a class, a table or a segment is only paid where it wins that back.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .format import build_freq
from .reference import extra_bits_for, max_symbol
from .space import MAX_CLASSES as _FORMAT_MAX_CLASSES

# The encoder plans at most this many classes (the format allows 32): decoders count classes 8 to a vector register,
# and a 17th class adds a third vector for a few bytes (measured on bench/format2.py's speed state, interleaved runs:
# 17 -> 15 classes cost 0.02% more bytes and took the context decode (staging) from 43 to 36 ms).
MAX_CLASSES = min(16, _FORMAT_MAX_CLASSES)

FINE = 4096                   # scan block (elements)
CHUNK_TARGET = 4096           # about this many changes per chunk (parallel decode granularity)
MIN_LOG2C, MAX_LOG2C = 12, 30
SPLIT_ZERO_BLOCKS = 256       # a sparse run is cut where this many fine blocks in a row have no change
DENSE_MARGIN = 256            # a run goes dense only if that saves more than this many bytes


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


@functools.lru_cache(maxsize=None)
def extra_bits_table(w: int, mode: int) -> np.ndarray:
    """Extra bits (FORMAT.md §4.2) of each value symbol (a shared array: do not modify)."""
    return np.array([extra_bits_for(s, w, mode) if s <= max_symbol(w, mode) else 0 for s in range(256)],
                    dtype=np.float64)


@dataclass
class ClassPlan:
    cuts: list                # FORMAT.md §6.3
    freqs: np.ndarray         # (K, 256) uint32
    bits_per_change: float    # estimated coded bits per changed element (positions + values + extra bits, and the
                              # classes' and tables' header bits of the ``segments`` segments expected)
    context: bool             # cuts are used (decode reads the base)
    header_bits: float = 0.0  # header bits of the classes and tables in one segment
    segments: float = 1.0     # segments the estimate counted those header bits for


# Header bits of a class in a segment (FORMAT.md §6.2/§6.3, msgpack): its cut (a positive fixint: key < 128, else
# uint8), then its ``cls`` entry: nil, or [k, freq] = fixarray + fixint k + bin8 header + the table's bytes (none when
# the class shares the table of the present class before it).
NIL_BITS = 8.0
ENTRY_BITS = 8.0 * 4


def _cut_bits(first_key: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(first_key) < 128, 8.0, 16.0)


def _table_bits_rows(h: np.ndarray, syms: np.ndarray) -> np.ndarray:
    """Bits of the packed value table (FORMAT.md §4.3: varint S, then varint symbol and varint f per symbol) of each
    row of a histogram over the symbols ``syms``, with f the row's counts scaled to 4096 (as build_freq does)."""
    h = np.asarray(h, dtype=np.float64)
    tot = h.sum(axis=-1, keepdims=True)
    f = h * 4096.0 / np.where(tot > 0, tot, 1.0)
    present = h > 0
    nsym = present.sum(axis=-1)
    sym_bytes = np.where(np.asarray(syms) < 128, 1.0, 2.0)
    f_bytes = np.where(f < 128, 1.0, 2.0)
    return 8.0 * (np.where(nsym < 128, 1.0, 2.0) + (present * (sym_bytes + f_bytes)).sum(axis=-1))


def plan_classes(hist: np.ndarray, keys: np.ndarray, key_scale: float, n: int, w: int, mode: int,
                 context: bool | None, tables: bool = True) -> ClassPlan:
    """Choose classes for a space from the scan's (key, symbol) histogram of changes and its sampled key counts.

    ``context``: None = by estimated size, True = use classes whenever the dtype has keys, False = one class.
    Classes are runs of adjacent occurring keys and tables are shared by runs of adjacent classes (FORMAT.md §6.3: an
    empty table refers back), so the partition is found exactly by dynamic programming over the occurring keys: a
    *group* of keys shares one value table (its entropy plus the table's bytes) and is split into classes each of
    which codes its own positions (Rice bits at the class's density, its final gap in every chunk, its cut and its
    header entry). Everything a class or table costs in a segment's header is counted in exact bytes, once per
    segment the run is expected to be cut into; that is what a class has to win back in position or value bits.
    ``tables=False``: the estimate only (``freqs`` is None).
    """
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    sym = hist.sum(axis=0)
    ext = extra_bits_table(w, mode)
    extra = float((sym * ext).sum())
    nchunks = max(1.0, total / CHUNK_TARGET)
    nseg = max(1.0, nchunks / 64)
    used = np.flatnonzero(sym)          # the symbols that occur (the planning below works on them only)

    def one_class_bits(n_, c_, h_):
        pos = float(_rice_bits(np.array([c_ / max(n_, 1)]))[0] * c_) + nchunks * (2.0 + math.log2(max(n_ / c_, 1.0)))
        return pos + float(_entropy_rows(h_[None, :])[0]) + \
            nseg * (ENTRY_BITS + float(_table_bits_rows(h_[None, :], used)[0]))

    o0_bits = (one_class_bits(float(max(n, 1)), total, sym[used]) + extra) if total else 0.0
    o0_head = ENTRY_BITS + float(_table_bits_rows(sym[None, used], used)[0]) if total else 0.0
    o0 = ClassPlan([], build_freq(sym)[None, :] if tables else None, o0_bits / max(total, 1), False, o0_head, nseg)
    if context is False or hist.shape[0] == 1 or total == 0:
        return o0
    chg = hist.sum(axis=1)
    cnt = np.maximum(np.asarray(keys, dtype=np.float64) * key_scale, chg)
    occ = np.flatnonzero(cnt > 0)
    if occ.size <= 1:
        return o0
    hist_u = hist[occ][:, used]
    plan = _partition(occ, cnt[occ], chg[occ], hist_u, used, nchunks, nseg)
    if plan is None:            # one class is best: order-0 coding (no base needed to decode)
        return o0
    classes, groups, bits, head = plan
    ctx_bits = bits + extra
    if context is None and ctx_bits >= 0.97 * o0_bits:
        return o0
    cuts = [int(occ[a]) for a, _ in classes[1:]]
    if not tables:
        return ClassPlan(cuts, None, ctx_bits / max(total, 1), True, head, nseg)
    freqs = np.zeros((len(classes), 256), dtype=np.uint32)
    for g in groups:
        h = hist_u[classes[g[0]][0]:classes[g[-1]][1]].sum(axis=0)
        if not h.any():
            continue
        full = np.zeros(256, dtype=np.float64)
        full[used] = h
        f = build_freq(full)
        for i in g:
            if hist_u[classes[i][0]:classes[i][1]].any():
                freqs[i] = f
    return ClassPlan(cuts, freqs, ctx_bits / max(total, 1), True, head, nseg)


def _partition(first: np.ndarray, un: np.ndarray, uc: np.ndarray, uh: np.ndarray, used: np.ndarray,
               nchunks: float, nseg: float):
    """Optimal classes and table groups over the occurring keys ``first`` (units with element counts ``un``, change
    counts ``uc`` and symbol histograms ``uh``). Returns (classes as [start, end) unit ranges, groups as lists of
    class indices sharing a table, estimated bits without extra bits, header bits of the classes and tables in one
    segment), or None when one class is best."""
    U = first.size
    pn = np.concatenate([[0.0], np.cumsum(un)])
    pc = np.concatenate([[0.0], np.cumsum(uc)])
    ph = np.concatenate([np.zeros((1, uh.shape[1])), np.cumsum(uh, axis=0)])
    cut = np.concatenate([[0.0], _cut_bits(first[1:])])      # the first class has no cut
    i_, j_ = np.meshgrid(np.arange(U + 1), np.arange(U + 1), indexing="ij")
    valid = j_ > i_
    N = np.where(valid, pn[j_] - pn[np.minimum(i_, U)], 1.0)
    C = np.where(valid, pc[j_] - pc[np.minimum(i_, U)], 0.0)
    present = C > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = np.where(present, C / np.maximum(N, 1.0), 1.0)
        pos = np.where(present, _rice_bits_lut(dens) * C
                       + nchunks * (2.0 + np.log2(np.maximum(N / np.maximum(C, 1.0), 1.0))), 0.0)
    head = cut[np.minimum(i_, U - 1)] + np.where(present, ENTRY_BITS, NIL_BITS)
    # values of a table group [i, j): entropy of its histogram plus the table's bytes (none without change)
    ent = np.zeros((U + 1, U + 1))
    tab = np.zeros((U + 1, U + 1))
    step = max(1, (1 << 21) // ((U + 1) * max(1, ph.shape[1])))      # columns per pass (bounded memory)
    for j0 in range(1, U + 1, step):
        j1 = min(U + 1, j0 + step)
        h = np.maximum(ph[j0:j1, None, :] - ph[None, :, :], 0.0).reshape(-1, ph.shape[1])
        ent[:, j0:j1] = _entropy_rows(h).reshape(j1 - j0, U + 1).T
        tab[:, j0:j1] = np.where(h.any(axis=1), _table_bits_rows(h, used), 0.0).reshape(j1 - j0, U + 1).T
    grp_val = np.where(valid, ent + nseg * tab, np.inf)
    penalty = 0.0
    for _ in range(12):
        cls_cost = np.where(valid, pos + nseg * (head + penalty), np.inf)
        # best split of units [i, j) into classes (bp), then of [0, U) into table groups (best); the argmins are
        # found again for the few ranges the reconstruction visits
        bp = np.full((U + 1, U + 1), np.inf)
        bp[:, 1] = cls_cost[:, 1]
        for j in range(2, U + 1):
            bp[:j, j] = np.minimum(cls_cost[:j, j], (bp[:j, 1:j] + cls_cost[1:j, j]).min(axis=1))
        grp = bp + grp_val
        best = np.zeros(U + 1)
        for j in range(1, U + 1):
            best[j] = (best[:j] + grp[:j, j]).min()
        bounds, j = [], U
        while j > 0:
            i = int(np.argmin(best[:j] + grp[:j, j]))
            bounds.append((i, j))
            j = i
        bounds.reverse()

        def classes_of(a, b):
            if b - a <= 1:
                return [(a, b)]
            m = int(np.argmin(bp[a, a + 1:b] + cls_cost[a + 1:b, b])) + a + 1
            if bp[a, m] + cls_cost[m, b] >= cls_cost[a, b]:
                return [(a, b)]
            return classes_of(a, m) + [(m, b)]
        classes, groups = [], []
        for a, b in bounds:
            cs = classes_of(a, b)
            groups.append(list(range(len(classes), len(classes) + len(cs))))
            classes.extend(cs)
        if len(classes) <= MAX_CLASSES:
            break
        penalty = 64.0 if penalty == 0 else penalty * 2
    else:
        return None
    if len(classes) == 1:
        return None
    bits = float(best[U]) - nseg * penalty * len(classes)
    hbits = sum(float(cut[min(a, U - 1)]) + (ENTRY_BITS if pc[b] > pc[a] else NIL_BITS) for a, b in classes)
    hbits += sum(float(tab[classes[g[0]][0], classes[g[-1]][1]]) for g in groups)
    return classes, groups, bits, hbits


# A sparse segment's own header fields besides its classes (FORMAT.md §6.2, msgpack): the array header, the space's
# name, kind, start, end, log2c, table_len, off, len, the headers of cuts and cls, values_hash and nchanged.
SEGMENT_BITS = 8.0 * 44


def _regions(counts: np.ndarray) -> tuple[int, int, int]:
    """(first, last) fine block with a change and the sparse segments plan_regions cuts the blocks into (it cuts at
    SPLIT_ZERO_BLOCKS blocks in a row without change); (-1, -1, 0) without change."""
    nz = np.flatnonzero(np.asarray(counts))
    if nz.size == 0:
        return -1, -1, 0
    return int(nz[0]), int(nz[-1]), 1 + int(np.count_nonzero(np.diff(nz) > SPLIT_ZERO_BLOCKS))


def _h2_bits(n: np.ndarray, c: np.ndarray) -> float:
    """Sum of n * H2(c / n) (bits): what positions cost at least, coded with these element and change counts."""
    n = np.maximum(np.asarray(n, dtype=np.float64), np.asarray(c, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, c / np.where(n > 0, n, 1.0), 0.0)
        q = 1.0 - p
        h = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
              + np.where(q > 0, q * np.log2(np.where(q > 0, q, 1.0)), 0.0))
    return float((n * h).sum())


def merge_runs(runs: list, w: int, mode: int, context: bool | None, plans: list | None = None) -> list:
    """Which adjacent runs of a space are better planned (and coded) as one.

    ``runs``: consecutive ranges of a space, each (hist, keys, n, counts, mergeable): the scan's histogram of (key,
    symbol) of the changes, the estimated element count of each key, the element count, the change counts per fine
    block from the range's start, and whether it may be merged at all. ``plans``: plan_classes of each run when the
    caller has them. Returns [(a, b, plan)]: the merged runs as [a, b) index ranges covering all of ``runs`` in
    order, each with its plan (None for a run without change).

    Each run is a segment of its own (or more, where long stretches without change cut it) that pays its header, its
    classes and its value tables; one run planned for two ranges pays them once but codes both with one set of
    classes and tables, which costs bits where their statistics differ. In one pass from left to right, a run joins
    the group before it when the plan of the merged statistics (plan_classes: positions, values, classes, tables)
    plus the segment headers it needs is estimated below the two apart (one pass: about one plan per run, so a
    space of many similar runs is decided in about the time planning them takes). A pair is planned only if its
    lower bound (positions and values with every key its own class and table, no header) leaves room for a saving,
    so runs that clearly differ cost a few vector operations. Runs without change go with the runs around them when
    those merge (their elements dilute the classes' densities, which the merged plan counts)."""
    R = len(runs)
    ext = extra_bits_table(w, mode)

    def est(cp, total, nseg):
        if total == 0:
            return 0.0
        data = cp.bits_per_change * total - cp.segments * cp.header_bits
        return data + max(nseg, cp.segments) * (SEGMENT_BITS + cp.header_bits)

    hists = [np.asarray(r[0], dtype=np.float64) for r in runs]
    used = np.flatnonzero(sum(h.sum(axis=0) for h in hists)) if R else np.zeros(0, dtype=np.int64)
    ext_u = ext[used]
    nkeys = hists[0].shape[0] if R else 0

    def full(h):
        f = np.zeros((nkeys, ext.size))
        f[:, used] = h
        return f

    groups = []
    for i, (h, (_, k, n, counts, ok)) in enumerate(zip(hists, runs)):
        k = np.asarray(k, dtype=np.float64)
        first, last, segs = _regions(counts)
        total = float(h.sum())
        cp = plans[i] if plans is not None and plans[i] is not None else \
            (plan_classes(h, k, 1.0, int(n), w, mode, context) if total else None)
        groups.append({"a": i, "b": i + 1, "h": h[:, used], "k": k, "n": int(n), "total": total, "first": first,
                       "last": last, "segs": segs, "blocks": -(-int(n) // FINE), "ok": bool(ok), "plan": cp,
                       "bits": est(cp, total, segs) if total else 0.0})
    if R <= 1:
        return [(g["a"], g["b"], g["plan"]) for g in groups]

    def joined(x, y):
        if x["first"] < 0:
            first, last, segs = (y["first"] + x["blocks"], y["last"] + x["blocks"], y["segs"]) if y["first"] >= 0 \
                else (-1, -1, 0)
        elif y["first"] < 0:
            first, last, segs = x["first"], x["last"], x["segs"]
        else:
            gap = y["first"] + x["blocks"] - x["last"]
            first, last = x["first"], y["last"] + x["blocks"]
            segs = x["segs"] + y["segs"] - (1 if gap <= SPLIT_ZERO_BLOCKS else 0)
        return {"a": x["a"], "b": y["b"], "h": x["h"] + y["h"], "k": x["k"] + y["k"], "n": x["n"] + y["n"],
                "total": x["total"] + y["total"], "first": first, "last": last, "segs": segs,
                "blocks": x["blocks"] + y["blocks"], "ok": True, "plan": None}

    def pair(i, j):
        """Groups i and j (the next one with changes) and the groups without change between them, merged, and the
        estimated bits that saves (negative: merging costs)."""
        if not all(g["ok"] for g in groups[i:j + 1]):
            return None, -math.inf
        z = groups[i]
        for y in groups[i + 1:j + 1]:
            z = joined(z, y)
        apart = groups[i]["bits"] + groups[j]["bits"]
        chg = z["h"].sum(axis=1)
        occ = chg > 0
        lower = _h2_bits(z["k"][occ], chg[occ]) + float(_entropy_rows(z["h"][occ]).sum()) + \
            float((z["h"].sum(axis=0) * ext_u).sum())
        if lower + SEGMENT_BITS >= apart:
            return None, -math.inf
        z["plan"] = plan_classes(full(z["h"]), z["k"], 1.0, z["n"], w, mode, context, tables=False)
        z["bits"] = est(z["plan"], z["total"], z["segs"])
        return z, apart - z["bits"]

    # one pass from left to right: a run joins the group before it when that saves bits
    i = 0
    while True:
        live = [x for x, g in enumerate(groups) if g["total"] and x >= i]
        if len(live) < 2:
            break
        i, j = live[0], live[1]
        z, saving = pair(i, j)
        if saving > 0:
            groups[i:j + 1] = [z]
        else:
            i = j
    out = []
    for g in groups:
        if g["plan"] is not None and g["plan"].freqs is None:
            g["plan"] = plan_classes(full(g["h"]), g["k"], 1.0, g["n"], w, mode, context)
        out.append((g["a"], g["b"], g["plan"]))
    return out


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
    """Header bits of a plan's class entries in one segment (cuts, class entries, distinct tables)."""
    return plan.header_bits


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
