"""Wire format negotiation in sessions (docs/PROTOCOL.md): a receiver that reads only format 1 gets format 1, in a
fan-out every push is encoded in the newest format all connected peers read, and a catch-up in a format a peer cannot
read becomes a full update in its own format. Every check compares bytes through state_digest."""
from __future__ import annotations

import pytest

import sparsesync as ss
from sparsesync.codec import Decoder
from sparsesync.format import peek_version
from sparsesync.session import Receiver, Sender
from test_session import TOKEN, clone, make_state, receivers, step_state  # noqa: F401 (fixture)


def receiver_reading(formats: list[int] | None, doc: str) -> type:
    """A Receiver class that announces ``formats`` in its WELCOME (None: no "formats" at all, as before format 2) and
    refuses buckets of any other format."""
    readable = formats or [1]

    class Limited(Receiver):
        def _info(self) -> dict:
            info = super()._info()
            if formats is None:
                info.pop("formats")
            else:
                info["formats"] = list(formats)
            return info

        def _stager(self, old):
            dec = super()._stager(old)
            stage = Decoder._stage

            def only(bucket, owned, _dec=dec):
                if peek_version(bucket) not in readable:
                    raise ss.CorruptPayload(f"unsupported format version (this receiver reads format {readable})")
                return stage(_dec, bucket, owned)
            dec._stage = only
            return dec
    Limited.__doc__ = doc
    return Limited


OldReceiver = receiver_reading(None, "A receiver as released before format 2: its WELCOME lists no formats, and it "
                                     "refuses format-2 buckets.")
Format2OnlyReceiver = receiver_reading([2], "A receiver that reads format 2 only, as one whose weights are on a GPU "
                                            "(Decoder.formats == (2,)).")


def formats_sent(sender: Sender) -> set:
    return {peek_version(b) for _, _, buckets in sender.retain for b in buckets}


@pytest.fixture
def old_receivers():
    made = []

    def make(state, version=0):
        r = OldReceiver(state, "tcp://127.0.0.1:0", version=version, token=TOKEN).start()
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


def test_new_receivers_get_format_2(receivers):  # noqa: F811
    base = make_state(1)
    r = receivers(clone(base))
    s = Sender([r.address], token=TOKEN, base=base, base_version=0, digest=True, progress=False)
    try:
        cur = base
        for v in range(1, 3):
            cur = step_state(cur, v)
            assert s.push(cur, v).ok
        assert formats_sent(s) == {2}
        assert r.digest() == ss.state_digest(cur)
    finally:
        s.close()


def test_an_old_receiver_in_the_fan_out_makes_the_push_format_1(receivers, old_receivers):  # noqa: F811
    base = make_state(2)
    new_r, old_r = receivers(clone(base)), old_receivers(clone(base))
    s = Sender([new_r.address, old_r.address], token=TOKEN, base=base, base_version=0, digest=True,
               progress=False, quorum="all")
    try:
        cur = step_state(base, 1)
        st = s.push(cur, 1)
        assert st.ok and all(p.kind == "delta" for p in st.peers)
        assert formats_sent(s) == {1}
        assert new_r.digest() == old_r.digest() == ss.state_digest(cur)
    finally:
        s.close()


def test_an_old_receiver_joining_later_gets_a_full_update_in_format_1(receivers, old_receivers):  # noqa: F811
    base = make_state(3)
    new_r = receivers(clone(base))
    old_r = old_receivers(clone(base))
    s = Sender([new_r.address], token=TOKEN, base=base, base_version=0, digest=True, progress=False)
    try:
        cur = base
        for v in range(1, 3):
            cur = step_state(cur, v)
            assert s.push(cur, v).ok
        assert formats_sent(s) == {2}
    finally:
        s.close()
    # a new sender session with both peers; the retained format-2 deltas cannot serve the old receiver at v0
    s2 = Sender([new_r.address, old_r.address], token=TOKEN, base=cur, base_version=2, digest=True,
                progress=False, quorum="all")
    try:
        nxt = step_state(cur, 3)
        st = s2.push(nxt, 3)
        assert st.ok
        kinds = {p.peer: p.kind for p in st.peers}
        assert kinds[old_r.address] == "full" and kinds[new_r.address] == "delta"
        assert new_r.digest() == old_r.digest() == ss.state_digest(nxt)
    finally:
        s2.close()


def test_a_format_2_only_receiver_next_to_an_old_one_gets_a_full_update_in_format_2(old_receivers):
    base = make_state(5)
    old_r = old_receivers(clone(base))
    gpu_r = Format2OnlyReceiver(clone(base), "tcp://127.0.0.1:0", version=0, token=TOKEN).start()
    s = Sender([old_r.address, gpu_r.address], token=TOKEN, base=base, base_version=0, digest=True,
               progress=False, quorum="all")
    try:
        cur = step_state(base, 1)
        st = s.push(cur, 1)
        kinds = {p.peer: p.kind for p in st.peers}
        assert st.ok, st
        assert kinds[old_r.address] == "delta" and kinds[gpu_r.address] == "full"
        assert old_r.digest() == gpu_r.digest() == ss.state_digest(cur)
        note = next(p.note for p in st.peers if p.peer == gpu_r.address)
        assert "reads wire format 2 only" in note
    finally:
        s.close()
        gpu_r.stop()
