"""Sessions over real sockets and processes on loopback: chains, fan-out, late joiners, restarts, cut connections,
authentication, forged frames, slow peers, relays. Every check compares the receiver's bytes with state_digest."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import sparsesync as ss
from sparsesync import wire
from sparsesync.session import Receiver, Sender

TOKEN = "test-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def make_state(seed=0, n=3, size=(256, 512)):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": (torch.randn(*size, generator=g) * 0.02).bfloat16() for i in range(n)} | \
        {"norm.weight": torch.ones(512, dtype=torch.bfloat16), "step": torch.tensor(0, dtype=torch.int64)}


def step_state(state, seed, density=0.01):
    g = torch.Generator().manual_seed(1000 + seed)
    new = {k: v.clone() for k, v in state.items()}
    for k, v in new.items():
        if v.dtype == torch.bfloat16 and v.dim() == 2:
            flat = v.view(torch.int16).view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[: int(flat.numel() * density)]
            flat[idx] += (torch.randint(0, 2, (idx.numel(),), generator=g, dtype=torch.int16) * 2 - 1)
    if "step" in new:
        new["step"] += 1
    return new


def clone(state):
    return {k: v.clone() for k, v in state.items()}


@pytest.fixture
def receivers():
    made = []

    def make(state, version=0, **kw):
        kw.setdefault("token", TOKEN)
        r = Receiver(state, "tcp://127.0.0.1:0", version=version, **kw).start()
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


def test_chain_fanout_two_receivers(receivers):
    base = make_state()
    r1, r2 = receivers(clone(base)), receivers(clone(base))
    with Sender([r1.address, r2.address], token=TOKEN, base=base, base_version=0, progress=False,
                digest=True) as s:
        cur = base
        for v in range(1, 6):
            cur = step_state(cur, v)
            st = s.push(cur, v)
            assert st.ok, st
            assert [p.kind for p in st.peers] == ["delta", "delta"]
            assert all(p.digest_verified for p in st.peers)
            d = ss.state_digest(cur)
            assert ss.state_digest(r1.state) == d and ss.state_digest(r2.state) == d
            assert r1.version == r2.version == v


def test_first_push_without_base_is_full_and_late_joiner_catches_up(receivers):
    base = make_state(1)
    # a receiver at a lower version than the push (a higher one would be a rollback: refused, see
    # test_hardening_session.py)
    r1 = receivers({k: torch.zeros_like(v) for k, v in base.items()}, version=0)
    with Sender([r1.address], token=TOKEN, progress=False) as s:
        st = s.push(base, 1)
        assert st.ok and st.peers[0].kind == "full"
        cur = step_state(base, 2)
        assert s.push(cur, 2).peers[0].kind == "delta"
        # a receiver that joins late, holding version 0 of something else, is given a full update
        r2 = receivers({k: torch.zeros_like(v) for k, v in base.items()}, version=0)
        s.peers.append(type(s.peers[0])(r2.address))
        cur = step_state(cur, 3)
        st = s.push(cur, 3)
        assert st.ok, st
        kinds = {p.peer: p.kind for p in st.peers}
        assert kinds[r1.address] == "delta" and kinds[r2.address] == "full"
        assert ss.state_digest(r2.state) == ss.state_digest(cur) == ss.state_digest(r1.state)


def test_wrong_token_is_rejected_before_any_payload(receivers):
    base = make_state(2)
    r = receivers(clone(base))
    before = ss.state_digest(r.state)
    with Sender([r.address], token="a-different-token", base=base, base_version=0, progress=False, retries=0,
                timeout=5) as s:
        with pytest.raises(ss.PushFailed) as ei:
            s.push(step_state(base, 1), 1)
    st = ei.value.stats
    assert not st.ok
    assert "authentication" in st.peers[0].error or "token" in st.peers[0].error
    assert ss.state_digest(r.state) == before and r.version == 0
    assert r.updates_applied == 0


def test_unauthenticated_peer_dropped_and_oversized_frames_refused(receivers):
    base = make_state(3)
    r = receivers(clone(base))
    _, host, port = wire.parse_url(r.address)
    # 1. before authenticating: a frame claiming a huge size is refused without allocation, connection dropped
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.recv(4096)                                       # the CHALLENGE
        sock.sendall(struct.pack("<BQ", wire.AUTH, 1 << 60))
        sock.settimeout(5)
        assert sock.recv(4096) == b""                         # closed by the receiver
    # 2. authenticated, then a forged BUCKET frame with a huge size: refused, state untouched
    sock = socket.create_connection((host, port), timeout=5)
    ch = wire.Channel(sock, peer="forger")
    wire.client_handshake(ch, wire.token_bytes(TOKEN), 5)
    ch.send_msg(wire.UPDATE, {})
    sock.sendall(struct.pack("<BQ", wire.BUCKET, 1 << 62))
    sock.settimeout(5)
    assert sock.recv(4096) == b""
    ch.close()
    # 3. authenticated, a well-framed but forged bucket: rejected with a clear error, state untouched
    sock = socket.create_connection((host, port), timeout=5)
    ch = wire.Channel(sock, peer="forger")
    wire.client_handshake(ch, wire.token_bytes(TOKEN), 5)
    ch.send_msg(wire.UPDATE, {})
    ch.send(wire.BUCKET, b"SSYN" + b"\xff" * 200)
    ch.send_msg(wire.DONE, {"cnt": 1})
    _, ack = ch.recv_msg((wire.ACK,))
    assert ack["ok"] is False and ack["error_type"] == "CorruptPayload"
    ch.close()
    assert ss.state_digest(r.state) == ss.state_digest(base) and r.version == 0


def _update_size(base, new, bucket_bytes=8192) -> int:
    return sum(len(b) for b in ss.Encoder(base=base, bucket_bytes=bucket_bytes).encode(new, 1).buckets)


class CuttingProxy:
    """TCP proxy that cuts the first connection after ``cut_after`` bytes from the sender, then passes through."""

    def __init__(self, target: tuple[str, int], cut_after: int, cut_all: bool = False):
        self.target, self.cut_after, self.cut_all = target, cut_after, cut_all
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.connections = 0
        self.cuts = 0
        self._stop = False
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        self.srv.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.srv.accept()
            except socket.timeout:
                continue
            self.connections += 1
            up = socket.create_connection(self.target)
            limit = self.cut_after if self.connections == 1 or self.cut_all else None
            threading.Thread(target=self._pipe, args=(c, up, limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, c, None), daemon=True).start()

    def _pipe(self, a, b, limit):
        sent = 0
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    b.sendall(data[: limit - sent])
                    self.cuts += 1
                    break
                b.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self._stop = True
        self.t.join(2)
        self.srv.close()


def test_connection_cut_mid_update_leaves_receiver_intact_and_sender_retries(receivers):
    base = make_state(4, n=4)
    r = receivers(clone(base))
    _, host, port = wire.parse_url(r.address)
    new = step_state(base, 1, density=0.05)
    # small buckets so the update spans many frames; cut in the middle of the transfer
    proxy = CuttingProxy((host, port), cut_after=2000 + _update_size(base, new) // 2)
    applied = []
    r.on_update = lambda v, st: applied.append(v)
    try:
        with Sender([f"tcp://127.0.0.1:{proxy.port}"], token=TOKEN, base=base, base_version=0, progress=False,
                    bucket_bytes=8192, backoff=0.05) as s:
            st = s.push(new, 1)
        assert proxy.cuts == 1 and proxy.connections >= 2
        assert st.ok and st.peers[0].attempts >= 2, st
        assert r.wait_for(1, 5)
        deadline = time.monotonic() + 5
        while not applied and time.monotonic() < deadline:    # on_update runs just after the ACK
            time.sleep(0.01)
        assert applied == [1]                                   # applied exactly once, after the retry
        assert ss.state_digest(r.state) == ss.state_digest(new)
        assert any("ended" in e or "closed" in e or "failed" in e for e in r.errors) or r.errors
    finally:
        proxy.close()


def test_cut_without_retry_keeps_previous_version_bytes(receivers):
    base = make_state(5, n=4)
    r = receivers(clone(base))
    _, host, port = wire.parse_url(r.address)
    new = step_state(base, 1, density=0.05)
    proxy = CuttingProxy((host, port), cut_after=2000 + _update_size(base, new) // 2, cut_all=True)
    try:
        with Sender([f"tcp://127.0.0.1:{proxy.port}"], token=TOKEN, base=base, base_version=0, progress=False,
                    bucket_bytes=8192, retries=0, timeout=5) as s:
            with pytest.raises(ss.PushFailed) as ei:
                s.push(new, 1)
        assert not ei.value.stats.ok
        time.sleep(0.2)
        assert r.version == 0 and not r.decoder.pending
        assert ss.state_digest(r.state) == ss.state_digest(base)
    finally:
        proxy.close()


def test_slow_peer_does_not_stall_others(receivers):
    base = make_state(6)
    good = receivers(clone(base))
    # a peer that authenticates and then never reads: its socket buffers fill and it stalls
    slow = socket.create_server(("127.0.0.1", 0))
    slow_port = slow.getsockname()[1]
    stop = threading.Event()

    def stall():
        c, _ = slow.accept()
        ch = wire.Channel(c)
        wire.server_handshake(ch, wire.token_bytes(TOKEN), {"version": 0, "digest": ss.state_digest(base),
                                                            "layout": ss.Decoder(clone(base)).layout_digest}, 5)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stop.wait(30)
        c.close()
    t = threading.Thread(target=stall, daemon=True)
    t.start()
    new = step_state(base, 1, density=0.3)
    window = 3.0
    try:
        with Sender([good.address, f"tcp://127.0.0.1:{slow_port}"], token=TOKEN, base=base, base_version=0,
                    progress=False, timeout=window, retries=0) as s:
            t0 = time.perf_counter()
            st = s.push(new, 1)
            took = time.perf_counter() - t0
        assert took < window + 6
        res = {p.peer: p for p in st.peers}
        assert res[good.address].ok and res[good.address].version == 1
        bad = res[f"tcp://127.0.0.1:{slow_port}"]
        assert not bad.ok and "timed out" in bad.error, bad.error
        assert ss.state_digest(good.state) == ss.state_digest(new)
    finally:
        stop.set()
        slow.close()


def test_relay_forwards_to_downstream(receivers):
    base = make_state(7)
    leaf1, leaf2 = receivers(clone(base)), receivers(clone(base))
    relay = receivers(clone(base), forward_to=[leaf1.address, leaf2.address])
    with Sender([relay.address], token=TOKEN, base=base, base_version=0, progress=False) as s:
        cur = base
        for v in (1, 2, 3):
            cur = step_state(cur, v)
            st = s.push(cur, v)
            assert st.ok
            assert leaf1.wait_for(v, 10) and leaf2.wait_for(v, 10)
            d = ss.state_digest(cur)
            assert ss.state_digest(relay.state) == d == ss.state_digest(leaf1.state) == ss.state_digest(leaf2.state)
        # the trainer's uplink carried each update once
        assert all(len(h.peers) == 1 for h in s.history)


def _serve_proc(tmp_path, name, version=0, seed=8):
    ready = tmp_path / f"{name}.addr"
    env = dict(os.environ, SPARSESYNC_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "sparsesync.cli", "serve", "--listen", "tcp://127.0.0.1:0",
                          "--layers", "1", "--hidden", "128", "--vocab", "512", "--seed", str(seed),
                          "--version", str(version), "--ready-file", str(ready)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert p.poll() is None, "receiver process died"
        assert time.monotonic() < deadline, "receiver process did not start"
        time.sleep(0.05)
    return p, ready.read_text()


def test_receiver_process_killed_mid_transfer_then_restarted(tmp_path):
    from sparsesync.cli import _model_state
    _, base = _model_state(1, 128, 8, 512)
    proc, addr = _serve_proc(tmp_path, "a")
    try:
        with Sender([addr], token=TOKEN, base=base, base_version=0, progress=False, retries=0, timeout=20) as s:
            cur = step_state(base, 1)
            assert s.push(cur, 1).ok
            proc.kill()                                  # the receiver process dies
            proc.wait(10)
            cur = step_state(cur, 2)
            with pytest.raises(ss.PushFailed) as ei:    # reported, with the reason
                s.push(cur, 2)
            st = ei.value.stats
            assert not st.ok and st.peers[0].error
            # restarted from its checkpoint (version 0) on the same port: brought up to date at the next push
            port = addr.rsplit(":", 1)[1]
            env = dict(os.environ, SPARSESYNC_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
            ready = tmp_path / "b.addr"
            proc = subprocess.Popen([sys.executable, "-m", "sparsesync.cli", "serve", "--listen",
                                     f"tcp://127.0.0.1:{port}", "--layers", "1", "--hidden", "128", "--vocab", "512",
                                     "--seed", "8", "--ready-file", str(ready), "--save", str(tmp_path / "out.st"),
                                     "--exit-at", "3"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            s.retries = 3
            cur = step_state(cur, 3)
            st = s.push(cur, 3)
            assert st.ok, st
            assert st.peers[0].kind == "chain"        # restarted at version 0: the retained deltas (v0 digest known)
            proc.wait(30)
        from sparsesync.safetensors_io import load
        assert ss.state_digest(load(tmp_path / "out.st")) == ss.state_digest(cur)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sender_refuses_missing_token_and_receiver_defaults_to_loopback():
    with pytest.raises(ValueError, match="token"):
        Sender(["tcp://127.0.0.1:1"])
    with pytest.raises(ValueError, match="token"):
        Receiver(make_state())
    r = Receiver(make_state(), token=TOKEN)
    assert r.host == "127.0.0.1"


def test_zstd_outer_compression_and_forged_compressed_frame(receivers):
    import zstandard
    base = make_state(9)
    r = receivers({k: torch.zeros_like(v) for k, v in base.items()}, version=0)
    with Sender([r.address], token=TOKEN, progress=False, compress=True) as s:
        st = s.push(base, 1)                                   # a full update: compressible bf16
        assert st.ok and st.peers[0].bytes < st.wire_bytes
        cur = step_state(base, 2)
        assert s.push(cur, 2).ok
    assert ss.state_digest(r.state) == ss.state_digest(cur)
    # a compressed frame that declares a huge content size is refused before decompression
    _, host, port = wire.parse_url(r.address)
    sock = socket.create_connection((host, port), timeout=5)
    ch = wire.Channel(sock, peer="forger")
    wire.client_handshake(ch, wire.token_bytes(TOKEN), 5)
    ch.send_msg(wire.UPDATE, {})
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(b"\0" * 1000)
    ch.send(wire.BUCKET_Z, _declare_huge(bytearray(frame)))
    sock.settimeout(5)
    assert sock.recv(4096) == b""
    ch.close()
    assert r.version == 2 and ss.state_digest(r.state) == ss.state_digest(cur)


def _declare_huge(frame: bytearray) -> bytes:
    """Rewrite a zstd frame header to declare an 8-byte content size of 2^40 (a decompression bomb's header)."""
    import zstandard
    f = bytearray(frame)
    fhd = f[4]
    size_flag = fhd >> 6
    single = (fhd >> 5) & 1
    did = fhd & 3
    pos = 5 + (0 if single else 1) + [0, 1, 2, 4][did]
    nbytes = [1 if single else 0, 2, 4, 8][size_flag]
    new_fhd = (3 << 6) | (fhd & 0x3F)
    out = f[:4] + bytes([new_fhd]) + f[5:pos] + (1 << 40).to_bytes(8, "little") + f[pos + nbytes:]
    assert zstandard.frame_content_size(bytes(out)) == 1 << 40
    return bytes(out)


def _self_signed(tmp_path):
    import shutil
    if not shutil.which("openssl"):
        pytest.skip("openssl command not available to make a test certificate")
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, crt


def test_tls_session(tmp_path, receivers):
    import ssl
    key, crt = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(crt, key)
    client_ctx = ssl.create_default_context(cafile=str(crt))
    base = make_state(10)
    r = receivers(clone(base), ssl_context=server_ctx)
    with Sender([r.address], token=TOKEN, base=base, base_version=0, progress=False, ssl_context=client_ctx) as s:
        cur = step_state(base, 1)
        assert s.push(cur, 1).ok
    assert ss.state_digest(r.state) == ss.state_digest(cur)
    # a client that does not trust the certificate cannot talk to it
    with Sender([r.address], token=TOKEN, base=cur, base_version=1, progress=False, retries=0, timeout=5,
                ssl_context=ssl.create_default_context()) as s:
        with pytest.raises(ss.PushFailed) as ei:
            s.push(step_state(cur, 2), 2)
    assert not ei.value.stats.ok and r.version == 1


class _FakeWorld:
    def __init__(self, world):
        self.barrier = threading.Barrier(world)
        self.slot = None


class FakeNCCLGroup:
    """Stands in for sparsesync.nccl.NCCLGroup: ranks in threads of this process meet at a barrier per broadcast."""
    worlds: dict = {}
    lock = threading.Lock()
    broadcasts = 0

    def __init__(self, unique_id, rank, world, device, **kw):
        with self.lock:
            self.w = self.worlds.setdefault(unique_id, _FakeWorld(world))
        self.rank = rank

    def broadcast_bytes(self, data, nbytes, root=0):
        if self.rank == root:
            assert len(data) == nbytes
            self.w.slot = bytes(data)
            type(self).broadcasts += 1
        self.w.barrier.wait(10)
        out = self.w.slot
        assert len(out) == nbytes
        self.w.barrier.wait(10)
        return out

    def close(self):
        pass


def test_nccl_payload_path_with_fake_communicator(receivers, monkeypatch):
    from sparsesync import nccl
    monkeypatch.setattr(nccl.NCCLBackend, "check", classmethod(lambda cls: None))
    monkeypatch.setattr(nccl, "NCCLGroup", FakeNCCLGroup)
    monkeypatch.setattr(nccl, "new_unique_id", lambda library=None: os.urandom(128))
    base = make_state(11)
    at_base = receivers(clone(base))
    elsewhere = receivers({k: torch.zeros_like(v) for k, v in base.items()}, version=0)
    with Sender([at_base.address, elsewhere.address], token=TOKEN, base=base, base_version=0, progress=False,
                backend="nccl", bucket_bytes=8192) as s:
        cur = base
        for v in (1, 2):
            before = FakeNCCLGroup.broadcasts
            cur = step_state(cur, v)
            st = s.push(cur, v)
            assert st.ok, st
            assert FakeNCCLGroup.broadcasts - before == sum(1 for _ in s.retain[-1][2])   # one per bucket
            kinds = {p.peer: p.kind for p in st.peers}
            assert kinds[at_base.address] == "delta"
            # v1: the out-of-date peer took part in the broadcast, discarded it, then caught up over TCP
            assert kinds[elsewhere.address] == ("full" if v == 1 else "delta")
            d = ss.state_digest(cur)
            assert ss.state_digest(at_base.state) == d == ss.state_digest(elsewhere.state)


def test_nccl_backend_refused_clearly_without_gpu():
    from sparsesync import nccl
    ok, why = nccl.available()
    if ok:
        pytest.skip("NCCL is usable on this machine")
    with pytest.raises(ss.SparseSyncError, match="NCCL"):
        Sender(["tcp://127.0.0.1:1"], token=TOKEN, backend="nccl")


def test_parallel_streams(receivers):
    base = make_state(12, n=4)
    r = receivers(clone(base))
    other = receivers({k: torch.zeros_like(v) for k, v in base.items()}, version=0)
    with Sender([r.address, other.address], token=TOKEN, base=base, base_version=0, progress=False, streams=3,
                bucket_bytes=8192) as s:
        cur = base
        for v in (1, 2, 3):
            cur = step_state(cur, v, density=0.05)
            st = s.push(cur, v)
            assert st.ok, st
            assert ss.state_digest(r.state) == ss.state_digest(cur) == ss.state_digest(other.state)
        assert len(s.peers[0].extra) == 2
    # an UPDATE that claims more streams than are attached is refused; the state is untouched
    _, host, port = wire.parse_url(r.address)
    sock = socket.create_connection((host, port), timeout=5)
    ch = wire.Channel(sock, peer="x")
    wire.client_handshake(ch, wire.token_bytes(TOKEN), 5, {"session": os.urandom(16)})
    ch.send_msg(wire.UPDATE, {"streams": 4})
    sock.settimeout(5)
    assert sock.recv(4096) == b""
    ch.close()
    assert r.version == 3 and ss.state_digest(r.state) == ss.state_digest(cur)
    with pytest.raises(ValueError, match="streams"):
        Sender([r.address], token=TOKEN, streams=0)


def test_bucket_after_the_final_one_applies_nothing(receivers):
    base = make_state(13)
    r = receivers(clone(base))
    new = step_state(base, 1)
    buckets = ss.Encoder(base=base, base_version=0).encode(new, 1).buckets
    _, host, port = wire.parse_url(r.address)
    sock = socket.create_connection((host, port), timeout=5)
    ch = wire.Channel(sock, peer="x")
    wire.client_handshake(ch, wire.token_bytes(TOKEN), 5)
    ch.send_msg(wire.UPDATE, {})
    for b in buckets + [buckets[-1]]:
        ch.send(wire.BUCKET, b)
    ch.send_msg(wire.DONE, {"cnt": len(buckets) + 1})
    _, ack = ch.recv_msg((wire.ACK,))
    assert ack["ok"] is False and ack["error_type"] == "CorruptPayload"
    assert r.version == 0 and ss.state_digest(r.state) == ss.state_digest(base)
    # and a DONE that miscounts is a protocol error: the connection is dropped, nothing applied
    ch.send_msg(wire.UPDATE, {})
    for b in buckets:
        ch.send(wire.BUCKET, b)
    ch.send_msg(wire.DONE, {"cnt": len(buckets) + 5})
    sock.settimeout(5)
    assert sock.recv(4096) == b""
    ch.close()
    assert r.version == 0 and ss.state_digest(r.state) == ss.state_digest(base)
