"""An independent implementation of docs/FORMAT.md in plain Python integers (no sparsesync code, only msgpack).

Used by the tests to pin the wire format: hand-made vectors and real encoder output must agree with what the spec
says, so neither the reference nor the native kernels can drift from the document silently. Slow; small inputs only.
"""
from __future__ import annotations

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
    if m["v"] != 1:
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
    ends = {}          # FORMAT.md 2: a tensor's segments ascend through the update
    prev = 0
    for idx, bucket in enumerate(buckets):
        m, body = parse_bucket(bucket)
        if m["v"] != 1 or m["idx"] != idx:
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
    for name, ws in writes:
        _, _, buf = state[name]
        w = WIDTH[state[name][0]]
        for i, v in ws:
            buf[i * w:(i + 1) * w] = v.to_bytes(w, "little")
    return first


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
