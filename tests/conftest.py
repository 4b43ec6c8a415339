"""Shared fixtures, markers and hypothesis settings of the sparsesync test suite.

Helpers and strategies live in tests/helpers.py (imported by the test modules). Markers: ``slow`` (more than ~10 s;
still run by default, deselect with ``-m "not slow"``) and ``gpu`` (needs a CUDA device; skipped without one).
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# keep the checkout clean: hypothesis writes failure patches under its home directory even without a database
set_hypothesis_home_dir(os.environ.get("SPARSESYNC_HYPOTHESIS_HOME") or tempfile.mkdtemp(prefix="sparsesync-hyp-"))
settings.register_profile("sparsesync", deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("SPARSESYNC_HYPOTHESIS_PROFILE", "sparsesync"))

# The fallback warning of sparsesync.kernels is tested on its own (test_import.py); here it would only be noise.
warnings.filterwarnings("ignore", message="sparsesync: native library not available", category=RuntimeWarning)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (still run by default)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("filterwarnings",
                            "ignore:sparsesync. native library not available:RuntimeWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    import sparsesync._native as native
    from sparsesync import kernels
    which = "native" if kernels.using_native() else "reference"
    return [f"sparsesync kernels: {which} (native available={native.available}, "
            f"load_error={native.load_error!r}, SPARSESYNC_REFERENCE={os.environ.get('SPARSESYNC_REFERENCE', '')!r})"]


def _with_format(value: int):
    old = os.environ.get("SPARSESYNC_FORMAT")
    os.environ["SPARSESYNC_FORMAT"] = str(value)
    try:
        yield value
    finally:
        if old is None:
            os.environ.pop("SPARSESYNC_FORMAT", None)
        else:
            os.environ["SPARSESYNC_FORMAT"] = old


@pytest.fixture(scope="module", params=[1, 2], ids=["format1", "format2"])
def wire_format(request):
    """Runs a whole module once per wire format version (the encoders' default, SPARSESYNC_FORMAT)."""
    yield from _with_format(request.param)


@pytest.fixture(scope="module")
def format1():
    """For modules that pin the structure of format 1 (FORMAT.md §2-§5); format 2 has its own tests."""
    yield from _with_format(1)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def small_state(rng):
    """A small mixed-dtype state (a few thousand elements) and a sparse successor of it."""
    from helpers import mutate, random_tensor
    old = {
        "emb": random_tensor((64, 96), torch.bfloat16, rng),
        "bias": random_tensor((96,), torch.float32, rng),
        "scale": random_tensor((), torch.float16, rng),
        "ids": random_tensor((300,), torch.int64, rng),
        "mask": random_tensor((5, 7), torch.bool, rng),
        "empty": random_tensor((0, 4), torch.float32, rng),
    }
    new = {k: mutate(v, 0.05, rng) for k, v in old.items()}
    return old, new


@pytest.fixture
def multi_bucket_update(rng):
    """(old, new, update) where the update has several buckets (bucket_bytes=4096) of mixed sparse/dense segments."""
    from helpers import mutate, random_tensor
    from sparsesync import Encoder
    old = {
        "a": random_tensor((9000,), torch.bfloat16, rng),
        "b": random_tensor((40, 50), torch.float32, rng),
        "c": random_tensor((3000,), torch.int32, rng),
        "d": random_tensor((), torch.float64, rng),
    }
    new = {
        "a": mutate(old["a"], 0.02, rng, "ulp"),
        "b": mutate(old["b"], 1.0, rng, "bits"),     # dense, split over buckets
        "c": mutate(old["c"], 0.3, rng),
        "d": mutate(old["d"], 1.0, rng),
    }
    upd = Encoder(old, 0, bucket_bytes=4096, digest=True).encode(new, 1)
    assert upd.count >= 3
    return old, new, upd
