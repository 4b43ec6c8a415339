"""Fuzz the Decoder: mutated payloads must be refused cleanly or applied bit-exactly, in wire formats 1 and 2.

    python bench/fuzz.py [--count 1000000] [--seed 1] [--workers 2] [--reference-share 0.01] [--formats 1,2]
                         [--out DIR]
    python bench/fuzz.py --seed 1 --start 123456 --count 1 --workers 1 -v      # reproduce one payload

Every payload is a real update of a small state with one mutation. Half the payloads (``--formats 1,2``, the default)
are format-1 updates (docs/FORMAT.md §2-§5) of a state of several dtypes (sparse/dense/unchanged tensors, delta and
raw values, full updates, tied weights, with and without a state digest); the other half are format-2 updates (§6) of
a weight-like state: normal values (std 0.02) in bfloat16, float32, float16 and float8 that change where an
AdamW-like step crosses a rounding boundary (so smaller weights change more often and the encoder finds classes),
dozens of small tensors so that one segment spans many tensors, a dense run next to sparse ones in the float32 space,
and int32/int8/bool/float64/empty tensors; encoded with ``context=True`` (classes with cuts wherever the dtype has an
exponent), ``None`` (the encoder's choice) and ``False`` (order-0). Each case also holds a second update of the same
transition (``other``) and the same update in the other format (``alt_fmt``). The mutations:

- byte-level (no checksum recomputed): ``bitflip``, ``overwrite`` (a run of random bytes), ``truncate``, ``pad``,
  ``splice`` (a prefix of one bucket joined to the suffix of another, of this update, of a second update of the same
  transition or of the same update in the other format), ``foreign`` (a bucket of the second update or of the other
  format), ``duplicate``, ``reorder``, ``drop`` buckets;
- structure-aware (body and header checksums, chain links and, half the time, the update id recomputed, so the
  mutation reaches the deep parsers): ``header_field`` edits, ``header_encoding`` (the same values in non-canonical
  msgpack), ``early_count`` (an earlier bucket claims to be the last), ``segment_field`` edits, ``segment_list``
  (segments dropped, duplicated, swapped, moved to another bucket), ``varint`` edits in chunk tables,
  ``symbol_table`` (format 1: the segment's table; format 2: a present class's table) and ``chunk_table`` edits
  (Rice parameters, stream lengths, chunk entries), ``stream`` bytes of the rANS/bit streams, ``dense_data`` bytes,
  ``version_field`` (``v`` set to the other format, unknown versions, other types, in one or every bucket),
  ``layout_field`` (the layout digest and ``ntensors`` edited: random, bit flipped, cut, another receiver's),
  ``mixed_format`` (a bucket of the other format spliced in with the chain rebuilt, a prefix of this update followed by
  the rest in the other format, ``v`` switched in every bucket, a segment of the other format inserted; and, as a
  positive control, the same update in the other format, which must be accepted exactly);
- structure-aware, format 2 only: ``space`` (a segment's space set to another dtype of the layout, of the same width
  or not, to a dtype the layout lacks, to unknown names and other types), ``range`` (``start``/``end`` out of the
  space, huge, empty, reversed, swapped, overlapping the previous or next segment of the space, nudged, shifted, a
  dense segment resized with its data; and ``log2c``, the chunk size), ``cuts`` (unsorted, duplicate, 0, 2^kb and beyond, negative, shifted, a cut
  dropped or added with or without its class entry, 31 and 32 cuts, cuts on a dtype without keys, other types,
  cleared), ``cls`` (present <-> nil swaps, k beyond log2c and of other types, corrupted, zero-sum, over-long and
  trailing-byte tables, one entry more or less than the cuts call for, malformed entries, all nil, entries swapped,
  one table for every class), ``seg_move`` (a segment moved to another bucket or position, to another space, in
  place of every segment of another space of the same width (so that it decodes against that space's base values),
  two segments' ranges swapped; as positive controls a dense segment split in two in its bucket or across the next
  bucket's start, which must be accepted exactly);
- ``base_drift`` (digest-carrying updates): the genuine update goes to a receiver whose base differs from the
  encoder's in one to three bits (the lowest, the top exponent bit or any), at elements the update changes (values
  hashes; the context of format 2 comes from base values) or anywhere: it must be refused with the drifted base
  unchanged, or (where dense data overwrites the drifted elements) applied exactly;
- ``other_layout`` (every case): the payload goes to a receiver of another layout (a tensor reshaped, renamed in
  place, retyped or dropped, an empty tensor or a tensor of a new dtype added). The genuine update (of either format)
  must be refused. For the receivers whose spaces hold the same elements in the same order, the update is also
  forged for them (layout digest, ``ntensors``, update id and, mostly, the state digest rewritten): it must then be
  refused or applied exactly as the new values in the receiver's layout ("accepted-relayout").

The outcome of each payload must be one of: a :class:`SparseSyncError` with the target bit-for-bit unchanged (and its
version, nothing pending, the staging arena bounded), or an accept whose result is bit-exact the encoder's new state
("accepted-exact"; "accepted-relabelled" when a re-chained header edit changed only the version the update claims, which
nothing but authentication could detect; "accepted-relayout" above). Anything else -- another exception, a crash, a
changed target after a refusal, an accepted state that differs, an accept by a receiver of another layout -- is a
failure, reported with the seed and payload index to reproduce it.

A forger who recomputes every checksum can always make a different valid update when the update carries no digest
(docs/FORMAT.md §5.1), so structure-aware mutations target digest-carrying updates; byte-level mutations and
``other_layout`` target all.

The reference kernels (pure PyTorch) decode a share of the payloads (``--reference-share``, small states of both
formats).

Results go to --out DIR (default: a scratch folder under /tmp): fuzz.json and fuzz.txt. The committed results are only
rewritten when asked: --out bench/results.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402
import torch  # noqa: E402

import sparsesync as ss  # noqa: E402
from sparsesync import kernels  # noqa: E402
from sparsesync.netbench import machine  # noqa: E402
from sparsesync.codec import Decoder, Encoder, full_update  # noqa: E402
from sparsesync.digest import layout_digest, state_digest  # noqa: E402
from sparsesync.dtypes import BY_NAME, name_of  # noqa: E402
from sparsesync.errors import SparseSyncError  # noqa: E402
from sparsesync.format import HEADER_SEED, MAGIC, PREAMBLE, _put_varint, update_uid  # noqa: E402
from sparsesync.reference import read_varint  # noqa: E402
from sparsesync.space import key_bits, spaces_of  # noqa: E402

SCRATCH = Path(tempfile.gettempdir()) / "sparsesync-fuzz"
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
WIDTH = {n: torch.empty(0, dtype=d).element_size() for n, d in BY_NAME.items()}

# segment field positions: format 1 (FORMAT.md §2) and format 2 (§6.2)
SEG = {1: {"name": 0, "dtype": 1, "shape": 2, "kind": 3, "start": 4, "end": 5, "log2c": 6, "tl": 7, "off": 8,
           "len": 9, "freq": 10, "vh": 11, "nch": 12, "n": 13},
       2: {"space": 0, "kind": 1, "start": 2, "end": 3, "log2c": 4, "tl": 5, "off": 6, "len": 7, "cuts": 8,
           "cls": 9, "vh": 10, "nch": 11, "n": 12}}

BYTE_KINDS = ["bitflip", "overwrite", "truncate", "pad", "splice", "foreign", "duplicate", "reorder", "drop"]
STRUCT_KINDS = ["header_field", "header_encoding", "early_count", "segment_field", "segment_list", "varint",
                "symbol_table", "chunk_table", "stream", "dense_data", "version_field", "layout_field",
                "mixed_format"]
V2_KINDS = ["space", "range", "cuts", "cls", "seg_move"]          # structure-aware, format 2 only
RECEIVER_KINDS = ["base_drift"]                                    # the genuine update, a receiver's base drifted
ANY_KINDS = ["other_layout"]                                       # every case, digest or not
# relative weights: structure-aware mutations reach the deep parsers, so they get most of the payloads
WEIGHTS = {"bitflip": 6, "overwrite": 3, "truncate": 3, "pad": 2, "splice": 3, "foreign": 2, "duplicate": 2,
           "reorder": 2, "drop": 2, "header_field": 10, "header_encoding": 5, "early_count": 3, "segment_field": 12,
           "segment_list": 5, "varint": 10, "symbol_table": 8, "chunk_table": 8, "stream": 6, "dense_data": 3,
           "version_field": 3, "layout_field": 3, "mixed_format": 4, "other_layout": 4, "base_drift": 4,
           "space": 5, "range": 9, "cuts": 9, "cls": 11, "seg_move": 5}


# ---------------------------------------------------------------------------------------------------------------------
# states and updates

def _ivw(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF_WIDTH[t.element_size()])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return _ivw(t).reshape(-1).view(torch.uint8).clone()


def _random(shape, dtype, g) -> torch.Tensor:
    w = torch.empty(0, dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    bits = torch.randint(-(1 << 62), 1 << 62, (n,), generator=g, dtype=torch.int64).to(INT_OF_WIDTH[w])
    return bits.view(dtype).reshape(shape).clone()


def _mutate(t: torch.Tensor, density: float, g, small: bool = True) -> torch.Tensor:
    out = t.clone()
    n = t.numel()
    if n == 0 or density <= 0:
        return out
    flat = out.reshape(-1)
    if t.dtype == torch.bool:
        mask = torch.rand(n, generator=g) < density
        flat[mask] = ~flat[mask]
        return out
    iv = _ivw(flat)
    mask = torch.rand(n, generator=g) < density
    k = int(mask.sum())
    if small:
        delta = torch.randint(1, 4, (k,), generator=g, dtype=torch.int64) * \
            (torch.randint(0, 2, (k,), generator=g, dtype=torch.int64) * 2 - 1)
    else:
        delta = torch.randint(1, 1 << 20, (k,), generator=g, dtype=torch.int64)
    iv[mask] = (iv[mask].to(torch.int64) + delta).to(iv.dtype)
    return out


def _weights(shape, dtype, g, scale: float = 0.02, mean: float = 0.0) -> torch.Tensor:
    """Weight-like values: normal (so exponents, the context of format 2, vary)."""
    n = 1
    for s in shape:
        n *= s
    return (mean + torch.randn(n, generator=g, dtype=torch.float64) * scale).to(torch.float32).to(dtype) \
        .reshape(shape)


def _step(t: torch.Tensor, sigma: float, g) -> torch.Tensor:
    """An AdamW-like step: every high-precision value moves by about ``sigma``; the stored copy changes where it
    crosses a rounding boundary, so small values (fine ulps) change more often than large ones."""
    moved = t.to(torch.float32).to(torch.float64) + sigma * torch.randn(t.shape, generator=g, dtype=torch.float64)
    return moved.to(torch.float32).to(t.dtype)


class Target:
    """A receiver: its base tensors, what an accepted update must leave in them, and its Decoder.

    ``forge``: for a receiver of another layout whose spaces hold the same elements as the case's, (layout digest,
    ntensors, state digest of the expected new state): what a forger rewrites to make the update apply here."""

    def __init__(self, name, state, new_bits, version0, tied=None, forge=None):
        self.name = name
        self.state0 = state
        self.old_bits = {k: _bits(v) for k, v in state.items()}
        self.new_bits = new_bits
        self.version0 = version0
        self.tied = tied or []
        self.forge = forge
        self.layout = layout_digest([(n, name_of(t.dtype), tuple(t.shape)) for n, t in state.items()])
        self.ntensors = len(state)
        self.tensors = None
        self.decoder = None

    def fresh(self):
        dst = {k: v.clone() for k, v in self.state0.items()}
        for a, b in self.tied:     # tied weights: two names, one storage
            dst[b] = dst[a]
        self.tensors = dst
        self.decoder = Decoder(dst, self.version0)

    def reset(self):
        """Put the target back to the base state (after an accept or a failure)."""
        for k, t in self.tensors.items():
            _ivw(t).reshape(-1).view(torch.uint8).copy_(self.old_bits[k])
        self.decoder.version = self.version0
        if self.decoder.pending:
            self.decoder.abort()

    def bits_equal(self, which) -> bool:
        want = which if isinstance(which, dict) else self.old_bits if which == "old" else self.new_bits
        return all(torch.equal(_ivw(t).reshape(-1).view(torch.uint8), want[k]) for k, t in self.tensors.items())


def _space_seq(state: dict, src: dict) -> dict:
    """dtype -> [(source tensor name, numel)] of the non-empty tensors in sorted name order (FORMAT.md §6.1)."""
    out: dict = {}
    for n in sorted(state, key=lambda x: x.encode()):
        t = state[n]
        if t.numel():
            out.setdefault(name_of(t.dtype), []).append((src.get(n), t.numel()))
    return out


def _alt_targets(old: dict, new: dict, new_bits: dict, version0: int, g) -> list[Target]:
    """Receivers of other layouts than ``old``'s (FORMAT.md §1.3, §6.1): a tensor reshaped, renamed without moving in
    its space, retyped, dropped; an empty tensor or one of a new dtype added."""
    names = sorted(old, key=lambda x: x.encode())
    variants = []        # (label, state, src: alt name -> case name or None)
    ident = {n: n for n in names}
    multi = [n for n in names if old[n].dim() > 1 and old[n].numel() > 1] or \
        [n for n in names if old[n].numel() > 1]
    n0 = max(multi, key=lambda n: old[n].numel())
    shape = (old[n0].numel(),) if old[n0].dim() != 1 else (1, old[n0].numel())
    variants.append((f"reshape {n0}", {k: (v.reshape(shape) if k == n0 else v) for k, v in old.items()}, ident))
    variants.append(("extra empty", dict(old, **{"zz.empty": torch.empty(0, dtype=torch.int8)}), ident))
    present = {name_of(t.dtype) for t in old.values()}
    newdt = next(d for d in ("uint8", "float8_e5m2", "int16", "float64") if d not in present)
    variants.append((f"extra {newdt}", dict(old, **{"zz.extra": _random((16,), BY_NAME[newdt], g)}), ident))
    by_dt: dict = {}
    for n in names:
        by_dt.setdefault(name_of(old[n].dtype), []).append(n)
    dt = max(by_dt, key=lambda d: (len(by_dt[d]), d))
    last = by_dt[dt][-1]                                     # the last of its space stays last when renamed n + "~"
    variants.append((f"rename {last}", {(k + "~" if k == last else k): v for k, v in old.items()},
                     {(k + "~" if k == last else k): k for k in names}))
    empty = [n for n in names if old[n].numel() == 0]
    if empty:
        variants.append((f"drop empty {empty[0]}", {k: v for k, v in old.items() if k != empty[0]}, ident))
    w2 = [n for n in names if old[n].element_size() == 2 and old[n].dtype != torch.float16 and old[n].numel()]
    if w2:
        variants.append((f"retype {w2[0]}", {k: (v.view(torch.float16) if k == w2[0] else v)
                                              for k, v in old.items()}, {}))
    big = max(names, key=lambda n: old[n].numel())
    variants.append((f"drop {big}", {k: v for k, v in old.items() if k != big}, {}))
    ref = _space_seq(old, ident)
    out = []
    for label, state, src in variants:
        alt_new = {}
        bits = {}
        for k, v in state.items():
            s = src.get(k)
            if s is not None and s in new and new[s].dtype == v.dtype and new[s].numel() == v.numel():
                alt_new[k] = new[s].reshape(v.shape).clone()
                bits[k] = new_bits[s]
            else:
                alt_new[k] = v
                bits[k] = _bits(v)
        seq = _space_seq(state, src)
        same = all(seq.get(d) == ref[d] for d in ref)     # a space of a new dtype is never addressed: it stays
        forge = None
        if same and src:
            forge = (layout_digest([(n, name_of(t.dtype), tuple(t.shape)) for n, t in state.items()]), len(state),
                     state_digest(alt_new))
        out.append(Target(label, {k: v.clone() for k, v in state.items()}, bits, version0, forge=forge))
    return out


class Case:
    """One base state, the genuine update (a second one of the same transition, the same one in the other format),
    the receiver it is made for and receivers of other layouts."""

    def __init__(self, name, fmt, old, new, upd, other, alt_fmt, version0, digest, g, tied=None):
        self.name = name
        self.format = fmt
        self.old = old
        self.new = new
        self.buckets = list(upd.buckets)
        self.other = list(other.buckets)
        self.alt_fmt = list(alt_fmt.buckets)
        self.version0 = version0
        self.version = upd.version
        self.digest = digest
        self.parts = [_split(b) for b in self.buckets]
        self.alt_parts = [_split(b) for b in self.alt_fmt]
        new_bits = {k: _bits(v) for k, v in new.items()}
        self.main = Target(name, old, new_bits, version0, tied=tied)
        self.alts = _alt_targets(old, new, new_bits, version0, g)
        self.space_n = {dn: sp.n for dn, sp in spaces_of(list(old.items())).items()}
        self.max_arena = max(len(self.buckets), len(self.other), len(self.alt_fmt))
        # elements the update changes, per tensor (for drifting the receiver's base where the update reads it)
        self.changed_pos = []
        for k, v in old.items():
            if v.numel():
                pos = (_ivw(v).reshape(-1) != _ivw(new[k]).reshape(-1)).nonzero().reshape(-1)
                if pos.numel():
                    self.changed_pos.append((k, pos))

    def targets(self):
        return [self.main] + self.alts


def _state(g, spec):
    return {name: _random(shape, dtype, g) for name, shape, dtype in spec}


def _encode(old, new, fmt, values, digest, context=None, full=False, bucket_bytes=4096):
    if full:
        return full_update(new, 3, bucket_bytes=bucket_bytes, digest=digest, stream=False, format=fmt)
    kw = {"context": context} if fmt == 2 else {}
    return Encoder(old, 0, values=values, bucket_bytes=bucket_bytes, digest=digest, format=fmt, **kw).encode(new, 1)


def build_cases(seed: int, formats=(1, 2)) -> tuple[list[Case], list[Case]]:
    """(cases for the native kernels, tiny cases for the reference kernels), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    galt = torch.Generator().manual_seed(seed + 7919)      # alternative receivers (keeps the states of ``g`` as before)
    big = [("a", (6000,), torch.bfloat16), ("b", (30, 40), torch.float32), ("c", (2000,), torch.int32),
           ("d", (), torch.float64), ("e", (6, 7), torch.bool), ("f", (5000,), torch.float8_e4m3fn),
           ("g", (0, 3), torch.int16)]
    dens = {"a": 0.02, "b": 1.0, "c": 0.2, "d": 1.0, "e": 0.0, "f": 0.05, "g": 0.0}
    tiny = [("a", (5000,), torch.bfloat16), ("b", (1200,), torch.float32), ("c", (300,), torch.int64)]
    tiny_dens = {"a": 0.01, "b": 1.0, "c": 0.05}

    # ---- format 1 (the states of the format-1 fuzzer)
    def delta_case(name, spec, dmap, values, digest, bucket_bytes=4096):
        old = _state(g, spec)
        new = {k: _random(tuple(v.shape), v.dtype, g) if dmap[k] >= 1 else _mutate(v, dmap[k], g)
               for k, v in old.items()}
        other_new = {k: _mutate(v, dmap[k] or 0.01, g) for k, v in old.items()}
        upd = _encode(old, new, 1, values, digest, bucket_bytes=bucket_bytes)
        other = _encode(old, other_new, 1, values, digest, bucket_bytes=bucket_bytes)
        alt = _encode(old, new, 2, values, digest, bucket_bytes=bucket_bytes)
        return Case(name, 1, old, new, upd, other, alt, 0, digest, galt)

    def full_case(name, spec, dmap, digest, fmt=1):
        old = _state(g, spec)
        new = {k: _mutate(v, dmap[k] or 0.01, g) for k, v in old.items()}
        upd = _encode(old, new, fmt, None, digest, full=True)
        other = _encode(old, {k: _mutate(v, 0.5, g) for k, v in old.items()}, fmt, None, digest, full=True)
        alt = _encode(old, new, 3 - fmt, None, digest, full=True)
        return Case(name, fmt, old, new, upd, other, alt, 1, digest, galt)

    def tied_case():
        w = _random((4000,), torch.bfloat16, g)
        old = {"emb": w, "head": w.clone(), "x": _random((3000,), torch.float16, g)}
        nw = _mutate(w, 0.03, g)
        new = {"emb": nw, "head": nw.clone(), "x": _mutate(old["x"], 0.9, g, small=False)}
        upd = _encode(old, new, 1, "delta", True)
        nw2 = _mutate(w, 0.03, g)
        other = _encode(old, {"emb": nw2, "head": nw2.clone(), "x": old["x"]}, 1, "delta", True)
        alt = _encode(old, new, 2, "delta", True)
        return Case("tied-delta-digest", 1, old, new, upd, other, alt, 0, True, galt, tied=[("emb", "head")])

    native = [delta_case("delta-digest", big, dens, "delta", True),
              delta_case("raw-digest", big, dens, "raw", True),
              full_case("full-digest", big, dens, True),
              tied_case(),
              delta_case("delta-nodigest", big, dens, "delta", False),
              delta_case("raw-nodigest", big, dens, "raw", False),
              full_case("full-nodigest", big, dens, False)]
    reference = [delta_case("tiny-delta-digest", tiny, tiny_dens, "delta", True, 4096),
                 delta_case("tiny-raw-digest", tiny, tiny_dens, "raw", True, 4096),
                 delta_case("tiny-delta-nodigest", tiny, tiny_dens, "delta", False, 4096)]

    # ---- format 2: weight-like states, many small tensors (segments span tensors), ints and bools
    def state2(g2, small: int, tiny_state: bool = False):
        """(old, step): the base state and a function making a new state from it."""
        spec = []          # (name, tensor, how it changes)
        if tiny_state:
            spec += [("a", _weights((5000,), torch.bfloat16, g2), ("step", 1e-5)),
                     ("b", _weights((1200,), torch.float32, g2), ("step", 5e-10)),
                     ("b.dense", _random((1100,), torch.float32, g2), ("rand", 1.0)),
                     ("c", _random((300,), torch.int64, g2), ("mut", 0.05)),
                     ("h", _weights((800,), torch.float16, g2), ("step", 3e-6))]
        else:
            spec += [("emb.w", _weights((60, 100), torch.bfloat16, g2), ("step", 1e-5)),
                     ("head.w", _weights((30, 40), torch.float32, g2), ("step", 5e-10)),
                     ("proj.w", _random((1200,), torch.float32, g2), ("rand", 1.0)),
                     ("h16", _weights((3000,), torch.float16, g2), ("step", 3e-6)),
                     ("c", _random((2000,), torch.int32, g2), ("mut", 0.2)),
                     ("d", _random((), torch.float64, g2), ("rand", 1.0)),
                     ("e", _random((6, 7), torch.bool, g2), ("mut", 0.1)),
                     ("f", _weights((5000,), torch.float8_e4m3fn, g2, scale=0.5), ("step", 0.005)),
                     ("g", torch.empty(0, 3, dtype=torch.int16), ("mut", 0.0)),
                     ("i8", _random((700,), torch.int8, g2), ("mut", 0.05))]
            spec += [(f"layers.{i:02d}.n", _weights((64,), torch.float32, g2, mean=1.0), ("step", 2e-8))
                     for i in range(6)]
            # rewritten completely: a dense run between the sparse ones of the bfloat16 space
            spec += [("layers.20.x", _weights((8192,), torch.bfloat16, g2), ("rand", 1.0))]
        sizes = torch.randint(40, 400, (small,), generator=g2).tolist()
        spec += [(f"layers.{i:02d}.w", _weights((n,), torch.bfloat16, g2), ("step", 1e-5))
                 for i, n in enumerate(sizes)]
        old = {n: t for n, t, _ in spec}
        how = {n: h for n, _, h in spec}

        def step(scale=1.0):
            out = {}
            for n, t in old.items():
                kind, x = how[n]
                if kind == "step":
                    out[n] = _step(t, x * scale, g2)
                elif kind == "rand":
                    out[n] = _random(tuple(t.shape), t.dtype, g2)
                else:
                    out[n] = _mutate(t, min(1.0, x * scale), g2)
            return out
        return old, step

    def case2(name, values, digest, context, full=False, tiny_state=False):
        old, step = state2(g, 6 if tiny_state else 40, tiny_state)
        new = step()
        if full:
            upd = _encode(old, new, 2, None, digest, full=True)
            other = _encode(old, step(3.0), 2, None, digest, full=True)
            alt = _encode(old, new, 1, None, digest, full=True)
            return Case(name, 2, old, new, upd, other, alt, 1, digest, galt)
        upd = _encode(old, new, 2, values, digest, context)
        other = _encode(old, step(), 2, values, digest, context)
        alt = _encode(old, new, 1, values, digest)
        return Case(name, 2, old, new, upd, other, alt, 0, digest, galt)

    def tied_case2():
        w = _weights((4000,), torch.bfloat16, g)
        old = {"emb": w, "head": w.clone(), "x": _weights((3000,), torch.float16, g),
               **{f"l{i}.w": _weights((300,), torch.bfloat16, g) for i in range(8)}}
        nw = _step(w, 1e-5, g)
        new = {k: _step(v, 1e-5, g) for k, v in old.items()}
        new.update(emb=nw, head=nw.clone(), x=_mutate(old["x"], 0.9, g, small=False))    # x goes dense
        upd = _encode(old, new, 2, "delta", True, True)
        nw2 = _step(w, 1e-5, g)
        other = _encode(old, dict(new, emb=nw2, head=nw2.clone()), 2, "delta", True, True)
        alt = _encode(old, new, 1, "delta", True)
        return Case("v2-tied-delta-digest-ctx", 2, old, new, upd, other, alt, 0, True, galt,
                    tied=[("emb", "head")])

    native += [case2("v2-delta-digest-ctx", "delta", True, True),
               case2("v2-raw-digest-ctx", "raw", True, True),
               case2("v2-delta-digest-auto", "delta", True, None),
               case2("v2-raw-digest-auto", "raw", True, None),
               case2("v2-delta-digest-o0", "delta", True, False),
               case2("v2-full-digest", None, True, None, full=True),
               tied_case2(),
               case2("v2-delta-nodigest-ctx", "delta", False, True),
               case2("v2-raw-nodigest-auto", "raw", False, None),
               case2("v2-full-nodigest", None, False, None, full=True)]
    reference += [case2("tiny2-delta-digest-ctx", "delta", True, True, tiny_state=True),
                  case2("tiny2-raw-digest-auto", "raw", True, None, tiny_state=True),
                  case2("tiny2-delta-nodigest-o0", "delta", False, False, tiny_state=True)]
    for c in native + reference:
        assert len(c.buckets) >= 2, (c.name, len(c.buckets))
    native = [c for c in native if c.format in formats]
    reference = [c for c in reference if c.format in formats]
    return native, reference


# ---------------------------------------------------------------------------------------------------------------------
# framing helpers (docs/FORMAT.md §2): split a bucket, re-pack one, re-chain a whole update

def _split(bucket: bytes):
    _, hlen, _ = PREAMBLE.unpack_from(bucket, 0)
    return msgpack.unpackb(bucket[PREAMBLE.size:PREAMBLE.size + hlen], raw=False), \
        bytes(bucket[PREAMBLE.size + hlen:])


def _pack_raw(hbytes: bytes, body: bytes) -> bytes:
    return PREAMBLE.pack(MAGIC, len(hbytes), kernels.impl().h64(hbytes, HEADER_SEED)) + hbytes + body


def _pack(m, body: bytes, body_changed: bool) -> bytes:
    if body_changed and isinstance(m, dict) and "body_hash" in m:
        m = dict(m, body_hash=kernels.impl().tree64(body))
    return _pack_raw(msgpack.packb(m, use_bin_type=True), body)


def _chain(parts, changed: set, fix_uid: bool, raw_header: dict | None = None) -> list[bytes]:
    """Re-pack (map, body) parts: body hashes of ``changed`` indices, every chain link and (``fix_uid``) the uid."""
    if fix_uid:
        try:
            m0 = parts[0][0]
            uid = update_uid(m0["layout"], m0["base"], m0["ver"], m0["vals"])
            parts = [(dict(m, uid=uid) if isinstance(m, dict) else m, b) for m, b in parts]
        except Exception:       # the edit broke what the uid is made of: leave it
            pass
    out, prev = [], 0
    for i, (m, body) in enumerate(parts):
        if raw_header is not None and i in raw_header:
            bucket = _pack_raw(raw_header[i](m if not isinstance(m, dict) else dict(m, prev=prev)), body)
        else:
            if isinstance(m, dict) and "prev" in m:
                m = dict(m, prev=prev)
            bucket = _pack(m, body, i in changed)
        prev = PREAMBLE.unpack_from(bucket, 0)[2]
        out.append(bucket)
    return out


def _deep(x):
    """Copy of nested lists (segments, cuts, class entries); other values are immutable."""
    return [_deep(y) for y in x] if isinstance(x, list) else x


def _copy_parts(case: Case, alt: bool = False):
    return [({k: (_deep(v) if k == "segs" else v) for k, v in m.items()}, b)
            for m, b in (case.alt_parts if alt else case.parts)]


# ---------------------------------------------------------------------------------------------------------------------
# value pools

_INTS = [0, 1, 2, -1, -2, 7, 127, 128, 255, 256, 4095, 4096, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32,
         2 ** 40, 2 ** 40 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -2 ** 63]


def _any_value(rng: random.Random, cur=None):
    r = rng.random()
    if isinstance(cur, int) and not isinstance(cur, bool) and r < 0.45:
        return cur + rng.choice([-4096, -2, -1, 1, 2, 3, 4096, 1 << 20, cur if cur else 1, -cur - 1])
    pool = [None, True, False, 0.0, 1.0, 1.5, "", "x", "delta", "raw", "d", "s", b"", b"\x00" * 16,
            bytes(rng.randrange(256) for _ in range(16)), [], [0], [1, 2], {}, {"a": 1}, "0" * 64]
    if r < 0.75:
        return rng.choice(_INTS)
    return rng.choice(pool)


# ---------------------------------------------------------------------------------------------------------------------
# a non-canonical msgpack writer (same values, other encodings)

def _nc_pack(obj, rng: random.Random, p: float) -> bytes:
    def wide(x: bool) -> bool:
        return x and rng.random() < p
    if obj is None:
        return b"\xc0"
    if obj is True:
        return b"\xc3"
    if obj is False:
        return b"\xc2"
    if isinstance(obj, int):
        if obj >= 0:
            fmts = [(b"", 0x7F), (b"\xcc", 0xFF), (b"\xcd", 0xFFFF), (b"\xce", 0xFFFFFFFF), (b"\xcf", 2 ** 64 - 1)]
            if obj < 2 ** 63:
                fmts += [(b"\xd0", 0x7F), (b"\xd1", 0x7FFF), (b"\xd2", 0x7FFFFFFF), (b"\xd3", 2 ** 63 - 1)]
            ok = [f for f in fmts if obj <= f[1]]
            tag, _ = ok[0] if not wide(True) else rng.choice(ok)
            if tag == b"":
                return bytes([obj])
            size = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}[tag[0]]
            return tag + obj.to_bytes(size, "big", signed=tag[0] >= 0xD0)
        return msgpack.packb(obj)
    if isinstance(obj, float):
        return struct.pack(">Bf", 0xCA, obj) if wide(True) else msgpack.packb(obj)
    if isinstance(obj, str):
        raw = obj.encode()
        n = len(raw)
        opts = ([bytes([0xA0 | n])] if n < 32 else []) + ([b"\xd9" + bytes([n])] if n < 256 else []) + \
            ([b"\xda" + n.to_bytes(2, "big")] if n < 65536 else []) + [b"\xdb" + n.to_bytes(4, "big")]
        return (opts[0] if not wide(True) else rng.choice(opts)) + raw
    if isinstance(obj, bytes):
        n = len(obj)
        opts = ([b"\xc4" + bytes([n])] if n < 256 else []) + ([b"\xc5" + n.to_bytes(2, "big")] if n < 65536 else []) \
            + [b"\xc6" + n.to_bytes(4, "big")]
        return (opts[0] if not wide(True) else rng.choice(opts)) + obj
    if isinstance(obj, (list, tuple)):
        n = len(obj)
        opts = ([bytes([0x90 | n])] if n < 16 else []) + ([b"\xdc" + n.to_bytes(2, "big")] if n < 65536 else []) + \
            [b"\xdd" + n.to_bytes(4, "big")]
        return (opts[0] if not wide(True) else rng.choice(opts)) + b"".join(_nc_pack(x, rng, p) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        opts = ([bytes([0x80 | n])] if n < 16 else []) + ([b"\xde" + n.to_bytes(2, "big")] if n < 65536 else []) + \
            [b"\xdf" + n.to_bytes(4, "big")]
        return (opts[0] if not wide(True) else rng.choice(opts)) + \
            b"".join(_nc_pack(k, rng, p) + _nc_pack(v, rng, p) for k, v in obj.items())
    return msgpack.packb(obj, use_bin_type=True)


# ---------------------------------------------------------------------------------------------------------------------
# sparse segment internals (FORMAT.md §4, §6.4)

def _varint(v: int) -> bytes:
    out = bytearray()
    _put_varint(out, v)           # the format's own (canonical) writer
    return bytes(out)


def _fmt(m) -> int:
    return 2 if isinstance(m, dict) and m.get("v") == 2 else 1


def _nchunks(s, fmt: int) -> int:
    F = SEG[fmt]
    start, end, log2c = s[F["start"]], s[F["end"]], s[F["log2c"]]
    if fmt == 1:
        return -(-end >> log2c) - (start >> log2c)
    return -(-(end - start) >> log2c)


def _table_fields(seg_bytes: bytes, table_len: int, nchunks: int, with_k: bool = True):
    """[(kind, offset, length, value)] of a chunk table: kind 'n', 'k' (format 1 only), 'rl', 'bl'. Stops at the
    first problem."""
    fields, pos = [], 0
    try:
        for _ in range(nchunks):
            n, p2 = read_varint(seg_bytes, pos, table_len)
            fields.append(("n", pos, p2 - pos, n))
            pos = p2
            if n == 0:
                continue
            if with_k:
                fields.append(("k", pos, 1, seg_bytes[pos]))
                pos += 1
            for kind in ("rl", "bl"):
                v, p2 = read_varint(seg_bytes, pos, table_len)
                fields.append((kind, pos, p2 - pos, v))
                pos = p2
    except Exception:
        pass
    return fields


def _segments(parts, kind=None, fmt=None):
    """(bucket, segment) indices of every segment (of ``kind`` "s"/"d"), taking each bucket's format from its map."""
    out = []
    for i, (m, _) in enumerate(parts):
        f = fmt or _fmt(m)
        K = SEG[f]["kind"]
        out += [(i, j) for j, s in enumerate(m["segs"]) if kind is None or s[K] == kind]
    return out


def _sparse_segments(parts, fmt=None):
    return _segments(parts, "s", fmt)


def _dense_segments(parts, fmt=None):
    return _segments(parts, "d", fmt)


def _replace_segment_bytes(parts, i, j, new_bytes: bytes, table_len: int | None = None):
    """Replace segment j's data in bucket i; later offsets, the segment's len (and table_len) and body_len follow."""
    m, body = parts[i]
    F = SEG[_fmt(m)]
    segs = m["segs"]
    s = segs[j]
    off, ln = s[F["off"]], s[F["len"]]
    grow = len(new_bytes) - ln
    body = body[:off] + new_bytes + body[off + ln:]
    s[F["len"]] = len(new_bytes)
    if table_len is not None:
        s[F["tl"]] = table_len
    for later in segs[j + 1:]:
        later[F["off"]] += grow
    m["body_len"] = len(body)
    parts[i] = (m, body)


def _seg_items(parts, i):
    """[[segment, data], ...] of bucket i (segments are the parts' own lists)."""
    m, body = parts[i]
    F = SEG[_fmt(m)]
    return [[s, body[s[F["off"]]:s[F["off"]] + s[F["len"]]]] for s in m["segs"]]


def _relay(parts, i, items, fmt=None):
    """Rebuild bucket i from [[segment, data], ...]: offsets in order, body, body_len (each segment's own format)."""
    m, _ = parts[i]
    body, off, segs = bytearray(), 0, []
    for s, data in items:
        F = SEG[fmt or (1 if len(s) == 13 else 2)]
        s[F["off"]] = off
        off += len(data)
        body += data
        segs.append(s)
    parts[i] = (dict(m, segs=segs, body_len=len(body)), bytes(body))


def _freq_entries(f: bytes):
    count, pos = read_varint(f, 0, len(f))
    entries = []
    for _ in range(count):
        sym, pos = read_varint(f, pos, len(f))
        fr, pos = read_varint(f, pos, len(f))
        entries.append([sym, fr])
    return count, entries


def _mutate_freq(f: bytes, rng: random.Random) -> bytes | None:
    """A corrupted (or re-balanced) value-symbol table (FORMAT.md §4.3); None if ``f`` does not parse."""
    try:
        count, entries = _freq_entries(f)
    except Exception:
        return None
    op = rng.choice(["sym", "freq", "move_mass", "drop", "add", "noncanonical", "truncate", "append", "count", "swap"])
    lead = None
    if op == "sym" and entries:
        e = rng.choice(entries)
        e[0] = max(0, e[0] + rng.choice([-1, 1, 2, 100, 200]))
    elif op == "freq" and entries:
        e = rng.choice(entries)
        e[1] = max(0, e[1] + rng.choice([-1, 1, 4096, -4096]))
    elif op == "move_mass" and len(entries) > 1:
        a, b = rng.sample(range(len(entries)), 2)
        k = rng.randint(1, max(1, entries[a][1] - 1))
        entries[a][1] -= k
        entries[b][1] += k
    elif op == "drop" and entries:
        entries.pop(rng.randrange(len(entries)))
    elif op == "add":
        entries.append([rng.randrange(300), rng.randint(0, 5)])
        entries.sort()
    elif op == "swap" and len(entries) > 1:
        a, b = rng.sample(range(len(entries)), 2)
        entries[a], entries[b] = entries[b], entries[a]
    elif op == "count":
        lead = _varint(max(0, count + rng.choice([-1, 1])))
    raw = (lead or _varint(len(entries))) + b"".join(_varint(a) + _varint(b) for a, b in entries)
    if op == "noncanonical":
        raw = bytes([raw[0] | 0x80, 0x00]) + raw[1:] if raw[0] < 0x80 else raw + b"\x00"
    elif op == "truncate":
        raw = raw[:rng.randrange(len(raw))]
    elif op == "append":
        raw = raw + bytes([rng.randrange(256)])
    return raw


def _odd_table(rng: random.Random, max_sym: int) -> bytes:
    """A value-symbol table that is empty, sums to other than 4096, is over-long, or is valid but different."""
    op = rng.choice(["empty", "nothing", "zero_f", "sum_low", "sum_high", "257", "all_256", "one_beyond", "one",
                     "two"])
    if op == "empty":
        return b"\x00"
    if op == "nothing":
        return b""
    if op == "zero_f":
        return _varint(2) + _varint(0) + _varint(0) + _varint(1) + _varint(4096)
    if op == "sum_low":
        return _varint(2) + _varint(0) + _varint(2048) + _varint(1) + _varint(2047)
    if op == "sum_high":
        return _varint(2) + _varint(0) + _varint(2048) + _varint(1) + _varint(2049)
    if op == "257":
        return _varint(257) + b"".join(_varint(s) + _varint(16) for s in range(256)) + _varint(256) + _varint(1)
    if op == "all_256":          # valid in raw mode of width > 1 (every symbol), too many symbols in delta mode
        return _varint(256) + b"".join(_varint(s) + _varint(16) for s in range(256))
    if op == "one_beyond":
        return _varint(1) + _varint(max_sym + 1) + _varint(4096)
    if op == "one":              # valid: one symbol takes all the mass
        return _varint(1) + _varint(rng.randrange(max_sym + 1)) + _varint(4096)
    a = rng.randrange(max_sym)
    return _varint(2) + _varint(a) + _varint(2048) + _varint(rng.randrange(a + 1, max_sym + 1)) + _varint(2048)


def _max_sym(space: str, vals: str) -> int:
    w = WIDTH.get(space, 2)
    return 16 + 8 * w - 4 if vals == "delta" else 255


def _space_order(parts, space: str):
    """(bucket, segment) indices of the format-2 segments of ``space`` in update order."""
    return [(i, j) for i, (m, _) in enumerate(parts) for j, s in enumerate(m["segs"]) if s[0] == space]


_OP: dict = {"op": None}      # the operation the last mutation chose (for the per-operation counts)


def _pick(rng: random.Random, ops: list) -> str:
    op = rng.choice(ops)
    _OP["op"] = op
    return op


# ---------------------------------------------------------------------------------------------------------------------
# mutations: each returns (payload, note) where payload is a list of buckets and note is False, True (a re-chained
# header edit changed only the version the update claims) or ("alt", index, forged) (send to case.alts[index])

def mutate(case: Case, kind: str, rng: random.Random):
    _OP["op"] = None
    bs = case.buckets
    nb = len(bs)
    i = rng.randrange(nb)
    relabel = False
    fmt = case.format
    F = SEG[fmt]
    if kind == "bitflip":
        b = bytearray(bs[i])
        for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
            pos = rng.randrange(min(len(b), 64)) if rng.random() < 0.3 else rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        return bs[:i] + [bytes(b)] + bs[i + 1:], relabel
    if kind == "overwrite":
        b = bytearray(bs[i])
        pos = rng.randrange(len(b))
        run = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        b[pos:pos + len(run)] = run[:len(b) - pos]
        return bs[:i] + [bytes(b)] + bs[i + 1:], relabel
    if kind == "truncate":
        cut = rng.randrange(len(bs[i])) if rng.random() < 0.7 else rng.randrange(min(40, len(bs[i])))
        return bs[:i] + [bs[i][:cut]] + bs[i + 1:], relabel
    if kind == "pad":
        extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 7, 64])))
        return bs[:i] + [bs[i] + extra] + bs[i + 1:], relabel
    if kind == "splice":
        r = rng.random()
        src = bs if r < 0.45 else case.other if r < 0.8 else case.alt_fmt
        j = rng.randrange(len(src))
        a, b = rng.randrange(len(bs[i]) + 1), rng.randrange(len(src[j]) + 1)
        return bs[:i] + [bs[i][:a] + src[j][b:]] + bs[i + 1:], relabel
    if kind == "foreign":
        src = case.other if rng.random() < 0.7 else case.alt_fmt
        j = min(i, len(src) - 1) if rng.random() < 0.7 else rng.randrange(len(src))
        return bs[:i] + [src[j]] + bs[i + 1:], relabel
    if kind == "duplicate":
        j = rng.randrange(nb + 1)
        return bs[:j] + [bs[i]] + bs[j:], relabel
    if kind == "reorder":
        out = list(bs)
        if rng.random() < 0.5:
            j = rng.randrange(nb)
            out[i], out[j] = out[j], out[i]
        else:
            rng.shuffle(out)
        return out, relabel
    if kind == "drop":
        if rng.random() < 0.2:
            return bs[:i], relabel
        return bs[:i] + bs[i + 1:], relabel
    if kind == "base_drift":
        # the genuine update to a receiver whose base differs in a few bits: at elements the update changes (values
        # hashes, and the context of format 2), or anywhere (a digest-carrying update is refused unless a dense
        # range overwrites them)
        drift = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            if case.changed_pos and rng.random() < 0.6:
                name, pos = case.changed_pos[rng.randrange(len(case.changed_pos))]
                idx = int(pos[rng.randrange(pos.numel())])
                where = "changed"
            else:
                names = [k for k, v in case.old.items() if v.numel()]
                name = rng.choices(names, weights=[case.old[k].numel() for k in names])[0]
                idx = rng.randrange(case.old[name].numel())
                where = "anywhere"
            w = case.old[name].element_size()
            r = rng.random()
            bit = 0 if r < 0.3 else 8 * w - 2 if r < 0.6 else rng.randrange(8 * w)   # lsb, exponent top, any
            drift.append((name, idx, bit))
        _OP["op"] = where
        return list(bs), ("drift", drift)
    if kind == "other_layout":
        a = rng.randrange(len(case.alts))
        alt = case.alts[a]
        if alt.forge is None or rng.random() < 0.4:      # the genuine update, of either format
            _OP["op"] = f"genuine ({alt.name.split()[0]})"
            return list(bs if rng.random() < 0.7 else case.alt_fmt), ("alt", a, False)
        _OP["op"] = f"forged ({alt.name.split()[0]})"
        lay, nt, dg = alt.forge
        parts = _copy_parts(case, alt=rng.random() < 0.3)
        keep_count = rng.random() < 0.1
        fix_digest = rng.random() < 0.8
        for t, (m, body) in enumerate(parts):
            m["layout"] = lay
            if not keep_count:
                m["ntensors"] = nt
            if m["digest"] is not None and fix_digest:
                m["digest"] = dg
        return _chain(parts, set(), True), ("alt", a, True)
    # structure-aware: edit (map, body) parts, then re-chain
    parts = _copy_parts(case)
    changed: set[int] = set()
    fix_uid = rng.random() < 0.5
    if kind == "header_field":
        keys = list(parts[0][0])
        key = rng.choice(keys + ["ver", "ver", "base", "cnt", "idx", "dig", "digest", "ntensors"])
        targets = range(nb) if rng.random() < 0.5 else [i]
        value = _any_value(rng, parts[i][0].get(key))
        for t in targets:
            m, body = parts[t]
            if rng.random() < 0.1:
                m = {k: v for k, v in m.items() if k != key}                     # drop the key
            elif rng.random() < 0.05:
                m = dict(m, **{rng.choice(["x", "v2", "Ver", "digests"]): value})  # unknown key
            else:
                m = dict(m, **{key: value})
            parts[t] = (m, body)
        relabel = key == "ver"
        return _chain(parts, changed, fix_uid), relabel
    if kind == "header_encoding":
        p = rng.choice([0.05, 0.2, 1.0])
        which = {i} if rng.random() < 0.7 else set(range(nb))
        return _chain(parts, changed, False, raw_header={t: (lambda m: _nc_pack(m, rng, p)) for t in which}), relabel
    if kind == "early_count":
        if nb < 2:
            return list(bs), relabel
        k = rng.randrange(nb - 1)
        m, body = parts[k]
        parts[k] = (dict(m, cnt=k + 1, **({"digest": rng.choice([None, "0" * 64])} if rng.random() < 0.3 else {})),
                    body)
        return _chain(parts, changed, False)[:k + 1], relabel
    if kind == "version_field":
        value = rng.choice([3 - fmt, 3 - fmt, 3 - fmt, 0, 3, 4, 127, 128, 255, 2 ** 32, 2 ** 63 - 1, -1, True, False,
                            None, float(fmt), float(3 - fmt), str(fmt), "2", bytes([fmt]), [fmt]])
        r = rng.random()
        targets = range(nb) if r < 0.5 else range(1, nb) if r < 0.6 else [i]
        for t in targets:
            parts[t] = (dict(parts[t][0], v=value), parts[t][1])
        return _chain(parts, changed, fix_uid), relabel
    if kind == "layout_field":
        cur = parts[0][0]["layout"]
        op = _pick(rng, ["random", "alt", "alt", "bitflip", "short", "long", "type", "ntensors", "alt_both"])
        alt = rng.choice(case.alts)
        upd = {}
        if op == "random":
            upd["layout"] = bytes(rng.randrange(256) for _ in range(16))
        elif op == "alt":
            upd["layout"] = alt.layout
        elif op == "bitflip":
            b = bytearray(cur)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            upd["layout"] = bytes(b)
        elif op == "short":
            upd["layout"] = cur[:rng.choice([0, 8, 15])]
        elif op == "long":
            upd["layout"] = cur + bytes(rng.choice([1, 16]))
        elif op == "type":
            upd["layout"] = rng.choice([cur.hex(), None, 0, list(cur[:4]), cur.decode("latin-1")])
        elif op == "ntensors":
            n0 = parts[0][0]["ntensors"]
            upd["ntensors"] = rng.choice([n0 + 1, n0 - 1, 0, alt.ntensors, 2 ** 32, n0 + 2 ** 40])
        else:
            upd.update(layout=alt.layout, ntensors=alt.ntensors)
        targets = range(nb) if rng.random() < 0.7 else [i]
        for t in targets:
            parts[t] = (dict(parts[t][0], **upd), parts[t][1])
        return _chain(parts, changed, rng.random() < 0.7), relabel
    if kind == "mixed_format":
        alt = _copy_parts(case, alt=True)
        op = _pick(rng, ["whole", "bucket", "bucket", "prefix", "v_all", "seg_splice", "seg_splice"])
        if op == "whole":       # the same update in the other format: a valid update, accepted exactly
            return list(case.alt_fmt), relabel
        if op == "bucket":
            j = rng.randrange(len(alt))
            m0 = parts[i][0]
            parts[i] = (dict(alt[j][0], idx=m0["idx"], cnt=m0["cnt"], digest=m0["digest"]), alt[j][1])
            return _chain(parts, changed, False), relabel
        if op == "prefix":
            k = rng.randrange(1, nb)
            if k >= len(alt):
                return list(bs), relabel
            return _chain(parts[:k] + alt[k:], changed, False), relabel
        if op == "v_all":
            for t in range(nb):
                parts[t] = (dict(parts[t][0], v=3 - fmt), parts[t][1])
            return _chain(parts, changed, fix_uid), relabel
        srcs = _segments(alt)
        if not srcs:
            return list(bs), relabel
        a, b = rng.choice(srcs)
        item = _seg_items(alt, a)[b]
        items = _seg_items(parts, i)
        items.insert(rng.randrange(len(items) + 1), item)
        _relay(parts, i, items)
        changed.add(i)
        return _chain(parts, changed, fix_uid), relabel
    if kind == "segment_field":
        m, body = parts[i]
        if not m["segs"]:
            return _chain(parts, changed, fix_uid), relabel
        j = rng.randrange(len(m["segs"]))
        f = rng.randrange(F["n"])
        s = m["segs"][j]
        if rng.random() < 0.9:
            s[f] = _any_value(rng, s[f])
        elif fmt == 1:
            s[f] = rng.choice([list(s[2])[::-1], [x + 1 for x in s[2]] if isinstance(s[2], list) else [1], "d", "s",
                               "bfloat16"])
        else:
            s[f] = rng.choice(list(case.space_n) + ["d", "s", [], [1], [None], [[0, b"\x01\x00\xa0\x20"]], [[0]],
                                                    [1, 2, 3]])
        return _chain(parts, changed, fix_uid), relabel
    if kind == "segment_list":
        m, body = parts[i]
        segs = m["segs"]
        op = _pick(rng, ["drop", "dup", "swap", "move", "reverse", "empty"])
        if op == "move" and nb > 1 and segs:
            j = rng.randrange(len(segs))
            k = rng.choice([x for x in range(nb) if x != i])
            items = _seg_items(parts, i)
            item = items.pop(j)
            _relay(parts, i, items)
            _relay(parts, k, _seg_items(parts, k) + [item])
            changed |= {i, k}
            return _chain(parts, changed, fix_uid), relabel
        if op == "empty":
            parts[i] = (dict(m, segs=[], body_len=0), b"")
            changed.add(i)
            return _chain(parts, changed, fix_uid), relabel
        if not segs:
            return _chain(parts, changed, fix_uid), relabel
        order = list(range(len(segs)))
        if op == "drop":
            order.pop(rng.randrange(len(order)))
        elif op == "dup":
            j = rng.randrange(len(order))
            order.insert(rng.randrange(len(order) + 1), j)
        elif op == "swap" and len(order) > 1:
            a, b = rng.sample(range(len(order)), 2)
            order[a], order[b] = order[b], order[a]
        else:
            order.reverse()
        items = _seg_items(parts, i)
        _relay(parts, i, [[list(items[j][0]), items[j][1]] for j in order])
        changed.add(i)
        return _chain(parts, changed, fix_uid), relabel
    if kind in ("varint", "symbol_table", "chunk_table", "stream"):
        sp = _sparse_segments(parts, fmt)
        if not sp:
            return list(bs), relabel
        i, j = rng.choice(sp)
        m, body = parts[i]
        s = m["segs"][j]
        seg_bytes = body[s[F["off"]]:s[F["off"]] + s[F["len"]]]
        tl = s[F["tl"]]
        nchunks = _nchunks(s, fmt)
        if kind == "symbol_table":
            if fmt == 1:
                raw = _mutate_freq(s[10], rng)
                if raw is None:
                    return list(bs), relabel
                s[10] = raw
            else:
                present = [e for e in s[9] if e is not None]
                if not present:
                    return list(bs), relabel
                e = rng.choice(present)
                raw = _mutate_freq(e[1], rng)
                if raw is None:
                    return list(bs), relabel
                e[1] = raw
            return _chain(parts, changed, fix_uid), relabel
        fields = _table_fields(seg_bytes, tl, nchunks, with_k=fmt == 1)
        if kind == "stream":
            if len(seg_bytes) <= tl:
                return list(bs), relabel
            b = bytearray(seg_bytes)
            for _ in range(rng.choice([1, 1, 2, 4])):
                pos = rng.randrange(tl, len(b))
                b[pos] ^= 1 << rng.randrange(8)
            _replace_segment_bytes(parts, i, j, bytes(b))
            changed.add(i)
            return _chain(parts, changed, fix_uid), relabel
        if kind == "varint":
            vfields = [x for x in fields if x[0] != "k"]
            if not vfields:
                return list(bs), relabel
            _, off, ln, v = rng.choice(vfields)
            op = _pick(rng, ["inc", "dec", "zero", "double", "huge", "noncanonical", "truncate", "overlong",
                             "continue", "max"])
            if op == "inc":
                enc = _varint(v + 1)
            elif op == "dec":
                enc = _varint(max(0, v - 1))
            elif op == "zero":
                enc = b"\x00"
            elif op == "double":
                enc = _varint(2 * v + 1)
            elif op == "huge":
                enc = _varint(rng.choice([2 ** 31, 2 ** 40, 2 ** 62, 2 ** 63 - 1]))
            elif op == "noncanonical":
                e = bytearray(_varint(v))
                e[-1] |= 0x80
                enc = bytes(e) + b"\x00" * rng.choice([1, 1, 2])
            elif op == "truncate":
                enc = _varint(v)[:-1]
            elif op == "overlong":
                enc = b"\xff" * 10 + b"\x01"
            elif op == "continue":
                e = bytearray(_varint(v))
                e[-1] |= 0x80
                enc = bytes(e)
            else:
                enc = b"\xff" * 8 + b"\x7f"
            table = seg_bytes[:off] + enc + seg_bytes[off + ln:tl]
            fix_len = rng.random() < 0.8
            _replace_segment_bytes(parts, i, j, table + seg_bytes[tl:], len(table) if fix_len else None)
            changed.add(i)
            return _chain(parts, changed, fix_uid), relabel
        # chunk_table: Rice parameter (format 1), lengths moved between streams, chunk entries swapped/emptied
        ops = ["k", "k", "move_len", "swap_chunks", "zero_chunk", "table_len"] if fmt == 1 else \
            ["move_len", "move_len", "swap_chunks", "zero_chunk", "table_len"]
        op = _pick(rng, ops)
        b = bytearray(seg_bytes)
        if op == "k":
            ks = [x for x in fields if x[0] == "k"]
            if not ks:
                return list(bs), relabel
            _, off, _, v = rng.choice(ks)
            b[off] = rng.choice([0, v + 1, max(0, v - 1), s[6], s[6] + 1, 255])
            _replace_segment_bytes(parts, i, j, bytes(b))
        elif op == "move_len":
            rls = [x for x in fields if x[0] == "rl"]
            if not rls:
                return list(bs), relabel
            idx = fields.index(rng.choice(rls))
            rl, bl = fields[idx], fields[idx + 1]
            d = rng.choice([-1, 1, 4])
            new_rl, new_bl = _varint(max(0, rl[3] + d)), _varint(max(0, bl[3] - d))
            table = bytes(b[:rl[1]]) + new_rl + new_bl + bytes(b[bl[1] + bl[2]:tl])
            _replace_segment_bytes(parts, i, j, table + bytes(b[tl:]), len(table))
        elif op in ("swap_chunks", "zero_chunk"):
            # chunk entries as byte ranges of the table
            entries, cur = [], None
            for x in fields:
                if x[0] == "n":
                    cur = [x[1], x[1] + x[2]]
                    entries.append(cur)
                else:
                    cur[1] = x[1] + x[2]
            if len(entries) < 2 and op == "swap_chunks":
                return list(bs), relabel
            pieces = [bytes(b[a:e]) for a, e in entries]
            if op == "swap_chunks":
                a, c = rng.sample(range(len(pieces)), 2)
                pieces[a], pieces[c] = pieces[c], pieces[a]
            else:
                pieces[rng.randrange(len(pieces))] = b"\x00"
            table = b"".join(pieces) + bytes(b[entries[-1][1]:tl]) if entries else bytes(b[:tl])
            _replace_segment_bytes(parts, i, j, table + bytes(b[tl:]), len(table))
        else:
            s[F["tl"]] = max(0, tl + rng.choice([-1, 1, -2, 2]))
        changed.add(i)
        return _chain(parts, changed, fix_uid), relabel
    if kind == "dense_data":
        dsegs = _dense_segments(parts, fmt)
        if not dsegs:
            return list(bs), relabel
        i, j = rng.choice(dsegs)
        m, body = parts[i]
        s = m["segs"][j]
        b = bytearray(body)
        for _ in range(rng.choice([1, 1, 3])):
            pos = s[F["off"]] + rng.randrange(s[F["len"]])
            b[pos] ^= 1 << rng.randrange(8)
        parts[i] = (m, bytes(b))
        changed.add(i)
        return _chain(parts, changed, fix_uid), relabel
    if kind in V2_KINDS:
        if fmt != 2:
            raise ValueError(f"{kind} mutates format-2 segments")
        return _mutate2(case, kind, parts, rng, fix_uid), relabel
    raise ValueError(f"unknown mutation kind {kind!r}")


def _mutate2(case: Case, kind: str, parts, rng: random.Random, fix_uid: bool) -> list[bytes]:
    """The format-2 segment mutations (FORMAT.md §6.2-§6.5): space, range, cuts, cls, seg_move."""
    bs = case.buckets
    nb = len(parts)
    vals = parts[0][0]["vals"]
    changed: set[int] = set()
    allsegs = _segments(parts, fmt=2)
    sparse = _sparse_segments(parts, fmt=2)
    if not allsegs:
        return list(bs)
    present = list(case.space_n)

    if kind == "space":
        i, j = rng.choice(allsegs)
        s = parts[i][0]["segs"][j]
        cur = s[0]
        same_w = [d for d in present if d != cur and WIDTH[d] == WIDTH.get(cur)]
        others = [d for d in present if d != cur]
        absent = [d for d in BY_NAME if d not in case.space_n]
        op = _pick(rng, ["same_width", "same_width", "present", "absent", "unknown", "type"])
        if op == "same_width" and same_w:
            s[0] = rng.choice(same_w)
        elif op in ("present", "same_width") and others:
            s[0] = rng.choice(others)
        elif op == "absent" and absent:
            s[0] = rng.choice(absent)
        elif op == "type":
            s[0] = rng.choice([None, 0, cur.encode(), [cur], True, {cur: 1}])
        else:
            s[0] = rng.choice(["", "bf16", "torch." + cur, cur.upper(), cur + "\x00", cur + " ", "float", "float128",
                               "complex64", "int4", "uint16", "Bool"])
        if rng.random() < 0.5 and s[0] in case.space_n and s[3] > case.space_n[s[0]]:   # fit the range in
            n = case.space_n[s[0]]
            length = s[3] - s[2]
            if length <= n:
                s[2], s[3] = n - length, n
        return _chain(parts, changed, fix_uid)

    if kind == "range":
        i, j = rng.choice(allsegs)
        items = _seg_items(parts, i)
        s = items[j][0]
        space = s[0]
        N = case.space_n.get(space, 0)
        order = _space_order(parts, space)
        k = order.index((i, j))
        prev_end = parts[order[k - 1][0]][0]["segs"][order[k - 1][1]][3] if k > 0 else None
        next_start = parts[order[k + 1][0]][0]["segs"][order[k + 1][1]][2] if k + 1 < len(order) else None
        C = 1 << s[4] if s[1] == "s" else 4096
        st, en = s[2], s[3]
        op = _pick(rng, ["end_N", "end_over", "end_over", "huge", "empty", "reversed", "swap", "start_zero",
                         "overlap_prev", "overlap_prev", "overlap_next", "nudge", "nudge", "shift", "shift",
                         "resize", "log2c"])
        if op == "end_N":
            s[3] = N
        elif op == "end_over":
            d = rng.choice([1, 2, C, 4096, N])
            s[3] = N + d
            if rng.random() < 0.5:
                s[2] = st + (N + d - en)     # the whole segment moved past the end
        elif op == "huge":
            v = rng.choice([2 ** 62, 2 ** 62 - 1, 2 ** 63 - 1, 2 ** 40, 2 ** 32])
            if rng.random() < 0.5:
                s[3] = v
            else:
                s[2], s[3] = v - (en - st), v
        elif op == "empty":
            if rng.random() < 0.5:
                s[3] = st
            else:
                s[2] = en
            if rng.random() < 0.5:
                s[11] = 0
        elif op == "reversed":
            s[3] = max(0, st - rng.choice([1, 5, C]))
        elif op == "swap":
            s[2], s[3] = en, st
        elif op == "start_zero":
            s[2] = 0
            if rng.random() < 0.5:
                s[3] = en - st
        elif op == "overlap_prev":
            if prev_end is None:
                s[2] = max(0, st - rng.choice([1, C]))
            else:
                d = st - (prev_end - rng.choice([1, 2, 100]))
                s[2] = max(0, st - d)
                if rng.random() < 0.5:
                    s[3] = en - (st - s[2])
        elif op == "overlap_next":
            if next_start is None:
                s[3] = en + rng.choice([1, C])
            else:
                s[3] = next_start + rng.choice([1, 10, C])
        elif op == "nudge":
            d = rng.choice([1, -1, 2, -2, 4096, -4096, C, -C])
            if rng.random() < 0.5:
                s[2] = max(0, st + d)
            else:
                s[3] = max(0, en + d)
        elif op == "shift":
            d = rng.choice([1, -1, 7, -7, 4096, -4096, C, -C, -st, N - en])
            if st + d >= 0 and d:
                s[2], s[3] = st + d, en + d
            else:
                s[2], s[3] = st + 1, en + 1
        elif op == "log2c":      # chunk size: other chunk boundaries (a one-chunk segment stays valid)
            s[4] = rng.choice([0, 11, 12, 13, 20, 29, 30, 31, s[4] - 1, s[4] + 1, s[4] + 1])
            if s[1] == "s" and isinstance(s[9], list) and rng.random() < 0.5:
                for e in s[9]:          # Rice parameters kept within the new log2c
                    if isinstance(e, list) and e and isinstance(e[0], int):
                        e[0] = max(0, min(e[0], s[4]))
        else:
            s[3] = max(st + 1, en + rng.choice([-1, 1, -8, 8, -(en - st) // 2]))
        # half the time a dense segment stays self-consistent (its data resized to the new range, len, nchanged)
        new_len = s[3] - s[2] if isinstance(s[3], int) and isinstance(s[2], int) else -1
        if s[1] == "d" and 0 < new_len <= 1 << 20 and (op == "resize" or rng.random() < 0.5):
            w = WIDTH[space]
            data = items[j][1]
            want = new_len * w
            data = data[:want] + bytes(rng.randrange(256) for _ in range(max(0, want - len(data))))
            items[j][1] = data
            s[7] = want
            s[11] = new_len
            _relay(parts, i, items, 2)
            changed.add(i)
        return _chain(parts, changed, fix_uid)

    if kind == "cuts":
        op = _pick(rng, ["unsorted", "duplicate", "zero", "top", "negative", "shift", "shift", "drop", "drop_only",
                         "add", "add", "add_only", "too_many", "keyless", "keyless", "types", "not_list", "clear",
                         "clear_only"])
        if not sparse:
            return list(bs)
        keyless = [(i, j) for i, j in sparse if key_bits(parts[i][0]["segs"][j][0]) == 0]
        with_cuts = [(i, j) for i, j in sparse if parts[i][0]["segs"][j][8]]
        if op == "keyless" and keyless:
            i, j = rng.choice(keyless)
        elif with_cuts and rng.random() < 0.85:
            i, j = rng.choice(with_cuts)
        else:
            i, j = rng.choice(sparse)
        s = parts[i][0]["segs"][j]
        cuts, cls = s[8], s[9]
        kb = key_bits(s[0]) if isinstance(s[0], str) else 0
        top = 1 << kb
        ents = [e for e in cls if e is not None] or [[0, _varint(1) + _varint(0) + _varint(4096)]]

        def entry():
            return None if rng.random() < 0.4 else _deep(rng.choice(ents))
        if op == "keyless" or (not kb and op in ("add", "too_many")):
            n = rng.choice([1, 1, 2, 31])
            s[8] = list(range(1, n + 1))
            s[9] = cls + [entry() for _ in range(n - len(cuts))]
        elif op == "unsorted":
            if len(cuts) >= 2:
                a, b = rng.sample(range(len(cuts)), 2)
                cuts[a], cuts[b] = cuts[b], cuts[a]
            elif cuts:
                cuts.append(max(1, cuts[0] - 1))
                cls.append(entry())
            else:
                s[8], s[9] = [2, 1], cls + [entry(), entry()]
        elif op == "duplicate":
            if cuts:
                k = rng.randrange(len(cuts))
                cuts.insert(k, cuts[k])
                cls.insert(k + 1, entry())
            else:
                s[8], s[9] = [1, 1], cls + [entry(), entry()]
        elif op == "zero":
            cuts.insert(0, 0)
            cls.insert(0, entry())
        elif op == "top":
            cuts.append(rng.choice([top, top + 1, top - 1, 255, 256, 2 ** 31, 2 ** 63 - 1, 2 ** 64 - 1]))
            cls.append(entry())
        elif op == "negative":
            cuts.insert(rng.randrange(len(cuts) + 1), rng.choice([-1, -top, -(2 ** 63)]))
            cls.append(entry())
        elif op == "shift":
            if not cuts:
                s[8], s[9] = [rng.randrange(1, max(2, top))], cls + [entry()]
            else:
                k = rng.randrange(len(cuts))
                cuts[k] += rng.choice([1, -1, 2, -2, top, -cuts[k]])
        elif op in ("drop", "drop_only"):
            if not cuts:
                return list(bs)
            k = rng.randrange(len(cuts))
            cuts.pop(k)
            if op == "drop":             # classes k and k+1 merge: keep one entry (a nil one if there is)
                drop = k if cls[k] is None else k + 1 if k + 1 < len(cls) and cls[k + 1] is None else \
                    rng.choice([k, k + 1])
                if drop < len(cls):
                    cls.pop(drop)
        elif op in ("add", "add_only"):
            free = [c for c in range(1, top) if c not in cuts]
            if not free:
                return list(bs)
            c = rng.choice(free)
            k = sum(1 for x in cuts if x < c)
            cuts.insert(k, c)
            if op == "add":             # class k splits at c: the new upper part gets a nil or a copied entry
                cls.insert(k + 1, entry())
        elif op == "too_many":
            n = rng.choice([31, 31, 32, 33])
            if top > n:
                s[8] = sorted(rng.sample(range(1, top), n))
            else:
                s[8] = list(range(1, n + 1))
            s[9] = [entry() for _ in range(n + 1)]
            if all(e is None for e in s[9]):
                s[9][0] = _deep(ents[0])
        elif op == "types":
            v = rng.choice([True, False, 1.0, "1", None, b"\x01", [1], {1: 1}, 0.5])
            if cuts:
                cuts[rng.randrange(len(cuts))] = v
            else:
                s[8], s[9] = [v], cls + [entry()]
        elif op == "not_list":
            s[8] = rng.choice([None, 0, 1, b"", "", {}, b"\x01", True])
        elif op == "clear":
            s[8] = []
            s[9] = [_deep(rng.choice(ents))]
        else:
            s[8] = []
        return _chain(parts, changed, fix_uid)

    if kind == "cls":
        if not sparse:
            return list(bs)
        multi = [(i, j) for i, j in sparse if len(parts[i][0]["segs"][j][9]) > 1]
        i, j = rng.choice(multi) if multi and rng.random() < 0.8 else rng.choice(sparse)
        s = parts[i][0]["segs"][j]
        cls = s[9]
        log2c = s[4]
        pres = [c for c, e in enumerate(cls) if e is not None]
        nils = [c for c, e in enumerate(cls) if e is None]
        ms = _max_sym(s[0], vals)
        op = _pick(rng, ["to_nil", "to_nil", "to_present", "to_present", "k", "k", "k_type", "freq", "freq",
                         "odd_table", "odd_table", "count_more", "count_less", "shape", "all_nil", "swap",
                         "same_table", "type"])
        if op == "to_nil" and pres:
            cls[rng.choice(pres)] = None
        elif op == "to_present" and nils:
            src = cls[rng.choice(pres)] if pres else [0, _varint(1) + _varint(0) + _varint(4096)]
            e = _deep(src)
            if rng.random() < 0.3:
                e[1] = _odd_table(rng, ms)
            if rng.random() < 0.3:
                e[0] = rng.randrange(log2c + 1)
            cls[rng.choice(nils)] = e
        elif op in ("k", "to_nil", "to_present") and pres:
            e = cls[rng.choice(pres)]
            e[0] = rng.choice([log2c + 1, log2c + 2, 31, 32, 63, 255, 256, 2 ** 32, -1, e[0] + 1, max(0, e[0] - 1),
                               0, log2c, log2c])
        elif op == "k_type" and pres:
            cls[rng.choice(pres)][0] = rng.choice([True, False, 1.0, None, "1", b"\x01", [0]])
        elif op == "freq" and pres:
            e = cls[rng.choice(pres)]
            raw = _mutate_freq(e[1], rng)
            if raw is None:
                return list(bs)
            e[1] = raw
        elif op == "odd_table" and pres:
            cls[rng.choice(pres)][1] = _odd_table(rng, ms)
        elif op == "count_more":
            cls.insert(rng.randrange(len(cls) + 1),
                       None if rng.random() < 0.5 or not pres else _deep(cls[rng.choice(pres)]))
        elif op == "count_less":
            cls.pop(rng.randrange(len(cls)))
        elif op == "shape":
            c = rng.randrange(len(cls))
            e = cls[c] if cls[c] is not None else [0, _varint(1) + _varint(0) + _varint(4096)]
            cls[c] = rng.choice([[e[0]], [e[0], e[1], 0], [e[1], e[0]], "x", [], [e[0], e[1].hex()], [e[0], [e[1]]],
                                 e[1], e[0], [e[0], None], [None, e[1]], {0: e[0]}, False])
        elif op == "all_nil":
            s[9] = [None] * len(cls)
        elif op == "swap" and len(cls) > 1:
            a, b = rng.sample(range(len(cls)), 2)
            cls[a], cls[b] = cls[b], cls[a]
        elif op == "same_table" and len(pres) > 1:
            t = cls[rng.choice(pres)][1]
            for c in pres:
                cls[c][1] = t
        elif op == "type":
            s[9] = rng.choice([None, 0, b"", {}, "x", True])
        else:
            return list(bs)
        return _chain(parts, changed, fix_uid)

    # seg_move
    op = _pick(rng, ["bucket", "bucket", "position", "space", "replace", "replace", "swap_ranges", "split",
                     "split_next"])
    if op in ("bucket", "position"):
        crowded = [(i, j) for i, j in allsegs if len(parts[i][0]["segs"]) > 1]
        i, j = rng.choice(crowded) if crowded and rng.random() < 0.8 else rng.choice(allsegs)
        items = _seg_items(parts, i)
        item = items.pop(j)
        k = rng.choice([x for x in range(nb) if x != i]) if op == "bucket" and nb > 1 else i
        if k != i:
            _relay(parts, i, items, 2)
            items = _seg_items(parts, k)
        items.insert(rng.randrange(len(items) + 1), item)
        _relay(parts, k, items, 2)
        changed |= {i, k}
        return _chain(parts, changed, fix_uid)
    if op == "space":
        i, j = rng.choice(allsegs)
        s = parts[i][0]["segs"][j]
        others = [d for d in present if d != s[0]]
        same_w = [d for d in others if WIDTH[d] == WIDTH[s[0]]]
        if not others:
            return list(bs)
        d = rng.choice(same_w) if same_w and rng.random() < 0.7 else rng.choice(others)
        n2 = case.space_n[d]
        length = s[3] - s[2]
        s[0] = d
        if s[3] > n2 and length <= n2:
            st = rng.choice([0, n2 - length, rng.randrange(n2 - length + 1)])
            s[2], s[3] = st, st + length
        return _chain(parts, changed, fix_uid)
    if op == "replace":
        # a segment takes the place of every segment of another space (of the same width when there is one): it
        # decodes against that space's base values
        i, j = rng.choice(allsegs)
        s = parts[i][0]["segs"][j]
        others = [d for d in present if d != s[0]]
        same_w = [d for d in others if WIDTH[d] == WIDTH[s[0]]]
        if not others:
            return list(bs)
        d = rng.choice(same_w) if same_w and rng.random() < 0.9 else rng.choice(others)
        n2 = case.space_n[d]
        length = s[3] - s[2]
        if length > n2:
            if s[1] == "d":
                return list(bs)
            s[3] = s[2] + n2               # a sparse segment cut to the space (its table then disagrees)
            length = n2
        st = rng.choice([0, n2 - length, rng.randrange(n2 - length + 1)])
        s[0], s[2], s[3] = d, st, st + length
        for k in range(nb):
            items = _seg_items(parts, k)
            kept = [it for it in items if it[0][0] != d or it[0] is s]
            if len(kept) != len(items):
                _relay(parts, k, kept, 2)
                changed.add(k)
        # buckets left empty (only the last may be) are removed, the others renumbered
        keep = [k for k in range(nb) if parts[k][0]["segs"] or k == nb - 1]
        if len(keep) != nb:
            parts[:] = [parts[k] for k in keep]
            changed = set(range(len(parts)))
            for k, (m, body) in enumerate(parts):
                parts[k] = (dict(m, idx=k, cnt=k + 1 if k == len(parts) - 1 else 0), body)
        return _chain(parts, changed, fix_uid)
    if op == "swap_ranges":
        if len(allsegs) < 2:
            return list(bs)
        (i, j), (k, l) = rng.sample(allsegs, 2)
        a, b = parts[i][0]["segs"][j], parts[k][0]["segs"][l]
        a[2], a[3], b[2], b[3] = b[2], b[3], a[2], a[3]
        if rng.random() < 0.5:
            a[0], b[0] = b[0], a[0]
        return _chain(parts, changed, fix_uid)
    # a dense segment split in two, in its bucket or with the second half at the start of the next bucket: a valid
    # update (the ranges still ascend and cover the same elements), accepted exactly
    dense = [(i, j) for i, j in _dense_segments(parts, 2) if parts[i][0]["segs"][j][3] - parts[i][0]["segs"][j][2] > 1
             and (op == "split" or i + 1 < nb)]
    if not dense:
        return list(bs)
    i, j = rng.choice(dense)
    items = _seg_items(parts, i)
    s, data = items[j]
    w = WIDTH[s[0]]
    c = rng.randrange(s[2] + 1, s[3])
    first = [list(s), data[:(c - s[2]) * w]]
    second = [list(s), data[(c - s[2]) * w:]]
    first[0][3] = c
    first[0][7] = first[0][11] = c - s[2]
    first[0][7] *= w
    second[0][2] = c
    second[0][7] = (s[3] - c) * w
    second[0][11] = s[3] - c
    if op == "split" or j + 1 < len(items):     # a later segment in the bucket: the halves stay together
        items[j:j + 1] = [first, second]
        _relay(parts, i, items, 2)
        changed.add(i)
    else:
        items[j] = first
        _relay(parts, i, items, 2)
        nxt = _seg_items(parts, i + 1)
        _relay(parts, i + 1, [second] + nxt, 2)
        changed |= {i, i + 1}
    return _chain(parts, changed, fix_uid)


# ---------------------------------------------------------------------------------------------------------------------
# running

_STATE: dict = {}


def _kinds_schedule(fmt: int):
    sched = []
    for k, w in WEIGHTS.items():
        if fmt == 1 and k in V2_KINDS:
            continue
        sched += [k] * w
    return sched


def _by_format(cases):
    out: dict = {}
    for c in cases:
        out.setdefault(c.format, []).append(c)
    return [out[f] for f in sorted(out)]


def _init(seed: int, slots=None, slot_index=None, formats=(1, 2)):
    torch.set_num_threads(1)
    native, reference = build_cases(seed, formats)
    for c in native + reference:
        for t in c.targets():
            t.fresh()
    _STATE.update(native=_by_format(native), reference=_by_format(reference),
                  schedule={f: _kinds_schedule(f) for f in (1, 2)}, seed=seed, slots=slots)
    if slots is not None:
        with slot_index.get_lock():
            _STATE["slot"] = slot_index.value
            slot_index.value += 1


def one(index: int, reference_share: float, verbose: bool = False) -> tuple[str, str, str, str | None, str | None]:
    """Run payload ``index``: (kind, case name, outcome, failure description or None, the mutation's operation or
    None)."""
    seed = _STATE["seed"]
    rng = random.Random(f"{seed}:{index}")
    use_ref = rng.random() < reference_share
    groups = _STATE["reference"] if use_ref else _STATE["native"]
    cases = groups[rng.randrange(len(groups))]          # a format, then a case of it
    for _attempt in range(50):   # a mutation that does not apply to the case, or changes no byte, is drawn again
        case = cases[rng.randrange(len(cases))]
        kinds = _STATE["schedule"][case.format]
        kind = kinds[rng.randrange(len(kinds))]
        if not case.digest and (kind in STRUCT_KINDS or kind in V2_KINDS or kind in RECEIVER_KINDS):
            kind = BYTE_KINDS[rng.randrange(len(BYTE_KINDS))]
        try:
            payload, note = mutate(case, kind, rng)
        except (OverflowError, ValueError, TypeError, IndexError, KeyError):   # value msgpack cannot hold, etc.
            continue
        if payload != case.buckets or isinstance(note, tuple):
            break
    target, forged, relabel = case.main, False, note is True
    old_want = "old"
    if isinstance(note, tuple) and note[0] == "alt":
        target, forged = case.alts[note[1]], note[2]
    elif isinstance(note, tuple) and note[0] == "drift":    # the receiver's base differs from the encoder's
        for name, idx, bit in note[1]:
            t = target.tensors[name]
            w = t.element_size()
            _ivw(t).reshape(-1).view(torch.uint8)[idx * w + bit // 8] ^= 1 << (bit % 8)
        old_want = {k: _bits(t) for k, t in target.tensors.items()}
    dec = target.decoder
    r = rng.random()        # buckets as bytes (mostly), bytearray or memoryview (the decoder copies what it keeps)
    if r < 0.1:
        payload = [bytearray(b) for b in payload]
    elif r < 0.2:
        payload = [memoryview(b) for b in payload]
    prev_ref = os.environ.get("SPARSESYNC_REFERENCE")
    if use_ref:
        os.environ["SPARSESYNC_REFERENCE"] = "1"
    failure = None
    try:
        try:
            stats = dec.apply(payload)
            outcome = "accepted"
        except SparseSyncError as exc:
            outcome = type(exc).__name__
            err = exc
        except Exception as exc:    # noqa: BLE001 - anything else is a failure
            outcome = "exception"
            failure = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    finally:
        if use_ref:
            if prev_ref is None:
                os.environ.pop("SPARSESYNC_REFERENCE", None)
            else:
                os.environ["SPARSESYNC_REFERENCE"] = prev_ref
    where = "" if target is case.main else f" (receiver of another layout: {target.name})"
    if outcome == "accepted":
        if target is not case.main and not forged:
            failure = f"accepted by a receiver of another layout ({target.name}): the update names another layout"
        elif not target.bits_equal("new"):
            failure = "accepted, but the target differs from the encoder's new state" + where
        elif dec.version != case.version:
            if relabel:
                outcome = "accepted-relabelled"
            else:
                failure = f"accepted at version {dec.version}, expected {case.version}" + where
        else:
            outcome = "accepted-relayout" if forged else "accepted-exact"
            if stats.version != case.version:
                failure = "stats disagree with the decoder"
        target.reset()
    elif outcome != "exception":
        if not target.bits_equal(old_want):
            failure = f"refused ({outcome}: {err}) but the target changed" + where
        elif dec.version != target.version0 or dec.pending:
            failure = f"refused ({outcome}) but version/pending changed" + where
    if outcome == "exception" or failure or old_want != "old":     # a drifted base goes back too
        target.reset()
    if len(dec._arena) > case.max_arena:
        failure = (failure or "") + f" arena holds {len(dec._arena)} entries (> {case.max_arena})"
    op = _OP["op"]
    if verbose:
        print(f"payload {index}: case {case.name}{where}, kind {kind}{'/' + op if op else ''}, "
              f"{'reference' if use_ref else 'native'} "
              f"kernels: {outcome}"
              f"{'' if outcome.startswith('accepted') or outcome == 'exception' else ': ' + str(err)}")
    return kind, case.name + ("/ref" if use_ref else ""), outcome, failure, op


def _chunk(args) -> dict:
    start, stop, reference_share = args
    slots = _STATE.get("slots")
    res = {"kinds": defaultdict(Counter), "cases": defaultdict(Counter), "outcomes": Counter(), "failures": [],
           "formats": defaultdict(Counter), "ops": defaultdict(Counter), "reference": 0, "n": 0}
    fmt_of = {c.name: c.format for g in _STATE["native"] + _STATE["reference"] for c in g}
    for index in range(start, stop):
        if slots is not None:
            slots[_STATE["slot"]] = index
        kind, case, outcome, failure, op = one(index, reference_share)
        res["kinds"][kind][outcome] += 1
        if op:
            res["ops"][f"{kind}/{op}"][outcome] += 1
        res["cases"][case][outcome] += 1
        res["outcomes"][outcome] += 1
        res["formats"][f"format {fmt_of[case.split('/')[0]]}"][outcome] += 1
        res["reference"] += case.endswith("/ref")
        res["n"] += 1
        if failure:
            res["failures"].append({"index": index, "kind": kind, "case": case, "outcome": outcome,
                                    "failure": failure[:2000]})
    res["kinds"] = {k: dict(v) for k, v in res["kinds"].items()}
    res["cases"] = {k: dict(v) for k, v in res["cases"].items()}
    res["formats"] = {k: dict(v) for k, v in res["formats"].items()}
    res["ops"] = {k: dict(v) for k, v in res["ops"].items()}
    return res


def run(count: int = 1_000_000, seed: int = 1, workers: int = 2, out=None, reference_share: float = 0.01,
        start: int = 0, chunk: int = 2000, quiet: bool = False, progress_every: float = 5.0,
        formats=(1, 2)) -> dict:
    """Fuzz ``count`` payloads (indices ``start .. start+count-1``); write fuzz.json/fuzz.txt into ``out`` and return
    the summary (``failures`` lists every failing payload with what reproduces it)."""
    out = Path(out) if out is not None else SCRATCH
    formats = tuple(sorted(set(formats)))
    t0 = time.perf_counter()
    total = {"kinds": defaultdict(Counter), "cases": defaultdict(Counter), "outcomes": Counter(), "failures": [],
             "formats": defaultdict(Counter), "ops": defaultdict(Counter), "reference": 0, "n": 0}
    chunks = [(a, min(a + chunk, start + count), reference_share) for a in range(start, start + count, chunk)]
    last = time.perf_counter()
    crashes = []

    def merge(r):
        for k, v in r["kinds"].items():
            total["kinds"][k].update(v)
        for k, v in r["cases"].items():
            total["cases"][k].update(v)
        for k, v in r["formats"].items():
            total["formats"][k].update(v)
        for k, v in r["ops"].items():
            total["ops"][k].update(v)
        total["outcomes"].update(r["outcomes"])
        total["failures"] += r["failures"]
        total["reference"] += r["reference"]
        total["n"] += r["n"]

    def tick(force=False):
        nonlocal last
        now = time.perf_counter()
        if not quiet and (force or now - last >= progress_every):
            last = now
            rate = total["n"] / max(1e-9, now - t0)
            print(f"[fuzz] {total['n']}/{count} payloads, {rate:.0f}/s, {len(total['failures'])} failures, "
                  f"{total['outcomes'].get('accepted-exact', 0)} accepted exact, elapsed {now - t0:.0f}s",
                  file=sys.stderr, flush=True)

    if workers <= 1:
        _init(seed, formats=formats)
        for c in chunks:
            merge(_chunk(c))
            tick()
    else:
        ctx = mp.get_context("spawn")
        slots = ctx.Array("q", [-1] * workers, lock=False)
        slot_index = ctx.Value("i", 0)
        env_threads = os.environ.get("SPARSESYNC_THREADS")
        os.environ["SPARSESYNC_THREADS"] = "1"
        try:
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                        initargs=(seed, slots, slot_index, formats)) as pool:
                futures = {pool.submit(_chunk, c): c for c in chunks}
                for fut in cf.as_completed(futures):
                    try:
                        merge(fut.result())
                    except cf.process.BrokenProcessPool:
                        crashes.append({"chunk": futures[fut][:2], "in_flight": [int(x) for x in slots if x >= 0]})
                        break
                    tick()
        finally:
            if env_threads is None:
                os.environ.pop("SPARSESYNC_THREADS", None)
            else:
                os.environ["SPARSESYNC_THREADS"] = env_threads
    tick(force=True)
    elapsed = time.perf_counter() - t0
    for c in crashes:
        total["failures"].append({"index": c["in_flight"], "kind": "?", "case": "?", "outcome": "crash",
                                  "failure": f"a worker process died (chunk {c['chunk']}); payloads in flight: "
                                             f"{c['in_flight']}"})
    fmt_arg = ",".join(map(str, formats))
    result = {
        "count": total["n"], "requested": count, "seed": seed, "start": start, "workers": workers,
        "formats": list(formats),
        "reference_share": reference_share, "reference_payloads": total["reference"],
        "seconds": round(elapsed, 2), "payloads_per_second": round(total["n"] / max(elapsed, 1e-9), 1),
        "outcomes": dict(sorted(total["outcomes"].items())),
        "per_format": {k: dict(sorted(v.items())) for k, v in sorted(total["formats"].items())},
        "kinds": {k: dict(sorted(v.items())) for k, v in sorted(total["kinds"].items())},
        "ops": {k: dict(sorted(v.items())) for k, v in sorted(total["ops"].items())},
        "cases": {k: dict(sorted(v.items())) for k, v in sorted(total["cases"].items())},
        "failures": total["failures"],
        "reproduce": f"python bench/fuzz.py --seed {seed} --formats {fmt_arg} --start INDEX --count 1 --workers 1 -v",
        "machine": machine(), "native_kernels": ss._native.available,
        "sparsesync": ss.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "fuzz.txt").write_text(report(result))
    if not quiet:
        print(report(result))
    return result


def report(r: dict) -> str:
    fmts = ", ".join(map(str, r.get("formats", [1])))
    lines = [f"sparsesync decoder fuzz: {r['count']} payloads (seed {r['seed']}, indices {r['start']}.."
             f"{r['start'] + r['count'] - 1}, formats {fmts}), {r['workers']} worker process(es)",
             f"machine: {r['machine']}; native kernels: {r['native_kernels']}",
             f"reference kernels decoded {r['reference_payloads']} payloads (share {r['reference_share']})",
             f"{r['seconds']:.1f} s, {r['payloads_per_second']:.0f} payloads/s",
             f"failures: {len(r['failures'])}", "", "outcomes:"]
    for k, v in r["outcomes"].items():
        lines.append(f"  {k:22s} {v:>9d}  ({100 * v / max(1, r['count']):.2f}%)")
    outcome_names = sorted({o for v in r["kinds"].values() for o in v})
    short = {"accepted-exact": "exact", "accepted-relabelled": "relabel", "accepted-relayout": "relayout",
             "CorruptPayload": "Corrupt", "BaseMismatch": "BaseMis", "VersionMismatch": "VersMis",
             "LayoutMismatch": "LayoutMis", "RollbackRefused": "Rollback", "exception": "EXC"}
    head = "  ".join(f"{short.get(o, o)[:9]:>9s}" for o in outcome_names)
    if r.get("per_format"):
        lines += ["", f"per format:          {'total':>8s}  {head}"]
        for k, v in r["per_format"].items():
            lines.append(f"  {k:16s} {sum(v.values()):>8d}  " + "  ".join(f"{v.get(o, 0):>9d}" for o in outcome_names))
    lines += ["", f"per mutation kind:  {'total':>8s}  {head}"]
    for k, v in r["kinds"].items():
        lines.append(f"  {k:16s} {sum(v.values()):>8d}  " + "  ".join(f"{v.get(o, 0):>9d}" for o in outcome_names))
    if r.get("ops"):
        lines += ["", f"per operation:      {'total':>8s}  {head}"]
        for k, v in r["ops"].items():
            lines.append(f"  {k:32s} {sum(v.values()):>8d}  " + "  ".join(f"{v.get(o, 0):>9d}" for o in outcome_names))
    lines += ["", "per case:"]
    for k, v in r["cases"].items():
        lines.append(f"  {k:28s} {sum(v.values()):>8d}  " + ", ".join(f"{o} {n}" for o, n in v.items()))
    if r["failures"]:
        lines += ["", f"FAILURES (reproduce: {r['reproduce']}):"]
        for f in r["failures"][:50]:
            lines.append(f"  index {f['index']} kind {f['kind']} case {f['case']}: {f['outcome']}: "
                         f"{f['failure'].splitlines()[0] if f['failure'] else ''}")
    return "\n".join(lines) + "\n"


def _formats(text: str) -> tuple:
    try:
        fs = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--formats takes 1, 2 or 1,2, got {text!r}") from None
    if not fs or any(f not in (1, 2) for f in fs):
        raise argparse.ArgumentTypeError(f"--formats takes 1, 2 or 1,2, got {text!r}")
    return fs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000, help="payloads to try (default 1,000,000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the states and of every mutation (default 1)")
    p.add_argument("--start", type=int, default=0, help="first payload index (to reproduce one: --count 1)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    p.add_argument("--reference-share", type=float, default=0.01,
                   help="share of payloads decoded by the pure-PyTorch reference kernels (default 0.01)")
    p.add_argument("--formats", type=_formats, default=(1, 2),
                   help="wire formats of the updates, e.g. 1, 2 or 1,2 (default 1,2: half the payloads each)")
    p.add_argument("--chunk", type=int, default=2000, help="payloads per work unit (default 2000)")
    p.add_argument("--out", metavar="DIR", default=str(SCRATCH),
                   help=f"write fuzz.json and fuzz.txt into DIR (default {SCRATCH}; the committed results are "
                        "bench/results)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every payload's outcome (with --workers 1)")
    a = p.parse_args(argv)
    if a.verbose:
        _init(a.seed, formats=a.formats)
        for index in range(a.start, a.start + a.count):
            *_, failure, _op = one(index, a.reference_share, verbose=True)
            if failure:
                print(f"  FAILURE: {failure}")
        return 0
    r = run(count=a.count, seed=a.seed, workers=a.workers, out=a.out, reference_share=a.reference_share,
            start=a.start, chunk=a.chunk, formats=a.formats)
    return 1 if r["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
