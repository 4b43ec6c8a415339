"""The soak machinery (bench/soak.py) in a small configuration: receiver processes killed and restarted, connections
cut and stalled by a fault-injecting proxy, and every digest a receiver reports checked against the trainer's."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _soak():
    name = "sparsesync_bench_soak"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "soak.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod                 # dataclasses look their module up while the file executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.mark.slow
def test_soak_small_kills_cuts_stalls():
    soak = _soak()
    cfg = soak.SoakConfig(versions=30, receivers=2, kill_every=10, cut_rate=0.25, handshake_cut_rate=0.1,
                          stall_rate=0.03, long_stall_rate=0.0, partition_rate=0.01, timeout=5.0, max_seconds=120.0,
                          progress_every=10)
    res = soak.run_soak(cfg, log=lambda s: None)
    report = soak.format_report(res)
    assert res["versions_pushed"] == 30, report
    assert res["mismatches"] == 0, res["mismatch_details"]
    assert res["faults"]["kills"] >= 2 and res["faults"]["cuts"] > 0, report
    assert res["digest_checks"] > 30, report
    assert not res["hung"] and not res["thread_exceptions_total"], res["findings"]
    fv = res["final"]["version"]
    assert fv == 31 and res["final"]["ok"], res["final"]
    assert [r["version"] for r in res["final"]["receivers"]] == [fv, fv]
    assert all(r["digest_ok"] for r in res["final"]["receivers"])
    assert res["passed"], report
    assert res["leftover_processes"] == []                 # every receiver process ended
    assert all(m > 0 for m in res["peak_rss_mib"]["receivers"]) and res["peak_rss_mib"]["sender"] > 0


def test_fault_proxy_cuts_at_the_armed_offset():
    """A cut armed at byte k of the sender->receiver stream lets exactly k bytes through, then closes both sides (FIN;
    an RST cut may also discard bytes still in flight, as a real reset does)."""
    import random
    import socket
    import threading
    soak = _soak()
    srv = socket.create_server(("127.0.0.1", 0))
    got = bytearray()
    done = threading.Event()

    def sink():
        c, _ = srv.accept()
        try:
            while chunk := c.recv(65536):
                got.extend(chunk)
        finally:
            c.close()
            done.set()
    threading.Thread(target=sink, daemon=True).start()
    proxy = soak.FaultProxy(srv.getsockname()[1], random.Random(0))
    try:
        assert proxy.arm(soak.Fault("fin", "s2r", 1000))
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            for _ in range(10):
                c.sendall(b"x" * 300)
        except OSError:
            pass
        assert done.wait(5)
        assert len(got) == 1000
        assert proxy.counts["cuts"] == 1 and proxy.counts["cuts_fin"] == 1 and proxy.counts["cuts_s2r"] == 1
        c.close()
    finally:
        proxy.close()
        srv.close()
