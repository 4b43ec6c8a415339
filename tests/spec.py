"""An independent implementation of docs/FORMAT.md in plain Python integers (no sparsesync code, only msgpack).

Used by the tests to pin the wire format: hand-made vectors and real encoder output must agree with what the spec
says, so neither the reference nor the native kernels can drift from the document silently. Slow; small inputs only.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import struct

import msgpack

M64 = (1 << 64) - 1
K0 = 0x9E3779B97F4A7C15
K1 = 0xBF58476D1CE4E5B9
K2 = 0x94D049BB133111EB
K3 = 0xD6E8FEB86659FD93
RANS_L = 1 << 23
WIDTH = {"bfloat16": 2, "float16": 2, "int16": 2, "float32": 4, "int32": 4, "float64": 8, "int64": 8,
         "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1, "bool": 1}
HEADER_KEYS_DOC = None  # filled by tests from docs/FORMAT.md
# FORMAT.md 2: exactly these keys, in this order
HEADER_KEYS = ["v", "uid", "base", "ver", "vals", "idx", "cnt", "layout", "ntensors", "dig", "digest", "body_len",
               "body_hash", "prev", "segs"]


class SpecError(Exception):
    pass


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _mix(x):
    x ^= x >> 30
    x = (x * K1) & M64
    x ^= x >> 27
    x = (x * K2) & M64
    x ^= x >> 31
    return x


def h64(data: bytes, seed: int) -> int:
    data = bytes(data)
    L = len(data)
    padded = data + b"\0" * (-L % 32)
    words = struct.unpack(f"<{len(padded) // 8}Q", padded)
    a = [(seed + (j + 1) * K0) & M64 for j in range(4)]
    for i in range(len(words) // 4):
        for j in range(4):
            a[j] = (_rotl((a[j] + words[4 * i + j] * K3) & M64, 27) * K1) & M64
    h = (seed ^ (L * K0)) & M64
    for j in range(4):
        h = _mix(h ^ a[j])
    return h


def tree64(data: bytes) -> int:
    data = bytes(data)
    L = len(data)
    leaves = [data[i:i + 4096] for i in range(0, L, 4096)] or [b""]
    hashes = b"".join(struct.pack("<Q", h64(leaf, i)) for i, leaf in enumerate(leaves))
    return h64(hashes, L ^ 0x5353594E43)


def put_varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def read_varint(buf: bytes, pos: int, end: int):
    v = 0
    for i in range(10):
        if pos >= end:
            raise SpecError("varint past end")
        b = buf[pos]
        pos += 1
        v |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if v >= 1 << 63:
                raise SpecError("varint too large")
            if i > 0 and b == 0:
                raise SpecError("varint not canonical: a multi-byte varint ends in a zero byte")
            return v, pos
    raise SpecError("varint longer than 10 bytes")


def parse_freq(data: bytes):
    S, pos = read_varint(data, 0, len(data))
    freq = {}
    last = -1
    for _ in range(S):
        s, pos = read_varint(data, pos, len(data))
        f, pos = read_varint(data, pos, len(data))
        if s <= last or s > 255 or f < 1:
            raise SpecError("bad symbol table entry")
        freq[s] = f
        last = s
    if pos != len(data) or sum(freq.values()) != 4096:
        raise SpecError("bad symbol table")
    return freq


def rans_encode(syms, freq) -> bytes:
    cum = _cum(freq)
    x = RANS_L
    emitted = []
    for s in reversed(syms):
        f, c = freq[s], cum[s]
        while x >= ((RANS_L >> 12) << 8) * f:
            emitted.append(x & 255)
            x >>= 8
        x = ((x // f) << 12) + (x % f) + c
    return struct.pack("<I", x) + bytes(reversed(emitted))


def _cum(freq):
    cum, acc = {}, 0
    for s in sorted(freq):
        cum[s] = acc
        acc += freq[s]
    return cum


def rans_decode(stream: bytes, n: int, freq):
    cum = _cum(freq)
    if len(stream) < 4:
        raise SpecError("rANS stream too short")
    x = struct.unpack_from("<I", stream, 0)[0]
    p = 4
    out = []
    for _ in range(n):
        slot = x & 4095
        s = next((s for s in sorted(freq) if cum[s] <= slot < cum[s] + freq[s]), None)
        if s is None:
            raise SpecError("slot without symbol")
        x = freq[s] * (x >> 12) + slot - cum[s]
        while x < RANS_L:
            if p >= len(stream):
                raise SpecError("rANS overrun")
            x = (x << 8) | stream[p]
            p += 1
        out.append(s)
    if x != RANS_L or p != len(stream):
        raise SpecError("rANS does not end in state L with all bytes consumed")
    return out


class BitReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def bit(self) -> int:
        if self.pos >= 8 * len(self.data):
            raise SpecError("bit stream overrun")
        b = (self.data[self.pos >> 3] >> (self.pos & 7)) & 1
        self.pos += 1
        return b

    def bits(self, n: int) -> int:
        v = 0
        for i in range(n):
            v |= self.bit() << i
        return v

    def finish(self):
        if (self.pos + 7) // 8 != len(self.data):
            raise SpecError("bit stream not consumed exactly")
        while self.pos < 8 * len(self.data):
            if self.bit():
                raise SpecError("padding bit set")


def decode_sparse(seg_bytes: bytes, table_len: int, old: bytes, w: int, vals: str, log2c: int, start: int, end: int,
                  N: int, freq, nchanged: int, values_hash: int):
    """FORMAT.md 4: returns [(flat index, new bit pattern)]."""
    B = 8 * w
    C = 1 << log2c
    if start % C:
        raise SpecError("start not chunk aligned")
    c0, c1 = start // C, -(-end // C)
    pos = 0
    entries = []
    for c in range(c0, c1):
        n, pos = read_varint(seg_bytes, pos, table_len)
        if n == 0:
            continue
        if pos >= table_len:
            raise SpecError("table truncated")
        k = seg_bytes[pos]
        pos += 1
        if k > log2c:
            raise SpecError("k > log2c")
        rl, pos = read_varint(seg_bytes, pos, table_len)
        bl, pos = read_varint(seg_bytes, pos, table_len)
        entries.append((c, n, k, rl, bl))
    if pos != table_len:
        raise SpecError("table has trailing bytes")
    if sum(e[1] for e in entries) != nchanged:
        raise SpecError("counts do not add up")
    dp = table_len
    out = []
    for c, n, k, rl, bl in entries:
        clen = min(C, N - c * C)
        if dp + rl + bl > len(seg_bytes):
            raise SpecError("streams past the segment")
        syms = rans_decode(seg_bytes[dp:dp + rl], n, freq)
        br = BitReader(seg_bytes[dp + rl:dp + rl + bl])
        dp += rl + bl
        p = -1
        for s in syms:
            q = 0
            while br.bit():
                q += 1
            g = (q << k) | br.bits(k)
            p += g + 1
            if p >= clen:
                raise SpecError("position outside its chunk")
            i = c * C + p
            o = int.from_bytes(old[i * w:(i + 1) * w], "little")
            if vals == "raw":
                new = (s << (B - 8)) | br.bits(B - 8)
            else:
                if s < 16:
                    m, neg = s // 2 + 1, s & 1
                else:
                    nb = s - 16 + 4
                    if nb > B:
                        raise SpecError("symbol too large for the width")
                    neg = br.bits(1)
                    m = (1 << (nb - 1)) | br.bits(nb - 1)
                new = (o + (-m if neg else m)) % (1 << B)
            out.append((i, new))
        br.finish()
    if dp != len(seg_bytes):
        raise SpecError("streams do not fill the segment")
    if tree64(b"".join(v.to_bytes(w, "little") for _, v in out)) != values_hash:
        raise SpecError("values_hash mismatch")
    return out


def parse_bucket(bucket: bytes):
    bucket = bytes(bucket)
    if bucket[:4] != b"SSYN":
        raise SpecError("magic")
    H, hh = struct.unpack_from("<IQ", bucket, 4)
    if H > 64 << 20 or 16 + H > len(bucket):
        raise SpecError("header length")
    hb = bucket[16:16 + H]
    if h64(hb, 0x48445248) != hh:
        raise SpecError("header hash")
    try:
        m = msgpack.unpackb(hb, raw=False)
    except Exception as exc:
        raise SpecError(f"header is not msgpack: {exc}") from None
    # FORMAT.md 2, canonical form: exactly the documented keys in their order, the documented types, and re-encoding
    # the decoded values with the shortest formats gives the received bytes back
    if not isinstance(m, dict) or list(m) != HEADER_KEYS:
        raise SpecError("header keys are not exactly the documented ones in the documented order")
    if msgpack.packb(m, use_bin_type=True) != hb:
        raise SpecError("header not in canonical form")
    types = {"v": (int,), "uid": (bytes,), "base": (int, type(None)), "ver": (int,), "vals": (str,), "idx": (int,),
             "cnt": (int,), "layout": (bytes,), "ntensors": (int,), "dig": (bool,), "digest": (str, type(None)),
             "body_len": (int,), "body_hash": (int,), "prev": (int,), "segs": (list,)}
    for k, ts in types.items():
        if not isinstance(m[k], ts) or (bool not in ts and isinstance(m[k], bool)):
            raise SpecError(f"header field {k} has type {type(m[k]).__name__}")
    if m["v"] not in (1, 2):
        raise SpecError("format version")
    body = bucket[16 + H:]
    if len(body) != m["body_len"] or tree64(body) != m["body_hash"]:
        raise SpecError("body")
    return m, body


def apply_update(buckets, state: dict):
    """Decode a whole update per FORMAT.md and apply it to ``state`` {name: (dtype name, shape, bytearray)}.
    Returns the first header map."""
    writes = []
    first = None
    ends = {}          # FORMAT.md 2 / 6.2: a tensor's (a space's) segments ascend through the update
    prev = 0
    spaces = None      # version 2: dtype -> Space (built from the state before the update)
    for idx, bucket in enumerate(buckets):
        m, body = parse_bucket(bucket)
        if m["idx"] != idx or (first is not None and m["v"] != first["v"]):
            raise SpecError("version or index")
        if m["prev"] != prev:
            raise SpecError("chain link")
        prev = struct.unpack_from("<Q", bytes(bucket), 8)[0]
        if first is None:
            first = m
            if m["layout"] != layout_digest(state) or m["ntensors"] != len(state):
                raise SpecError("layout")
            if m["base"] is not None and m["ver"] <= m["base"]:
                raise SpecError("a delta update must increase the version")
        elif (m["uid"], m["base"], m["ver"], m["vals"], m["layout"], m["ntensors"], m["dig"]) != \
                (first["uid"], first["base"], first["ver"], first["vals"], first["layout"], first["ntensors"],
                 first["dig"]):
            raise SpecError("foreign bucket")
        if m["cnt"] not in (0, idx + 1):
            raise SpecError("count must be 0 (more follow) or idx + 1 (the last bucket)")
        if m["cnt"] and m["dig"]:
            d = m["digest"]
            if not isinstance(d, str) or len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise SpecError("the update says it carries a digest; its last bucket has none")
        elif m["digest"] is not None:
            raise SpecError("digest where none belongs")
        if not m["cnt"] and not m["segs"]:
            raise SpecError("only the last bucket may be empty")
        last = m
        if m["v"] == 2:
            if spaces is None:
                spaces = build_spaces(state)
            _apply_segments_v2(m, body, spaces, state, ends, writes)
            continue
        off = 0
        for seg in m["segs"]:
            name, dtype, shape, kind, start, end, log2c, table_len, soff, slen, freq, vhash, nchanged = seg
            dt, sh, buf = state[name]
            if dt != dtype or list(sh) != list(shape):
                raise SpecError("layout")
            if not start < end:
                raise SpecError("empty segment")
            if start < ends.get(name, 0):
                raise SpecError("segments of a tensor overlap or are out of order")
            ends[name] = end
            if soff != off:
                raise SpecError("segments must tile the body")
            off += slen
            w = WIDTH[dtype]
            N = math.prod(shape)
            data = body[soff:soff + slen]
            if kind == "d":
                if slen != (end - start) * w or nchanged != end - start or vhash is not None:
                    raise SpecError("dense segment")
                writes.append((name, [(start + i, int.from_bytes(data[i * w:(i + 1) * w], "little"))
                                      for i in range(end - start)]))
            elif kind == "s":
                if not 12 <= log2c <= 30 or end != min(-(-end // (1 << log2c)) * (1 << log2c), N):
                    raise SpecError("sparse range")
                writes.append((name, decode_sparse(data, table_len, bytes(buf), w, m["vals"], log2c, start, end, N,
                                                   parse_freq(freq), nchanged, vhash)))
            else:
                raise SpecError("kind")
        if off != len(body):
            raise SpecError("segments must cover the body")
    if first is None or last["cnt"] != idx + 1:
        raise SpecError("truncated")
    if spaces is not None:  # version 2: writes address space elements; map them back to the tensors
        writes = [(name, ws) for sp, sws in writes for name, ws in spaces[sp].to_tensors(sws)]
    for name, ws in writes:
        _, _, buf = state[name]
        w = WIDTH[state[name][0]]
        for i, v in ws:
            buf[i * w:(i + 1) * w] = v.to_bytes(w, "little")
    return first


# ---------------------------------------------------------------------------------------------------------------------
# Version 2 (FORMAT.md 6)

# FORMAT.md 6.3: key bits (the bits just below the sign bit); other dtypes have none
KEY_BITS = {"bfloat16": 8, "float16": 5, "float32": 8, "float8_e4m3fn": 4, "float8_e5m2": 5, "float64": 8}


class Space:
    """FORMAT.md 6.1: the elements of every tensor of one dtype, in sorted name order (by UTF-8 bytes), each flat."""

    def __init__(self, dtype: str, parts):
        self.dtype = dtype
        self.w = WIDTH[dtype]
        self.kb = KEY_BITS.get(dtype, 0)
        self._base = None
        self.parts = []           # (name, off_t, numel_t)
        off = 0
        for name, numel in parts:
            if numel:
                self.parts.append((name, off, numel))
                off += numel
        self.n = off

    def base_bytes(self, state) -> bytes:
        """The space's base bytes (the state before the update: writes are staged until the end)."""
        if self._base is None:
            self._base = b"".join(bytes(state[name][2]) for name, _, _ in self.parts)
        return self._base

    def to_tensors(self, ws):
        """[(space index, value)] -> [(tensor name, [(element, value)])]."""
        starts = [off for _, off, _ in self.parts]
        out = {}
        for i, v in ws:
            t = bisect.bisect_right(starts, i) - 1
            if t < 0 or not 0 <= i < self.n:
                raise SpecError("space index outside the space")
            name, off, _ = self.parts[t]
            out.setdefault(name, []).append((i - off, v))
        return list(out.items())


def build_spaces(state: dict) -> dict:
    groups = {}
    for name in sorted(state, key=lambda s: s.encode()):
        dt, shape, _ = state[name]
        groups.setdefault(dt, []).append((name, math.prod(shape)))
    return {dt: Space(dt, parts) for dt, parts in groups.items()}


def key_of(x: int, B: int, kb: int) -> int:
    """FORMAT.md 6.3: the kb bits just below the sign bit of bit pattern x."""
    return (x >> (B - 1 - kb)) & ((1 << kb) - 1)


def max_symbol(w: int, vals: str) -> int:
    return 255 if vals == "raw" else 16 + 8 * w - 4


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class RansDecoder:
    """FORMAT.md 4.3, one symbol at a time (each symbol may use another table, 6.4)."""

    def __init__(self, stream: bytes):
        if len(stream) < 4:
            raise SpecError("rANS stream too short")
        self.stream = stream
        self.x = struct.unpack_from("<I", stream, 0)[0]
        self.p = 4

    def get(self, freq) -> int:
        cum = _cum(freq)
        slot = self.x & 4095
        s = next((s for s in sorted(freq) if cum[s] <= slot < cum[s] + freq[s]), None)
        if s is None:
            raise SpecError("slot without symbol")
        self.x = freq[s] * (self.x >> 12) + slot - cum[s]
        while self.x < RANS_L:
            if self.p >= len(self.stream):
                raise SpecError("rANS overrun")
            self.x = (self.x << 8) | self.stream[self.p]
            self.p += 1
        return s

    def finish(self):
        if self.x != RANS_L or self.p != len(self.stream):
            raise SpecError("rANS does not end in state L with all bytes consumed")


def _rice(br: BitReader, k: int) -> int:
    q = 0
    while br.bit():
        q += 1
    return (q << k) | br.bits(k)


def _value(br: BitReader, s: int, o: int, B: int, vals: str) -> int:
    """FORMAT.md 4.2: read symbol s's extra bits and return the new bit pattern against the base value o."""
    if vals == "raw":
        return (s << (B - 8)) | br.bits(B - 8)
    if s < 16:
        m, neg = s // 2 + 1, s & 1
    else:
        nb = s - 16 + 4
        if nb > B:
            raise SpecError("symbol too large for the width")
        neg = br.bits(1)
        m = (1 << (nb - 1)) | br.bits(nb - 1)
    return (o + (-m if neg else m)) % (1 << B)


def check_cuts(cuts, kb: int):
    """FORMAT.md 6.3 / 6.5: K-1 ints, 1 <= K <= 32, strictly increasing in [1, 2^kb)."""
    if not isinstance(cuts, list) or not 1 <= len(cuts) + 1 <= 32:
        raise SpecError("cuts must be an array of at most 31 ints")
    prev = 0
    for c in cuts:
        if not _is_int(c) or c <= prev or c >= 1 << kb:
            raise SpecError("cuts must be strictly increasing ints in [1, 2^kb)")
        prev = c


def decode_sparse2(seg_bytes: bytes, table_len: int, base: bytes, w: int, kb: int, vals: str, log2c: int, start: int,
                   end: int, cuts, cls, nchanged: int, values_hash: int):
    """FORMAT.md 6.4 over space elements [start, end) of a space whose base bytes are ``base`` (``cls`` as in the
    header: K entries, nil or [k, freq bytes]). Returns [(space index, new bit pattern)]."""
    B = 8 * w
    C = 1 << log2c
    N = len(base) // w
    if not 12 <= log2c <= 30:
        raise SpecError("log2c")
    if not 0 <= start < end <= N:
        raise SpecError("segment range outside the space")
    check_cuts(cuts, kb)
    K = len(cuts) + 1
    if not isinstance(cls, list) or len(cls) != K:
        raise SpecError("cls must have K entries")
    tables = {}
    freq = None
    for c, entry in enumerate(cls):
        if entry is None:
            continue
        if not isinstance(entry, list) or len(entry) != 2 or not _is_int(entry[0]) or \
                not isinstance(entry[1], bytes):
            raise SpecError("class entry must be nil or [k, freq]")
        k, fb = entry
        if not 0 <= k <= log2c:
            raise SpecError("k > log2c")
        if fb == b"":                      # 6.3: the table of the nearest present class before it
            if freq is None:
                raise SpecError("the first present class has an empty table")
        else:
            freq = parse_freq(fb)
        if max(freq) > max_symbol(w, vals):
            raise SpecError("symbol above the largest of the width and mode")
        tables[c] = (k, freq)
    if not tables:
        raise SpecError("no present class")
    if not _is_int(nchanged) or not 1 <= nchanged <= end - start:
        raise SpecError("nchanged")
    if not 0 <= table_len <= len(seg_bytes):
        raise SpecError("table_len")

    def base_val(i):
        return int.from_bytes(base[i * w:(i + 1) * w], "little")

    def class_of(i):
        key = key_of(base_val(i), B, kb)
        return sum(1 for c in cuts if c <= key)

    nchunks = -(-(end - start) // C)
    pos = 0
    entries = []
    for j in range(nchunks):
        n, pos = read_varint(seg_bytes, pos, table_len)
        if n == 0:
            continue
        rl, pos = read_varint(seg_bytes, pos, table_len)
        bl, pos = read_varint(seg_bytes, pos, table_len)
        entries.append((j, n, rl, bl))
    if pos != table_len:
        raise SpecError("table has trailing bytes")
    if sum(e[1] for e in entries) != nchanged:
        raise SpecError("counts do not add up")
    dp = table_len
    out = []
    for j, n, rl, bl in entries:
        lo, hi = start + j * C, min(start + (j + 1) * C, end)
        if dp + rl + bl > len(seg_bytes):
            raise SpecError("streams past the segment")
        rans = RansDecoder(seg_bytes[dp:dp + rl])
        br = BitReader(seg_bytes[dp + rl:dp + rl + bl])
        dp += rl + bl
        skip = {c: _rice(br, tables[c][0]) for c in sorted(tables)}   # first gaps, increasing class order
        changed = 0
        for i in range(lo, hi):
            c = class_of(i)
            if c not in tables:
                continue        # an element of an absent class is unchanged
            if skip[c] > 0:
                skip[c] -= 1
                continue
            changed += 1
            if changed > n:
                raise SpecError("more changed elements than the chunk's count (a final gap too short)")
            k, freq = tables[c]
            s = rans.get(freq)
            new = _value(br, s, base_val(i), B, vals)
            skip[c] = _rice(br, k)
            out.append((i, new))
        if any(skip.values()):
            raise SpecError("a gap runs past the end of its chunk")
        if changed != n:
            raise SpecError("fewer changed elements than the chunk's count")
        br.finish()
        rans.finish()
    if dp != len(seg_bytes):
        raise SpecError("streams do not fill the segment")
    if tree64(b"".join(v.to_bytes(w, "little") for _, v in out)) != values_hash:
        raise SpecError("values_hash mismatch")
    return out


def _apply_segments_v2(m: dict, body: bytes, spaces: dict, state: dict, ends: dict, writes: list) -> None:
    """FORMAT.md 6.2: check and decode one version-2 bucket's segments; appends (space, [(index, value)])."""
    off = 0
    for seg in m["segs"]:
        if not isinstance(seg, list) or len(seg) != 12:
            raise SpecError("a version-2 segment has 12 fields")
        sp, kind, start, end, log2c, table_len, soff, slen, cuts, cls, vhash, nchanged = seg
        if not isinstance(sp, str) or sp not in spaces or spaces[sp].n == 0:
            raise SpecError("segment names no space of the layout")
        space = spaces[sp]
        if not all(_is_int(v) for v in (start, end, log2c, table_len, soff, slen, nchanged)):
            raise SpecError("segment field types")
        if not 0 <= start < end <= space.n:
            raise SpecError("segment range")
        if start < ends.get(("space", sp), 0):
            raise SpecError("segments of a space overlap or are out of order")
        ends[("space", sp)] = end
        if soff != off:
            raise SpecError("segments must tile the body")
        off += slen
        if off > len(body):
            raise SpecError("segment past the body")
        w = space.w
        data = body[soff:soff + slen]
        if kind == "d":
            if slen != (end - start) * w or nchanged != end - start or vhash is not None or log2c != 0 or \
                    table_len != 0 or cuts != [] or cls != []:
                raise SpecError("dense segment")
            writes.append((sp, [(start + i, int.from_bytes(data[i * w:(i + 1) * w], "little"))
                                for i in range(end - start)]))
        elif kind == "s":
            if not _is_int(vhash):
                raise SpecError("values_hash")
            writes.append((sp, decode_sparse2(data, table_len, space.base_bytes(state), w, space.kb, m["vals"],
                                              log2c, start, end, cuts, cls, nchanged, vhash)))
        else:
            raise SpecError("kind")
    if off != len(body):
        raise SpecError("segments must cover the body")


def uid_per_doc(first_header, buckets) -> bytes:
    """FORMAT.md 5: BLAKE2b over layout, then msgpack([base, ver, vals])."""
    h = hashlib.blake2b(digest_size=32)
    h.update(first_header["layout"])
    h.update(msgpack.packb([first_header["base"], first_header["ver"], first_header["vals"]], use_bin_type=True))
    return h.digest()[:16]


def state_digest(state: dict) -> str:
    """FORMAT.md 1.3 over {name: (dtype name, shape, bytes)}."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(state):
        dt, shape, buf = state[name]
        nb, db = name.encode(), dt.encode()
        h.update(struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(db)) + db)
        h.update(struct.pack("<I", len(shape)) + b"".join(struct.pack("<q", s) for s in shape))
        h.update(struct.pack("<QQ", len(buf), tree64(bytes(buf))))
    return h.hexdigest()


def layout_digest(state: dict) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(struct.pack("<I", len(state)))
    for name in sorted(state):
        dt, shape, _ = state[name]
        nb, db = name.encode(), dt.encode()
        h.update(struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(db)) + db)
        h.update(struct.pack("<I", len(shape)) + b"".join(struct.pack("<q", s) for s in shape))
    return h.digest()[:16]
