"""`sparsesync bench` over an emulated link in network namespaces (skipped where namespaces cannot be created)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsesync.netbench import emulation_available

ROOT = Path(__file__).resolve().parent.parent
why = emulation_available()


@pytest.mark.skipif(why is not None, reason=f"network namespaces unavailable: {why}")
def test_bench_over_emulated_link_is_exact_and_cleans_up(tmp_path):
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = tmp_path / "net"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "sparsesync.cli", "bench", "--params", "3e6", "--rates", "200mbit",
                        "--tensor-elems", "1000000", "--port", "7480", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "net.json").read_text())["rows"]
    by = {row["method"]: row for row in rows}
    assert set(by) == {"dense", "dense+zstd", "int32+raw", "sparsesync-v1", "sparsesync"}
    assert by["sparsesync"]["format"] == 2 and by["sparsesync-v1"]["format"] == 1
    assert all(row["exact"] for row in rows)
    # bytes counted at the link: sparsesync sends far fewer than int32 + raw values
    assert by["sparsesync"]["link_bytes"] * 3 < by["int32+raw"]["link_bytes"]
    assert by["sparsesync"]["link_bytes"] > by["sparsesync"]["payload_bytes"]      # headers are counted
    assert by["sparsesync"]["payload_bytes"] <= by["sparsesync-v1"]["payload_bytes"] * 1.02
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert after == before                                                     # namespaces removed
