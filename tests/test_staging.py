"""Receivers that adopt a sender's layout, probe(), and the shared engine-side core (StagedMirror)."""
import socket

import pytest
import torch

import sparsesync as ss
from sparsesync import wire
from sparsesync.errors import InvalidArgument, PushFailed
from sparsesync.integrations.staging import StagedMirror

TOKEN = "staging-test-token"


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 16, generator=g).bfloat16(),
            "model.layers.0.self_attn.k_proj.weight": torch.randn(8, 16, generator=g).bfloat16(),
            "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(16, generator=g),
            "step": torch.tensor([3, 4], dtype=torch.int64)}


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 else \
        t.view(torch.int64)


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _touch(state, name, idx, value):
    state[name].view(-1)[idx] = value


def test_empty_receiver_adopts_the_layout_of_a_generator_push():
    src = _state()
    src["model.norm.weight"][0] = float("nan")
    src["model.norm.weight"][1] = -0.0
    src["model.norm.weight"][2] = float("inf")
    mirror = {}
    r = ss.Receiver(mirror, "tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True).start()
    try:
        assert ss.probe(r.address, token=TOKEN)["adopt"] is True
        s = ss.Sender([r.address], token=TOKEN, digest=True, progress=False)
        st = s.push(((k, v) for k, v in src.items()), 1)       # a generator: read once, layout given first
        assert st.ok and st.kind == "full"
        _same(mirror, src)
        assert r.version == 1
        _touch(src, "model.layers.0.mlp.down_proj.weight", 7, 2.5)
        st = s.push(src, 2)
        assert st.ok and st.kind == "delta" and st.changed == 1
        _same(mirror, src)
        p = ss.probe(r.address, token=TOKEN)
        assert p["adopt"] is False and p["version"] == 2 and p["digest"] == ss.state_digest(src)
    finally:
        r.stop()


def test_empty_receiver_gets_a_full_update_from_a_sender_with_a_base():
    src = _state(1)
    mirror = {}
    r = ss.Receiver(mirror, "tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True).start()
    try:
        s = ss.Sender([r.address], token=TOKEN, base=src, base_version=5, digest=True, progress=False)
        _touch(src, "model.norm.weight", 3, 9.0)
        st = s.push(src, 6)
        assert st.ok and st.peers[0].kind == "full"
        _same(mirror, src)
    finally:
        r.stop()


def test_layout_is_adopted_once():
    mirror = {}
    r = ss.Receiver(mirror, "tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True).start()
    try:
        ss.Sender([r.address], token=TOKEN, progress=False).push(_state(), 1)
        other = {"something.else": torch.zeros(4)}
        with pytest.raises(PushFailed, match="LayoutMismatch|layout"):
            ss.Sender([r.address], token=TOKEN, progress=False, retries=0).push(other, 2)
        assert list(mirror) == list(_state()) and r.version == 1
    finally:
        r.stop()


def test_adopt_layout_needs_a_dict():
    with pytest.raises(InvalidArgument, match="dict"):
        ss.Receiver([("a", torch.zeros(2))], "tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True)


def test_layout_set_to_a_receiver_that_has_a_layout_is_refused():
    state = _state()
    before = {k: v.clone() for k, v in state.items()}
    r = ss.Receiver(state, "tcp://127.0.0.1:0", token=TOKEN).start()
    try:
        host, port = r.address[len("tcp://"):].rsplit(":", 1)
        ch = wire.Channel(socket.create_connection((host, int(port)), timeout=5), peer="test")
        info = wire.client_handshake(ch, wire.token_bytes(TOKEN), 5)
        assert "adopt" not in info
        ch.send(wire.LAYOUT_SET, wire.pack_layout([("x", "float32", (2,))]))
        with pytest.raises(ss.SparseSyncError):
            ch.recv((wire.WELCOME,))
        ch.close()
        _same(state, before)
        assert any("LAYOUT_SET" in e for e in r.errors)
    finally:
        r.stop()


def test_probe_reports_status_and_checks_the_token():
    calls = []

    def status():
        calls.append(1)
        return {"applied_version": 0, "note": "ok", "nested": {"a": [1, 2.5, None]}}

    r = ss.Receiver(_state(), "tcp://127.0.0.1:0", token=TOKEN, status=status).start()
    try:
        p = ss.probe(r.address, token=TOKEN)
        assert p["status"] == {"applied_version": 0, "note": "ok", "nested": {"a": [1, 2.5, None]}}
        assert p["version"] == 0 and p["digest"] == ss.state_digest(_state()) and 2 in p["formats"]
        n = len(calls)
        with pytest.raises(wire.AuthError):
            ss.probe(r.address, token="wrong-token-123")
        assert len(calls) == n                      # nothing is revealed before authentication
        with pytest.raises(InvalidArgument, match="token"):
            ss.probe(r.address)
    finally:
        r.stop()


def test_a_broken_status_function_does_not_break_handshakes():
    def status():
        raise RuntimeError("boom")

    src = _state()
    r = ss.Receiver({k: v.clone() for k, v in src.items()}, "tcp://127.0.0.1:0", token=TOKEN, status=status).start()
    try:
        assert "boom" in ss.probe(r.address, token=TOKEN)["status"]["error"]
        s = ss.Sender([r.address], token=TOKEN, base=src, base_version=0, progress=False)
        _touch(src, "model.norm.weight", 0, 1.0)
        assert s.push(src, 1).ok
    finally:
        r.stop()


# -- StagedMirror ------------------------------------------------------------------------------------------------------

def _staged(src, **kw):
    sm = StagedMirror({k: v.clone() for k, v in src.items()}, listen="tcp://127.0.0.1:0", token=TOKEN, **kw)
    sm.start()
    return sm


def test_staged_mirror_plans_exactly_what_changed_and_proves_it():
    src = _state()
    sm = _staged(src)
    try:
        s = ss.Sender([sm.address], token=TOKEN, base=src, base_version=0, digest=True, progress=False)
        _touch(src, "model.layers.0.self_attn.q_proj.weight", 5, 1.25)
        s.push(src, 1)

        def whole_attention(changed):
            return set(changed) | {n for n in sm.mirror if ".self_attn." in n and any(".self_attn." in c
                                                                                    for c in changed)}

        with sm.prepare(1, timeout=10, expand=whole_attention) as plan:
            assert plan.problem is None and plan.version == 1
            assert plan.changed == {"model.layers.0.self_attn.q_proj.weight"}
            assert plan.names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
            assert plan.digest_verified is True
            sm.applied(plan, apply_s=0.0)
        assert sm.version == 1 and sm.digest == ss.state_digest(src)
        st = ss.probe(sm.address, token=TOKEN)["status"]
        assert st["applied_version"] == 1 and st["digest"] == ss.state_digest(src) and st["error"] is None
        with sm.prepare(1, timeout=1) as plan:           # the same version again: nothing to load
            assert plan.problem is None and plan.names == []
    finally:
        sm.stop()


def test_staged_mirror_problems_touch_nothing():
    src = _state()
    sm = _staged(src, require_digest=True)
    try:
        with sm.prepare(3, timeout=0.2) as plan:
            assert "version 3 did not arrive within 0.2 s" in plan.problem and sm.address in plan.problem
        assert "did not arrive" in sm.status()["error"]
        s = ss.Sender([sm.address], token=TOKEN, base=src, base_version=0, digest=False, progress=False)
        _touch(src, "model.norm.weight", 1, 3.0)
        s.push(src, 1)
        with sm.prepare(1, timeout=5) as plan:
            assert "require_digest" in plan.problem
        _touch(src, "model.norm.weight", 2, 4.0)
        s.push(src, 2)
        with sm.prepare(1, timeout=5) as plan:
            assert "already holds version 2" in plan.problem and "ask for version 2" in plan.problem
        assert sm.version == 0 and sm.digest == ss.state_digest(_state())
        with pytest.raises(InvalidArgument, match="version"):
            with sm.prepare(-1, timeout=1):
                pass
    finally:
        sm.stop()


def test_staged_mirror_after_an_inconsistent_failure_loads_everything():
    src = _state()
    sm = _staged(src)
    try:
        s = ss.Sender([sm.address], token=TOKEN, base=src, base_version=0, digest=True, progress=False)
        _touch(src, "model.norm.weight", 1, 3.0)
        s.push(src, 1)
        with sm.prepare(1, timeout=5) as plan:
            assert plan.names == ["model.norm.weight"]
            sm.failed(plan, "load_weights exploded", consistent=False)
        assert sm.version == 0 and sm.status()["broken"] == "load_weights exploded"
        with sm.prepare(1, timeout=5) as plan:
            assert plan.names == list(src)
            sm.applied(plan)
        assert sm.broken is None and sm.version == 1
    finally:
        sm.stop()


def test_staged_mirror_with_an_adopted_layout_loads_everything_first():
    mirror = {}
    sm = StagedMirror(mirror, listen="tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True)
    sm.start()
    try:
        with sm.prepare(0, timeout=1) as plan:
            assert "empty" in plan.problem
        src = _state(2)
        s = ss.Sender([sm.address], token=TOKEN, digest=True, progress=False)
        s.push(src, 1)
        with sm.prepare(1, timeout=5) as plan:
            assert plan.problem is None and plan.names == list(src)
            sm.applied(plan)
        _same(sm.mirror, src)
        assert sm.digest == ss.state_digest(src)
    finally:
        sm.stop()


def test_staged_mirror_refuses_an_empty_mirror_without_adoption():
    with pytest.raises(InvalidArgument, match="empty"):
        StagedMirror({}, listen="tcp://127.0.0.1:0", token=TOKEN)


def test_a_relay_and_its_downstream_can_both_start_empty():
    src = _state(3)
    down, mid = {}, {}
    rd = ss.Receiver(down, "tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True).start()
    rm = ss.Receiver(mid, "tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True, forward_to=[rd.address]).start()
    try:
        s = ss.Sender([rm.address], token=TOKEN, digest=True, progress=False)
        for v in (1, 2):
            _touch(src, "model.layers.0.mlp.down_proj.weight", v, float(v))
            assert s.push(src, v).ok
            assert rd.wait_for(v, 10)
            _same(down, src)
            _same(mid, src)
    finally:
        rm.stop()
        rd.stop()


def test_a_layout_that_cannot_be_allocated_is_refused_and_changes_nothing():
    mirror = {}
    r = ss.Receiver(mirror, "tcp://127.0.0.1:0", token=TOKEN, adopt_layout=True).start()
    try:
        host, port = r.address[len("tcp://"):].rsplit(":", 1)
        ch = wire.Channel(socket.create_connection((host, int(port)), timeout=5), peer="test")
        wire.client_handshake(ch, wire.token_bytes(TOKEN), 5)
        ch.send(wire.LAYOUT_SET, wire.pack_layout([("ok", "float32", (2,)), ("huge", "float32", (1 << 40, 1 << 20))]))
        with pytest.raises(ss.SparseSyncError):
            ch.recv((wire.WELCOME,))
        ch.close()
        assert mirror == {} and any("cannot allocate" in e for e in r.errors)
        assert ss.probe(r.address, token=TOKEN)["adopt"] is True     # still empty, still adopting
        ss.Sender([r.address], token=TOKEN, progress=False).push(_state(), 1)
        _same(mirror, _state())
    finally:
        r.stop()
