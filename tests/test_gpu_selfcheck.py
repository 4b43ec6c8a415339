"""The gpu tests' own logic, checked on every machine: tests/test_gpu_kernels.py and tests/test_gpu_codec.py run in a
subprocess with SPARSESYNC_GPU_SELFCHECK=1, which puts the CPU kernels (and, for the codec tests, an emulated device)
where the GPU would be. A GPU machine runs the same tests for real (`pytest -m gpu`, bench/gpu_check.sh)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsesync import _native

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not _native.available, reason="native library not available")
def test_gpu_tests_pass_on_the_cpu_stand_ins():
    env = dict(os.environ, SPARSESYNC_GPU_SELFCHECK="1", SPARSESYNC_GPU_TEST_SCALE="0.5")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_kernels.py",
                        "tests/test_gpu_codec.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
