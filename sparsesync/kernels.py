"""Chooses the kernel implementation: the native library when it loads, otherwise the pure-PyTorch reference.

Everything in sparsesync calls kernels through this module (``from .kernels import impl``).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

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


# -- device memory --------------------------------------------------------------------------------------------------
# A test hook: an object with ``kernels`` (a module-like object with kernels_cuda's calls) and ``device_of(t)``
# standing in for the CUDA kernels and devices, so that the device paths of the Encoder and Decoder run on machines
# without a GPU (tests/test_device_paths.py). Never set outside tests.
_emulation = None


def device_of(t: torch.Tensor):
    """The device whose kernels handle tensor ``t``: None for host memory (the CPU kernels), else its CUDA device."""
    if _emulation is not None:
        return _emulation.device_of(t)
    return t.device if t.is_cuda else None


def device_kernels():
    """The module implementing the kernel calls on device spaces (:mod:`sparsesync.kernels_cuda`)."""
    if _emulation is not None:
        return _emulation.kernels
    from . import kernels_cuda
    return kernels_cuda


def device_unavailable(t: torch.Tensor) -> str | None:
    """Why the device kernels cannot work on tensor ``t`` (None when they can, or when ``t`` is in host memory)."""
    if device_of(t) is None or _emulation is not None:
        return None
    key = (t.device, config.get_bool("SPARSESYNC_CUDA_SELFTEST"))
    if key not in _device_checks:         # per device and process (the Encoder asks for every tensor)
        from . import kernels_cuda
        why = kernels_cuda.unavailable_reason()
        if why is None:
            failed = kernels_cuda.self_test(t.device)
            if failed is not None:
                why = (f"the CUDA kernels failed their self-test on {t.device} ({failed}); please report it with "
                       "sparsesync.build_info(); SPARSESYNC_CUDA_SELFTEST=0 skips the test")
        _device_checks[key] = why
    return _device_checks[key]


_device_checks: dict = {}


def device_groups(ts: list) -> list | None:
    """Tensors grouped by the device whose kernels hash them: None when all are on one device, else
    ``[(indices, tensors), ...]`` (computed once for tensors that keep their storage: the codec's digests)."""
    if _emulation is None and all(t.is_cpu for t in ts):
        return None
    devs = [_hash_place(t) for t in ts]
    if len(set(devs)) <= 1:
        return None
    out = []
    for d in dict.fromkeys(devs):
        sel = np.array([i for i, x in enumerate(devs) if x == d], dtype=np.int64)
        out.append((sel, [ts[i] for i in sel.tolist()]))
    return out


def _hash_place(t: torch.Tensor):
    """Where a tensor is hashed: its device's kernels (device_of), host memory (None), or its own device (a device
    without sparsesync kernels: copied to the host)."""
    d = device_of(t)
    return d if d is not None or t.is_cpu else t.device


def tree64_by_device(ts: list, ptrs=None, nbytes=None, groups: list | None = None) -> np.ndarray:
    """tree64 of each tensor, with the kernels of the device it sits on (one call per device; ``groups`` from
    :func:`device_groups`); tensors on a device whose CUDA kernels cannot run are copied to the host first.
    ``ptrs``/``nbytes``: the tensors' addresses and sizes when the caller keeps them."""
    parts = [(None, ts)] if groups is None else groups
    out = np.zeros(len(ts), dtype=np.uint64)
    for sel, group in parts:
        if not group:
            continue
        gp = ptrs if sel is None or ptrs is None else ptrs[sel]
        gn = nbytes if sel is None or nbytes is None else nbytes[sel]
        t0 = group[0]
        if not t0.is_cpu and (device_of(t0) is None or device_unavailable(t0) is not None):
            group, gp, gn = [t.cpu() for t in group], None, None
        kern = for_tensors(group)
        if sel is None:
            return kern.tree64_many(group, ptrs=gp, nbytes=gn)
        out[sel] = kern.tree64_many(group, ptrs=gp, nbytes=gn)
    return out


def for_space(sp):
    """The kernels for a space on one device: the CPU kernels (:func:`impl`) for host memory, the device kernels
    otherwise."""
    return impl() if sp.device is None else device_kernels()


def for_tensors(ts: list):
    """The kernels for tensors all on one device (as :func:`for_space`)."""
    return impl() if not ts or device_of(ts[0]) is None else device_kernels()


def build_info() -> dict:
    """What this installation can do: ``native`` (the C++ library loaded; else ``native_error`` says why and the
    reference kernels run), ``simd`` (the CPU path in use: ``"avx512"`` or ``"portable"``), ``cuda`` (the library
    was compiled with the CUDA sources), ``cuda_archs`` (e.g. ``[90]`` for sm_90), ``cuda_usable`` (CUDA kernels,
    a CUDA build of PyTorch and a device are all there, and the kernels passed their self-test against the CPU ones
    on the current device; else ``cuda_error`` says why), ``nccl`` (libnccl loads and a
    device is there; else ``nccl_error``). Nothing here touches a GPU unless PyTorch's CUDA is already usable."""
    import ctypes
    info: dict = {"native": bool(_native.available), "native_error": _native.load_error,
                  "reference_forced": config.get_bool("SPARSESYNC_REFERENCE"), "simd": None,
                  "cuda": False, "cuda_archs": [], "cuda_usable": False, "cuda_error": None,
                  "nccl": False, "nccl_error": None}
    lib = _native.lib if _native.available else None
    if lib is not None:
        level = lib.ss_simd(-1)
        info["simd"] = "avx512" if level >= 1 else "portable"
        info["cuda"] = _native.cuda_compiled()
        fn = getattr(lib, "ss_cuda_archs", None)
        if fn is not None and info["cuda"]:
            buf = (ctypes.c_int * 32)()
            n = fn(buf, 32)
            info["cuda_archs"] = [buf[i] // 10 for i in range(min(max(n, 0), 32))]
    from . import kernels_cuda
    info["cuda_usable"] = bool(kernels_cuda.available())
    if not info["cuda_usable"]:
        info["cuda_error"] = kernels_cuda.unavailable_reason()
    else:      # the self-test the Encoder and Decoder run before their first work on a device (cached)
        failed = kernels_cuda.self_test(torch.device("cuda", torch.cuda.current_device()))
        if failed is not None:
            info["cuda_usable"], info["cuda_error"] = False, f"self-test failed: {failed}"
    try:
        from .nccl import NCCLBackend
        NCCLBackend.check()
        info["nccl"] = True
    except Exception as exc:          # noqa: BLE001 - reported, not raised
        info["nccl_error"] = str(exc)
    return info
