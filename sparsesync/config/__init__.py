"""Every environment variable sparsesync reads, with its default and type, in one place (README lists them).

``python -m sparsesync.config`` prints the README's table (``sparsesync/config/__main__.py``). This is a package so
that running it as a module works cleanly even though importing ``sparsesync`` imports ``sparsesync.config``.
"""
from __future__ import annotations

import os

VARIABLES = {
    "SPARSESYNC_THREADS": ("0", "int", "CPU threads for native kernels; 0 = all cores"),
    "SPARSESYNC_BUCKET_BYTES": (str(32 << 20), "int", "default bucket body size target in bytes"),
    "SPARSESYNC_FORMAT": ("2", "int", "wire format version encoders write (1 or 2); sessions use 1 with receivers that only read 1"),
    "SPARSESYNC_LIB": ("", "path", "load the native library from this path instead of the package directory"),
    "SPARSESYNC_REFERENCE": ("0", "bool", "1 = use the pure-PyTorch reference kernels even if the native library loads"),
    "SPARSESYNC_NCCL_LIB": ("", "path", "libnccl.so.2 to use for backend='nccl' (default: the nvidia-nccl wheel, then the system)"),
    "SPARSESYNC_CUDA": ("auto", "0, 1 or auto", "build time: compile the CUDA sources (auto = when nvcc is found)"),
    "SPARSESYNC_CUDA_SELFTEST": ("1", "bool", "check the CUDA kernels against the CPU ones on small data before first use on a device (0 = skip)"),
}


def _raw(name: str) -> str:
    return os.environ.get(name, VARIABLES[name][0])


def get_int(name: str) -> int:
    raw = _raw(name)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def get_bool(name: str) -> bool:
    raw = _raw(name).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean (use 0 or 1)")


def threads() -> int:
    n = get_int("SPARSESYNC_THREADS")
    return n if n > 0 else (os.cpu_count() or 1)


def markdown_table() -> str:
    """The README's configuration table (python -m sparsesync.config)."""
    rows = ["| variable | default | type | meaning |", "|---|---|---|---|"]
    for name, (default, typ, doc) in VARIABLES.items():
        rows.append(f"| `{name}` | `{default or '(unset)'}` | {typ} | {doc} |")
    return "\n".join(rows)
