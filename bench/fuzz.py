"""Fuzz the Decoder: mutated payloads must be refused cleanly or applied bit-exactly.

    python bench/fuzz.py [--count 1000000] [--seed 1] [--workers 2] [--reference-share 0.01] [--out DIR]
    python bench/fuzz.py --seed 1 --start 123456 --count 1 --workers 1 -v      # reproduce one payload

Every payload is a real update of a small state (several dtypes, sparse/dense/unchanged tensors, delta and raw values,
full updates, tied weights, with and without a state digest) with one mutation:

- byte-level (no checksum recomputed): ``bitflip``, ``overwrite`` (a run of random bytes), ``truncate``, ``pad``,
  ``splice`` (a prefix of one bucket joined to the suffix of another, of this or of a second update of the same
  transition), ``foreign`` (a bucket of the second update), ``duplicate``, ``reorder``, ``drop`` buckets;
- structure-aware (body and header checksums, chain links and, half the time, the update id recomputed, so the
  mutation reaches the deep parsers): ``header_field`` edits, ``header_encoding`` (the same values in non-canonical
  msgpack), ``early_count`` (an earlier bucket claims to be the last), ``segment_field`` edits, ``segment_list``
  (segments dropped, duplicated, swapped, moved to another bucket), ``varint`` edits in chunk tables,
  ``symbol_table`` and ``chunk_table`` edits (Rice parameters, stream lengths, chunk entries), ``stream`` bytes of
  the rANS/bit streams, ``dense_data`` bytes.

The outcome of each payload must be one of: a :class:`SparseSyncError` with the target bit-for-bit unchanged (and its
version, nothing pending, the staging arena bounded), or an accept whose result is bit-exact the encoder's new state
("accepted-exact"; "accepted-relabelled" when a re-chained header edit changed only the version the update claims, which
nothing but authentication could detect). Anything else -- another exception, a crash, a changed target after a
refusal, an accepted state that differs -- is a failure, reported with the seed and payload index to reproduce it.

A forger who recomputes every checksum can always make a different valid update when the update carries no digest
(docs/FORMAT.md §5.1), so structure-aware mutations target digest-carrying updates; byte-level mutations target all.

The reference kernels (pure PyTorch) decode a share of the payloads (``--reference-share``, small states).

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
from sparsesync.errors import SparseSyncError  # noqa: E402
from sparsesync.format import HEADER_SEED, MAGIC, PREAMBLE, _put_varint, update_uid  # noqa: E402
from sparsesync.reference import read_varint  # noqa: E402

SCRATCH = Path(tempfile.gettempdir()) / "sparsesync-fuzz"
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

BYTE_KINDS = ["bitflip", "overwrite", "truncate", "pad", "splice", "foreign", "duplicate", "reorder", "drop"]
STRUCT_KINDS = ["header_field", "header_encoding", "early_count", "segment_field", "segment_list", "varint",
                "symbol_table", "chunk_table", "stream", "dense_data"]
# relative weights: structure-aware mutations reach the deep parsers, so they get most of the payloads
WEIGHTS = {"bitflip": 6, "overwrite": 3, "truncate": 3, "pad": 2, "splice": 3, "foreign": 2, "duplicate": 2,
           "reorder": 2, "drop": 2, "header_field": 10, "header_encoding": 5, "early_count": 3, "segment_field": 12,
           "segment_list": 5, "varint": 10, "symbol_table": 8, "chunk_table": 8, "stream": 6, "dense_data": 3}


# ---------------------------------------------------------------------------------------------------------------------
# states and updates

def _ivw(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF_WIDTH[t.element_size()])


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


class Case:
    """One base state, the genuine update (and a second one of the same transition), and how to apply it."""

    def __init__(self, name, old, new, upd, other, version0, digest, tied=None):
        self.name = name
        self.old = old
        self.new = new
        self.buckets = list(upd.buckets)
        self.other = list(other.buckets)
        self.version0 = version0
        self.version = upd.version
        self.digest = digest
        self.tied = tied or []
        self.parts = [_split(b) for b in self.buckets]
        self.old_bits = {k: _ivw(v).reshape(-1).view(torch.uint8).clone() for k, v in old.items()}
        self.new_bits = {k: _ivw(v).reshape(-1).view(torch.uint8).clone() for k, v in new.items()}
        self.max_arena = len(self.buckets)
        self.target = None
        self.decoder = None

    def fresh_target(self):
        dst = {k: v.clone() for k, v in self.old.items()}
        for a, b in self.tied:     # tied weights: two names, one storage
            dst[b] = dst[a]
        self.target = dst
        self.decoder = Decoder(dst, self.version0)

    def reset(self):
        """Put the target back to the base state (after an accept or a failure)."""
        for k, t in self.target.items():
            _ivw(t).reshape(-1).view(torch.uint8).copy_(self.old_bits[k])
        self.decoder.version = self.version0
        if self.decoder.pending:
            self.decoder.abort()

    def bits_equal(self, which) -> bool:
        want = self.old_bits if which == "old" else self.new_bits
        return all(torch.equal(_ivw(t).reshape(-1).view(torch.uint8), want[k]) for k, t in self.target.items())


def _state(g, spec):
    return {name: _random(shape, dtype, g) for name, shape, dtype in spec}


def build_cases(seed: int) -> tuple[list[Case], list[Case]]:
    """(cases for the native kernels, tiny cases for the reference kernels), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    big = [("a", (6000,), torch.bfloat16), ("b", (30, 40), torch.float32), ("c", (2000,), torch.int32),
           ("d", (), torch.float64), ("e", (6, 7), torch.bool), ("f", (5000,), torch.float8_e4m3fn),
           ("g", (0, 3), torch.int16)]
    dens = {"a": 0.02, "b": 1.0, "c": 0.2, "d": 1.0, "e": 0.0, "f": 0.05, "g": 0.0}
    tiny = [("a", (5000,), torch.bfloat16), ("b", (1200,), torch.float32), ("c", (300,), torch.int64)]
    tiny_dens = {"a": 0.01, "b": 1.0, "c": 0.05}

    def delta_case(name, spec, dmap, values, digest, bucket_bytes=4096):
        old = _state(g, spec)
        new = {k: _random(tuple(v.shape), v.dtype, g) if dmap[k] >= 1 else _mutate(v, dmap[k], g)
               for k, v in old.items()}
        other_new = {k: _mutate(v, dmap[k] or 0.01, g) for k, v in old.items()}
        upd = Encoder(old, 0, values=values, bucket_bytes=bucket_bytes, digest=digest).encode(new, 1)
        other = Encoder(old, 0, values=values, bucket_bytes=bucket_bytes, digest=digest).encode(other_new, 1)
        return Case(name, old, new, upd, other, 0, digest)

    def full_case(name, spec, dmap, digest):
        old = _state(g, spec)
        new = {k: _mutate(v, dmap[k] or 0.01, g) for k, v in old.items()}
        upd = full_update(new, 3, bucket_bytes=4096, digest=digest, stream=False)
        other = full_update({k: _mutate(v, 0.5, g) for k, v in old.items()}, 3, bucket_bytes=4096, digest=digest,
                            stream=False)
        return Case(name, old, new, upd, other, 1, digest)

    def tied_case():
        w = _random((4000,), torch.bfloat16, g)
        old = {"emb": w, "head": w.clone(), "x": _random((3000,), torch.float16, g)}
        nw = _mutate(w, 0.03, g)
        new = {"emb": nw, "head": nw.clone(), "x": _mutate(old["x"], 0.9, g, small=False)}
        upd = Encoder(old, 0, bucket_bytes=4096, digest=True).encode(new, 1)
        nw2 = _mutate(w, 0.03, g)
        other = Encoder(old, 0, bucket_bytes=4096, digest=True).encode({"emb": nw2, "head": nw2.clone(),
                                                                        "x": old["x"]}, 1)
        return Case("tied-delta-digest", old, new, upd, other, 0, True, tied=[("emb", "head")])

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
    for c in native + reference:
        assert len(c.buckets) >= 2, (c.name, len(c.buckets))
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


def _copy_parts(case: Case):
    return [({k: ([list(s) for s in v] if k == "segs" else v) for k, v in m.items()}, b) for m, b in case.parts]


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
# sparse segment internals (FORMAT.md §4)

def _varint(v: int) -> bytes:
    out = bytearray()
    _put_varint(out, v)           # the format's own (canonical) writer
    return bytes(out)


def _table_fields(seg_bytes: bytes, table_len: int, nchunks: int):
    """[(kind, offset, length, value)] of a chunk table: kind 'n', 'k', 'rl', 'bl'. Stops at the first problem."""
    fields, pos = [], 0
    try:
        for _ in range(nchunks):
            n, p2 = read_varint(seg_bytes, pos, table_len)
            fields.append(("n", pos, p2 - pos, n))
            pos = p2
            if n == 0:
                continue
            fields.append(("k", pos, 1, seg_bytes[pos]))
            pos += 1
            for kind in ("rl", "bl"):
                v, p2 = read_varint(seg_bytes, pos, table_len)
                fields.append((kind, pos, p2 - pos, v))
                pos = p2
    except Exception:
        pass
    return fields


def _sparse_segments(parts):
    return [(i, j) for i, (m, _) in enumerate(parts) for j, s in enumerate(m["segs"]) if s[3] == "s"]


def _dense_segments(parts):
    return [(i, j) for i, (m, _) in enumerate(parts) for j, s in enumerate(m["segs"]) if s[3] == "d"]


def _replace_segment_bytes(parts, i, j, new_bytes: bytes, table_len: int | None = None):
    """Replace segment j's data in bucket i; later offsets, the segment's len (and table_len) and body_len follow."""
    m, body = parts[i]
    segs = m["segs"]
    s = segs[j]
    off, ln = s[8], s[9]
    grow = len(new_bytes) - ln
    body = body[:off] + new_bytes + body[off + ln:]
    s[9] = len(new_bytes)
    if table_len is not None:
        s[7] = table_len
    for later in segs[j + 1:]:
        later[8] += grow
    m["body_len"] = len(body)
    parts[i] = (m, body)


# ---------------------------------------------------------------------------------------------------------------------
# mutations: each returns (payload, changed_version) where payload is a list of buckets

def mutate(case: Case, kind: str, rng: random.Random):
    bs = case.buckets
    nb = len(bs)
    i = rng.randrange(nb)
    relabel = False
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
        src = bs if rng.random() < 0.5 else case.other
        j = rng.randrange(len(src))
        a, b = rng.randrange(len(bs[i]) + 1), rng.randrange(len(src[j]) + 1)
        return bs[:i] + [bs[i][:a] + src[j][b:]] + bs[i + 1:], relabel
    if kind == "foreign":
        j = min(i, len(case.other) - 1) if rng.random() < 0.7 else rng.randrange(len(case.other))
        return bs[:i] + [case.other[j]] + bs[i + 1:], relabel
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
    if kind == "segment_field":
        m, body = parts[i]
        if not m["segs"]:
            return _chain(parts, changed, fix_uid), relabel
        j = rng.randrange(len(m["segs"]))
        f = rng.randrange(13)
        s = m["segs"][j]
        s[f] = _any_value(rng, s[f]) if rng.random() < 0.9 else rng.choice(
            [list(s[2])[::-1], [x + 1 for x in s[2]] if isinstance(s[2], list) else [1], "d", "s", "bfloat16"])
        return _chain(parts, changed, fix_uid), relabel
    if kind == "segment_list":
        m, body = parts[i]
        segs = m["segs"]
        op = rng.choice(["drop", "dup", "swap", "move", "reverse", "empty"])
        if op == "move" and nb > 1 and segs:
            j = rng.randrange(len(segs))
            k = rng.choice([x for x in range(nb) if x != i])
            s = segs.pop(j)
            data = body[s[8]:s[8] + s[9]]
            rest, off = bytearray(), 0
            for t in segs:          # re-lay the source body
                rest += body[t[8]:t[8] + t[9]]
                t[8] = off
                off += t[9]
            parts[i] = (dict(m, segs=segs, body_len=len(rest)), bytes(rest))
            m2, body2 = parts[k]
            s[8] = len(body2)
            parts[k] = (dict(m2, segs=m2["segs"] + [s], body_len=len(body2) + len(data)), body2 + data)
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
        new_segs, new_body, off = [], bytearray(), 0
        for j in order:
            s = list(segs[j])
            new_body += body[s[8]:s[8] + s[9]]
            s[8] = off
            off += s[9]
            new_segs.append(s)
        parts[i] = (dict(m, segs=new_segs, body_len=len(new_body)), bytes(new_body))
        changed.add(i)
        return _chain(parts, changed, fix_uid), relabel
    if kind in ("varint", "symbol_table", "chunk_table", "stream"):
        sp = _sparse_segments(parts)
        if not sp:
            return list(bs), relabel
        i, j = rng.choice(sp)
        m, body = parts[i]
        s = m["segs"][j]
        seg_bytes = body[s[8]:s[8] + s[9]]
        tl = s[7]
        nchunks = -(-s[5] >> s[6]) - (s[4] >> s[6])
        if kind == "symbol_table":
            f = s[10]
            try:
                count, pos = read_varint(f, 0, len(f))
                entries = []
                for _ in range(count):
                    sym, pos = read_varint(f, pos, len(f))
                    fr, pos = read_varint(f, pos, len(f))
                    entries.append([sym, fr])
            except Exception:
                return list(bs), relabel
            op = rng.choice(["sym", "freq", "move_mass", "drop", "add", "noncanonical", "truncate", "append",
                             "count", "swap"])
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
            s[10] = raw
            return _chain(parts, changed, fix_uid), relabel
        fields = _table_fields(seg_bytes, tl, nchunks)
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
            op = rng.choice(["inc", "dec", "zero", "double", "huge", "noncanonical", "truncate", "overlong",
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
        # chunk_table: Rice parameter, lengths moved between streams, chunk entries swapped/emptied
        op = rng.choice(["k", "k", "move_len", "swap_chunks", "zero_chunk", "table_len"])
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
            s[7] = max(0, tl + rng.choice([-1, 1, -2, 2]))
        changed.add(i)
        return _chain(parts, changed, fix_uid), relabel
    if kind == "dense_data":
        dsegs = _dense_segments(parts)
        if not dsegs:
            return list(bs), relabel
        i, j = rng.choice(dsegs)
        m, body = parts[i]
        s = m["segs"][j]
        b = bytearray(body)
        for _ in range(rng.choice([1, 1, 3])):
            pos = s[8] + rng.randrange(s[9])
            b[pos] ^= 1 << rng.randrange(8)
        parts[i] = (m, bytes(b))
        changed.add(i)
        return _chain(parts, changed, fix_uid), relabel
    raise ValueError(f"unknown mutation kind {kind!r}")


# ---------------------------------------------------------------------------------------------------------------------
# running

_STATE: dict = {}


def _kinds_schedule():
    sched = []
    for k, w in WEIGHTS.items():
        sched += [k] * w
    return sched


def _init(seed: int, slots=None, slot_index=None):
    torch.set_num_threads(1)
    native, reference = build_cases(seed)
    for c in native + reference:
        c.fresh_target()
    _STATE.update(native=native, reference=reference, schedule=_kinds_schedule(), seed=seed, slots=slots)
    if slots is not None:
        with slot_index.get_lock():
            _STATE["slot"] = slot_index.value
            slot_index.value += 1


def one(index: int, reference_share: float, verbose: bool = False) -> tuple[str, str, str, str | None]:
    """Run payload ``index``: (kind, case name, outcome, failure description or None)."""
    seed = _STATE["seed"]
    rng = random.Random(f"{seed}:{index}")
    use_ref = rng.random() < reference_share
    cases = _STATE["reference"] if use_ref else _STATE["native"]
    kinds = _STATE["schedule"]
    for _attempt in range(50):   # a mutation that does not apply to the case, or changes no byte, is drawn again
        case = cases[rng.randrange(len(cases))]
        kind = kinds[rng.randrange(len(kinds))]
        if not case.digest and kind in STRUCT_KINDS:
            kind = BYTE_KINDS[rng.randrange(len(BYTE_KINDS))]
        try:
            payload, relabel = mutate(case, kind, rng)
        except (OverflowError, ValueError, TypeError, IndexError, KeyError):   # value msgpack cannot hold, etc.
            continue
        if payload != case.buckets:
            break
    dec = case.decoder
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
    if outcome == "accepted":
        if not case.bits_equal("new"):
            failure = "accepted, but the target differs from the encoder's new state"
        elif dec.version != case.version:
            if relabel:
                outcome = "accepted-relabelled"
            else:
                failure = f"accepted at version {dec.version}, expected {case.version}"
        else:
            outcome = "accepted-exact"
            if stats.version != case.version:
                failure = "stats disagree with the decoder"
        case.reset()
    elif outcome != "exception":
        if not case.bits_equal("old"):
            failure = f"refused ({outcome}: {err}) but the target changed"
        elif dec.version != case.version0 or dec.pending:
            failure = f"refused ({outcome}) but version/pending changed"
    if outcome == "exception" or failure:
        case.reset()
    if len(dec._arena) > case.max_arena:
        failure = (failure or "") + f" arena holds {len(dec._arena)} entries (> {case.max_arena})"
    if verbose:
        print(f"payload {index}: case {case.name}, kind {kind}, {'reference' if use_ref else 'native'} kernels: "
              f"{outcome}{'' if outcome.startswith('accepted') or outcome == 'exception' else ': ' + str(err)}")
    return kind, case.name + ("/ref" if use_ref else ""), outcome, failure


def _chunk(args) -> dict:
    start, stop, reference_share = args
    slots = _STATE.get("slots")
    res = {"kinds": defaultdict(Counter), "cases": defaultdict(Counter), "outcomes": Counter(), "failures": [],
           "reference": 0, "n": 0}
    for index in range(start, stop):
        if slots is not None:
            slots[_STATE["slot"]] = index
        kind, case, outcome, failure = one(index, reference_share)
        res["kinds"][kind][outcome] += 1
        res["cases"][case][outcome] += 1
        res["outcomes"][outcome] += 1
        res["reference"] += case.endswith("/ref")
        res["n"] += 1
        if failure:
            res["failures"].append({"index": index, "kind": kind, "case": case, "outcome": outcome,
                                    "failure": failure[:2000]})
    res["kinds"] = {k: dict(v) for k, v in res["kinds"].items()}
    res["cases"] = {k: dict(v) for k, v in res["cases"].items()}
    return res



def run(count: int = 1_000_000, seed: int = 1, workers: int = 2, out=None, reference_share: float = 0.01,
        start: int = 0, chunk: int = 2000, quiet: bool = False, progress_every: float = 5.0) -> dict:
    """Fuzz ``count`` payloads (indices ``start .. start+count-1``); write fuzz.json/fuzz.txt into ``out`` and return
    the summary (``failures`` lists every failing payload with what reproduces it)."""
    out = Path(out) if out is not None else SCRATCH
    t0 = time.perf_counter()
    total = {"kinds": defaultdict(Counter), "cases": defaultdict(Counter), "outcomes": Counter(), "failures": [],
             "reference": 0, "n": 0}
    chunks = [(a, min(a + chunk, start + count), reference_share) for a in range(start, start + count, chunk)]
    last = time.perf_counter()
    crashes = []

    def merge(r):
        for k, v in r["kinds"].items():
            total["kinds"][k].update(v)
        for k, v in r["cases"].items():
            total["cases"][k].update(v)
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
        _init(seed)
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
                                        initargs=(seed, slots, slot_index)) as pool:
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
    result = {
        "count": total["n"], "requested": count, "seed": seed, "start": start, "workers": workers,
        "reference_share": reference_share, "reference_payloads": total["reference"],
        "seconds": round(elapsed, 2), "payloads_per_second": round(total["n"] / max(elapsed, 1e-9), 1),
        "outcomes": dict(sorted(total["outcomes"].items())),
        "kinds": {k: dict(sorted(v.items())) for k, v in sorted(total["kinds"].items())},
        "cases": {k: dict(sorted(v.items())) for k, v in sorted(total["cases"].items())},
        "failures": total["failures"],
        "reproduce": f"python bench/fuzz.py --seed {seed} --start INDEX --count 1 --workers 1 -v",
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
    lines = [f"sparsesync decoder fuzz: {r['count']} payloads (seed {r['seed']}, indices {r['start']}.."
             f"{r['start'] + r['count'] - 1}), {r['workers']} worker process(es)",
             f"machine: {r['machine']}; native kernels: {r['native_kernels']}",
             f"reference kernels decoded {r['reference_payloads']} payloads (share {r['reference_share']})",
             f"{r['seconds']:.1f} s, {r['payloads_per_second']:.0f} payloads/s",
             f"failures: {len(r['failures'])}", "", "outcomes:"]
    for k, v in r["outcomes"].items():
        lines.append(f"  {k:22s} {v:>9d}  ({100 * v / max(1, r['count']):.2f}%)")
    outcome_names = sorted({o for v in r["kinds"].values() for o in v})
    short = {"accepted-exact": "exact", "accepted-relabelled": "relabel", "CorruptPayload": "Corrupt",
             "BaseMismatch": "BaseMis", "VersionMismatch": "VersMis", "LayoutMismatch": "LayoutMis",
             "RollbackRefused": "Rollback", "exception": "EXC"}
    head = "  ".join(f"{short.get(o, o)[:9]:>9s}" for o in outcome_names)
    lines += ["", f"per mutation kind:  {'total':>8s}  {head}"]
    for k, v in r["kinds"].items():
        lines.append(f"  {k:16s} {sum(v.values()):>8d}  " + "  ".join(f"{v.get(o, 0):>9d}" for o in outcome_names))
    lines += ["", "per case:"]
    for k, v in r["cases"].items():
        lines.append(f"  {k:24s} {sum(v.values()):>8d}  " + ", ".join(f"{o} {n}" for o, n in v.items()))
    if r["failures"]:
        lines += ["", f"FAILURES (reproduce: {r['reproduce']}):"]
        for f in r["failures"][:50]:
            lines.append(f"  index {f['index']} kind {f['kind']} case {f['case']}: {f['outcome']}: "
                         f"{f['failure'].splitlines()[0] if f['failure'] else ''}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000, help="payloads to try (default 1,000,000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the states and of every mutation (default 1)")
    p.add_argument("--start", type=int, default=0, help="first payload index (to reproduce one: --count 1)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    p.add_argument("--reference-share", type=float, default=0.01,
                   help="share of payloads decoded by the pure-PyTorch reference kernels (default 0.01)")
    p.add_argument("--chunk", type=int, default=2000, help="payloads per work unit (default 2000)")
    p.add_argument("--out", metavar="DIR", default=str(SCRATCH),
                   help=f"write fuzz.json and fuzz.txt into DIR (default {SCRATCH}; the committed results are "
                        "bench/results)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every payload's outcome (with --workers 1)")
    a = p.parse_args(argv)
    if a.verbose:
        _init(a.seed)
        for index in range(a.start, a.start + a.count):
            kind, case, outcome, failure = one(index, a.reference_share, verbose=True)
            if failure:
                print(f"  FAILURE: {failure}")
        return 0
    r = run(count=a.count, seed=a.seed, workers=a.workers, out=a.out, reference_share=a.reference_share,
            start=a.start, chunk=a.chunk)
    return 1 if r["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
