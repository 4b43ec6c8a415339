"""Framing and authentication of the sparsesync session protocol (docs/PROTOCOL.md).

A frame is ``u8 type, u64 length`` followed by ``length`` bytes. Lengths are checked against a per-type bound before
anything is allocated. Control frames carry msgpack maps (never pickle). Authentication is a mutual HMAC-SHA256
challenge-response over fresh nonces: the token never crosses the wire, and an unauthenticated peer is dropped before
any payload frame is read.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
from urllib.parse import urlparse

import msgpack

from .errors import InvalidArgument, SparseSyncError

PROTOCOL = 1
FRAME = struct.Struct("<BQ")

(CHALLENGE, AUTH, WELCOME, UPDATE, BUCKET, ACK, BYE, REJECT, BUCKET_Z, NCCL_INIT, NCCL_READY, BUCKET_NCCL,
 DONE, LAYOUT_REQ, LAYOUT, LAYOUT_SET) = range(1, 17)
NAMES = {CHALLENGE: "CHALLENGE", AUTH: "AUTH", WELCOME: "WELCOME", UPDATE: "UPDATE", BUCKET: "BUCKET", ACK: "ACK",
         BYE: "BYE", REJECT: "REJECT", BUCKET_Z: "BUCKET_Z", NCCL_INIT: "NCCL_INIT", NCCL_READY: "NCCL_READY",
         BUCKET_NCCL: "BUCKET_NCCL", DONE: "DONE", LAYOUT_REQ: "LAYOUT_REQ", LAYOUT: "LAYOUT",
         LAYOUT_SET: "LAYOUT_SET"}
MAX_CONTROL = 64 << 10
MAX_LAYOUT = 64 << 20            # a LAYOUT frame: zlib-compressed msgpack list of [name, dtype, shape]
DEFAULT_MAX_BUCKET = 1 << 30
GROW_STEP = 1 << 20              # large frames are allocated as their bytes arrive, growing from this size


class ProtocolError(SparseSyncError):
    """The peer broke the session protocol (bad frame, size or order)."""


class AuthError(SparseSyncError):
    """The peer failed authentication."""


class PeerClosed(SparseSyncError):
    """The connection ended."""


class Timeout(SparseSyncError, TimeoutError):
    """A peer did not answer within the time allowed (a socket timeout or a whole-exchange deadline)."""


def parse_url(url: str, default_port: int = 7000) -> tuple[str, str, int]:
    """'tcp://host:port' -> (scheme, host, port)."""
    if "://" not in url:
        url = "tcp://" + url
    u = urlparse(url)
    if u.scheme not in ("tcp", "inproc"):
        raise InvalidArgument(f"unsupported address {url!r}: use tcp://HOST:PORT")
    if u.scheme == "inproc":
        return "inproc", u.netloc, 0
    if not u.hostname:
        raise InvalidArgument(f"address {url!r} has no host")
    try:
        port = u.port
    except ValueError:
        raise InvalidArgument(f"address {url!r} has an invalid port") from None
    return "tcp", u.hostname, default_port if port is None else port


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                              ext_hook=lambda c, d: (_ for _ in ()).throw(ValueError("ext")))
    except Exception as exc:
        raise ProtocolError(f"control frame is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a map")
    return obj


class Channel:
    """A framed, bounded byte channel over a socket (plain or TLS)."""

    def __init__(self, sock: socket.socket, max_bucket: int = DEFAULT_MAX_BUCKET, peer: str = "?"):
        self.sock = sock
        self.max_bucket = max_bucket
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0
        self.deadline: float | None = None    # monotonic time by which a whole exchange must finish (handshakes)
        self._timeout: float | None = None

    def settimeout(self, t: float | None) -> None:
        """Bound each blocking socket operation to ``t`` seconds (None: no bound)."""
        self._timeout = t
        self.sock.settimeout(t)

    def clear_deadline(self) -> None:
        self.deadline = None
        self.sock.settimeout(self._timeout)

    def _arm(self) -> None:
        """Before a blocking operation: when a deadline is set, bound the operation by the time left."""
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"{self.peer}: no answer within the time allowed")
        self.sock.settimeout(left if self._timeout is None else min(left, self._timeout))

    def send(self, ftype: int, payload=b"") -> None:
        mv = memoryview(payload).cast("B") if not isinstance(payload, (bytes, bytearray)) else payload
        head = FRAME.pack(ftype, len(mv))
        try:
            self._arm()
            if len(mv) < 65536:
                self.sock.sendall(head + bytes(mv))
            else:
                self.sock.sendall(head)
                self.sock.sendall(mv)
        except socket.timeout:
            raise Timeout(f"{self.peer}: send timed out") from None
        except OSError as exc:
            raise PeerClosed(f"{self.peer}: send failed: {exc}") from None
        self.bytes_sent += FRAME.size + len(mv)

    def send_msg(self, ftype: int, obj: dict) -> None:
        self.send(ftype, pack(obj))

    def _recv_exact(self, n: int) -> bytearray:
        """Read exactly ``n`` bytes. Memory is allocated as bytes arrive (doubling from 1 MiB), so a frame header that
        declares a large size costs nothing until the bytes are really sent."""
        buf = bytearray(min(n, GROW_STEP))
        view = memoryview(buf)
        got = 0
        while got < n:
            if got == len(buf):                      # grow: at most twice what has arrived so far
                view.release()
                buf.extend(bytes(min(len(buf), n - len(buf))))
                view = memoryview(buf)
            try:
                self._arm()
                k = self.sock.recv_into(view[got:], min(len(buf) - got, 1 << 22))
            except socket.timeout:
                raise Timeout(f"{self.peer}: no data for too long (received {got} of {n} bytes)") from None
            except OSError as exc:
                raise PeerClosed(f"{self.peer}: receive failed: {exc}") from None
            if k == 0:
                raise PeerClosed(f"{self.peer}: connection closed")
            got += k
        view.release()
        self.bytes_received += n
        return buf

    def recv(self, expect: tuple[int, ...] | None = None, max_len: int | None = None) -> tuple[int, bytearray]:
        ftype, length = FRAME.unpack(self._recv_exact(FRAME.size))
        if ftype not in NAMES:
            raise ProtocolError(f"{self.peer}: unknown frame type {ftype}")
        if expect is not None and ftype not in expect:
            raise ProtocolError(f"{self.peer}: got {NAMES[ftype]}, expected {'/'.join(NAMES[e] for e in expect)}")
        bound = max_len if max_len is not None else \
            (self.max_bucket if ftype in (BUCKET, BUCKET_Z) else MAX_LAYOUT if ftype == LAYOUT else MAX_CONTROL)
        if length > bound:
            raise ProtocolError(f"{self.peer}: {NAMES[ftype]} frame of {length} bytes exceeds the {bound}-byte limit")
        return ftype, self._recv_exact(length)

    def send_bucket(self, bucket, compress: bool) -> int:
        """Send one bucket, zstd-compressed (BUCKET_Z) when asked and smaller; returns the payload bytes sent."""
        if compress:
            import zstandard
            z = zstandard.ZstdCompressor(level=3).compress(bucket)
            if len(z) < len(bucket):
                self.send(BUCKET_Z, z)
                return len(z)
        self.send(BUCKET, bucket)
        return len(bucket)

    def recv_bucket(self):
        """Receive one bucket (BUCKET or BUCKET_Z, decompressed with the same size bound), or None for DONE (then
        ``self.done_msg`` holds its map)."""
        ftype, data = self.recv((BUCKET, BUCKET_Z, DONE))
        if ftype == DONE:
            if len(data) > MAX_CONTROL:
                raise ProtocolError(f"{self.peer}: DONE frame too large")
            self.done_msg = unpack(data)
            return None
        if ftype == BUCKET:
            return data
        import zstandard
        try:
            size = zstandard.frame_content_size(bytes(data[:18]))
            if size < 0 or size > self.max_bucket:   # unknown or oversized: refuse before allocating
                raise ProtocolError(f"{self.peer}: compressed bucket declares {size} bytes (limit {self.max_bucket})")
            out = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=self.max_bucket)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"{self.peer}: compressed bucket is invalid: {exc}") from None
        if len(out) > self.max_bucket:
            raise ProtocolError(f"{self.peer}: compressed bucket expands beyond {self.max_bucket} bytes")
        return out

    def recv_msg(self, expect: tuple[int, ...]) -> tuple[int, dict]:
        ftype, data = self.recv(expect, MAX_CONTROL)
        return ftype, unpack(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _mac(token: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(token, b"sparsesync-v1 " + label + a + b, hashlib.sha256).digest()


def token_bytes(token) -> bytes | None:
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, (bytes, bytearray)):
        raise InvalidArgument(f"token must be a str or bytes, got {type(token).__name__}")
    if len(token) < MIN_TOKEN:
        raise InvalidArgument(f"token has {len(token)} characters; at least {MIN_TOKEN} are required")
    return bytes(token)


def pack_layout(layout) -> bytes:
    """A LAYOUT frame's payload: the receiver's [(name, dtype, shape), ...], msgpack then zlib."""
    import zlib
    return zlib.compress(pack([[n, d, list(s)] for n, d, s in layout]), 1)


def unpack_layout(data) -> list:
    import zlib
    try:
        d = zlib.decompressobj()
        raw = d.decompress(bytes(data), MAX_LAYOUT)
        if d.unconsumed_tail:
            raise ProtocolError("LAYOUT frame expands beyond its limit")
        obj = msgpack.unpackb(raw, raw=False, use_list=True,
                              ext_hook=lambda c, x: (_ for _ in ()).throw(ValueError("ext")))
        out = []
        for n, dt, shape in obj:
            if not isinstance(n, str) or not isinstance(dt, str) or not isinstance(shape, list) or \
                    not all(isinstance(x, int) and not isinstance(x, bool) for x in shape):
                raise ValueError("bad entry")
            out.append((n, dt, tuple(shape)))
        return out
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"LAYOUT frame is invalid: {exc}") from None


MIN_TOKEN = 8


def server_handshake(ch: Channel, token: bytes | None, state_info, timeout: float) -> dict:
    """Receiver side. Sends a challenge, checks the sender's proof, proves itself, then sends ``state_info`` (a dict,
    or a function returning one, called once the sender has authenticated). The whole exchange must finish within
    ``timeout`` seconds (not each read: a peer trickling bytes cannot hold it open)."""
    ch.deadline = time.monotonic() + timeout
    ch.settimeout(timeout)
    nonce_r = os.urandom(32)
    ch.send_msg(CHALLENGE, {"proto": PROTOCOL, "nonce": nonce_r, "auth": token is not None})
    _, msg = ch.recv_msg((AUTH,))
    nonce_s = msg.get("nonce")
    if not isinstance(nonce_s, bytes) or len(nonce_s) != 32:
        raise AuthError(f"{ch.peer}: malformed AUTH")
    if token is not None:
        mac = msg.get("mac")
        if not isinstance(mac, bytes) or not hmac.compare_digest(mac, _mac(token, b"client", nonce_r, nonce_s)):
            try:
                ch.send_msg(REJECT, {"reason": "authentication failed"})
            finally:
                ch.close()
            raise AuthError(f"{ch.peer}: authentication failed")
    reply = dict(state_info() if callable(state_info) else state_info)
    reply["mac"] = _mac(token, b"server", nonce_s, nonce_r) if token is not None else b""
    ch.send_msg(WELCOME, reply)
    ch.clear_deadline()
    return msg


def client_handshake(ch: Channel, token: bytes | None, timeout: float, hello: dict | None = None) -> dict:
    """Sender side. Answers the challenge and checks the receiver's proof; returns the receiver's state info. The
    whole exchange must finish within ``timeout`` seconds."""
    ch.deadline = time.monotonic() + timeout
    ch.settimeout(timeout)
    _, msg = ch.recv_msg((CHALLENGE,))
    if msg.get("proto") != PROTOCOL:
        raise ProtocolError(f"{ch.peer}: protocol {msg.get('proto')!r}, expected {PROTOCOL}")
    nonce_r = msg.get("nonce")
    if not isinstance(nonce_r, bytes) or len(nonce_r) != 32:
        raise ProtocolError(f"{ch.peer}: malformed CHALLENGE")
    if msg.get("auth") and token is None:
        raise AuthError(f"{ch.peer}: receiver requires a token")
    nonce_s = os.urandom(32)
    out = dict(hello or {})
    out.update(nonce=nonce_s, mac=_mac(token, b"client", nonce_r, nonce_s) if token is not None else b"")
    ch.send_msg(AUTH, out)
    ftype, reply = ch.recv_msg((WELCOME, REJECT))
    if ftype == REJECT:
        raise AuthError(f"{ch.peer}: rejected: {reply.get('reason')}")
    if token is not None:
        mac = reply.get("mac")
        if not isinstance(mac, bytes) or not hmac.compare_digest(mac, _mac(token, b"server", nonce_s, nonce_r)):
            raise AuthError(f"{ch.peer}: receiver failed to prove it knows the token")
    ch.clear_deadline()
    return reply
