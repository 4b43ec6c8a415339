"""Bucket framing, headers and symbol tables (docs/FORMAT.md §2-§5). Parsing validates everything before use."""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from .dtypes import BY_NAME, width
from .errors import CorruptPayload
from .kernels import impl
from .reference import SCALE, max_symbol, read_varint, KernelError

FORMAT_VERSION = 1
MAGIC = b"SSYN"
PREAMBLE = struct.Struct("<4sIQ")
HEADER_SEED = 0x48445248
MAX_HEADER = 64 << 20
MAX_SEGMENTS = 1 << 20
VALUE_MODES = {"delta": 0, "raw": 1}


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
class Header:
    uid: bytes
    base: int | None
    ver: int
    vals: str
    idx: int
    cnt: int
    layout: bytes
    ntensors: int
    digest: str | None
    body_len: int
    body_hash: int
    prev: int
    segs: tuple

    def as_map(self) -> dict:
        return {"v": FORMAT_VERSION, "uid": self.uid, "base": self.base, "ver": self.ver, "vals": self.vals,
                "idx": self.idx, "cnt": self.cnt, "layout": self.layout, "ntensors": self.ntensors,
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


def header_hash(bucket) -> int:
    return PREAMBLE.unpack_from(bucket, 0)[2]


def _ext_refused(code, data):
    raise ValueError("msgpack extension types are not allowed")


def _int(m, key, lo=0, hi=(1 << 63) - 1, nullable=False):
    v = m.get(key, KeyError) if isinstance(m, dict) else m
    if v is KeyError:
        raise CorruptPayload(f"header field {key!r} missing")
    if v is None and nullable:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptPayload(f"header field {key!r} = {v!r} is not an integer in [{lo}, {hi}]")
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
        raise CorruptPayload(f"segment name/dtype invalid: {name!r} {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 64 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < (1 << 62) for s in shape):
        raise CorruptPayload(f"segment {name!r}: shape {shape!r} invalid")
    numel = math.prod(shape)
    if numel >= 1 << 62:
        raise CorruptPayload(f"segment {name!r}: shape too large")
    w = width(BY_NAME[dtype])
    start = _int(raw[4], "start", 0, numel)
    end = _int(raw[5], "end", start, numel)
    log2c = _int(raw[6], "log2c", 0, 30)
    table_len = _int(raw[7], "table_len", 0, body_len)
    off = _int(raw[8], "off", 0, body_len)
    length = _int(raw[9], "len", 0, body_len - off)
    freq, vhash = raw[10], raw[11]
    nchanged = _int(raw[12], "nchanged", 0, end - start)
    if off != expect_off:
        raise CorruptPayload(f"segment {name!r}: data at {off}, expected {expect_off} (gap or overlap)")
    if not isinstance(freq, bytes):
        raise CorruptPayload(f"segment {name!r}: freq is not bytes")
    if kind == "d":
        if length != (end - start) * w or log2c or table_len or freq or vhash is not None or nchanged != end - start:
            raise CorruptPayload(f"dense segment {name!r}: fields inconsistent")
    elif kind == "s":
        if not 12 <= log2c <= 30:
            raise CorruptPayload(f"sparse segment {name!r}: log2c {log2c} outside [12, 30]")
        C = 1 << log2c
        if start % C or (end % C and end != numel) or end == start or table_len > length:
            raise CorruptPayload(f"sparse segment {name!r}: range [{start}, {end}) not chunk aligned")
        if not isinstance(vhash, int) or isinstance(vhash, bool) or not 0 <= vhash < (1 << 64):
            raise CorruptPayload(f"sparse segment {name!r}: values_hash invalid")
        freq = bytes(freq)
        unpack_freq(freq, max_symbol(w, VALUE_MODES[vals]))
    else:
        raise CorruptPayload(f"segment {name!r}: unknown kind {kind!r}")
    return Segment(name, dtype, tuple(shape), kind, start, end, log2c, table_len, off, length, freq, vhash, nchanged)


def parse_bucket(bucket) -> tuple[Header, int, memoryview]:
    """Validate a bucket completely (framing, hashes, header schema, segment bounds); return header, its hash, body."""
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
        raise CorruptPayload("header is not a map")
    if m.get("v") != FORMAT_VERSION:
        raise CorruptPayload(f"unsupported format version {m.get('v')!r}")
    uid = _typed(m, "uid", bytes)
    layout = _typed(m, "layout", bytes)
    vals = _typed(m, "vals", str)
    if len(uid) != 16 or len(layout) != 16 or vals not in VALUE_MODES:
        raise CorruptPayload("uid/layout/vals invalid")
    idx = _int(m, "idx", 0, 1 << 40)
    cnt = _int(m, "cnt", 0, 1 << 40)
    if cnt not in (0, idx + 1):
        raise CorruptPayload(f"bucket {idx} has count {cnt}: it must be 0 (more follow) or {idx + 1} (the last)")
    body_len = _int(m, "body_len", 0, 1 << 62)
    body = mv[PREAMBLE.size + hlen:]
    if len(body) != body_len:
        raise CorruptPayload(f"body has {len(body)} bytes, header says {body_len} (truncated or padded bucket)")
    body_hash = _int(m, "body_hash", 0, (1 << 64) - 1)
    if impl().tree64(body) != body_hash:
        raise CorruptPayload("body checksum mismatch")
    digest = _typed(m, "digest", str, nullable=True)
    segs_raw = _typed(m, "segs", list)
    if len(segs_raw) > MAX_SEGMENTS:
        raise CorruptPayload("too many segments")
    segs, off = [], 0
    for raw in segs_raw:
        seg = _segment(raw, body_len, vals, off)
        off = seg.off + seg.length
        segs.append(seg)
    if off != body_len:
        raise CorruptPayload(f"segments cover {off} of {body_len} body bytes")
    header = Header(uid=uid, base=_int(m, "base", 0, nullable=True), ver=_int(m, "ver"), vals=vals, idx=idx, cnt=cnt,
                    layout=layout, ntensors=_int(m, "ntensors"), digest=digest, body_len=body_len,
                    body_hash=body_hash, prev=_int(m, "prev", 0, (1 << 64) - 1), segs=tuple(segs))
    return header, hhash, body
