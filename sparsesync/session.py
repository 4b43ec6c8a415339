"""Sync sessions: a Sender that encodes once and fans out to many receivers, and a Receiver that applies updates.

Protocol (docs/PROTOCOL.md): the receiver listens; the sender connects, both authenticate (HMAC challenge-response),
the receiver reports its version and state digest, and the sender streams an update (delta, chain of retained deltas,
or full) as bucket frames that the receiver stages as they arrive and commits all-or-nothing, then acknowledges.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import logging
import math
import os
import ssl as _ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import backends, wire
from .codec import ApplyStats, Decoder, Encoder, StateLike, Update, _as_items, full_update
from .digest import layout_digest, state_digest
from .dtypes import BY_NAME, name_of
from .format import FORMATS, peek_version
from .progress import Progress
from .errors import (CorruptPayload, InvalidArgument, LayoutMismatch, PushFailed, SparseSyncError, VersionConflict,
                     VersionMismatch)

log = logging.getLogger("sparsesync")
DEFAULT_SESSION_BUCKET = 256 << 10


def _positive(name: str, v) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
        raise InvalidArgument(f"{name} must be a positive number of seconds, got {v!r}")


# ---------------------------------------------------------------------------------------------------------------------
# receiver

class Receiver:
    """Receives updates into ``state`` (updated in place) on a background thread.

    ``listen``: ``tcp://HOST:PORT`` (default loopback ``tcp://127.0.0.1:7000``; port 0 picks a free port, see
    ``address``) or ``inproc://NAME``. Binding a wider address must be written out, e.g. ``tcp://0.0.0.0:7000``.
    ``token``: shared secret (at least 8 characters); required unless ``allow_unauthenticated=True``.
    ``version``: the version ``state`` holds.
    ``on_update(version, apply_stats)``: called after every applied update (on the receiver thread).
    ``on_commit(version, apply_stats)``: called right after each commit with the commit lock held, before the sender
    is acknowledged (keep it short; an engine uses it to note which tensors changed, ``apply_stats.tensors``). If it
    raises, the error is logged and the update stays applied.
    ``forward_to``: downstream peer addresses; every applied update is relayed to them (one upstream copy per
    cluster), with the same token unless ``forward_token`` is given.
    ``allow_rollback``: accept updates that move this receiver to a lower version (default: refused with
    :class:`~sparsesync.errors.RollbackRefused`, unless the sender allows it for that push).
    ``handshake_timeout``: the whole handshake of a new connection must finish within this many seconds.
    ``max_handshakes``: connections still in their handshake at once; more are closed at once.
    ``stall_timeout``: an update whose sender sends nothing for this many seconds is abandoned and its staging freed.
    Several senders may stream updates at once; a stalled or slow one never blocks another (each update is staged
    on its own, and only the commit is serialised).
    ``idle_timeout``: a connected sender that sends nothing between updates for this long is disconnected.
    ``adopt_layout``: ``state`` may be an empty dict; the first authenticated sender then gives it its layout (the
    receiver allocates zero-filled CPU tensors of that layout into ``state``, in place) and, since the zeros do not
    match the sender's state, sends a full update. For receivers that start with nothing (a rollout engine started
    with dummy weights, a new relay); the layout is adopted once and never changed afterwards.
    ``status``: a function returning a small dict of plain values (str, int, float, bool, None, lists, dicts), sent in
    every handshake; :func:`probe` reads it remotely (engines report what they applied through it).
    """

    MAX_STREAMS = 16
    MAX_BUCKETS = 1 << 30

    def __init__(self, state: StateLike, listen: str = "tcp://127.0.0.1:7000", *, token: str | bytes | None = None,
                 version: int = 0, on_update: Callable[[int, ApplyStats], None] | None = None,
                 ssl_context: _ssl.SSLContext | None = None, verify_digest: bool = True,
                 forward_to: Sequence[str] | None = None, forward_token: str | bytes | None = None,
                 max_bucket: int = wire.DEFAULT_MAX_BUCKET, handshake_timeout: float = 10.0,
                 idle_timeout: float = 300.0, stall_timeout: float = 30.0, max_handshakes: int = 64,
                 allow_rollback: bool = False, nccl_device: int | None = None, allow_unauthenticated: bool = False,
                 on_commit: Callable[[int, ApplyStats], None] | None = None, adopt_layout: bool = False,
                 status: Callable[[], dict] | None = None):
        self.token = wire.token_bytes(token)
        if adopt_layout and not isinstance(state, dict):
            raise InvalidArgument(f"adopt_layout=True needs a dict state (the receiver fills it in place), got "
                                  f"{type(state).__name__}")
        if status is not None and not callable(status):
            raise InvalidArgument(f"status must be a function returning a dict, got {type(status).__name__}")
        self._adopt_into = state if adopt_layout else None
        self._status = status
        self.nccl_device = nccl_device          # CUDA device for NCCL payloads (senders with backend="nccl")
        if self.token is None and not allow_unauthenticated:
            raise InvalidArgument("Receiver needs a token (or allow_unauthenticated=True for trusted loopback tests)")
        for name, v in (("handshake_timeout", handshake_timeout), ("idle_timeout", idle_timeout),
                        ("stall_timeout", stall_timeout)):
            _positive(name, v)
        if not isinstance(max_handshakes, int) or max_handshakes < 1:
            raise InvalidArgument(f"max_handshakes must be an int >= 1, got {max_handshakes!r}")
        self.decoder = Decoder(state, version, verify_digest=verify_digest)
        self.allow_rollback = bool(allow_rollback)
        self.listen = listen
        self.scheme, self.host, self.port = wire.parse_url(listen)
        self.on_update = on_update
        self.on_commit = on_commit
        self.ssl_context = ssl_context
        self.max_bucket = max_bucket
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.stall_timeout = stall_timeout
        self._handshakes = threading.BoundedSemaphore(max_handshakes)
        self._lock = threading.Lock()          # commits (and reads of version/digest) are serialised
        self._generation = 0                   # bumped by every commit: staged updates made before it are stale
        self._cond = threading.Condition()
        self._digest_cache: tuple[int, int, str] | None = None
        self._listener = None
        self._threads: list[threading.Thread] = []
        self._conns: set = set()
        self._sessions: set = set()                                 # session ids of live primary connections
        self._streams: dict[bytes, dict[int, wire.Channel]] = {}   # session id -> parked secondary streams
        self._streams_lock = threading.Condition()
        self._running = False
        self.errors: collections.deque = collections.deque(maxlen=32)
        self.updates_applied = 0
        self.refused_connections = 0
        self._relay = None
        if forward_to:
            self._relay = Sender(forward_to, token=forward_token if forward_token is not None else token,
                                 allow_unauthenticated=allow_unauthenticated, ssl_context=None, quorum=0,
                                 digest=True)

    # -- public ---------------------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The version the state holds now."""
        return self.decoder.version

    @property
    def state(self) -> dict:
        """The tensors this receiver updates in place (name -> tensor)."""
        return self.decoder.state

    @property
    def address(self) -> str:
        """The address actually listened on (with the real port when 0 was asked)."""
        if self.scheme == "inproc":
            return f"inproc://{self.host}"
        return f"tcp://{self.host}:{self.port}"

    def start(self) -> "Receiver":
        """Bind the listening address and serve on background threads. Raises ``OSError`` naming the address
        when it cannot be bound (for example when it is in use)."""
        if self._running:
            return self
        try:
            self._listener = backends.get(self.scheme).listen(self.host, self.port)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.address}: {exc.strerror or exc}") from None
        if self.scheme == "tcp":
            self.port = self._listener.port
        self._running = True
        t = threading.Thread(target=self._accept_loop, name=f"sparsesync-recv-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("receiver listening on %s at version %d", self.address, self.version)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close every connection (an update in flight is dropped; the state is untouched)."""
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

    def wait_for(self, version: int, timeout: float | None = None, *, exact: bool = False) -> bool:
        """Block until the receiver holds ``version`` or newer (``exact=True``: exactly ``version``, e.g. when a
        sender may move it back); False on timeout."""
        with self._cond:
            if exact:
                return self._cond.wait_for(lambda: self.decoder.version == version, timeout)
            return self._cond.wait_for(lambda: self.decoder.version >= version, timeout)

    def digest(self) -> str:
        """``state_digest`` of the state now (cached per applied update)."""
        with self._lock:
            return self._digest_locked()

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """``with receiver.hold() as version:`` no update commits inside the block, so ``state`` can be read
        consistently (updates keep arriving and staging meanwhile). Yields the version the state holds."""
        with self._lock:
            yield self.decoder.version

    # -- internals ------------------------------------------------------------------------------------------------------
    def _digest_locked(self) -> str:
        key = (self.decoder.version, self._generation)
        if self._digest_cache is None or self._digest_cache[:2] != key:
            self._digest_cache = (*key, state_digest(self.decoder.state))
        return self._digest_cache[2]

    def _info(self) -> dict:
        status = None
        if self._status is not None:            # outside the lock: the callback may read the receiver
            try:
                status = self._status()
                wire.pack(status)
            except Exception as exc:            # noqa: BLE001 - a broken status callback must not break handshakes
                status = {"error": f"status callback failed: {type(exc).__name__}: {exc}"}
        with self._lock:
            info = {"version": self.decoder.version, "digest": self._digest_locked(),
                    "layout": self.decoder.layout_digest, "formats": list(getattr(self.decoder, "formats", FORMATS))}
            if self._adopt_into is not None and not self.decoder.state:
                info["adopt"] = True
        if self._status is not None:
            info["status"] = status
        return info

    def _adopt(self, ch: wire.Channel, data) -> None:
        """LAYOUT_SET from an authenticated sender: allocate the layout into the (empty) state, once."""
        layout = wire.unpack_layout(data)
        with self._lock:
            if self._adopt_into is None or self.decoder.state:
                raise wire.ProtocolError(f"{ch.peer}: LAYOUT_SET, but this receiver does not adopt a layout "
                                         "(it has one)")
            tensors = {}
            total = 0
            for name, dt, shape in layout:
                dtype = BY_NAME.get(dt)
                if dtype is None or any(x < 0 for x in shape) or name in tensors:
                    raise wire.ProtocolError(f"{ch.peer}: LAYOUT_SET entry {name!r} {dt} {list(shape)} is invalid")
                total += math.prod(shape) * dtype.itemsize
            try:
                for name, dt, shape in layout:
                    tensors[name] = torch.zeros(shape, dtype=BY_NAME[dt])
            except (RuntimeError, MemoryError) as exc:
                raise wire.ProtocolError(f"{ch.peer}: cannot allocate the sender's layout ({len(layout)} tensors, "
                                         f"{total} bytes): {exc}") from None
            decoder = Decoder(tensors, self.decoder.version, verify_digest=self.decoder.verify_digest)
            self._adopt_into.update(tensors)
            self.decoder = decoder
            self._generation += 1
            self._digest_cache = None
        log.info("receiver %s: adopted the layout of %s (%d tensors)", self.address, ch.peer, len(tensors))
        ch.send_msg(wire.WELCOME, self._info())

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
            if not self._handshakes.acquire(blocking=False):    # too many connections still unauthenticated
                self.refused_connections += 1
                if self.refused_connections in (1, 10, 100) or self.refused_connections % 1000 == 0:
                    log.warning("receiver %s: %d connection(s) refused: too many handshakes in progress",
                                self.address, self.refused_connections)
                try:
                    sock.close()
                except OSError:
                    pass
                continue
            t = threading.Thread(target=self._serve, args=(sock, peer), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _handshake(self, sock, peer) -> tuple[wire.Channel, dict]:
        """TLS (if any) and authentication, within ``handshake_timeout`` in all."""
        try:
            sock.settimeout(self.handshake_timeout)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            ch = wire.Channel(sock, self.max_bucket, peer=str(peer))
            self._conns.add(ch)
            try:
                hello = wire.server_handshake(ch, self.token, self._info, self.handshake_timeout)
            except BaseException:
                self._conns.discard(ch)
                ch.close()
                raise
            return ch, hello
        except BaseException:
            try:
                sock.close()
            except OSError:
                pass
            raise
        finally:
            self._handshakes.release()

    def _serve(self, sock, peer) -> None:
        ch = None
        session = None
        try:
            ch, hello = self._handshake(sock, peer)
            ch.settimeout(self.idle_timeout)
            if self._park(ch, hello):
                ch = None              # a secondary stream: read by its session's primary connection from now on
                return
            session = hello.get("session") if isinstance(hello.get("session"), bytes) else None
            if session is not None:
                with self._streams_lock:
                    self._sessions.add(session)
                    self._streams_lock.notify_all()
            group = stager = None
            try:
                while self._running:
                    ftype, data = ch.recv((wire.UPDATE, wire.BYE, wire.NCCL_INIT, wire.LAYOUT_REQ, wire.LAYOUT_SET),
                                          wire.MAX_LAYOUT if self._adopt_into is not None and not self.decoder.state
                                          else wire.MAX_CONTROL)
                    if ftype == wire.BYE:
                        break
                    if ftype == wire.LAYOUT_SET:
                        self._adopt(ch, data)
                        continue
                    if ftype == wire.LAYOUT_REQ:
                        ch.send(wire.LAYOUT, wire.pack_layout(self.decoder.layout))
                        continue
                    if ftype == wire.NCCL_INIT:
                        if group is not None:
                            group.close()
                        group = self._join_nccl(ch, wire.unpack(data))
                        continue
                    stager = self._receive_update(ch, wire.unpack(data), group, session, stager)
            finally:
                if group is not None:
                    group.close()
        except (SparseSyncError, OSError, _ssl.SSLError) as exc:
            if self._running:
                self.errors.append(f"{peer}: {exc}")
                log.warning("receiver %s: connection from %s ended: %s", self.address, peer, exc)
        finally:
            if session is not None:
                with self._streams_lock:
                    self._sessions.discard(session)
                    parked = self._streams.pop(session, {})
                for sch in parked.values():
                    self._conns.discard(sch)
                    sch.close()
            if ch is not None:
                self._conns.discard(ch)
                ch.close()

    def _park(self, ch: wire.Channel, hello: dict) -> bool:
        """A secondary stream (``attach``) is parked for the primary connection of its session to read from. Its
        session's primary connection must be live (streams of sessions that never start, or ended, are refused), and
        it closes with that connection."""
        sid, j = hello.get("attach"), hello.get("stream")
        if sid is None:
            return False
        if not isinstance(sid, bytes) or len(sid) != 16 or not isinstance(j, int) or not 1 <= j < self.MAX_STREAMS:
            raise wire.ProtocolError("malformed stream attach")
        with self._streams_lock:
            # the primary's thread registers its session right after its handshake: give it a moment
            if not self._streams_lock.wait_for(lambda: sid in self._sessions, min(2.0, self.handshake_timeout)):
                raise wire.ProtocolError("stream attaches to a session that has no live primary connection")
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
        return chans

    def _join_nccl(self, ch: wire.Channel, msg: dict):
        """Join the sender's NCCL communicator (the payload path); the control path stays on this connection."""
        from . import nccl
        try:
            uid, rank, world = msg.get("uid"), msg.get("rank"), msg.get("world")
            if not isinstance(uid, bytes) or not isinstance(rank, int) or not isinstance(world, int):
                raise wire.ProtocolError("malformed NCCL_INIT")
            device = self.nccl_device if self.nccl_device is not None else 0
            group = nccl.NCCLGroup(uid, rank, world, device, max_bytes=self.max_bucket, timeout=self.stall_timeout)
        except SparseSyncError as exc:
            ch.send_msg(wire.NCCL_READY, {"ok": False, "error": str(exc)})
            return None
        ch.send_msg(wire.NCCL_READY, {"ok": True})
        return group

    def _stager(self, old: Decoder | None) -> Decoder:
        """A decoder of each connection's own over the same tensors (kept across its updates, so its staging buffers
        are reused): updates from several senders are staged side by side, and only commits are serialised (under
        ``_lock``). Called with the lock held."""
        if old is None:
            old = copy.copy(self.decoder)
            old._arena, old._arena_keep = [], ()
        old._pending = None
        old.last_stats = None
        old.version = self.decoder.version
        return old

    def _receive_update(self, ch: wire.Channel, msg: dict, group=None, session=None,
                        stager: Decoder | None = None) -> Decoder:
        """Buckets follow the UPDATE frame until a DONE frame ({cnt}); with k streams bucket i (and then DONE) comes
        on stream i mod k. Staged on a decoder of its own; committed under the lock if no other update was committed
        meanwhile."""
        k = msg.get("streams", 1)
        if not isinstance(k, int) or isinstance(k, bool):
            raise wire.ProtocolError(f"UPDATE with invalid stream count {k!r}")
        chans = self._stream_channels(ch, session, k)        # bucket i travels on stream i mod k
        via_nccl = msg.get("via") == "nccl"
        if via_nccl and group is None:
            raise wire.ProtocolError("UPDATE via NCCL without a communicator")
        discard = bool(msg.get("discard"))        # NCCL members that cannot apply this delta still take part
        for c in chans:
            c.settimeout(self.stall_timeout)      # an update that stalls this long is abandoned
        with self._lock:
            gen = self._generation
            dec = self._stager(stager)
        dec.allow_rollback = self.allow_rollback or msg.get("allow_rollback") is True
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
                if err is None:
                    try:
                        if done:       # a bucket after the final one: nothing is applied
                            dec.abort()
                            raise CorruptPayload("more buckets than the update announced")
                        done = dec.stage(data, owned=True)
                    except SparseSyncError as exc:
                        err = exc
                        buckets = []
                if self._relay is not None and err is None:
                    buckets.append(data)
            if done_msg.get("cnt") != i:
                raise wire.ProtocolError(f"DONE says {done_msg.get('cnt')!r} buckets, {i} arrived")
        except BaseException:
            dec.abort()        # connection cut or stalled mid-update: the state was never touched
            raise
        finally:
            for c in chans:
                c.settimeout(self.idle_timeout)
        if discard:
            ch.send_msg(wire.ACK, {"version": self.decoder.version, "ok": True, "discarded": True})
            return dec
        if err is None and not done:
            dec.abort()
            err = CorruptPayload("update ended before its last bucket")
        with self._lock:
            if err is None:
                if self._generation != gen:
                    dec.abort()
                    err = VersionMismatch(f"another update (now at version {self.decoder.version}) was applied "
                                          "while this one was received; nothing was changed")
                else:
                    try:
                        dec.commit()
                    except SparseSyncError as exc:
                        err = exc
                    else:
                        self.decoder.version = dec.version
                        self.decoder.last_stats = dec.last_stats
                        self._generation += 1
                        if dec.last_stats.digest is not None:     # verified while committing: no second pass
                            self._digest_cache = (dec.version, self._generation, dec.last_stats.digest)
                        if self.on_commit is not None:
                            try:
                                self.on_commit(dec.version, dec.last_stats)
                            except Exception as exc:        # the update is applied; the hook's failure is reported
                                log.warning("receiver %s: on_commit hook failed: %r", self.address, exc)
            ack = {"version": self.decoder.version, "ok": err is None, "seconds": time.perf_counter() - t0}
            if err is not None:
                ack.update(error=str(err), error_type=type(err).__name__)
            else:
                st = dec.last_stats
                ack.update(decode_s=st.decode_seconds, apply_s=st.apply_seconds, verified=st.digest_verified)
            ch.send_msg(wire.ACK, ack)
            if err is None:
                self.updates_applied += 1
                if self._relay is not None:
                    h = dec.last_stats
                    self._relay.forward(buckets, h.base_version, h.version, self.decoder.state)
        if err is not None:
            self.errors.append(str(err))
            log.warning("receiver %s: update rejected: %s", self.address, err)
            return dec
        with self._cond:
            self._cond.notify_all()
        if self.on_update is not None:
            try:
                self.on_update(self.decoder.version, self.decoder.last_stats)
            except Exception as exc:        # the update is applied and acknowledged; report the callback's failure
                self.errors.append(f"on_update failed: {exc!r}")
                log.warning("receiver %s: on_update callback failed: %r", self.address, exc)
        return dec


# ---------------------------------------------------------------------------------------------------------------------
# sender

@dataclass
class PeerResult:
    """What one push did for one peer."""
    peer: str
    ok: bool
    version: int | None          # the version the peer holds now (None if unknown)
    kind: str = "none"           # delta | chain | full | none (nothing needed) | refused (not sent: see error)
    bytes: int = 0               # bytes actually sent to this peer (a full update counts in full)
    wire_s: float = 0.0
    apply_s: float = 0.0
    attempts: int = 0
    digest_verified: bool = False
    error: str | None = None
    previous_version: int | None = None   # the version the peer held before this push (None if unknown)
    note: str | None = None      # why it got what it got, when that was not the delta (e.g. a full update)


@dataclass
class PushStats:
    """The result of one push: the update (``changed``, ``wire_bytes`` for one copy of it, ``dense_bytes``) and one
    :class:`PeerResult` per peer in ``peers``. ``ok`` is True when every peer holds ``version``; ``succeeded`` counts
    those that do."""
    version: int
    encode_s: float
    total_s: float
    changed: int
    wire_bytes: int              # one copy of the update (the delta); per-peer bytes are in peers[i].bytes
    dense_bytes: int
    peers: list = field(default_factory=list)
    kind: str = "delta"          # what was encoded: delta | full | repush (the same version again: nothing encoded)

    @property
    def ok(self) -> bool:
        """True when every peer holds ``version``."""
        return all(p.ok and p.version == self.version for p in self.peers)

    @property
    def succeeded(self) -> int:
        """How many peers hold ``version``."""
        return sum(1 for p in self.peers if p.ok and p.version == self.version)

    @property
    def full_peers(self) -> list:
        """Peers that were sent a full update although a delta was encoded."""
        return [p.peer for p in self.peers if p.kind == "full" and self.kind != "full"]

    @property
    def sent_bytes(self) -> int:
        """Bytes sent to all peers together."""
        return sum(p.bytes for p in self.peers)

    def as_dict(self) -> dict:
        """Every field and property as plain values (for JSON)."""
        d = asdict(self)
        d.update(ok=self.ok, succeeded=self.succeeded, sent_bytes=self.sent_bytes)
        return d

    def __str__(self) -> str:
        bad = [p for p in self.peers if not (p.ok and p.version == self.version)]
        kinds = collections.Counter(p.kind for p in self.peers if p.ok)
        what = ("nothing changed" if self.kind != "repush" and self.changed == 0 else
                "same version again" if self.kind == "repush" else f"{self.changed} changed")
        return (f"push v{self.version} ({self.kind}): {what}, update {_size(self.wire_bytes)}, sent "
                f"{_size(self.sent_bytes)} in all ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'})"
                f", encode {self.encode_s:.3f}s, total {self.total_s:.3f}s, {len(self.peers) - len(bad)}/"
                f"{len(self.peers)} peers at v{self.version}"
                + "".join(f"; {p.peer}: {p.error}" for p in bad))


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


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
        self.layout: bytes | None = None  # the receiver's layout digest (WELCOME)
        self.format = 1                   # the newest wire format both sides read (WELCOME's "formats")
        self.formats = frozenset({1})     # every wire format the receiver reads (a GPU receiver: only 2)
        self.adopt = False                # the receiver is empty and takes the sender's layout (LAYOUT_SET)
        self.last_error: str | None = None

    def drop(self) -> None:
        for c in [self.ch] + self.extra:
            if c is not None:
                c.close()
        self.ch = None
        self.extra = []
        self.version = None
        self.verified = False


class Sender:
    """Encodes each new state once and delivers it to every peer concurrently.

    ``peers``: receiver addresses (``tcp://host:port`` or ``inproc://name``). ``token``: shared secret (8+ chars).
    ``base``/``base_version``: the state all receivers start from (otherwise the first push is a full update).
    ``timeout``: the window (seconds) a push has, connecting included; peers not done by then are cut off, reported,
    and caught up at a later push. ``retries``/``backoff``: reconnect attempts within that window.
    ``quorum``: how many peers must hold the new version for a push to succeed (default 1; ``"all"`` = every peer;
    0 = never raise); otherwise :class:`~sparsesync.errors.PushFailed` is raised, naming each failed peer and why.
    ``retain``: deltas kept to catch up peers that are a few versions behind. ``progress``: progress on stderr
    (default: redrawn on a terminal, periodic log lines otherwise).
    ``streams``: TCP connections per peer (buckets go round-robin; for long fat links whose per-flow rate is limited).
    ``bucket_bytes``: bucket size (default 256 KiB: encode, wire and apply overlap, and the last bucket is short).
    ``compress``: zstd each bucket frame (for slow links; it gains little on sparse deltas, ~1.3x on full updates).
    ``digest``: every update (delta, chain or full) carries the new state's digest and receivers verify it.
    ``allow_rollback``: allow pushes that move a receiver to a lower version than it holds (default: refused).
    ``format`` / ``context`` / ``snapshot`` (where the snapshot of GPU tensors lives): see
    :class:`~sparsesync.codec.Encoder`. Each push is encoded once, in the newest format
    every connected peer reads (receivers say which in the handshake: one that reads only format 1 gets format 1); a
    peer that later needs a catch-up in a format it cannot read gets a full update in its own format.

    Versions identify bytes: each push must use a higher version than the last, except that pushing the same
    bytes again under the same version is allowed (it only brings peers that lack it up to date).
    """

    def __init__(self, peers: str | Sequence[str], *, token: str | bytes | None = None, backend: str = "tcp",
                 base: Mapping | None = None, base_version: int | None = None, values: str = "delta",
                 bucket_bytes: int | None = None, timeout: float = 60.0, connect_timeout: float = 5.0,
                 retries: int = 3, backoff: float = 0.2, retain: int = 4, quorum: int | str = 1,
                 ssl_context: _ssl.SSLContext | None = None, progress: bool | None = None, digest: bool = False,
                 compress: bool = False, streams: int = 1, allow_rollback: bool = False, nccl_device: int | None = None,
                 allow_unauthenticated: bool = False, format: int | None = None, context: bool | None = None,
                 snapshot: str = "device"):
        if isinstance(peers, str):
            peers = [peers]
        self.token = wire.token_bytes(token)
        if self.token is None and not allow_unauthenticated:
            raise InvalidArgument("Sender needs a token (or allow_unauthenticated=True for trusted loopback tests)")
        if backend not in backends.NAMES:
            raise InvalidArgument(f"unknown backend {backend!r}; choose from {sorted(backends.NAMES)}")
        for name, v in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            _positive(name, v)
        for name, v in (("retries", retries), ("retain", retain)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidArgument(f"{name} must be an int >= 0, got {v!r}")
        if not isinstance(backoff, (int, float)) or backoff < 0:
            raise InvalidArgument(f"backoff must be a number of seconds >= 0, got {backoff!r}")
        self.peers = [_Peer(p) for p in peers]
        if len({p.url for p in self.peers}) != len(self.peers):
            raise InvalidArgument(f"duplicate peer addresses in {list(peers)!r}")
        if quorum != "all" and (not isinstance(quorum, int) or isinstance(quorum, bool) or
                                not 0 <= quorum <= len(self.peers)):
            raise InvalidArgument(f"quorum must be 'all' or an int in [0, {len(self.peers)}] (the number of peers), "
                                  f"got {quorum!r}")
        self.quorum = quorum
        self.backend = backend
        if backend == "nccl":
            from .nccl import NCCLBackend
            NCCLBackend.check()               # a clear error here when there is no GPU or no libnccl
        self.nccl_device = nccl_device
        self._group = None                    # NCCL communicator with the peers in self._group_members
        self._group_members: tuple = ()
        # small buckets by default so that encode, wire and apply overlap (pipelining)
        self.encoder = Encoder(base, base_version, values=values,
                               bucket_bytes=DEFAULT_SESSION_BUCKET if bucket_bytes is None else bucket_bytes,
                               digest=digest, format=format, context=context, snapshot=snapshot)
        self.format = self.encoder.format     # the newest format this sender writes; per push: what all peers read
        self.compress = compress
        if not isinstance(streams, int) or not 1 <= streams <= Receiver.MAX_STREAMS:
            raise InvalidArgument(f"streams must be an int in [1, {Receiver.MAX_STREAMS}], got {streams!r}")
        self.streams = streams
        self.bucket_bytes = self.encoder.bucket_bytes
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.allow_rollback = bool(allow_rollback)
        self.retain: collections.deque = collections.deque(maxlen=retain)
        self.ssl_context = ssl_context
        self.progress = progress
        self._digests: dict[int, str] = {}
        self._ldig: tuple | None = None
        self.history: list[PushStats] = []

    # -- public ---------------------------------------------------------------------------------------------------------
    def push(self, state: StateLike, version: int, *, allow_rollback: bool | None = None) -> PushStats:
        """Encode ``state`` as ``version`` once and deliver it to every peer; returns per-peer results.

        Raises :class:`~sparsesync.errors.VersionConflict` (nothing sent) when ``version`` is lower than the last
        version pushed, or equal to it with other bytes; the same bytes under the same version only bring peers that
        lack it up to date. Raises :class:`~sparsesync.errors.PushFailed` (with ``.stats``) when fewer than
        ``quorum`` peers hold ``version`` afterwards. ``allow_rollback`` overrides the Sender's setting for this push.
        """
        Encoder._check_version(version)
        rollback = self.allow_rollback if allow_rollback is None else bool(allow_rollback)
        t0 = time.perf_counter()
        repush = False
        if self.encoder.version is not None and version <= self.encoder.version:
            if version < self.encoder.version:
                raise VersionConflict(f"cannot push version {version}: version {self.encoder.version} was pushed "
                                      "already, and versions must increase (a version identifies bytes)")
            if not self.encoder.same_as_snapshot(state):
                raise VersionConflict(f"version {version} was already pushed with other bytes; push the new bytes "
                                      f"as a new version (> {version}); nothing was sent")
            repush = True
        self.connect(t0 + self.timeout)
        if self.encoder.layout is None:
            state = self._adopt_pending(state, t0 + self.timeout)
        if repush:
            last = self.retain[-1] if self.retain and self.retain[-1][1] == version else None
            feed = _Feed(None, last[2] if last else [])
            stats = self._deliver(feed, t0, self.encoder.snapshot, last[0] if last else None, version,
                                  "delta" if last else "none", rollback)
            stats.kind = "repush"
        else:
            connected = [p.format for p in self.peers if p.ch is not None]
            self.encoder.format = min([self.format] + connected)
            update = self.encoder.encode(state, version, stream=True)
            feed = _Feed(update)
            stats = self._deliver(feed, t0, self.encoder.snapshot, update.base_version, version,
                                  "full" if update.base_version is None else "delta", rollback)
            if update.base_version is not None:
                self.retain.append((update.base_version, update.version, feed.buckets))
            if update.digest is not None:
                self._digests[version] = update.digest
            stats.encode_s = update.stats.encode_seconds
            stats.changed = update.stats.changed
            stats.dense_bytes = update.stats.dense_bytes
            stats.kind = "full" if update.base_version is None else "delta"
            if update.base_version is None:
                log.info("push v%d is a full update (%s): the Sender has no base state", version,
                         _size(stats.wire_bytes))
        keep = {version} | {v for b, ver, _ in self.retain for v in (b, ver)}     # versions a peer can be caught up from
        self._digests = {v: d for v, d in self._digests.items() if v in keep}
        self.history.append(stats)
        self._check_quorum(stats)
        return stats

    def connect(self, deadline: float | None = None) -> dict:
        """Connect and authenticate every peer not connected yet, and check the digest of peers that claim the
        sender's base version (a pass over the base state, once per new connection). ``push`` does this itself;
        calling it first keeps session set-up out of the first push. Returns {peer: version or None}; peers that
        could not be reached are logged at WARNING with the reason (``last_errors`` holds them)."""
        self._connect_all(time.perf_counter() + self.timeout if deadline is None else deadline)
        base_version = self.encoder.version
        for p in self.peers:
            if p.ch is None or p.verified or p.version is None:
                continue
            if p.version == base_version:
                d = self._digest_of(base_version, self.encoder.snapshot)
            elif p.version in self._digests:        # a version retained deltas lead on from
                d = self._digests[p.version]
            else:
                continue
            p.verified = p.digest == d
            if not p.verified:
                log.warning("peer %s claims version %d but its digest differs: it gets a full update", p.url,
                            p.version)
        for p in self.peers:
            if p.ch is None:
                log.warning("peer %s: not connected: %s", p.url, p.last_error or "connection window ended")
        return {p.url: p.version for p in self.peers}

    @property
    def last_errors(self) -> dict:
        """{peer: the last connection error} for peers that are not connected."""
        return {p.url: p.last_error for p in self.peers if p.ch is None and p.last_error}

    def forward(self, buckets: list, base: int | None, version: int, state: StateLike) -> PushStats:
        """Relay an update received elsewhere (its buckets) to the peers; ``state`` is the relay's applied state."""
        t0 = time.perf_counter()
        self._connect_all(t0 + self.timeout)
        self._adopt_pending(state, t0 + self.timeout)      # empty downstream receivers take the relay's layout
        feed = _Feed(None, buckets)
        stats = self._deliver(feed, t0, state, base, version, "full" if base is None else "delta", False)
        if base is not None:
            self.retain.append((base, version, list(buckets)))
        self.encoder.version = version
        self.history.append(stats)
        self._check_quorum(stats)
        return stats

    def close(self) -> None:
        """Say goodbye to every peer and close the connections."""
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
    def _check_quorum(self, stats: PushStats) -> None:
        for r in stats.peers:
            if not (r.ok and r.version == stats.version):
                log.warning("push v%d: peer %s does not hold it: %s", stats.version, r.peer, r.error)
        need = len(self.peers) if self.quorum == "all" else self.quorum
        if stats.succeeded < need:
            bad = [f"{r.peer}: {r.error}" for r in stats.peers if not (r.ok and r.version == stats.version)]
            raise PushFailed(f"push of version {stats.version} reached {stats.succeeded} of {len(stats.peers)} "
                             f"peer(s), {need} required (quorum): " + "; ".join(bad), stats)
        log.info("%s", stats)

    def _digest_of(self, version: int, state) -> str:
        if version not in self._digests:
            self._digests[version] = state_digest(state)
        return self._digests[version]

    def _open(self, p: _Peer, hello: dict | None, timeout: float) -> tuple[wire.Channel, dict]:
        sock = backends.get(p.scheme).connect(p.host, p.port, timeout)
        try:
            if self.ssl_context is not None:
                sock.settimeout(timeout)
                sock = self.ssl_context.wrap_socket(sock, server_hostname=p.host)
        except BaseException:
            sock.close()
            raise
        ch = wire.Channel(sock, peer=p.url)
        try:
            return ch, wire.client_handshake(ch, self.token, timeout, hello)
        except BaseException:
            ch.close()
            raise

    def _connect(self, p: _Peer, deadline: float) -> None:
        def budget() -> float:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise wire.Timeout(f"{p.url}: the push window ended while connecting")
            return min(self.connect_timeout, left)
        sid = os.urandom(16)
        ch, info = self._open(p, {"session": sid} if self.streams > 1 else None, budget())
        extra = []
        try:
            for j in range(1, self.streams):
                extra.append(self._open(p, {"attach": sid, "stream": j}, budget())[0])
            v = info.get("version")
            if not isinstance(v, int) or isinstance(v, bool):
                raise wire.ProtocolError(f"{p.url}: WELCOME without a version")
            if self.encoder.layout is not None and info.get("layout") != self._layout_digest():
                if not info.get("adopt"):
                    raise LayoutMismatch(f"{p.url}: " + self._layout_difference(ch, budget()))
                info = self._give_layout(p, ch, self.encoder.layout, budget())
        except BaseException:
            for c in [ch] + extra:
                c.close()
            raise
        p.ch, p.extra, p.version, p.digest, p.verified = ch, extra, v, info.get("digest"), False
        p.layout, p.last_error, p.adopt = info.get("layout"), None, bool(info.get("adopt"))
        formats = info.get("formats")
        common = [f for f in formats if type(f) is int and f in FORMATS] if isinstance(formats, list) else []
        p.format = max(common, default=1)   # receivers older than format 2 send no "formats": they read format 1
        p.formats = frozenset(common) or frozenset({1})

    def _layout_digest(self) -> bytes:
        layout = self.encoder.layout
        if self._ldig is None or self._ldig[0] is not layout:
            self._ldig = (layout, layout_digest(layout))
        return self._ldig[1]

    def _give_layout(self, p: _Peer, ch: wire.Channel, layout, timeout: float) -> dict:
        """An empty receiver made with ``adopt_layout=True`` takes this sender's layout; returns its new state info
        (its zero-filled tensors do not match the sender's state, so it gets a full update)."""
        ch.settimeout(timeout)
        ch.send(wire.LAYOUT_SET, wire.pack_layout(layout))
        _, info = ch.recv_msg((wire.WELCOME,))
        if info.get("layout") != layout_digest(layout):
            raise LayoutMismatch(f"{p.url}: the receiver did not adopt the sender's layout")
        log.info("peer %s adopted the sender's layout (%d tensors)", p.url, len(layout))
        return info

    def _adopt_pending(self, state, deadline: float):
        """Before the first push of a Sender without a base: give empty receivers the layout of ``state``. Returns
        the state to encode (an iterable of pairs is materialised once, to be read twice)."""
        todo = [p for p in self.peers if p.ch is not None and p.adopt]
        if not todo:
            return state
        items = list(_as_items(state))
        try:
            layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in items]
        except (AttributeError, InvalidArgument, TypeError):
            return items                         # not tensors: the encoder names the problem
        for p in todo:
            try:
                info = self._give_layout(p, p.ch, layout, max(0.001, min(self.connect_timeout,
                                                                         deadline - time.perf_counter())))
            except (OSError, SparseSyncError) as exc:
                p.last_error = f"giving it the layout failed: {exc}"
                log.warning("peer %s: %s", p.url, p.last_error)
                p.drop()
                continue
            p.version, p.digest, p.layout, p.verified, p.adopt = (info.get("version"), info.get("digest"),
                                                                   info.get("layout"), False, False)
        return items

    def _layout_difference(self, ch: wire.Channel, timeout: float) -> str:
        """Ask the receiver for its layout and name the first tensor that differs."""
        try:
            ch.settimeout(timeout)
            ch.send(wire.LAYOUT_REQ)
            _, data = ch.recv((wire.LAYOUT,))
            theirs = wire.unpack_layout(data)
        except SparseSyncError as exc:
            return f"the receiver holds a different tensor layout (it could not send its layout: {exc})"
        return layout_difference(self.encoder.layout, theirs)

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
            if time.perf_counter() >= deadline:
                err = err or "the push window ended before a connection was made"
                break
            try:
                self._connect(p, deadline)
                return None
            except (OSError, SparseSyncError) as exc:
                err = str(exc) or type(exc).__name__
                if isinstance(exc, (wire.AuthError, LayoutMismatch, InvalidArgument)):   # retrying cannot help
                    break
                wait = self.backoff * (2 ** attempt)
                if time.perf_counter() + wait >= deadline:
                    break
                time.sleep(wait)
        p.last_error = err
        return err

    def _plan(self, p: _Peer, base: int | None, version: int, feed_kind: str, rollback: bool):
        """What to send this peer: (kind, parts, note). kind is none|delta|chain|full|refused; parts are retained
        bucket lists, None (the feed) or "full" (a full update made from the state); note says why, when it is
        not the delta."""
        if p.version == version and p.verified:
            return "none", [], None
        if p.version is not None and p.version > version:
            if not rollback:
                return "refused", [], (f"RollbackRefused: the peer holds version {p.version}, newer than {version}; "
                                       "pass allow_rollback=True to move it back")
            back = f"moving it back from version {p.version} (allow_rollback)"
        else:
            back = None
        fmt = self.encoder.format                 # the format of this push's feed
        if fmt not in p.formats and feed_kind != "none":
            reads = " and ".join(map(str, sorted(p.formats)))
            return "full", ["full"], (f"it reads wire format {reads} only, this push is format {fmt}" +
                                      (f"; {back}" if back else ""))
        if feed_kind == "full":                  # the update itself is a full one: valid at any version
            return "full", [None], back
        if back is None and feed_kind == "delta" and p.version == base and p.verified:
            return "delta", [None], None
        if back is None and p.version is not None and p.verified:
            chain, v = [], p.version
            for b, ver, buckets in self.retain:
                if b == v and buckets and peek_version(buckets[0]) not in p.formats:
                    break                        # retained in a format this peer cannot read
                if b == v:
                    chain.append(buckets)
                    v = ver
                    if v == version:
                        return "chain", chain, None
            if chain and feed_kind == "delta" and v == base:
                return "chain", chain + [None], None
        if back is not None:
            why = back
        elif p.version is None:
            why = "its version is unknown"
        elif p.version == base and not p.verified:
            why = f"it claims version {p.version} but its digest differs from the sender's state at that version"
        elif feed_kind == "none":
            why = f"it holds version {p.version} and no retained delta leads to {version}"
        else:
            why = f"it holds version {p.version}, not the base version {base}, and no retained delta chain fits"
        return "full", ["full"], why

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

    def _nccl_broadcast(self, feed: _Feed, members: list, base, version, feed_kind, rollback, results,
                        prog) -> set:
        """Broadcast the update's buckets to every member; returns the peers that applied it."""
        applied = set()
        plans = {p.url: self._plan(p, base, version, feed_kind, rollback) for p in members}
        try:
            for p in members:
                kind = plans[p.url][0]
                results[p.url].previous_version = p.version
                p.ch.send_msg(wire.UPDATE, {"via": "nccl", "allow_rollback": rollback,
                                            "discard": kind not in ("delta", "full")
                                            or (kind == "full" and feed_kind != "full")})
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
                r.kind, _, r.note = plans[p.url]
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

    def _deliver(self, feed: _Feed, t0: float, state, base, version, feed_kind: str, rollback: bool) -> PushStats:
        deadline = t0 + self.timeout
        prog = Progress(f"push v{version}", len(self.peers), enabled=self.progress)
        results: dict[str, PeerResult] = {p.url: PeerResult(p.url, False, p.version, previous_version=p.version)
                                          for p in self.peers}
        full_lock = threading.Lock()
        threads = []
        done_nccl: set = set()
        if self.backend == "nccl" and feed_kind != "none":
            members = [p for p in self.peers if p.ch is not None]
            if self._ensure_group(members):
                done_nccl = self._nccl_broadcast(feed, members, base, version, feed_kind, rollback, results, prog)
        for p in self.peers:
            r = results[p.url]
            if p.url in done_nccl:
                prog.add(done=1)
                threads.append(None)
                continue
            t = threading.Thread(target=self._serve_peer, args=(p, r, feed, state, base, version, feed_kind,
                                                                rollback, deadline, prog, full_lock), daemon=True)
            t.start()
            threads.append(t)
        feed.finish()        # encoding completes even if every peer is unreachable (the snapshot must advance)
        for t in threads:
            if t is not None:
                t.join(max(0.0, deadline - time.perf_counter()))
        for p, t in zip(self.peers, threads):
            if t is not None and t.is_alive():       # slow peer: cut it off; it is caught up at a later push
                r = results[p.url]
                p.drop()                             # closing its sockets unblocks the thread
                t.join(1.0)
                # set after the thread gave up (its own error would say only "connection closed")
                r.ok, r.version = False, None
                r.error = f"timed out: the push window of {self.timeout:g}s ended"
        prog.close()
        wire_bytes = sum(len(b) for b in feed.buckets)
        return PushStats(version, 0.0, time.perf_counter() - t0, 0, wire_bytes, 0,
                         [results[p.url] for p in self.peers])

    def _send_update(self, p: _Peer, buckets_iter, prog: Progress, rollback: bool) -> tuple[int, dict]:
        ch = p.ch
        chans = [ch] + p.extra
        for c in chans:
            c.settimeout(max(1.0, self.timeout))
        msg = {"streams": len(chans)} if p.extra else {}
        if rollback:
            msg["allow_rollback"] = True
        ch.send_msg(wire.UPDATE, msg)
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

    def _send_parallel(self, chans: list, buckets_iter, prog: Progress) -> int:
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

    # errors a retry cannot fix: reported at once
    FINAL_ERRORS = ("LayoutMismatch", "RollbackRefused", "AuthError", "InvalidArgument")

    def _serve_peer(self, p: _Peer, r: PeerResult, feed: _Feed, state, base, version, feed_kind, rollback,
                    deadline, prog, full_lock) -> None:
        for attempt in range(self.retries + 1):
            r.attempts = attempt + 1
            if p.ch is None:
                err = self._try_connect(p, deadline)
                if p.ch is None:
                    r.error = f"cannot connect: {err}"
                    return
                if r.previous_version is None:
                    r.previous_version = p.version
                if p.version is not None and p.digest is not None:
                    if p.version == version:   # it applied this update but its ACK was lost: check, do not resend
                        feed.finish()
                        p.verified = p.digest == self._digest_of(version, state)
                    elif self._digests.get(p.version) == p.digest:
                        p.verified = True      # reconnected at a version whose digest the sender knows
            kind, parts, note = self._plan(p, base, version, feed_kind, rollback)
            r.kind, r.note = kind, note
            t1 = time.perf_counter()
            try:
                if kind == "none":
                    r.ok, r.version = True, p.version
                    prog.add(done=1)
                    return
                if kind == "refused":
                    r.error, r.version = note, p.version
                    return
                if self.encoder.layout is not None and p.layout is not None and p.layout != self._layout_digest():
                    r.error = "LayoutMismatch: " + self._layout_difference(p.ch, max(0.1, min(
                        self.connect_timeout, deadline - time.perf_counter())))
                    r.kind, r.version = "refused", p.version
                    log.warning("peer %s: %s", p.url, r.error)
                    return
                if kind == "full" and feed_kind != "full":
                    log.warning("peer %s gets a FULL update of version %d: %s", p.url, version, note)
                elif note:
                    log.warning("peer %s: %s", p.url, note)
                for part in parts:
                    if part is None:
                        nbytes, ack = self._send_update(p, feed.iterate(), prog, rollback)
                    elif part == "full":
                        feed.finish()              # the snapshot is final once the delta is fully encoded
                        with full_lock:
                            up = full_update(state, version, bucket_bytes=self.bucket_bytes,
                                             digest=self.encoder.want_digest, format=min(p.format, self.format))
                            nbytes, ack = self._send_update(p, up.iter_buckets(), prog, rollback)
                    else:
                        nbytes, ack = self._send_update(p, iter(part), prog, rollback)
                    r.bytes += nbytes
                    r.apply_s += float(ack.get("apply_s", 0.0)) + float(ack.get("decode_s", 0.0))
                    if not ack.get("ok"):
                        p.version, p.verified = ack.get("version"), False
                        raise _Refused(ack.get("error_type"), ack.get("error"))
                    p.version, p.verified = ack.get("version"), True
                    r.digest_verified = bool(ack.get("verified"))
                r.wire_s = time.perf_counter() - t1 - r.apply_s
                r.ok, r.version, r.error = True, p.version, None
                prog.add(done=1)
                return
            except (OSError, SparseSyncError) as exc:
                r.error = str(exc)
                r.version = p.version
                if isinstance(exc, _Refused) and exc.error_type in self.FINAL_ERRORS:
                    return
                if isinstance(exc, (wire.PeerClosed, wire.ProtocolError, OSError)):
                    p.drop()
                wait = self.backoff * (2 ** attempt)
                if time.perf_counter() + wait >= deadline:
                    return
                time.sleep(wait)


def probe(address: str, *, token: str | bytes | None = None, ssl_context: _ssl.SSLContext | None = None,
          timeout: float = 10.0, allow_unauthenticated: bool = False) -> dict:
    """Ask a :class:`Receiver` what it holds, without sending anything: connects, authenticates (both ways), reads
    its handshake reply and says goodbye. Returns ``{"address", "version", "digest", "layout" (hex), "formats",
    "adopt", "status"}``; ``status`` is what the receiver's ``status`` function returned (None without one).
    Raises ``OSError`` / :class:`~sparsesync.errors.SparseSyncError` subclasses naming the address on failure."""
    _positive("timeout", timeout)
    tok = wire.token_bytes(token)
    if tok is None and not allow_unauthenticated:
        raise InvalidArgument("probe needs a token (or allow_unauthenticated=True for trusted loopback tests)")
    scheme, host, port = wire.parse_url(address)
    sock = backends.get(scheme).connect(host, port, timeout)
    try:
        if ssl_context is not None:
            sock.settimeout(timeout)
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    ch = wire.Channel(sock, peer=address)
    try:
        info = wire.client_handshake(ch, tok, timeout)
        try:
            ch.send(wire.BYE)
        except SparseSyncError:
            pass
    finally:
        ch.close()
    layout = info.get("layout")
    return {"address": address, "version": info.get("version"), "digest": info.get("digest"),
            "layout": layout.hex() if isinstance(layout, bytes) else None, "formats": info.get("formats", [1]),
            "adopt": bool(info.get("adopt")), "status": info.get("status")}


class _Refused(SparseSyncError):
    """A receiver refused an update (its ACK named the error)."""

    def __init__(self, error_type, error):
        super().__init__(f"{error_type}: {error}")
        self.error_type = error_type


def layout_difference(mine, theirs) -> str:
    """Name the first tensor (in name order) whose presence, dtype or shape differs between two layouts
    [(name, dtype, shape), ...], and the tensor counts."""
    a = {n: (d, tuple(s)) for n, d, s in mine}
    b = {n: (d, tuple(s)) for n, d, s in theirs}
    counts = f"(the sender has {len(a)} tensors, the receiver {len(b)})"
    for n in sorted(set(a) | set(b)):
        if n not in b:
            return f"tensor {n!r} ({a[n][0]}{list(a[n][1])}) is on the sender, not on the receiver {counts}"
        if n not in a:
            return f"tensor {n!r} ({b[n][0]}{list(b[n][1])}) is on the receiver, not on the sender {counts}"
        if a[n] != b[n]:
            return (f"tensor {n!r}: the sender has {a[n][0]}{list(a[n][1])}, the receiver {b[n][0]}{list(b[n][1])} "
                    f"{counts}")
    return f"the layouts differ only in order {counts}"
