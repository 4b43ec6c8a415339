"""Spaces (FORMAT.md §6.1): all tensors of one dtype, in sorted name order, seen as one flat array of elements.

Format 2 addresses elements by their index in a space, so a model of tens of thousands of tensors costs the codec a
handful of segments instead of one per tensor. A :class:`Space` holds what the kernels need: the tensors (pure-PyTorch
reference kernels concatenate them) and, for the native kernels, their addresses (``ptrs``) and the prefix sums of
their element counts (``offs``: tensor ``i`` holds space elements ``[offs[i], offs[i+1])``). Empty tensors take no
elements and are left out of ``ptrs``/``offs`` (``names`` lists only the tensors that take elements).
"""
from __future__ import annotations

import contextlib
import gc

import numpy as np
import torch

from .dtypes import BY_NAME, byte_view, width

#: key bits of each dtype (FORMAT.md §6.3): the exponent field, or its top 8 bits for float64; 0 = no context coding
KEY_BITS = {"bfloat16": 8, "float16": 5, "float32": 8, "float64": 8, "float8_e4m3fn": 4, "float8_e5m2": 5}
MAX_CLASSES = 32


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector around a pass that makes one small object per tensor (``t.shape``): with
    100,000 tensors those allocations trigger collections over the whole heap, which cost ten times the pass."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def key_bits(dtype_name: str) -> int:
    """Key width of a dtype for context coding (0: the dtype is never context coded)."""
    return KEY_BITS.get(dtype_name, 0)


class Space:
    """The tensors of one dtype, in sorted name order (contiguous CPU tensors; empty ones are left out).

    ``dtype`` (wire name), ``w`` (element width), ``kb`` (key bits), ``names``, ``tensors`` (each as it was given),
    ``ptrs`` (uint64 addresses), ``offs`` (int64 prefix sums, ``len(tensors) + 1`` entries), ``n`` (elements).
    """

    __slots__ = ("dtype", "w", "kb", "names", "_tensors", "_src", "ptrs", "offs", "n", "_flat", "_druns")

    def __init__(self, dtype: str, names: list[str], tensors: list[torch.Tensor], ptrs=None):
        self.dtype = dtype
        self.w = width(BY_NAME[dtype])
        self.kb = key_bits(dtype)
        keep = [i for i, t in enumerate(tensors) if t.numel()]
        if len(keep) != len(tensors):
            names = [names[i] for i in keep]
            tensors = [tensors[i] for i in keep]
            ptrs = None
        self.names = names
        self._tensors = tensors
        self._src = None
        counts = np.fromiter((t.numel() for t in tensors), dtype=np.int64, count=len(tensors))
        self.offs = np.zeros(len(tensors) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offs[1:])
        self.n = int(self.offs[-1])
        if ptrs is None:
            ptrs = np.fromiter((t.data_ptr() for t in tensors), dtype=np.uint64, count=len(tensors))
        self.ptrs = ptrs
        self._flat = None
        self._druns = None

    @classmethod
    def prebuilt(cls, dtype: str, w: int, kb: int, names: list[str], src: list[torch.Tensor], perm: np.ndarray,
                 ptrs: np.ndarray, offs: np.ndarray, druns: tuple | None = None) -> "Space":
        """A space from parts the caller already checked: its tensors are ``src[perm]`` (sorted, none empty), made
        into a list only if something asks for them (the native kernels need only ``ptrs`` and ``offs``);
        ``druns``: its device runs when the caller knows them (see :attr:`druns`)."""
        self = cls.__new__(cls)
        self.dtype, self.w, self.kb, self.names, self._tensors, self._src = dtype, w, kb, names, None, (src, perm)
        self.ptrs, self.offs, self.n, self._flat, self._druns = ptrs, offs, int(offs[-1]), None, druns
        return self

    @property
    def druns(self) -> tuple:
        """The space's tensors as runs on one device each: ``((i0, i1, device), ...)`` covering tensors ``i0 ..
        i1-1``, where ``device`` is what :func:`sparsesync.kernels.device_of` says (None: host memory, the CPU
        kernels). One run for a space on one device; an empty space has none."""
        if self._druns is None:
            from .kernels import device_of
            self._druns = device_runs([device_of(t) for t in self.tensors])
        return self._druns

    def set_devices(self, devices: list) -> None:
        """Declare the device whose kernels handle each tensor (a snapshot in pinned host memory is handled by the
        kernels of the device its tensors came from)."""
        if len(devices) != len(self.names):
            raise ValueError(f"{len(devices)} devices for {len(self.names)} tensors")
        self._druns = device_runs(devices)

    @property
    def device(self):
        """The device of a space on one device (None: host memory); a space spanning devices raises ValueError."""
        runs = self.druns
        if len(runs) > 1:
            raise ValueError(f"the {self.dtype} space spans devices {[r[2] for r in runs]}")
        return runs[0][2] if runs else None

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            src, perm = self._src
            self._tensors = [src[i] for i in perm.tolist()]
        return self._tensors

    def sub(self, i0: int, i1: int) -> "Space":
        """The space of tensors ``i0 .. i1-1`` of this one (its element 0 is this space's element ``offs[i0]``)."""
        out = Space.__new__(Space)
        out.dtype, out.w, out.kb, out.names = self.dtype, self.w, self.kb, self.names[i0:i1]
        if self._tensors is not None:
            out._tensors, out._src = self._tensors[i0:i1], None
        else:
            src, perm = self._src
            out._tensors, out._src = None, (src, perm[i0:i1])
        out.ptrs = self.ptrs[i0:i1]
        out.offs = self.offs[i0:i1 + 1] - self.offs[i0]
        out.n, out._flat = int(out.offs[-1]), None
        out._druns = None
        if self._druns is not None:
            out._druns = tuple((max(a, i0) - i0, min(b, i1) - i0, d) for a, b, d in self._druns if a < i1 and b > i0)
        return out

    def device_pieces(self, start: int, end: int) -> list[tuple[int, int, "Space"]]:
        """Space range [start, end) as pieces on one device each: ``[(base, i0, sub), ...]`` where ``sub`` is the
        space of one device run (tensors ``i0 ..``) and ``base`` the space index of its element 0 (the whole space,
        base 0, when the space is on one device)."""
        runs = self.druns
        if len(runs) <= 1:
            return [(0, 0, self)]
        out = []
        for i0, i1, _ in runs:
            a, b = int(self.offs[i0]), int(self.offs[i1])
            if a < end and b > start:
                out.append((a, i0, self.sub(i0, i1)))
        return out

    def flat(self) -> torch.Tensor:
        """The space's bytes as one uint8 tensor (a copy unless the space has a single tensor): for the reference
        kernels and tests."""
        if len(self.tensors) == 1:
            return byte_view(self.tensors[0])
        if not self.tensors:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat([byte_view(t) for t in self.tensors])

    def locate(self, index: int) -> tuple[int, int]:
        """(tensor number, element within it) of space element ``index``."""
        i = int(np.searchsorted(self.offs, index, side="right")) - 1
        return i, index - int(self.offs[i])

    def names_in(self, start: int, end: int) -> list[str]:
        """Names of the tensors holding space elements ``[start, end)``."""
        if end <= start:
            return []
        i0, _ = self.locate(start)
        i1, _ = self.locate(end - 1)
        return self.names[i0:i1 + 1]

    def describe(self, start: int, end: int) -> str:
        """Human description of a range: the tensor(s) and elements it covers, for error messages."""
        names = self.names_in(start, end)
        if not names:
            return f"{self.dtype} elements [{start}, {end})"
        i0, e0 = self.locate(start)
        if len(names) == 1:
            return f"tensor {names[0]!r} elements [{e0}, {e0 + end - start})"
        return f"tensors {names[0]!r} .. {names[-1]!r} ({len(names)} tensors, {self.dtype} elements [{start}, {end}))"


def device_runs(devices: list) -> tuple:
    """``((i0, i1, device), ...)``: runs of equal consecutive devices."""
    runs: list = []
    for i, d in enumerate(devices):
        if runs and runs[-1][2] == d:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, d])
    return tuple(tuple(r) for r in runs)


def spaces_of(items: list[tuple[str, torch.Tensor]]) -> dict[str, Space]:
    """Group (name, contiguous CPU tensor) pairs into spaces (dtype name -> Space), names sorted in each."""
    from .dtypes import name_of
    groups: dict[str, list] = {}
    for name, t in items:
        groups.setdefault(name_of(t.dtype), []).append((name, t))
    out = {}
    for dn in sorted(groups):
        pairs = sorted(groups[dn], key=lambda kv: kv[0])
        out[dn] = Space(dn, [n for n, _ in pairs], [t for _, t in pairs])
    return out
