"""Bucket framing, headers and symbol tables (docs/FORMAT.md §2-§5). Parsing validates everything before use.

A bucket has exactly one valid encoding: :func:`parse_bucket` refuses any header that is not byte for byte what
:func:`pack_bucket` makes of the values it parsed (key set and order, msgpack types and integer widths).
"""
from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from .dtypes import BY_NAME, width
from .space import MAX_CLASSES, key_bits
from .errors import CorruptPayload, InvalidArgument
from .kernels import impl
from .reference import SCALE, max_symbol, read_varint, KernelError

FORMAT_VERSION = 2          # the newest version this library writes and reads
FORMATS = (1, 2)            # every version this library reads (and can write)
MAGIC = b"SSYN"
PREAMBLE = struct.Struct("<4sIQ")
HEADER_SEED = 0x48445248
MAX_HEADER = 64 << 20
MAX_SEGMENTS = 1 << 20
VALUE_MODES = {"delta": 0, "raw": 1}
# the header keys, in the order every header lists them (FORMAT.md §2)
HEADER_KEYS = ("v", "uid", "base", "ver", "vals", "idx", "cnt", "layout", "ntensors", "dig", "digest", "body_len",
               "body_hash", "prev", "segs")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Segment:
    name: str
    dtype: str
    shape: tuple
    kind: str          # "d" dense or "s" sparse
    start: int
    end: int
    log2c: int
    table_len: int
    off: int
    length: int
    freq: bytes
    values_hash: int | None
    nchanged: int

    def as_list(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.kind, self.start, self.end, self.log2c, self.table_len,
                self.off, self.length, self.freq, self.values_hash, self.nchanged]


@dataclass(frozen=True)
class Segment2:
    """A version-2 segment (FORMAT.md §6.2): a range of a dtype's space. ``cls``: per class None (absent) or
    (k, freq bytes)."""
    space: str
    kind: str          # "d" dense or "s" sparse
    start: int
    end: int
    log2c: int
    table_len: int
    off: int
    length: int
    cuts: tuple
    cls: tuple
    values_hash: int | None
    nchanged: int

    def as_list(self) -> list:
        return [self.space, self.kind, self.start, self.end, self.log2c, self.table_len, self.off, self.length,
                list(self.cuts), [None if c is None else [c[0], c[1]] for c in self.cls], self.values_hash,
                self.nchanged]

    @property
    def name(self) -> str:      # for messages that name what a segment covers
        return self.space


@dataclass(frozen=True)
class Header:
    uid: bytes
    base: int | None
    ver: int
    vals: str
    idx: int
    cnt: int
    layout: bytes
    ntensors: int
    dig: bool              # the update carries a state digest (in its last bucket); the same in every bucket
    digest: str | None
    body_len: int
    body_hash: int
    prev: int
    segs: tuple
    v: int = 1             # format version: segments are Segment (1) or Segment2 (2)

    def as_map(self) -> dict:
        """The header as the msgpack map of FORMAT.md §2, keys in the documented order (``HEADER_KEYS``)."""
        return {"v": self.v, "uid": self.uid, "base": self.base, "ver": self.ver, "vals": self.vals,
                "idx": self.idx, "cnt": self.cnt, "layout": self.layout, "ntensors": self.ntensors, "dig": self.dig,
                "digest": self.digest, "body_len": self.body_len, "body_hash": self.body_hash, "prev": self.prev,
                "segs": [s.as_list() for s in self.segs]}


# ---------------------------------------------------------------------------------------------------------------------
# symbol tables (FORMAT.md 4.3)

def build_freq(hist) -> np.ndarray:
    """Quantise a symbol histogram to frequencies summing to 4096 (every present symbol keeps f >= 1)."""
    hist = np.asarray(hist, dtype=np.float64)
    present = np.nonzero(hist)[0]
    freq = np.zeros(256, dtype=np.int64)
    if present.size == 0:
        return freq.astype(np.uint32)
    total = hist.sum()
    freq[present] = np.maximum(1, np.floor(hist[present] * SCALE / total)).astype(np.int64)
    diff = SCALE - int(freq.sum())
    order = sorted(present.tolist(), key=lambda s: (-hist[s], s))
    if diff > 0:
        freq[order[0]] += diff
    while diff < 0:  # only when many rare symbols were lifted to 1: take from the largest frequencies
        s = max(present.tolist(), key=lambda s: (freq[s], -s))
        take = min(-diff, int(freq[s]) - 1)
        freq[s] -= take
        diff += take
    return freq.astype(np.uint32)


def pack_freq(freq) -> bytes:
    out = bytearray()
    present = [s for s in range(256) if freq[s]]
    _put_varint(out, len(present))
    for s in present:
        _put_varint(out, s)
        _put_varint(out, int(freq[s]))
    return bytes(out)


def unpack_freq(data: bytes, max_sym: int) -> np.ndarray:
    freq = np.zeros(256, dtype=np.uint32)
    try:
        count, pos = read_varint(data, 0, len(data))
        if count < 1 or count > 256:
            raise CorruptPayload(f"symbol table has {count} symbols")
        last = -1
        for _ in range(count):
            s, pos = read_varint(data, pos, len(data))
            f, pos = read_varint(data, pos, len(data))
            if s <= last or s > max_sym or f < 1 or f > SCALE:
                raise CorruptPayload(f"symbol table entry ({s}, {f}) invalid")
            freq[s] = f
            last = s
    except KernelError as exc:
        raise CorruptPayload(f"symbol table: {exc}") from None
    if pos != len(data) or int(freq.sum()) != SCALE:
        raise CorruptPayload("symbol table does not sum to 4096 or has trailing bytes")
    return freq


def _put_varint(out: bytearray, v: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
        raise InvalidArgument(f"a varint holds an int in [0, 2^63), got {v!r}")
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def entropy_bits(hist) -> float:
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist[hist > 0] / total
    return float(-(p * np.log2(p)).sum())


def rice_bits(density: float) -> float:
    """Expected bits per position of the best Rice code for a geometric gap distribution."""
    if density >= 1.0:
        return 1.0
    q = 1.0 - density
    best = math.inf
    for k in range(31):
        qk = q ** (1 << k)
        best = min(best, 1 + k + (qk / (1 - qk) if qk < 1 else math.inf))
    return best


# ---------------------------------------------------------------------------------------------------------------------
# update id and buckets

def update_uid(layout: bytes, base, ver: int, vals: str) -> bytes:
    """FORMAT.md 5: names the transition (layout, versions, value mode); buckets of two different updates of the same
    transition are told apart by the chain of ``prev`` links."""
    h = hashlib.blake2b(digest_size=32)
    h.update(layout)
    h.update(msgpack.packb([base, ver, vals], use_bin_type=True))
    return h.digest()[:16]


def pack_bucket(header: Header, body) -> bytes:
    hbytes = msgpack.packb(header.as_map(), use_bin_type=True)
    out = bytearray(PREAMBLE.size + len(hbytes) + len(body))
    PREAMBLE.pack_into(out, 0, MAGIC, len(hbytes), impl().h64(hbytes, HEADER_SEED))
    out[PREAMBLE.size:PREAMBLE.size + len(hbytes)] = hbytes
    out[PREAMBLE.size + len(hbytes):] = body
    return bytes(out)


def peek_version(bucket) -> int:
    """The format version of a bucket made by :func:`pack_bucket` (its header starts with the key "v"), without
    parsing it; 0 if it does not look like one."""
    mv = memoryview(bucket).cast("B")
    if len(mv) > PREAMBLE.size + 3 and bytes(mv[PREAMBLE.size + 1:PREAMBLE.size + 3]) == b"\xa1v":
        return mv[PREAMBLE.size + 3] if mv[PREAMBLE.size + 3] < 0x80 else 0
    return 0


def header_hash(bucket) -> int:
    return PREAMBLE.unpack_from(bucket, 0)[2]


def _r(v, limit: int = 60) -> str:
    """repr of a (possibly huge, attacker-chosen) value, cut for error messages."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _ext_refused(code, data):
    raise CorruptPayload(f"msgpack extension type {code} is not allowed in a header")


def _int(m, key, lo=0, hi=(1 << 63) - 1, nullable=False):
    v = m.get(key, KeyError) if isinstance(m, dict) else m
    if v is KeyError:
        raise CorruptPayload(f"header field {key!r} missing")
    if v is None and nullable:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptPayload(f"header field {key!r} = {_r(v)} is not an integer in [{lo}, {hi}]")
    return v


def _typed(m, key, typ, nullable=False):
    v = m.get(key, KeyError)
    if v is KeyError:
        raise CorruptPayload(f"header field {key!r} missing")
    if v is None and nullable:
        return None
    if not isinstance(v, typ):
        raise CorruptPayload(f"header field {key!r} has type {type(v).__name__}")
    return v


def _segment(raw, body_len: int, vals: str, expect_off: int) -> Segment:
    if not isinstance(raw, list) or len(raw) != 13:
        raise CorruptPayload("segment is not a 13-element array")
    name, dtype, shape, kind = raw[0], raw[1], raw[2], raw[3]
    if not isinstance(name, str) or not isinstance(dtype, str) or dtype not in BY_NAME:
        raise CorruptPayload(f"segment name/dtype invalid: {_r(name)} {_r(dtype)}")
    if not isinstance(shape, list) or len(shape) > 64 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < (1 << 62) for s in shape):
        raise CorruptPayload(f"segment {_r(name, 200)}: shape {_r(shape)} invalid")
    numel = math.prod(shape)
    if numel >= 1 << 62:
        raise CorruptPayload(f"segment {_r(name, 200)}: shape too large")
    w = width(BY_NAME[dtype])
    start = _int(raw[4], "start", 0, numel)
    end = _int(raw[5], "end", start, numel)
    log2c = _int(raw[6], "log2c", 0, 30)
    table_len = _int(raw[7], "table_len", 0, body_len)
    off = _int(raw[8], "off", 0, body_len)
    length = _int(raw[9], "len", 0, body_len - off)
    freq, vhash = raw[10], raw[11]
    nchanged = _int(raw[12], "nchanged", 0, end - start)
    if end == start:
        raise CorruptPayload(f"segment {_r(name, 200)}: empty element range [{start}, {end})")
    if off != expect_off:
        raise CorruptPayload(f"segment {_r(name, 200)}: data at {off}, expected {expect_off} (gap or overlap)")
    if not isinstance(freq, bytes):
        raise CorruptPayload(f"segment {_r(name, 200)}: freq is not bytes")
    if kind == "d":
        if length != (end - start) * w or log2c or table_len or freq or vhash is not None or nchanged != end - start:
            raise CorruptPayload(f"dense segment {_r(name, 200)}: fields inconsistent")
    elif kind == "s":
        if not 12 <= log2c <= 30:
            raise CorruptPayload(f"sparse segment {_r(name, 200)}: log2c {log2c} outside [12, 30]")
        C = 1 << log2c
        if start % C or (end % C and end != numel) or table_len > length:
            raise CorruptPayload(f"sparse segment {_r(name, 200)}: range [{start}, {end}) not chunk aligned")
        if not isinstance(vhash, int) or isinstance(vhash, bool) or not 0 <= vhash < (1 << 64):
            raise CorruptPayload(f"sparse segment {_r(name, 200)}: values_hash invalid")
        freq = bytes(freq)
        unpack_freq(freq, max_symbol(w, VALUE_MODES[vals]))
    else:
        raise CorruptPayload(f"segment {_r(name, 200)}: unknown kind {_r(kind)}")
    return Segment(name, dtype, tuple(shape), kind, start, end, log2c, table_len, off, length, freq, vhash, nchanged)


def _segment2(raw, body_len: int, vals: str, expect_off: int) -> Segment2:
    if not isinstance(raw, list) or len(raw) != 12:
        raise CorruptPayload("segment is not a 12-element array (format 2)")
    space, kind = raw[0], raw[1]
    if not isinstance(space, str) or space not in BY_NAME:
        raise CorruptPayload(f"segment space {_r(space)} is not a dtype name")
    w = width(BY_NAME[space])
    start = _int(raw[2], "start", 0, (1 << 62) - 1)
    end = _int(raw[3], "end", start, 1 << 62)
    log2c = _int(raw[4], "log2c", 0, 30)
    table_len = _int(raw[5], "table_len", 0, body_len)
    off = _int(raw[6], "off", 0, body_len)
    length = _int(raw[7], "len", 0, body_len - off)
    cuts, cls, vhash = raw[8], raw[9], raw[10]
    nchanged = _int(raw[11], "nchanged", 0, end - start)
    where = f"{space} segment [{start}, {end})"
    if end == start:
        raise CorruptPayload(f"{where}: empty element range")
    if off != expect_off:
        raise CorruptPayload(f"{where}: data at {off}, expected {expect_off} (gap or overlap)")
    if not isinstance(cuts, list) or not isinstance(cls, list):
        raise CorruptPayload(f"{where}: cuts/cls are not arrays")
    if kind == "d":
        if length != (end - start) * w or log2c or table_len or cuts or cls or vhash is not None or \
                nchanged != end - start:
            raise CorruptPayload(f"dense {where}: fields inconsistent")
        return Segment2(space, kind, start, end, 0, 0, off, length, (), (), None, nchanged)
    if kind != "s":
        raise CorruptPayload(f"{where}: unknown kind {_r(kind)}")
    if not 12 <= log2c <= 30 or table_len > length or nchanged < 1:
        raise CorruptPayload(f"sparse {where}: log2c {log2c}, table_len {table_len} or nchanged {nchanged} invalid")
    if not isinstance(vhash, int) or isinstance(vhash, bool) or not 0 <= vhash < (1 << 64):
        raise CorruptPayload(f"sparse {where}: values_hash invalid")
    kb = key_bits(space)
    if len(cuts) > MAX_CLASSES - 1 or len(cls) != len(cuts) + 1 or (cuts and not kb):
        raise CorruptPayload(f"sparse {where}: {len(cuts)} cuts and {len(cls)} classes (dtype key bits {kb})")
    last = 0
    for c in cuts:
        if type(c) is not int or not last < c < (1 << kb):
            raise CorruptPayload(f"sparse {where}: cuts {_r(cuts, 200)} not strictly increasing in [1, {1 << kb})")
        last = c
    out = []
    max_sym = max_symbol(w, VALUE_MODES[vals])
    for c in cls:
        if c is None:
            out.append(None)
            continue
        if not isinstance(c, list) or len(c) != 2 or type(c[0]) is not int or not 0 <= c[0] <= log2c or \
                not isinstance(c[1], bytes):
            raise CorruptPayload(f"sparse {where}: class entry {_r(c)} is not [k <= log2c, table]")
        if c[1]:
            unpack_freq(c[1], max_sym)
        elif all(e is None for e in out):
            raise CorruptPayload(f"sparse {where}: the first present class refers to an earlier class's table")
        out.append((c[0], bytes(c[1])))
    if all(c is None for c in out):
        raise CorruptPayload(f"sparse {where}: no class is present")
    return Segment2(space, kind, start, end, log2c, table_len, off, length, tuple(cuts), tuple(out), vhash, nchanged)


def parse_bucket(bucket) -> tuple[Header, int, memoryview]:
    """Validate a bucket completely (framing, hashes, header schema and canonical form, segment bounds); return the
    header, its hash and the body. Everything that depends only on the bucket is checked here; what depends on the
    receiver (layout, versions, chain) is checked by the decoder. Raises :class:`CorruptPayload`."""
    try:
        mv = memoryview(bucket).cast("B")
    except (TypeError, ValueError):
        raise CorruptPayload(f"bucket is a {type(bucket).__name__}, not a contiguous bytes-like object") from None
    if len(mv) < PREAMBLE.size:
        raise CorruptPayload(f"bucket of {len(mv)} bytes is shorter than its {PREAMBLE.size}-byte preamble")
    magic, hlen, hhash = PREAMBLE.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptPayload(f"bad magic {bytes(magic)!r}")
    if hlen > MAX_HEADER or PREAMBLE.size + hlen > len(mv):
        raise CorruptPayload(f"header length {hlen} exceeds the bucket ({len(mv)} bytes) or the 64 MiB limit")
    hbytes = mv[PREAMBLE.size:PREAMBLE.size + hlen]
    if impl().h64(hbytes, HEADER_SEED) != hhash:
        raise CorruptPayload("header checksum mismatch")
    try:
        m = msgpack.unpackb(hbytes, raw=False, strict_map_key=True, ext_hook=_ext_refused, use_list=True)
    except Exception as exc:  # any malformed msgpack
        raise CorruptPayload(f"header is not valid msgpack: {exc}") from None
    if not isinstance(m, dict):
        raise CorruptPayload(f"header is a msgpack {type(m).__name__}, not a map")
    if tuple(m) != HEADER_KEYS:
        missing = [k for k in HEADER_KEYS if k not in m]
        unknown = [k for k in m if k not in HEADER_KEYS]
        raise CorruptPayload(f"header keys must be exactly {list(HEADER_KEYS)} in this order; missing {missing}, "
                             f"unknown {_r(unknown[:5], 200)}, got {_r(list(m)[:20], 300)}")
    v = m["v"]
    if type(v) is not int or v not in FORMATS:
        raise CorruptPayload(f"unsupported format version {_r(v)} (this decoder reads the integers "
                             f"{', '.join(map(str, FORMATS))})")
    uid = _typed(m, "uid", bytes)
    layout = _typed(m, "layout", bytes)
    vals = _typed(m, "vals", str)
    if len(uid) != 16 or len(layout) != 16 or vals not in VALUE_MODES:
        raise CorruptPayload(f"uid/layout/vals invalid: {len(uid)}-byte uid, {len(layout)}-byte layout, "
                             f"vals {vals[:20]!r}")
    idx = _int(m, "idx", 0, 1 << 40)
    cnt = _int(m, "cnt", 0, 1 << 40)
    if cnt not in (0, idx + 1):
        raise CorruptPayload(f"bucket {idx} has count {cnt}: it must be 0 (more follow) or {idx + 1} (the last)")
    base = _int(m, "base", 0, nullable=True)
    ver = _int(m, "ver")
    if base is not None and ver <= base:
        raise CorruptPayload(f"a delta update goes from version {base} to version {ver}: versions must increase "
                             "(a full update is the only way to a version at or below the receiver's)")
    dig = m["dig"]
    if type(dig) is not bool:
        raise CorruptPayload(f"header field 'dig' = {_r(dig)} is not a bool")
    digest = _typed(m, "digest", str, nullable=True)
    if cnt and dig:
        if digest is None or not _DIGEST_RE.fullmatch(digest):
            raise CorruptPayload(f"the update says it carries a state digest, but its last bucket ({idx}) has "
                                 f"digest {_r(digest, 80)}, not 64 lowercase hex digits (truncated or forged "
                                 "update)")
    elif digest is not None:
        raise CorruptPayload(f"bucket {idx} carries a digest, but " +
                             ("it is not the last bucket" if not cnt else "the update says it carries none"))
    body_len = _int(m, "body_len", 0, 1 << 62)
    body = mv[PREAMBLE.size + hlen:]
    if len(body) != body_len:
        raise CorruptPayload(f"body has {len(body)} bytes, header says {body_len} (truncated or padded bucket)")
    body_hash = _int(m, "body_hash", 0, (1 << 64) - 1)
    if impl().tree64(body) != body_hash:
        raise CorruptPayload("body checksum mismatch")
    ntensors = _int(m, "ntensors")
    prev = _int(m, "prev", 0, (1 << 64) - 1)
    segs_raw = _typed(m, "segs", list)
    if len(segs_raw) > MAX_SEGMENTS:
        raise CorruptPayload(f"{len(segs_raw)} segments in one bucket (at most {MAX_SEGMENTS})")
    if not segs_raw and not cnt:
        raise CorruptPayload(f"bucket {idx} is empty but not the last: only the last bucket may have no segment")
    segs, off = [], 0
    parse = _segment if v == 1 else _segment2
    for raw in segs_raw:
        seg = parse(raw, body_len, vals, off)
        off = seg.off + seg.length
        segs.append(seg)
    if off != body_len:
        raise CorruptPayload(f"segments cover {off} of {body_len} body bytes")
    header = Header(uid=uid, base=base, ver=ver, vals=vals, idx=idx, cnt=cnt, layout=layout, ntensors=ntensors,
                    dig=dig, digest=digest, body_len=body_len, body_hash=body_hash, prev=prev, segs=tuple(segs), v=v)
    # one encoding only: the header must be exactly what the encoder packs for these values (key order, msgpack
    # types, shortest integer/string/array formats); headers are small next to their bodies, so this costs little
    if msgpack.packb(header.as_map(), use_bin_type=True) != hbytes:
        raise CorruptPayload("header is not in canonical form (FORMAT.md §2: shortest msgpack encodings, documented "
                             "types and key order)")
    return header, hhash, body
