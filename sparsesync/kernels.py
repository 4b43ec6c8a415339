"""Chooses the kernel implementation: the native library when it loads, otherwise the pure-PyTorch reference.

Everything in sparsesync calls kernels through this module (``from .kernels import impl``).
"""
from __future__ import annotations

import warnings

from . import _native, config, reference

_warned = False


def impl():
    """The module implementing scan/encode/decode/scatter/h64/tree64 for this process."""
    global _warned
    if _native.available and not config.get_bool("SPARSESYNC_REFERENCE"):
        return _native
    if not _warned and not config.get_bool("SPARSESYNC_REFERENCE"):
        _warned = True
        warnings.warn(f"sparsesync: native library not available ({_native.load_error}); using the slow pure-PyTorch "
                      "reference kernels. Build it with: pip install -e .", RuntimeWarning, stacklevel=3)
    return reference


def using_native() -> bool:
    return impl() is _native
