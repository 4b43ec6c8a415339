"""Session semantics that keep a user from being misled (issue 6): versions identify bytes, failed pushes raise,
full updates and rollbacks are visible and refused by default, layout mismatches are named and not retried, time
windows include connecting, and no stalled, slow or hostile peer can block a legitimate push or hold memory."""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import tracemalloc

import pytest
import torch

import sparsesync as ss
from sparsesync import wire
from sparsesync.codec import full_update
from sparsesync.errors import PushFailed, SparseSyncError, VersionConflict
from sparsesync.session import Receiver, Sender

from test_session import TOKEN, clone, make_state, receivers, step_state  # noqa: F401  (fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_channel(r: Receiver, hello=None) -> wire.Channel:
    _, host, port = wire.parse_url(r.address)
    ch = wire.Channel(socket.create_connection((host, port), timeout=5), peer="test")
    wire.client_handshake(ch, wire.token_bytes(TOKEN), 5, hello)
    return ch


def send_update(ch: wire.Channel, buckets, msg=None) -> dict:
    ch.send_msg(wire.UPDATE, msg or {})
    for b in buckets:
        ch.send(wire.BUCKET, b)
    ch.send_msg(wire.DONE, {"cnt": len(buckets)})
    return ch.recv_msg((wire.ACK,))[1]


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# -- 1. a version identifies bytes ---------------------------------------------------------------------------------

def test_other_bytes_under_a_pushed_version_raise_and_same_bytes_are_a_noop(receivers):
    base = make_state(11)
    r = receivers(clone(base))
    v1, v1b = step_state(base, 1), step_state(base, 2)
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False) as s:
        assert s.push(v1, 1).ok
        with pytest.raises(VersionConflict, match=r"version 1 was already pushed"):
            s.push(v1b, 1)
        with pytest.raises(VersionConflict, match=r"version 0.*version 1"):
            s.push(v1, 0)
        assert r.version == 1 and ss.state_digest(r.state) == ss.state_digest(v1)
        again = s.push(clone(v1), 1)                  # the same bytes again: nothing to send
        assert again.ok and again.kind == "repush" and again.peers[0].kind == "none" and again.peers[0].bytes == 0
        st = s.push(step_state(v1, 3), 2)             # and the next push is still a delta (not a full fallback)
        assert st.ok and st.peers[0].kind == "delta"
        assert ss.state_digest(r.state) == ss.state_digest(step_state(v1, 3))


def test_repush_of_the_same_version_catches_up_a_peer_that_missed_it(receivers):
    base = make_state(12)
    a = receivers(clone(base))
    port = free_port()
    with Sender([a.address, f"tcp://127.0.0.1:{port}"], token=TOKEN, base=base, base_version=0, progress=False,
                timeout=3, retries=0) as s:
        v1 = step_state(base, 1)
        st = s.push(v1, 1)                            # quorum 1: one peer is enough, the other is reported
        assert not st.ok and st.succeeded == 1 and "cannot connect" in st.peers[1].error
        b = Receiver(clone(base), f"tcp://127.0.0.1:{port}", token=TOKEN).start()
        try:
            st = s.push(v1, 1)                        # same bytes, same version: the late peer gets the delta
            assert st.ok and [p.kind for p in st.peers] == ["none", "delta"], st
            assert ss.state_digest(b.state) == ss.state_digest(v1) and b.version == 1
        finally:
            b.stop()


# -- 2. a push that reaches nobody raises ----------------------------------------------------------------------------

def test_push_reaching_no_peer_raises_naming_each_peer(caplog):
    base = make_state(13)
    dead = [f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"]
    caplog.set_level(logging.WARNING, logger="sparsesync")
    with Sender(dead, token=TOKEN, base=base, base_version=0, progress=False, timeout=2, retries=1,
                backoff=0.05) as s:
        with pytest.raises(PushFailed) as ei:
            s.push(step_state(base, 1), 1)
    msg = str(ei.value)
    assert "0 of 2" in msg and all(d in msg for d in dead) and "refused" in msg.lower()
    assert ei.value.stats.succeeded == 0 and len(ei.value.stats.peers) == 2
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert all(d in warned for d in dead)


def test_quorum_all_and_zero(receivers):
    base = make_state(14)
    r = receivers(clone(base))
    peers = [r.address, f"tcp://127.0.0.1:{free_port()}"]
    with Sender(peers, token=TOKEN, base=base, base_version=0, progress=False, timeout=2, retries=0,
                quorum="all") as s:
        with pytest.raises(PushFailed, match="1 of 2 peer.*2 required"):
            s.push(step_state(base, 1), 1)
    assert r.version == 1                            # the reachable peer got it all the same
    with Sender(peers, token=TOKEN, base=step_state(base, 1), base_version=1, progress=False, timeout=2, retries=0,
                quorum=0) as s:
        st = s.push(step_state(base, 2), 2)
        assert st.succeeded == 1 and not st.ok
    with pytest.raises(SparseSyncError, match="quorum"):
        Sender(peers, token=TOKEN, quorum=3)


# -- 3. full updates and rollbacks are visible; rollbacks refused unless allowed ------------------------------------

def test_full_update_is_visible_and_carries_the_digest(receivers, caplog):
    base = make_state(15)
    other = step_state(base, 7, density=0.2)          # the receiver claims version 0 but holds other bytes
    r = receivers(clone(other))
    caplog.set_level(logging.WARNING, logger="sparsesync")
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False, digest=True) as s:
        v1 = step_state(base, 1)
        st = s.push(v1, 1)
    p = st.peers[0]
    assert st.ok and p.kind == "full" and "digest differs" in p.note
    assert p.bytes > 10 * st.wire_bytes                # the bytes really sent, not the delta's size
    assert p.digest_verified and r.decoder.last_stats.digest_verified   # item 4: the full update carries the digest
    assert st.full_peers == [r.address] and "1 full" in str(st)
    assert any("FULL update" in rec.getMessage() for rec in caplog.records)
    assert ss.state_digest(r.state) == ss.state_digest(v1)


def test_sender_refuses_to_move_a_receiver_back_unless_allowed(receivers, caplog):
    base = make_state(16)
    r = receivers(clone(base), version=5)
    caplog.set_level(logging.WARNING, logger="sparsesync")
    with Sender([r.address], token=TOKEN, progress=False, timeout=5) as s:      # no base: a full update of v1
        with pytest.raises(PushFailed, match="RollbackRefused.*version 5"):
            s.push(step_state(base, 1), 1)
        assert r.version == 5 and ss.state_digest(r.state) == ss.state_digest(base)
        assert s.history[-1].peers[0].bytes == 0        # refused before sending anything
        st = s.push(step_state(base, 2), 2, allow_rollback=True)
        assert st.ok and st.peers[0].previous_version == 5 and r.version == 2
    assert any("moving it back from version 5" in rec.getMessage() for rec in caplog.records)


def test_receiver_refuses_rollback_from_any_sender_unless_allowed(receivers):
    base = make_state(17)
    r = receivers(clone(base), version=5)
    v1 = step_state(base, 1)
    buckets = full_update(v1, 1, bucket_bytes=8192).buckets
    ch = raw_channel(r)
    try:
        ack = send_update(ch, buckets)
        assert not ack["ok"] and ack["error_type"] == "RollbackRefused" and ack["version"] == 5
        assert ss.state_digest(r.state) == ss.state_digest(base)
        ack = send_update(ch, buckets, {"allow_rollback": True})     # the sender allows it explicitly
        assert ack["ok"] and ack["version"] == 1
    finally:
        ch.close()
    r2 = receivers(clone(base), version=5, allow_rollback=True)      # or the receiver does
    ch = raw_channel(r2)
    try:
        assert send_update(ch, buckets)["ok"] and r2.version == 1
        assert ss.state_digest(r2.state) == ss.state_digest(v1)
    finally:
        ch.close()


# -- 5. layout mismatches are named and not retried ---------------------------------------------------------------

def test_layout_mismatch_names_the_tensor_and_is_not_retried(receivers):
    base = make_state(18)
    theirs = clone(base)
    theirs["layer1.weight"] = torch.zeros(256, 500, dtype=torch.bfloat16)
    r = receivers(theirs)
    t0 = time.perf_counter()
    with Sender([r.address], token=TOKEN, progress=False, retries=4, timeout=20) as s:   # full update, no base
        with pytest.raises(PushFailed) as ei:
            s.push(base, 1)
    assert time.perf_counter() - t0 < 5
    msg = str(ei.value)
    assert "layer1.weight" in msg and "[256, 512]" in msg and "[256, 500]" in msg, msg
    p = ei.value.stats.peers[0]
    assert p.bytes == 0 and p.attempts == 1 and r.updates_applied == 0


# -- 7. the push window includes connecting --------------------------------------------------------------------------

def test_timeout_covers_connect_to_a_peer_that_never_answers():
    srv = socket.create_server(("127.0.0.1", 0))        # accepts TCP (backlog) and never says a word
    port = srv.getsockname()[1]
    try:
        base = make_state(19, n=1)
        with Sender([f"tcp://127.0.0.1:{port}"], token=TOKEN, base=base, base_version=0, progress=False,
                    timeout=2, connect_timeout=5, retries=3) as s:
            t0 = time.perf_counter()
            with pytest.raises(PushFailed):
                s.push(step_state(base, 1), 1)
            took = time.perf_counter() - t0
        assert took < 3.0, took
    finally:
        srv.close()


# -- 8. a stalled sender never blocks another; an abandoned update is dropped ----------------------------------------

def test_stalled_sender_does_not_block_a_legitimate_push(receivers):
    base = make_state(20)
    r = receivers(clone(base), stall_timeout=1.5)
    stalled_update = ss.Encoder(base, 0, bucket_bytes=8192).encode(step_state(base, 5, density=0.05), 1).buckets
    assert len(stalled_update) >= 3
    ch = raw_channel(r)
    ch.send_msg(wire.UPDATE, {})
    ch.send(wire.BUCKET, stalled_update[0])             # ... and then nothing, like a trainer that died
    time.sleep(0.2)
    v1 = step_state(base, 1)
    t0 = time.perf_counter()
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False, timeout=10) as s:
        st = s.push(v1, 1)
    assert st.ok and time.perf_counter() - t0 < 1.5     # not blocked by the stalled update
    assert ss.state_digest(r.state) == ss.state_digest(v1)
    # the stalled update is abandoned after stall_timeout: its connection is closed and nothing was applied
    ch.settimeout(5)
    with pytest.raises(SparseSyncError):
        ch.recv()
    assert any("no data" in e or "timed out" in e.lower() for e in r.errors), list(r.errors)
    ch.close()
    assert ss.state_digest(r.state) == ss.state_digest(v1) and r.version == 1


def test_update_staged_while_another_committed_is_refused(receivers):
    base = make_state(21)
    r = receivers(clone(base))
    x = step_state(base, 6, density=0.05)
    xb = ss.Encoder(base, 0, bucket_bytes=8192).encode(x, 1).buckets
    ch = raw_channel(r)
    try:
        ch.send_msg(wire.UPDATE, {})
        ch.send(wire.BUCKET, xb[0])
        y = step_state(base, 1)
        with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False) as s:
            assert s.push(y, 1).ok
        for b in xb[1:]:
            ch.send(wire.BUCKET, b)
        ch.send_msg(wire.DONE, {"cnt": len(xb)})
        _, ack = ch.recv_msg((wire.ACK,))
        assert not ack["ok"] and ack["error_type"] == "VersionMismatch" and "another update" in ack["error"]
        assert ss.state_digest(r.state) == ss.state_digest(y)
    finally:
        ch.close()


# -- 9. attach-only streams cannot pile up ---------------------------------------------------------------------------

def test_attach_streams_without_a_live_session_are_closed(receivers):
    base = make_state(22, n=1)
    r = receivers(clone(base), handshake_timeout=0.3)
    for i in range(300):
        ch = raw_channel(r, {"attach": i.to_bytes(16, "little"), "stream": 1})
        ch.close()
    assert wait_until(lambda: not r._streams, 10), len(r._streams)
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False, streams=2) as s:
        assert s.push(step_state(base, 1), 1).ok


# -- 10. slowloris: the whole handshake is bounded, and so is the number of handshakes --------------------------------

def test_slow_handshakes_are_bounded_in_time_and_number(receivers):
    base = make_state(23, n=1)
    r = receivers(clone(base), handshake_timeout=1.0, max_handshakes=4)
    _, host, port = wire.parse_url(r.address)
    closed_after = []
    stop = threading.Event()

    def trickle():
        s = socket.create_connection((host, port), timeout=10)
        t0 = time.monotonic()
        frame = struct.pack("<BQ", wire.AUTH, 200) + b"\x80" * 200
        try:
            for byte in frame:                          # one byte every 0.2 s: each recv returns in time
                if stop.is_set():
                    return
                s.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            pass
        finally:
            closed_after.append(time.monotonic() - t0)
            s.close()
    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    stop.set()
    assert len(closed_after) == 8 and max(closed_after) < 4.0, closed_after
    assert r.refused_connections >= 1
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False) as s:
        assert s.push(step_state(base, 1), 1).ok


# -- 11. a frame header declaring a huge size costs nothing until the bytes arrive ------------------------------------

def test_frame_memory_grows_with_the_bytes_that_arrive():
    a, b = socket.socketpair()
    try:
        ch = wire.Channel(a, max_bucket=1 << 30, peer="forger")
        b.sendall(struct.pack("<BQ", wire.BUCKET, 1 << 30) + b"x" * 100)
        b.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            with pytest.raises(wire.PeerClosed):
                ch.recv_bucket()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, peak
    finally:
        a.close()
        b.close()
    # and a real large frame still arrives intact
    a, b = socket.socketpair()
    try:
        payload = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8).numpy().tobytes()
        t = threading.Thread(target=lambda: wire.Channel(b).send(wire.BUCKET, payload))
        t.start()
        got = wire.Channel(a, max_bucket=1 << 30).recv_bucket()
        t.join()
        assert bytes(got) == payload
    finally:
        a.close()
        b.close()


# -- a lost ACK does not cost a full update ---------------------------------------------------------------------------

class AckDroppingProxy:
    """Forwards frames both ways; on the first connection, cuts both sides when the receiver sends its ACK."""

    def __init__(self, target):
        self.target = target
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.connections = self.cuts = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(c, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, c, self.connections == 1), daemon=True).start()

    def _pipe(self, a, b, cut_at_ack):
        buf = b""
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if cut_at_ack:
                    buf += data
                    while len(buf) >= 9:
                        ftype, n = struct.unpack("<BQ", buf[:9])
                        if len(buf) < 9 + n:
                            break
                        if ftype == wire.ACK:
                            self.cuts += 1
                            raise OSError("cut at ACK")
                        b.sendall(buf[:9 + n])
                        buf = buf[9 + n:]
                else:
                    b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.srv.close()


def test_lost_ack_is_checked_by_digest_not_resent_in_full(receivers):
    base = make_state(24)
    r = receivers(clone(base))
    _, host, port = wire.parse_url(r.address)
    proxy = AckDroppingProxy((host, port))
    try:
        with Sender([f"tcp://127.0.0.1:{proxy.port}"], token=TOKEN, base=base, base_version=0, progress=False,
                    backoff=0.05) as s:
            v1 = step_state(base, 1)
            st = s.push(v1, 1)
        p = st.peers[0]
        assert proxy.cuts == 1 and p.attempts == 2
        assert st.ok and p.kind == "none" and r.updates_applied == 1, st    # applied once, its digest checked
        assert ss.state_digest(r.state) == ss.state_digest(v1)
    finally:
        proxy.close()


# -- engine hooks: which tensors an update wrote, and a consistent view of the state ---------------------------------

def test_on_commit_names_the_written_tensors_and_hold_blocks_commits(receivers):
    base = make_state(25)
    seen = []
    r = receivers(clone(base), on_commit=lambda v, st: seen.append((v, st.tensors)))
    v1 = clone(base)
    v1["layer1.weight"].view(torch.int16).view(-1)[7] += 1
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False, timeout=10) as s:
        assert s.push(v1, 1).ok
        assert seen == [(1, ("layer1.weight",))]
        done = threading.Event()
        with r.hold() as v:
            assert v == 1
            t = threading.Thread(target=lambda: (s.push(step_state(v1, 2), 2), done.set()), daemon=True)
            t.start()
            time.sleep(0.5)
            assert not done.is_set() and r.version == 1          # staged, not committed while held
        t.join(10)
        assert done.is_set() and r.version == 2 and seen[-1][0] == 2


def test_a_failing_callback_does_not_drop_the_connection(receivers):
    base = make_state(26)

    def boom(v, st):
        raise RuntimeError("callback bug")
    r = receivers(clone(base), on_update=boom)
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False) as s:
        assert s.push(step_state(base, 1), 1).ok
        st = s.push(step_state(step_state(base, 1), 2), 2)
        assert st.ok and st.peers[0].kind == "delta" and st.peers[0].attempts == 1   # same connection, no retry
    assert any("callback bug" in e for e in r.errors)


def test_verified_digest_is_reused_not_recomputed(receivers, monkeypatch):
    base = make_state(27)
    seen = []
    r = receivers(clone(base), on_commit=lambda v, st: seen.append(st.digest))
    v1 = step_state(base, 1)
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False, digest=True) as s:
        assert s.push(v1, 1).ok
    assert seen == [ss.state_digest(v1)]
    import sparsesync.session as session
    monkeypatch.setattr(session, "state_digest", lambda st: pytest.fail("digest computed twice"))
    assert r.digest() == ss.state_digest(v1)             # from the commit's verification, no new pass
