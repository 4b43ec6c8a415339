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
from urllib.parse import urlparse

import msgpack

from .errors import SparseSyncError

PROTOCOL = 1
FRAME = struct.Struct("<BQ")

(CHALLENGE, AUTH, WELCOME, UPDATE, BUCKET, ACK, BYE, REJECT, BUCKET_Z, NCCL_INIT, NCCL_READY, BUCKET_NCCL,
 DONE) = range(1, 14)
NAMES = {CHALLENGE: "CHALLENGE", AUTH: "AUTH", WELCOME: "WELCOME", UPDATE: "UPDATE", BUCKET: "BUCKET", ACK: "ACK",
         BYE: "BYE", REJECT: "REJECT", BUCKET_Z: "BUCKET_Z", NCCL_INIT: "NCCL_INIT", NCCL_READY: "NCCL_READY",
         BUCKET_NCCL: "BUCKET_NCCL", DONE: "DONE"}
MAX_CONTROL = 64 << 10
DEFAULT_MAX_BUCKET = 1 << 30


class ProtocolError(SparseSyncError):
    """The peer broke the session protocol (bad frame, size or order)."""


class AuthError(SparseSyncError):
    """The peer failed authentication."""


class PeerClosed(SparseSyncError):
    """The connection ended."""


def parse_url(url: str, default_port: int = 7000) -> tuple[str, str, int]:
    """'tcp://host:port' -> (scheme, host, port)."""
    if "://" not in url:
        url = "tcp://" + url
    u = urlparse(url)
    if u.scheme not in ("tcp", "inproc"):
        raise ValueError(f"unsupported address {url!r}: use tcp://HOST:PORT")
    if u.scheme == "inproc":
        return "inproc", u.netloc, 0
    if not u.hostname:
        raise ValueError(f"address {url!r} has no host")
    return "tcp", u.hostname, default_port if u.port is None else u.port


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

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def send(self, ftype: int, payload=b"") -> None:
        mv = memoryview(payload).cast("B") if not isinstance(payload, (bytes, bytearray)) else payload
        head = FRAME.pack(ftype, len(mv))
        try:
            if len(mv) < 65536:
                self.sock.sendall(head + bytes(mv))
            else:
                self.sock.sendall(head)
                self.sock.sendall(mv)
        except OSError as exc:
            raise PeerClosed(f"{self.peer}: send failed: {exc}") from None
        self.bytes_sent += FRAME.size + len(mv)

    def send_msg(self, ftype: int, obj: dict) -> None:
        self.send(ftype, pack(obj))

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], min(n - got, 1 << 22))
            except socket.timeout:
                raise
            except OSError as exc:
                raise PeerClosed(f"{self.peer}: receive failed: {exc}") from None
            if k == 0:
                raise PeerClosed(f"{self.peer}: connection closed")
            got += k
        self.bytes_received += n
        return buf

    def recv(self, expect: tuple[int, ...] | None = None, max_len: int | None = None) -> tuple[int, bytearray]:
        ftype, length = FRAME.unpack(self._recv_exact(FRAME.size))
        if ftype not in NAMES:
            raise ProtocolError(f"{self.peer}: unknown frame type {ftype}")
        if expect is not None and ftype not in expect:
            raise ProtocolError(f"{self.peer}: got {NAMES[ftype]}, expected {'/'.join(NAMES[e] for e in expect)}")
        bound = max_len if max_len is not None else \
            (self.max_bucket if ftype in (BUCKET, BUCKET_Z) else MAX_CONTROL)
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
    if not isinstance(token, (bytes, bytearray)) or len(token) < 8:
        raise ValueError("token must be a str or bytes of at least 8 characters")
    return bytes(token)


def server_handshake(ch: Channel, token: bytes | None, state_info: dict, timeout: float) -> dict:
    """Receiver side. Sends a challenge, checks the sender's proof, proves itself, then sends ``state_info``."""
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
    reply = dict(state_info)
    reply["mac"] = _mac(token, b"server", nonce_s, nonce_r) if token is not None else b""
    ch.send_msg(WELCOME, reply)
    return msg


def client_handshake(ch: Channel, token: bytes | None, timeout: float, hello: dict | None = None) -> dict:
    """Sender side. Answers the challenge and checks the receiver's proof; returns the receiver's state info."""
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
    return reply
