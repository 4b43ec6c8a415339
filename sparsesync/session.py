"""Sync sessions: a Sender that encodes once and fans out to many receivers, and a Receiver that applies updates.

Protocol (docs/PROTOCOL.md): the receiver listens; the sender connects, both authenticate (HMAC challenge-response),
the receiver reports its version and state digest, and the sender streams an update (delta, chain of retained deltas,
or full) as bucket frames that the receiver stages as they arrive and commits all-or-nothing, then acknowledges.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import ssl as _ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from . import backends, wire
from .codec import Decoder, Encoder, Update, full_update
from .digest import layout_digest, state_digest
from .errors import CorruptPayload, SparseSyncError

log = logging.getLogger("sparsesync")
DEFAULT_SESSION_BUCKET = 256 << 10


# ---------------------------------------------------------------------------------------------------------------------
# receiver

class Receiver:
    """Receives updates into ``state`` (updated in place) on a background thread.

    ``listen``: ``tcp://HOST:PORT`` (default loopback ``tcp://127.0.0.1:7000``; port 0 picks a free port, see
    ``address``) or ``inproc://NAME``. Binding a wider address must be written out, e.g. ``tcp://0.0.0.0:7000``.
    ``token``: shared secret; required unless ``allow_unauthenticated=True``.
    ``on_update(version, apply_stats)``: called after every applied update (on the receiver thread).
    ``forward_to``: downstream peer addresses; every applied update is relayed to them (one upstream copy per
    cluster), with the same token unless ``forward_token`` is given.
    """

    def __init__(self, state, listen: str = "tcp://127.0.0.1:7000", *, token=None, version: int = 0,
                 on_update=None, ssl_context: _ssl.SSLContext | None = None, verify_digest: bool = True,
                 forward_to=None, forward_token=None, max_bucket: int = wire.DEFAULT_MAX_BUCKET,
                 handshake_timeout: float = 10.0, idle_timeout: float = 300.0, nccl_device=None,
                 allow_unauthenticated: bool = False):
        self.token = wire.token_bytes(token)
        self.nccl_device = nccl_device          # CUDA device for NCCL payloads (senders with backend="nccl")
        if self.token is None and not allow_unauthenticated:
            raise ValueError("Receiver needs a token (or allow_unauthenticated=True for trusted loopback tests)")
        self.decoder = Decoder(state, version, verify_digest=verify_digest)
        self.listen = listen
        self.scheme, self.host, self.port = wire.parse_url(listen)
        self.on_update = on_update
        self.ssl_context = ssl_context
        self.max_bucket = max_bucket
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()          # one update at a time
        self._cond = threading.Condition()
        self._digest_cache: tuple[int, str] | None = None
        self._listener = None
        self._threads: list[threading.Thread] = []
        self._conns: set = set()
        self._streams: dict[bytes, dict[int, wire.Channel]] = {}   # session id -> parked secondary streams
        self._streams_lock = threading.Lock()
        self._running = False
        self.errors: collections.deque = collections.deque(maxlen=32)
        self.updates_applied = 0
        self._relay = None
        if forward_to:
            self._relay = Sender(forward_to, token=forward_token if forward_token is not None else token,
                                 allow_unauthenticated=allow_unauthenticated, ssl_context=None)

    # -- public ---------------------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.decoder.version

    @property
    def state(self) -> dict:
        return self.decoder.state

    @property
    def address(self) -> str:
        """The address actually listened on (with the real port when 0 was asked)."""
        if self.scheme == "inproc":
            return f"inproc://{self.host}"
        return f"tcp://{self.host}:{self.port}"

    def start(self) -> "Receiver":
        if self._running:
            return self
        self._listener = backends.get(self.scheme).listen(self.host, self.port)
        if self.scheme == "tcp":
            self.port = self._listener.port
        self._running = True
        t = threading.Thread(target=self._accept_loop, name=f"sparsesync-recv-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("receiver listening on %s at version %d", self.address, self.version)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._running = False
        if self._listener is not None:
            self._listener.close()
        for ch in list(self._conns):
            ch.close()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self._relay is not None:
            self._relay.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_for(self, version: int, timeout: float | None = None) -> bool:
        """Block until the receiver holds ``version`` or newer; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.decoder.version >= version, timeout)

    def digest(self) -> str:
        with self._lock:
            return self._digest_locked()

    # -- internals ------------------------------------------------------------------------------------------------------
    def _digest_locked(self) -> str:
        v = self.decoder.version
        if self._digest_cache is None or self._digest_cache[0] != v:
            self._digest_cache = (v, state_digest(self.decoder.state))
        return self._digest_cache[1]

    def _accept_loop(self) -> None:
        while self._running:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                if self._running:
                    time.sleep(0.05)
                continue
            if sock is None:
                continue
            t = threading.Thread(target=self._serve, args=(sock, peer), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _serve(self, sock, peer) -> None:
        ch = None
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            ch = wire.Channel(sock, self.max_bucket, peer=str(peer))
            self._conns.add(ch)
            with self._lock:
                info = {"version": self.decoder.version, "digest": self._digest_locked(),
                        "layout": self.decoder.layout_digest}
            hello = wire.server_handshake(ch, self.token, info, self.handshake_timeout)
            ch.settimeout(self.idle_timeout)
            if self._park(ch, hello):
                ch = None              # a secondary stream: read by its session's primary connection from now on
                return
            session = hello.get("session") if isinstance(hello.get("session"), bytes) else None
            group = None
            try:
                while self._running:
                    ftype, data = ch.recv((wire.UPDATE, wire.BYE, wire.NCCL_INIT), wire.MAX_CONTROL)
                    if ftype == wire.BYE:
                        break
                    if ftype == wire.NCCL_INIT:
                        if group is not None:
                            group.close()
                        group = self._join_nccl(ch, wire.unpack(data))
                        continue
                    self._receive_update(ch, wire.unpack(data), group, session)
            finally:
                if group is not None:
                    group.close()
                if session is not None:
                    with self._streams_lock:
                        parked = self._streams.pop(session, {})
                    for sch in parked.values():
                        self._conns.discard(sch)
                        sch.close()
        except (SparseSyncError, OSError, socket.timeout, _ssl.SSLError) as exc:
            if self._running:
                self.errors.append(f"{peer}: {exc}")
                log.warning("receiver %s: connection from %s ended: %s", self.address, peer, exc)
        finally:
            if ch is not None:
                self._conns.discard(ch)
                ch.close()

    MAX_STREAMS = 16
    MAX_SESSIONS = 256

    def _park(self, ch: wire.Channel, hello: dict) -> bool:
        """A secondary stream (``attach``) is parked for the primary connection of its session to read from."""
        sid, j = hello.get("attach"), hello.get("stream")
        if sid is None:
            return False
        if not isinstance(sid, bytes) or len(sid) != 16 or not isinstance(j, int) or not 1 <= j < self.MAX_STREAMS:
            raise wire.ProtocolError("malformed stream attach")
        with self._streams_lock:
            if sid not in self._streams and len(self._streams) >= self.MAX_SESSIONS:
                raise wire.ProtocolError("too many parallel-stream sessions")
            old = self._streams.setdefault(sid, {}).get(j)
            self._streams[sid][j] = ch
        if old is not None:
            self._conns.discard(old)
            old.close()
        return True

    def _stream_channels(self, ch: wire.Channel, session, k: int) -> list:
        if k == 1:
            return [ch]
        if session is None or not 1 < k <= self.MAX_STREAMS:
            raise wire.ProtocolError(f"UPDATE over {k!r} streams without a session")
        with self._streams_lock:
            parked = self._streams.get(session, {})
            missing = [j for j in range(1, k) if j not in parked]
            chans = [ch] + [parked.get(j) for j in range(1, k)]
        if missing:
            raise wire.ProtocolError(f"UPDATE over {k} streams, but streams {missing} are not attached")
        for c in chans[1:]:
            c.settimeout(self.idle_timeout)
        return chans

    def _join_nccl(self, ch: wire.Channel, msg: dict):
        """Join the sender's NCCL communicator (the payload path); the control path stays on this connection."""
        from . import nccl
        try:
            uid, rank, world = msg.get("uid"), msg.get("rank"), msg.get("world")
            if not isinstance(uid, bytes) or not isinstance(rank, int) or not isinstance(world, int):
                raise wire.ProtocolError("malformed NCCL_INIT")
            device = self.nccl_device if self.nccl_device is not None else 0
            group = nccl.NCCLGroup(uid, rank, world, device, max_bytes=self.max_bucket, timeout=self.idle_timeout)
        except SparseSyncError as exc:
            ch.send_msg(wire.NCCL_READY, {"ok": False, "error": str(exc)})
            return None
        ch.send_msg(wire.NCCL_READY, {"ok": True})
        return group

    MAX_BUCKETS = 1 << 30

    def _receive_update(self, ch: wire.Channel, msg: dict, group=None, session=None) -> None:
        """Buckets follow the UPDATE frame until a DONE frame ({cnt}); with k streams bucket i (and then DONE) comes
        on stream i mod k."""
        k = msg.get("streams", 1)
        if not isinstance(k, int):
            raise wire.ProtocolError(f"UPDATE with invalid stream count {k!r}")
        chans = self._stream_channels(ch, session, k)        # bucket i travels on stream i mod k
        via_nccl = msg.get("via") == "nccl"
        if via_nccl and group is None:
            raise wire.ProtocolError("UPDATE via NCCL without a communicator")
        discard = bool(msg.get("discard"))        # NCCL members that cannot apply this delta still take part
        with self._lock:
            err, done, buckets = None, False, []
            t0 = time.perf_counter()
            try:
                i = 0
                while True:
                    if i >= self.MAX_BUCKETS:
                        raise wire.ProtocolError("too many buckets in one update")
                    if via_nccl:
                        ftype, m = ch.recv_msg((wire.BUCKET_NCCL, wire.DONE))
                        if ftype == wire.DONE:
                            done_msg = m
                            break
                        size = m.get("size")
                        if not isinstance(size, int) or not 0 < size <= self.max_bucket:
                            raise wire.ProtocolError(f"NCCL bucket size {size!r} outside (0, {self.max_bucket}]")
                        data = group.broadcast_bytes(None, size, root=0)
                    else:
                        src = chans[i % len(chans)]
                        data = src.recv_bucket()
                        if data is None:
                            done_msg = src.done_msg
                            break
                    i += 1
                    if discard:
                        continue
                    if self._relay is not None:
                        buckets.append(data)
                    if err is None:
                        try:
                            if done:       # a bucket after the final one: nothing is applied
                                self.decoder.abort()
                                raise CorruptPayload("more buckets than the update announced")
                            done = self.decoder.stage(data, owned=True)
                        except SparseSyncError as exc:
                            err = exc
                if done_msg.get("cnt") != i:
                    raise wire.ProtocolError(f"DONE says {done_msg.get('cnt')!r} buckets, {i} arrived")
                if err is None and done:
                    try:
                        self.decoder.commit()
                    except SparseSyncError as exc:
                        err = exc
            except BaseException:
                self.decoder.abort()        # connection cut mid-update: the state was never touched
                raise
            if discard:
                ch.send_msg(wire.ACK, {"version": self.decoder.version, "ok": True, "discarded": True})
                return
            if err is None and not done:
                self.decoder.abort()
                err = CorruptPayload("update ended before its last bucket")
            ack = {"version": self.decoder.version, "ok": err is None, "seconds": time.perf_counter() - t0}
            if err is not None:
                ack.update(error=str(err), error_type=type(err).__name__)
            else:
                st = self.decoder.last_stats
                ack.update(decode_s=st.decode_seconds, apply_s=st.apply_seconds, verified=st.digest_verified)
            ch.send_msg(wire.ACK, ack)
            if err is None:
                self.updates_applied += 1
                if self._relay is not None:
                    h = self.decoder.last_stats
                    self._relay.forward(buckets, h.base_version, h.version, self.decoder.state)
        if err is not None:
            self.errors.append(str(err))
            log.warning("receiver %s: update rejected: %s", self.address, err)
            return
        with self._cond:
            self._cond.notify_all()
        if self.on_update is not None:
            self.on_update(self.decoder.version, self.decoder.last_stats)


# ---------------------------------------------------------------------------------------------------------------------
# sender

@dataclass
class PeerResult:
    peer: str
    ok: bool
    version: int | None          # the version the peer holds now (None if unknown)
    kind: str = "none"           # delta | chain | full | none
    bytes: int = 0
    wire_s: float = 0.0
    apply_s: float = 0.0
    attempts: int = 0
    digest_verified: bool = False
    error: str | None = None


@dataclass
class PushStats:
    version: int
    encode_s: float
    total_s: float
    changed: int
    wire_bytes: int              # one copy of the update
    dense_bytes: int
    peers: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.peers)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def __str__(self) -> str:
        bad = [p for p in self.peers if not p.ok]
        return (f"push v{self.version}: {self.changed} changed, {self.wire_bytes} B/peer, encode {self.encode_s:.3f}s, "
                f"total {self.total_s:.3f}s, {len(self.peers) - len(bad)}/{len(self.peers)} peers ok"
                + "".join(f"; {p.peer}: {p.error}" for p in bad))


class _Feed:
    """Buckets of one update, produced once (by whoever asks first) and read by many peer threads."""

    def __init__(self, update: Update | None, buckets=None):
        self.update = update
        self.buckets = list(buckets) if buckets is not None else []
        self.done = buckets is not None
        self._it = update.iter_buckets() if update is not None and not self.done else None
        self._lock = threading.Lock()

    def get(self, i: int):
        while True:
            if i < len(self.buckets):          # made already: no waiting on whoever is producing the next one
                return self.buckets[i]
            if self.done:
                return None
            with self._lock:
                if i >= len(self.buckets) and not self.done:
                    try:
                        self.buckets.append(next(self._it))
                    except StopIteration:
                        self.done = True

    def finish(self) -> None:
        i = len(self.buckets)
        while self.get(i) is not None:
            i += 1

    def iterate(self):
        """Buckets in order, produced on demand."""
        i = 0
        while (b := self.get(i)) is not None:
            yield b
            i += 1


class _Peer:
    def __init__(self, url: str):
        self.url = url
        self.scheme, self.host, self.port = wire.parse_url(url)
        self.ch: wire.Channel | None = None
        self.extra: list = []           # secondary streams (Sender(streams=k))
        self.version: int | None = None
        self.digest: str | None = None
        self.verified = False           # digest checked against the sender's state at that version

    def drop(self) -> None:
        for c in [self.ch] + self.extra:
            if c is not None:
                c.close()
        self.ch = None
        self.extra = []
        self.version = None
        self.verified = False


class _Progress:
    def __init__(self, enabled: bool, label: str, npeers: int):
        self.enabled = enabled
        self.label = label
        self.npeers = npeers
        self.sent = 0
        self.done = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int = 0, done: int = 0) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.sent += nbytes
            self.done += done
            now = time.monotonic()
            if done or now - self._last > 0.2:
                self._last = now
                sys.stderr.write(f"\r{self.label}: {self.sent / 2**20:9.1f} MiB sent, {self.done}/{self.npeers} "
                                 "peers done ")
                sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class Sender:
    """Encodes each new state once and delivers it to every peer concurrently.

    ``peers``: receiver addresses (``tcp://host:port`` or ``inproc://name``). ``token``: shared secret.
    ``base``/``base_version``: the state all receivers start from (otherwise the first push is a full update).
    ``timeout``: the window (seconds) a push waits for a peer; slower peers are cut off, reported, and caught up at a
    later push. ``retries``/``backoff``: reconnect attempts within that window. ``retain``: deltas kept to catch up
    peers that are a few versions behind. ``progress``: show progress on a terminal (default: when stderr is a tty).
    ``streams``: TCP connections per peer (buckets go round-robin; for long fat links whose per-flow rate is limited).
    ``bucket_bytes``: bucket size (default 256 KiB: encode, wire and apply overlap, and the last bucket is short).
    ``compress``: zstd each bucket
    frame (for slow links; it gains little on sparse deltas, ~1.3x on full bf16 updates).
    """

    def __init__(self, peers, *, token=None, backend: str = "tcp", base=None, base_version: int | None = None,
                 values: str = "delta", bucket_bytes: int | None = None, timeout: float = 60.0,
                 connect_timeout: float = 5.0, retries: int = 3, backoff: float = 0.2, retain: int = 4,
                 ssl_context: _ssl.SSLContext | None = None, progress: bool | None = None, digest: bool = False,
                 compress: bool = False, streams: int = 1, nccl_device=None, allow_unauthenticated: bool = False):
        if isinstance(peers, str):
            peers = [peers]
        self.token = wire.token_bytes(token)
        if self.token is None and not allow_unauthenticated:
            raise ValueError("Sender needs a token (or allow_unauthenticated=True for trusted loopback tests)")
        if backend not in backends.NAMES:
            raise ValueError(f"unknown backend {backend!r}; choose from {sorted(backends.NAMES)}")
        self.backend = backend
        if backend == "nccl":
            from .nccl import NCCLBackend
            NCCLBackend.check()               # a clear error here when there is no GPU or no libnccl
        self.nccl_device = nccl_device
        self._group = None                    # NCCL communicator with the peers in self._group_members
        self._group_members: tuple = ()
        self.peers = [_Peer(p) for p in peers]
        if len({p.url for p in self.peers}) != len(self.peers):
            raise ValueError("duplicate peer addresses")
        # small buckets by default so that encode, wire and apply overlap (pipelining)
        self.encoder = Encoder(base, base_version, values=values,
                               bucket_bytes=DEFAULT_SESSION_BUCKET if bucket_bytes is None else bucket_bytes,
                               digest=digest)
        self.compress = compress
        if not isinstance(streams, int) or not 1 <= streams <= Receiver.MAX_STREAMS:
            raise ValueError(f"streams must be an int in [1, {Receiver.MAX_STREAMS}], got {streams!r}")
        self.streams = streams
        self.bucket_bytes = self.encoder.bucket_bytes
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.retain: collections.deque = collections.deque(maxlen=max(0, retain))
        self.ssl_context = ssl_context
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._digests: dict[int, str] = {}
        self.history: list[PushStats] = []

    # -- public ---------------------------------------------------------------------------------------------------------
    def push(self, state, version: int) -> PushStats:
        """Encode ``state`` as ``version`` once and deliver it to every peer. Returns per-peer results."""
        t0 = time.perf_counter()
        self.connect(t0 + self.timeout)
        update = self.encoder.encode(state, version, stream=True)
        feed = _Feed(update)
        stats = self._deliver(feed, t0, self.encoder.snapshot)
        if update.base_version is not None:
            self.retain.append((update.base_version, update.version, feed.buckets))
        self._digests = {v: d for v, d in self._digests.items() if v == version}
        stats.encode_s = update.stats.encode_seconds
        stats.changed = update.stats.changed
        stats.dense_bytes = update.stats.dense_bytes
        self.history.append(stats)
        log.info("%s", stats)
        return stats

    def connect(self, deadline: float | None = None) -> dict:
        """Connect and authenticate every peer not connected yet, and check the digest of peers that claim the
        sender's base version (a pass over the base state, once per new connection). ``push`` does this itself;
        calling it first keeps session set-up out of the first push. Returns {peer: version or None}."""
        self._connect_all(time.perf_counter() + self.timeout if deadline is None else deadline)
        base_version = self.encoder.version
        if base_version is not None:
            need = [p for p in self.peers if p.ch is not None and not p.verified and p.version == base_version]
            if need:
                d = self._digest_of(base_version, self.encoder.snapshot)
                for p in need:
                    p.verified = p.digest == d
                    if not p.verified:
                        log.warning("peer %s claims version %d but its digest differs: it gets a full update", p.url,
                                    base_version)
        return {p.url: p.version for p in self.peers}

    def forward(self, buckets: list, base: int | None, version: int, state) -> PushStats:
        """Relay an update received elsewhere (its buckets) to the peers; ``state`` is the relay's applied state."""
        t0 = time.perf_counter()
        self._connect_all(t0 + self.timeout)
        feed = _Feed(None, buckets)
        stats = self._deliver(feed, t0, state, base=base, version=version)
        if base is not None:
            self.retain.append((base, version, list(buckets)))
        self.encoder.version = version
        return stats

    def close(self) -> None:
        self._close_group()
        for p in self.peers:
            if p.ch is not None:
                try:
                    p.ch.send(wire.BYE)
                except SparseSyncError:
                    pass
            p.drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ------------------------------------------------------------------------------------------------------
    def _digest_of(self, version: int, state) -> str:
        if version not in self._digests:
            self._digests[version] = state_digest(state)
        return self._digests[version]

    def _open(self, p: _Peer, hello: dict) -> tuple[wire.Channel, dict]:
        sock = backends.get(p.scheme).connect(p.host, p.port, self.connect_timeout)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_hostname=p.host)
        ch = wire.Channel(sock, peer=p.url)
        try:
            return ch, wire.client_handshake(ch, self.token, self.connect_timeout, hello)
        except BaseException:
            ch.close()
            raise

    def _connect(self, p: _Peer) -> None:
        sid = os.urandom(16)
        ch, info = self._open(p, {"session": sid} if self.streams > 1 else None)
        extra = []
        try:
            for j in range(1, self.streams):
                extra.append(self._open(p, {"attach": sid, "stream": j})[0])
        except BaseException:
            for c in [ch] + extra:
                c.close()
            raise
        v = info.get("version")
        if not isinstance(v, int):
            ch.close()
            raise wire.ProtocolError(f"{p.url}: WELCOME without a version")
        if self.encoder.layout is not None and info.get("layout") != layout_digest(self.encoder.layout):
            ch.close()
            raise SparseSyncError(f"{p.url}: receiver holds a different tensor layout")
        p.ch, p.extra, p.version, p.digest, p.verified = ch, extra, v, info.get("digest"), False

    def _connect_all(self, deadline: float) -> None:
        todo = [p for p in self.peers if p.ch is None]
        threads = [threading.Thread(target=self._try_connect, args=(p, deadline), daemon=True) for p in todo]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.perf_counter()))

    def _try_connect(self, p: _Peer, deadline: float) -> str | None:
        err = None
        for attempt in range(self.retries + 1):
            try:
                self._connect(p)
                return None
            except (OSError, SparseSyncError, socket.timeout) as exc:
                err = str(exc)
                if isinstance(exc, wire.AuthError):
                    return err
                wait = self.backoff * (2 ** attempt)
                if time.perf_counter() + wait >= deadline:
                    break
                time.sleep(wait)
        p.last_error = err
        return err

    def _plan(self, p: _Peer, base: int | None, version: int):
        """What to send this peer: ('none'|'delta'|'chain'|'full', list of feeds-or-None)."""
        if base is None:                      # the update itself is a full one: valid at any version
            return "full", [None]
        if p.version == version and p.verified:
            return "none", []
        if p.version == base and p.verified:
            return "delta", [None]
        if base is not None and p.version is not None and p.verified:
            chain, v = [], p.version
            for b, ver, buckets in self.retain:
                if b == v:
                    chain.append(buckets)
                    v = ver
            if chain and v == base:
                return "chain", chain + [None]
        return "full", ["full"]

    # -- NCCL payload path -----------------------------------------------------------------------------------------
    def _close_group(self) -> None:
        if self._group is not None:
            self._group.close()
        self._group, self._group_members = None, ()

    def _ensure_group(self, members: list) -> bool:
        """A communicator with exactly ``members`` (rank 0 = this sender); False when it cannot be formed."""
        from . import nccl
        key = tuple(p.url for p in members)
        if self._group is not None and key == self._group_members:
            return True
        self._close_group()
        if not members:
            return False
        uid, world = nccl.new_unique_id(), len(members) + 1
        device = self.nccl_device if self.nccl_device is not None else 0
        box = {}

        def create():
            try:
                box["group"] = nccl.NCCLGroup(uid, 0, world, device, timeout=self.timeout)
            except SparseSyncError as exc:
                box["error"] = exc
        t = threading.Thread(target=create, daemon=True)
        t.start()                                  # ncclCommInitRank blocks until every rank has joined
        ok = True
        for rank, p in enumerate(members, start=1):
            try:
                p.ch.send_msg(wire.NCCL_INIT, {"uid": uid, "rank": rank, "world": world})
                _, reply = p.ch.recv_msg((wire.NCCL_READY,))
                ok &= bool(reply.get("ok"))
                if not reply.get("ok"):
                    log.warning("peer %s cannot join NCCL: %s", p.url, reply.get("error"))
            except SparseSyncError as exc:
                log.warning("peer %s: NCCL set-up failed: %s", p.url, exc)
                p.drop()
                ok = False
        t.join(self.timeout)
        if not ok or "group" not in box:
            if "group" in box:
                box["group"].close()
            for p in members:                      # their half-made communicators die with the connection
                p.drop()
            log.warning("NCCL communicator not formed (%s); using TCP", box.get("error", "a peer failed"))
            return False
        self._group, self._group_members = box["group"], key
        return True

    def _nccl_broadcast(self, feed: _Feed, members: list, base, version, results, prog) -> set:
        """Broadcast the update's buckets to every member; returns the peers that applied it."""
        applied = set()
        plans = {p.url: self._plan(p, base, version)[0] for p in members}
        try:
            for p in members:
                p.ch.send_msg(wire.UPDATE, {"via": "nccl",
                                            "discard": plans[p.url] not in ("delta", "full")
                                            or (plans[p.url] == "full" and base is not None)})
            cnt = 0
            for b in feed.iterate():
                for p in members:
                    p.ch.send_msg(wire.BUCKET_NCCL, {"size": len(b)})
                self._group.broadcast_bytes(b, len(b), root=0)
                prog.add(len(b) * len(members))
                cnt += 1
            for p in members:
                p.ch.send_msg(wire.DONE, {"cnt": cnt})
            for p in members:
                _, ack = p.ch.recv_msg((wire.ACK,))
                r = results[p.url]
                if ack.get("discarded"):
                    continue
                r.kind = plans[p.url]
                r.bytes += sum(len(b) for b in feed.buckets)
                r.apply_s += float(ack.get("apply_s", 0.0)) + float(ack.get("decode_s", 0.0))
                if ack.get("ok"):
                    p.version, p.verified = ack.get("version"), True
                    r.ok, r.version, r.digest_verified = True, p.version, bool(ack.get("verified"))
                    applied.add(p.url)
                else:
                    p.version, p.verified = ack.get("version"), False
                    r.error = f"{ack.get('error_type')}: {ack.get('error')}"
        except SparseSyncError as exc:            # includes NCCLError/NCCLTimeout: abort, fall back to TCP
            log.warning("NCCL delivery failed (%s); falling back to TCP", exc)
            self._close_group()
            for p in members:
                p.drop()
            return set()
        return applied

    def _deliver(self, feed: _Feed, t0: float, state, base=None, version=None) -> PushStats:
        if feed.update is not None:
            base, version = feed.update.base_version, feed.update.version
        deadline = t0 + self.timeout
        prog = _Progress(self.progress, f"push v{version}", len(self.peers))
        results: dict[str, PeerResult] = {p.url: PeerResult(p.url, False, p.version) for p in self.peers}
        full_lock = threading.Lock()
        threads = []
        done_nccl: set = set()
        if self.backend == "nccl":
            members = [p for p in self.peers if p.ch is not None]
            if self._ensure_group(members):
                done_nccl = self._nccl_broadcast(feed, members, base, version, results, prog)
        for p in self.peers:
            r = results[p.url]
            if p.url in done_nccl:
                prog.add(done=1)
                threads.append(None)
                continue
            t = threading.Thread(target=self._serve_peer, args=(p, r, feed, state, base, version, deadline, prog,
                                                                full_lock), daemon=True)
            t.start()
            threads.append(t)
        feed.finish()        # encoding completes even if every peer is unreachable (the snapshot must advance)
        for t in threads:
            if t is not None:
                t.join(max(0.0, deadline - time.perf_counter()))
        for p, t in zip(self.peers, threads):
            if t is not None and t.is_alive():       # slow peer: cut it off; it is caught up at a later push
                r = results[p.url]
                r.ok, r.error = False, f"timed out after {self.timeout:.1f}s"
                p.drop()
                t.join(5.0)
                r.version = None
        prog.close()
        wire_bytes = sum(len(b) for b in feed.buckets)
        return PushStats(version, 0.0, time.perf_counter() - t0, 0, wire_bytes, 0,
                         [results[p.url] for p in self.peers])

    def _send_update(self, p: _Peer, buckets_iter, prog: _Progress) -> tuple[int, dict]:
        ch = p.ch
        chans = [ch] + p.extra
        for c in chans:
            c.settimeout(max(1.0, self.timeout))
        ch.send_msg(wire.UPDATE, {"streams": len(chans)} if p.extra else {})
        if not p.extra:
            n = cnt = 0
            for b in buckets_iter:
                k = ch.send_bucket(b, self.compress)
                n += k
                cnt += 1
                prog.add(k)
            ch.send_msg(wire.DONE, {"cnt": cnt})
        else:
            n = self._send_parallel(chans, buckets_iter, prog)
        _, ack = ch.recv_msg((wire.ACK,))
        return n, ack

    def _send_parallel(self, chans: list, buckets_iter, prog: _Progress) -> int:
        """Bucket i goes on stream i mod k, one sending thread per stream; at most 2 buckets queued per stream."""
        import queue
        queues = [queue.Queue(maxsize=2) for _ in chans]
        sent, errors = [0] * len(chans), []

        def pump(j):
            while True:
                b = queues[j].get()
                if b is None:
                    return
                if errors:
                    continue                         # drain: the transfer already failed
                try:
                    if isinstance(b, tuple):
                        chans[j].send_msg(wire.DONE, {"cnt": b[1]})
                        continue
                    k = chans[j].send_bucket(b, self.compress)
                    sent[j] += k
                    prog.add(k)
                except SparseSyncError as exc:
                    errors.append(exc)
        threads = [threading.Thread(target=pump, args=(j,), daemon=True) for j in range(len(chans))]
        for t in threads:
            t.start()
        cnt = 0
        try:
            for b in buckets_iter:
                if errors:
                    break
                queues[cnt % len(chans)].put(b)
                cnt += 1
            if not errors:
                queues[cnt % len(chans)].put(("DONE", cnt))   # DONE goes where bucket cnt would have gone
        finally:
            for q in queues:
                q.put(None)
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return sum(sent)

    def _serve_peer(self, p: _Peer, r: PeerResult, feed: _Feed, state, base, version, deadline, prog,
                    full_lock) -> None:
        for attempt in range(self.retries + 1):
            r.attempts = attempt + 1
            if p.ch is None:
                err = self._try_connect(p, deadline)
                if p.ch is None:
                    r.error = f"cannot connect: {err}"
                    return
            kind, parts = self._plan(p, base, version)
            r.kind = kind
            t1 = time.perf_counter()
            try:
                if kind == "none":
                    r.ok, r.version = True, p.version
                    prog.add(done=1)
                    return
                for part in parts:
                    if part is None:
                        nbytes, ack = self._send_update(p, feed.iterate(), prog)
                    elif part == "full":
                        feed.finish()              # the snapshot is final once the delta is fully encoded
                        with full_lock:
                            up = full_update(state, version, bucket_bytes=self.bucket_bytes)
                            nbytes, ack = self._send_update(p, up.iter_buckets(), prog)
                    else:
                        nbytes, ack = self._send_update(p, iter(part), prog)
                    r.bytes += nbytes
                    r.apply_s += float(ack.get("apply_s", 0.0)) + float(ack.get("decode_s", 0.0))
                    if not ack.get("ok"):
                        p.version, p.verified = ack.get("version"), False
                        raise SparseSyncError(f"{ack.get('error_type')}: {ack.get('error')}")
                    p.version, p.verified = ack.get("version"), True
                    r.digest_verified = bool(ack.get("verified"))
                r.wire_s = time.perf_counter() - t1 - r.apply_s
                r.ok, r.version, r.error = True, p.version, None
                prog.add(done=1)
                return
            except (OSError, SparseSyncError, socket.timeout) as exc:
                r.error = str(exc)
                if isinstance(exc, (wire.PeerClosed, wire.ProtocolError, OSError, socket.timeout)):
                    p.drop()
                wait = self.backoff * (2 ** attempt)
                if time.perf_counter() + wait >= deadline:
                    return
                time.sleep(wait)
