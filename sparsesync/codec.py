"""Encoder, Update and Decoder: weights at version v as a compact, self-checking update against version v-1.

Every refusal is a :class:`~sparsesync.errors.SparseSyncError` (bad arguments are :class:`InvalidArgument` /
:class:`InvalidType`, which are also ``ValueError`` / ``TypeError``), and a refusal changes nothing: neither the
decoder's tensors and version nor the encoder's snapshot and version. Decisions are logged at DEBUG on the
``"sparsesync"`` logger (dense fallbacks, full updates, digests); a rollback that was allowed is logged at WARNING.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import operator
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np
import torch

from . import config, kernels
from .digest import DigestPlan, layout_digest
from .dtypes import BY_NAME, byte_view, check_tensor, compare_layouts, name_of, width
from .errors import (BaseMismatch, CorruptPayload, InvalidArgument, InvalidType, LayoutMismatch, RollbackRefused,
                     SparseSyncError, VersionConflict, VersionMismatch)
from .format import (FORMATS, VALUE_MODES, Header, Segment, Segment2, build_freq, entropy_bits, header_hash,
                     pack_bucket, pack_freq, parse_bucket, rice_bits, unpack_freq, update_uid)
from .plan2 import FINE, merge_runs, plan_bits, plan_classes, plan_regions, tables_bits
from .space import Space, gc_paused, spaces_of
from .kernels import impl
from .reference import E_ARG, E_HASH, MODE_DELTA_DEFERRED, KernelError, extra_bits_for, max_symbol

log = logging.getLogger("sparsesync")

RUN_CHANGES = 1024           # format 2: a tensor with this many changes is planned on its own statistics ...
MAX_RUNS = 64                # ... if it is among the 64 most changed tensors of its space ...
RUN_GAIN_BITS = 8 * 64       # ... and, when it was planned alone before, that saved more than a segment header
RUN_REVIEW = 16              # every this many updates, every candidate is planned alone again
CHUNK_TARGET = 1024          # aim for about this many changed elements per chunk (parallel decode granularity)
MIN_LOG2C, MAX_LOG2C = 12, 30
MAX_VERSION = (1 << 63) - 1  # versions travel as msgpack ints in [0, 2^63)

_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_IS_CPU = operator.attrgetter("is_cpu")

#: A state: a Mapping name -> tensor, or an iterable of (name, tensor) pairs.
StateLike = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
#: What :meth:`Decoder.apply` takes: an Update, one bucket, or an iterable of buckets in order.
UpdateLike = Union["Update", bytes, bytearray, memoryview, Iterable]


@dataclass
class UpdateStats:
    """What an update costs.

    ``tensors`` / ``tensors_changed`` / ``dense_tensors``: tensors in the state / with at least one changed element /
    sent dense (whole or in part). ``elements`` / ``changed``: elements in the state / changed. ``dense_bytes``: the
    state's size; ``wire_bytes``: every byte of every bucket (headers included), ``header_bytes`` of which are
    framing and headers; ``buckets``: their number; ``encode_seconds``: time spent encoding.
    ``snapshot_host_bytes``: with ``Encoder(snapshot="pinned")``, bytes of the pinned host snapshot that the CUDA
    kernels read or wrote across PCIe (the ranges each kernel call covers).
    """
    tensors: int = 0
    tensors_changed: int = 0
    dense_tensors: int = 0
    elements: int = 0
    changed: int = 0
    dense_bytes: int = 0
    wire_bytes: int = 0
    header_bytes: int = 0
    buckets: int = 0
    encode_seconds: float = 0.0

    snapshot_host_bytes: int = 0

    @property
    def density(self) -> float:
        """Changed elements / all elements (0.0 for an empty state)."""
        return self.changed / self.elements if self.elements else 0.0

    @property
    def bytes_per_changed(self) -> float:
        """Wire bytes per changed element; ``inf`` when bytes were sent but nothing changed (``str()`` prints "n/a")."""
        return self.wire_bytes / self.changed if self.changed else math.inf if self.wire_bytes else 0.0

    @property
    def compression(self) -> float:
        """Dense bytes / wire bytes; ``inf`` before any byte is sent (``str()`` prints "n/a" when not meaningful)."""
        return self.dense_bytes / self.wire_bytes if self.wire_bytes else math.inf

    def as_dict(self) -> dict:
        """The fields and the derived figures (density, bytes_per_changed, compression) as a dict."""
        d = asdict(self)
        d.update(density=self.density, bytes_per_changed=self.bytes_per_changed, compression=self.compression)
        return d

    def __str__(self) -> str:
        if self.changed:
            what = (f"{self.changed}/{self.elements} changed ({100 * self.density:.3f}%) in {self.tensors_changed}/"
                    f"{self.tensors} tensors")
            per = f"{self.bytes_per_changed:.3f} B/changed"
        else:
            what = f"no element changed ({self.elements} elements in {self.tensors} tensors)"
            per = "n/a B/changed"
        ratio = f"{self.compression:.1f}x" if self.dense_bytes and self.wire_bytes else "n/a"
        return f"{what}, {self.wire_bytes} wire bytes in {self.buckets} bucket(s) ({per}, {ratio} vs dense " \
               f"{self.dense_bytes} B)"


@dataclass
class _TensorPlan:
    name: str
    new: torch.Tensor            # contiguous CPU tensor holding the new values
    w: int
    kind: str                    # "d" or "s"
    log2c: int = 0
    freq: np.ndarray | None = None
    chunk_counts: np.ndarray | None = None
    bytes_per_change: float = 0.0
    # format 2: a region [origin, origin + length) of a space (``name`` is the dtype), coded with ``cuts``/``freqs``
    origin: int = 0
    length: int = -1
    cuts: tuple = ()
    freqs: np.ndarray | None = None
    space: Space | None = None
    old_space: Space | None = None
    packed: tuple | None = None          # the classes' packed tables (made once per region)
    positions: torch.Tensor | None = None  # the run's changed space indices, from the scan (None: too many)
    run: tuple | None = None             # (first tensor of the run in its space, changes per tensor of the run)
    base: int = 0                        # space index of element 0 of ``space`` (a run's own space: see _encode2)


@dataclass
class _SegPlan:
    tp: _TensorPlan
    start: int
    end: int
    c0: int = 0
    c1: int = 0
    nchanged: int = 0


class Update:
    """One update from ``base_version`` (None for a full update) to ``version``.

    Attributes: ``uid`` (16-byte update id, FORMAT.md §5), ``values`` (``"delta"`` or ``"raw"``), ``count`` (number of
    buckets; None until the last bucket has been made), ``stats`` (:class:`UpdateStats`), ``digest`` (the state digest
    of ``version`` when the encoder computed one, once the last bucket has been made).

    Buckets are produced lazily by :meth:`iter_buckets` when the update was made with ``Encoder.encode(...,
    stream=True)``; otherwise they are all made at ``encode`` time.
    """

    def __init__(self, base_version: int | None, version: int, uid: bytes, values: str, count: int | None,
                 stats: UpdateStats, gen: Iterator[bytes] | None):
        self.base_version = base_version
        self.version = version
        self.uid = uid
        self.values = values
        self.count = count
        self.stats: UpdateStats = stats
        self.digest: str | None = None
        self._gen: Iterator[bytes] | None = gen
        self._buckets: list[bytes] = []

    @property
    def kind(self) -> str:
        """``"full"`` (no base: applies at any version) or ``"delta"``."""
        return "full" if self.base_version is None else "delta"

    @property
    def complete(self) -> bool:
        """True once every bucket has been made."""
        return self._gen is None

    def iter_buckets(self) -> Iterator[bytes]:
        """Yield the buckets in order, producing the remaining ones on demand (bounded memory when streaming)."""
        yield from list(self._buckets)
        while self._gen is not None:
            try:
                b = next(self._gen)
            except StopIteration:
                self._gen = None
                return
            self._buckets.append(b)
            yield b

    def finish(self) -> None:
        """Make every remaining bucket now."""
        for _ in self.iter_buckets():
            pass

    @property
    def buckets(self) -> list[bytes]:
        """Every bucket, in order (made now if the update is streamed and unfinished)."""
        self.finish()
        return self._buckets

    def __repr__(self) -> str:
        return f"Update(base={self.base_version}, version={self.version}, buckets={self.count}, {self.stats})"


def _as_items(state) -> Iterator[tuple[str, object]]:
    """(name, value) pairs of a Mapping or an iterable of pairs; refuses anything else and non-str names."""
    if isinstance(state, Mapping):
        items = state.items()
    else:
        if isinstance(state, (str, bytes, bytearray, memoryview)):
            raise InvalidType(f"a state is a Mapping of name -> tensor or an iterable of (name, tensor) pairs, "
                              f"got a {type(state).__name__}")
        try:
            items = iter(state)
        except TypeError:
            raise InvalidType(f"a state is a Mapping of name -> tensor or an iterable of (name, tensor) pairs, "
                              f"got a {type(state).__name__}") from None
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            if isinstance(item, list) and len(item) == 2:
                item = tuple(item)
            else:
                raise InvalidType(f"a state's entries are (name, tensor) pairs, got {_short(item)}")
        name, t = item
        if not isinstance(name, str):
            raise InvalidType(f"tensor names must be str, got {name!r} ({type(name).__name__})")
        yield name, t


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


_device_warned: set = set()


def _prepare(name: str, t, on_device: bool = False) -> torch.Tensor:
    """A contiguous tensor with ``t``'s bytes: on its device when ``on_device`` and the device kernels can work
    there, else in host memory (a copy for device tensors)."""
    check_tensor(name, t)
    if t.layout != torch.strided or t.device.type == "meta":
        raise InvalidArgument(f"tensor {name!r} is a {t.layout} tensor on {t.device}; sparsesync reads dense tensors "
                              "with data")
    t = t.detach()
    if t.device.type != "cpu":
        why = "the Encoder keeps its snapshot in host memory" if not on_device else kernels.device_unavailable(t)
        if why is not None:
            if on_device and str(t.device) not in _device_warned:
                _device_warned.add(str(t.device))
                log.warning("sparsesync: tensors on %s are copied to host memory to be encoded (%s)", t.device, why)
            t = t.cpu()
    return t.contiguous()


def _collect(state, what: str, on_device: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Validated (name, contiguous tensor) pairs of a state (in host memory unless ``on_device``, see
    :func:`_prepare`); duplicate names are refused."""
    items, seen = [], set()
    for name, t in _as_items(state):
        if name in seen:
            raise InvalidArgument(f"duplicate tensor name {name!r} in {what}")
        seen.add(name)
        items.append((name, _prepare(name, t, on_device)))
    return items


SNAPSHOT_MODES = ("device", "pinned", "host")


def _host_traffic() -> int:
    """Bytes of pinned host memory the CUDA kernels of this thread covered so far."""
    if kernels._emulation is not None:
        return getattr(kernels._emulation, "host_bytes", 0)
    from . import kernels_cuda
    return kernels_cuda.host_traffic()


def _host_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor in host memory (copied from a device)."""
    return t if t.is_cpu else t.cpu()


def _host(t) -> np.ndarray:
    """A uint8 tensor's bytes as a host numpy array (copied from a device)."""
    return _host_tensor(t).numpy()


class Encoder:
    """Turns successive states into updates against the state receivers hold.

    ``base``: the state receivers already hold (copied; ``None`` = the first update is a full one).
    ``base_version``: its version (default 0 when ``base`` is given).
    ``values``: ``"delta"`` (difference of bit patterns, default) or ``"raw"`` (new bit patterns).
    ``bucket_bytes``: target body size of one bucket (default ``SPARSESYNC_BUCKET_BYTES``, 32 MiB; at least 4096).
    ``digest``: put the state digest of each new state in the last bucket so receivers can prove equality.
    ``format``: wire format version to write, 1 or 2 (default ``SPARSESYNC_FORMAT``, 2). Version 2 addresses elements
    per dtype space (tens of thousands of tensors cost about what one tensor of the same size costs) and can code
    sparse segments with the base values' exponents as context; receivers must read version 2 (sessions negotiate).
    ``context`` (format 2): ``None`` = the encoder chooses per space by estimated size, ``True`` = context coding
    wherever the dtype has an exponent, ``False`` = order-0 coding only.
    ``snapshot`` (format 2): where the snapshot of tensors on a GPU lives: ``"device"`` (default: on their device;
    the diff, the coding and the snapshot update run there with the CUDA kernels, and only the coded bytes come to
    the host), ``"pinned"`` (in pinned host memory, for trainers short of device memory: the CUDA kernels still do the
    work and read the snapshot across PCIe; ``UpdateStats.snapshot_host_bytes`` counts those bytes) or ``"host"``
    (the state is copied to host memory every encode and coded with the CPU kernels). Tensors in host memory are
    always coded on the host; a state may mix devices. Without usable CUDA kernels, device tensors are copied to the
    host (logged once per device).

    A version identifies bytes: each :meth:`encode` needs a version above the encoder's current one
    (:attr:`version`), otherwise :class:`VersionConflict`. :meth:`same_as_snapshot` tells whether a state is
    bit-identical to the last encoded one (so that pushing it again can be skipped).
    """

    def __init__(self, base: StateLike | None = None, base_version: int | None = None, *, values: str = "delta",
                 bucket_bytes: int | None = None, digest: bool = False, format: int | None = None,
                 context: bool | None = None, snapshot: str = "device"):
        if values not in VALUE_MODES:
            raise InvalidArgument(f"values must be 'delta' or 'raw', got {_short(values)}")
        format = config.get_int("SPARSESYNC_FORMAT") if format is None else format
        if type(format) is not int or format not in FORMATS:
            raise InvalidArgument(f"format must be one of {list(FORMATS)}, got {_short(format)}")
        if context not in (None, True, False):
            raise InvalidArgument(f"context must be None (by size), True or False, got {_short(context)}")
        if snapshot not in SNAPSHOT_MODES:
            raise InvalidArgument(f"snapshot must be one of {list(SNAPSHOT_MODES)}, got {_short(snapshot)}")
        self.format = format
        self.context = context
        self.on_device = snapshot != "host" and format >= 2     # format 1 codes on the host only
        self.pinned = snapshot == "pinned" and format >= 2
        self._homes: dict | None = None     # pinned: name -> the device its snapshot's kernels run on
        self._fast = None               # format 2: what the last state looked like (fast path for the next one)
        self._old_spaces: dict[str, Space] | None = None
        self._ldig: bytes | None = None
        self._digest_plan: tuple | None = None    # (DigestPlan, tensors, addresses, sizes, device groups)
        self._changes: dict[str, np.ndarray | None] = {}   # format 2: changes per tensor of each space, last update
        self._gains: dict[str, dict] = {}     # format 2: bits a tensor saved when planned alone (see _runs)
        self._updates2 = 0
        bucket_bytes = config.get_int("SPARSESYNC_BUCKET_BYTES") if bucket_bytes is None else bucket_bytes
        if type(bucket_bytes) is not int or bucket_bytes < 4096:
            raise InvalidArgument(f"bucket_bytes must be an int >= 4096, got {_short(bucket_bytes)}")
        self.values = values
        self.mode = VALUE_MODES[values]
        self.bucket_bytes = bucket_bytes
        self.want_digest = bool(digest)
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.layout: list | None = None
        self.version: int | None = None
        self._pending: Update | None = None
        self._copy_full = True
        if base is not None:
            if base_version is None:
                base_version = 0
            self._check_version(base_version)
            items = _collect(base, "base", self.on_device)
            snapshot = self._snapshot_of(items)
            self.snapshot = snapshot
            self.layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in snapshot.items()]
            self.version = base_version
            self._set_snapshot(snapshot)
            self._remember(base, items)      # the first encode of a state like the base takes the fast path
        elif base_version is not None:
            raise InvalidArgument(f"base_version={_short(base_version)} given without base")

    def _to_host(self) -> None:
        """Format 1 codes on the host only: a snapshot kept on devices (or in pinned memory for a device) moves to
        host memory once, and the encoder stays there (a session drops to format 1 for a receiver that reads only
        format 1)."""
        if self._pending is not None and not self._pending.complete:
            self._pending.finish()
        self.on_device = self.pinned = False
        self._homes = None
        self._fast = None
        if self.snapshot is not None and any(not t.is_cpu or t.is_pinned() for t in self.snapshot.values()):
            log.warning("sparsesync: encoding wire format 1, which is coded on the host: the encoder's snapshot moves "
                        "to host memory (%d tensors)", len(self.snapshot))
            self._set_snapshot({n: t.cpu() if not t.is_cpu else t.clone() for n, t in self.snapshot.items()})

    def _snapshot_of(self, items: list) -> dict:
        """The encoder's own copy of a state: clones where the tensors are, or, with ``snapshot="pinned"``, device
        tensors copied to pinned host memory (their devices remembered in ``_homes``)."""
        if not self.pinned:
            return {name: t.clone() for name, t in items}
        out, homes = {}, {}
        for name, t in items:
            d = kernels.device_of(t)
            if d is None:
                out[name] = t.clone()
            else:
                out[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=kernels._emulation is None).copy_(t)
                homes[name] = d
        self._homes = homes
        return out

    def _set_snapshot(self, snapshot: dict) -> None:
        self.snapshot = snapshot
        self._old_spaces = None
        self._ldig = None
        self._digest_plan = None
        self._fast = None
        self._changes = {}
        self._gains = {}

    def _spaces(self) -> dict[str, Space]:
        if self._old_spaces is None:
            self._old_spaces = spaces_of(list(self.snapshot.items()))
            if self.pinned and self._homes:     # pinned host tensors: the kernels of their state's device
                for sp in self._old_spaces.values():
                    sp.set_devices([self._homes.get(n) for n in sp.names])
        return self._old_spaces

    def _layout_digest(self) -> bytes:
        if self._ldig is None:
            self._ldig = layout_digest(self.layout)
        return self._ldig

    def _snapshot_digest(self) -> str:
        """state_digest of the snapshot (the layout's records are built once)."""
        if self._digest_plan is None:
            snap = self.snapshot
            ts = [snap[n] for n, _, _ in self.layout]
            self._digest_plan = (DigestPlan(self.layout), ts, *_addresses(ts), kernels.device_groups(ts))
        plan, ts, ptrs, nbytes, groups = self._digest_plan
        return plan.digest(kernels.tree64_by_device(ts, ptrs, nbytes, groups))

    @staticmethod
    def _check_version(v) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_VERSION:
            raise InvalidArgument(f"version must be an int in [0, 2^63), got {_short(v)}")

    def same_as_snapshot(self, state: StateLike) -> bool:
        """True when ``state`` has exactly the encoder's snapshot: the same names, dtypes and shapes and the same
        bytes in every tensor (compared as bytes, so -0.0 differs from 0.0 and NaNs compare by payload).

        False when the encoder has no snapshot yet (no base, nothing encoded). An unfinished streamed update is
        finished first (its buckets are kept for its consumer), because the snapshot is final only then. Costs one
        pass over the bytes (memcmp speed) and stops at the first difference; nothing is copied for contiguous CPU
        tensors. Bad states (non-tensors, duplicate names) are refused like in :meth:`encode`.
        """
        if self.snapshot is None:
            return False
        if self._pending is not None and not self._pending.complete:
            self._pending.finish()
        snap = self.snapshot
        seen: set[str] = set()
        pairs = []
        for name, t in _as_items(state):
            check_tensor(name, t)
            if name in seen:
                raise InvalidArgument(f"duplicate tensor name {name!r} in state")
            seen.add(name)
            mine = snap.get(name)
            if mine is None or t.dtype != mine.dtype or tuple(t.shape) != tuple(mine.shape):
                return False
            pairs.append((name, t, mine))
        if len(pairs) != len(snap):
            return False
        for name, t, mine in pairs:
            t = _prepare(name, t, self.on_device)
            if t.device != mine.device:
                t = t.to(mine.device)
            if not torch.equal(byte_view(t), byte_view(mine)):
                return False
        return True


    # -- planning ---------------------------------------------------------------------------------------------------
    def _plan_tensor(self, name: str, new: torch.Tensor, full: bool, stats: UpdateStats) -> _TensorPlan | None:
        w = width(new.dtype)
        n = new.numel()
        if full:
            return _TensorPlan(name, new, w, "d") if n else None
        old = self.snapshot[name]
        counts, hist, total = impl().scan(byte_view(old), byte_view(new), w, self.mode)
        if total == 0:
            return None
        stats.changed += total
        density = total / n
        log2c = int(round(math.log2(CHUNK_TARGET / density))) if density < 1 else MIN_LOG2C
        log2c = max(MIN_LOG2C, min(MAX_LOG2C, log2c, max(MIN_LOG2C, (n - 1).bit_length())))
        extra = sum(int(hist[s]) * extra_bits_for(s, w, self.mode) for s in range(max_symbol(w, self.mode) + 1))
        bits = rice_bits(density) + entropy_bits(hist) + extra / total + 0.05
        per_block = 1 << (log2c - 12)
        nfine = len(counts)
        padded = np.zeros(-(-nfine // per_block) * per_block, dtype=np.int64)
        padded[:nfine] = counts
        chunk_counts = padded.reshape(-1, per_block).sum(1)
        est = total * bits / 8 + np.count_nonzero(chunk_counts) * 9 + len(chunk_counts)
        if est >= n * w:
            log.debug("tensor %r: %d of %d elements changed (%.3f%%), sparse estimate %d B >= dense %d B: sent dense",
                      name, total, n, 100 * density, int(est), n * w)
            return _TensorPlan(name, new, w, "d")
        return _TensorPlan(name, new, w, "s", log2c, build_freq(hist), chunk_counts, bits / 8)

    def _pack(self, plans) -> Iterator[tuple[list[_SegPlan], bool]]:
        """Assign segments of the tensor plans (consumed lazily) to buckets of about ``bucket_bytes``; yields each
        bucket as soon as it is closed, with ``final`` True only for the last one (there is always at least one).
        The first buckets are smaller (1/16, 1/8, ... of the target) so that the first bytes leave early."""
        nbuckets = 0
        cap = max(4096, self.bucket_bytes >> 4)
        cur: list[_SegPlan] = []
        used = 0.0

        def close():
            nonlocal nbuckets, cap
            nbuckets += 1
            cap = max(4096, self.bucket_bytes >> max(0, 4 - nbuckets))
        for tp in plans:
            n = tp.length if tp.length >= 0 else tp.new.numel()
            o = tp.origin
            if tp.kind == "d":
                pos = 0
                while pos < n:
                    room = int(cap - used) // tp.w
                    if room <= 0:
                        if cur:
                            yield cur, False
                            close()
                        cur, used = [], 0.0
                        continue
                    take = min(room, n - pos)
                    cur.append(_SegPlan(tp, o + pos, o + pos + take, nchanged=take))
                    used += take * tp.w
                    pos += take
                continue
            C = 1 << tp.log2c
            est = tp.chunk_counts * tp.bytes_per_change + 9.0
            c, nchunks = 0, len(tp.chunk_counts)
            while c < nchunks:
                c1, size = c, 0.0
                while c1 < nchunks and (used + size + est[c1] <= cap or (c1 == c and not cur)):
                    size += est[c1]
                    c1 += 1
                if c1 == c:  # not even one chunk fits in what is left of this bucket
                    yield cur, False
                    close()
                    cur, used = [], 0.0
                    continue
                cur.append(_SegPlan(tp, o + c * C, o + min(c1 * C, n), c, c1, int(tp.chunk_counts[c:c1].sum())))
                used += size + 64
                c = c1
        yield cur, True

    # -- encoding ---------------------------------------------------------------------------------------------------
    def encode(self, state: StateLike, version: int, *, stream: bool = False) -> Update:
        """Encode ``state`` (Mapping or iterable of (name, tensor)) as version ``version``.

        ``version`` must be above the encoder's current version (a version identifies bytes): an equal or lower one
        raises :class:`VersionConflict` naming both. The state must have the encoder's layout (names, dtypes,
        shapes; :class:`LayoutMismatch` otherwise). Any refusal leaves the encoder as it was. With ``stream=True``
        the buckets are made as they are consumed (``update.iter_buckets()``) and the tensors in ``state`` must not
        change meanwhile; the next ``encode`` finishes an unfinished stream first.
        """
        self._check_version(version)
        if self.version is not None and version <= self.version:
            if version == self.version:
                raise VersionConflict(f"version {version} was already encoded (the encoder is at version "
                                      f"{self.version}); a version identifies bytes: use a new, higher version")
            raise VersionConflict(f"version {version} is older than the encoder's version {self.version}; a version "
                                  f"identifies bytes and versions must increase: use a version above {self.version}")
        if self.format == 2:
            return self._encode2(state, version, stream)
        if self.on_device:
            self._to_host()
        full = self.snapshot is None
        items = _collect(state, "state")
        layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in items]
        if not full:
            compare_layouts(self.layout, layout)
            if [n for n, *_ in layout] != [n for n, *_ in self.layout]:
                order = {n: i for i, (n, *_) in enumerate(self.layout)}
                items.sort(key=lambda kv: order[kv[0]])
        # nothing was changed so far; from here on the update is made
        if self._pending is not None and not self._pending.complete:
            self._pending.finish()
        t0 = time.perf_counter()
        if full:
            self.layout = layout
            self._set_snapshot({})
        stats = UpdateStats(tensors=len(items))
        for name, t in items:
            stats.elements += t.numel()
            stats.dense_bytes += t.numel() * t.element_size()
            if full:
                self.snapshot[name] = t.clone() if self._copy_full else t
                stats.changed += t.numel()
        if full:
            log.debug("encoding version %d as a full update: %d tensors, %d bytes, every tensor dense%s", version,
                      len(items), stats.dense_bytes, ", with state digest" if self.want_digest else "")
        else:
            log.debug("encoding version %d as a delta against version %d (%s values, %d tensors)", version,
                      self.version, self.values, len(items))

        def plans():      # scanned lazily, tensor by tensor, as buckets are produced
            for name, t in items:
                tp = self._plan_tensor(name, self.snapshot[name] if full else t, full, stats)
                if tp is not None:
                    stats.tensors_changed += 1
                    yield tp
        return self._start(plans(), full, version, stats, t0, stream)

    def _start(self, plans, full: bool, version: int, stats: UpdateStats, t0: float, stream: bool) -> Update:
        """The Update of either format, its buckets made from ``plans`` (consumed lazily) as they are asked for."""
        ldig = self._layout_digest()
        base = None if full else self.version
        uid = update_uid(ldig, base, version, self.values)
        stats.encode_seconds = time.perf_counter() - t0
        update = Update(base, version, uid, self.values, None, stats, None)
        update._gen = self._generate(update, self._pack(plans), ldig)
        self.version = version
        self._pending = update
        if not stream:
            update.finish()
        return update

    # -- format 2 ---------------------------------------------------------------------------------------------------
    def _fast_spaces(self, state) -> dict[str, Space] | None:
        """The new state's spaces, when ``state`` is a dict with the names, dtypes and shapes of the last one and
        every tensor is contiguous on the CPU: a few C-level passes over the values, no per-tensor Python code."""
        fc = self._fast
        if fc is None or not isinstance(state, dict):
            return None
        with gc_paused():
            return self._fast_spaces_of(state, fc)

    @staticmethod
    def _fast_spaces_of(state: dict, fc: dict) -> dict[str, Space] | None:
        try:
            if list(state) != fc["names"]:
                return None
            ts = list(state.values())
            if list(map(_DTYPE, ts)) != fc["dtypes"] or list(map(_SHAPE, ts)) != fc["shapes"] or \
                    not all(map(torch.Tensor.is_contiguous, ts)):
                return None
            if fc["devices"] is None:
                if not all(map(_IS_CPU, ts)):
                    return None
            elif list(map(kernels.device_of, ts)) != fc["devices"]:
                return None
            ptrs = np.fromiter(map(torch.Tensor.data_ptr, ts), dtype=np.uint64, count=len(ts))
        except (TypeError, AttributeError):
            return None
        out = {}
        for dn, (w, kb, perm, names, offs, druns) in fc["groups"].items():
            p = ptrs[perm]
            if not p.all():
                return None
            out[dn] = Space.prebuilt(dn, w, kb, names, ts, perm, p, offs, druns)
        return out

    def _remember(self, state, items) -> None:
        """Record what ``state`` looked like so that the next encode of a state like it takes the fast path (only
        when the encoder works on the state's own tensors: none was copied to the host or made contiguous)."""
        if not isinstance(state, dict) or list(state) != [n for n, _ in items]:
            self._fast = None
            return
        ts = list(state.values())
        if any(t.data_ptr() != mine.data_ptr() or t.device != mine.device for t, (_, mine) in zip(ts, items)):
            self._fast = None
            return
        devices = None
        if kernels._emulation is not None or not all(map(_IS_CPU, ts)):
            devices = list(map(kernels.device_of, ts))
        pos = {n: i for i, n in enumerate(state)}
        groups = {}
        for dn, sp in spaces_of(items).items():
            perm = np.array([pos[n] for n in sp.names], dtype=np.int64)
            groups[dn] = (sp.w, sp.kb, perm, sp.names, sp.offs, sp.druns)
        self._fast = {"names": list(state), "dtypes": list(map(_DTYPE, ts)), "shapes": list(map(_SHAPE, ts)),
                      "devices": devices, "groups": groups}

    def _encode2(self, state: StateLike, version: int, stream: bool) -> Update:
        full = self.snapshot is None
        new_spaces = None if full else self._fast_spaces(state)
        slow = new_spaces is None
        if slow:
            items = _collect(state, "state", self.on_device)
            layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in items]
            if not full:
                compare_layouts(self.layout, layout)
                new_spaces = spaces_of(items)
                self._check_devices(new_spaces)
        # nothing was changed so far; from here on the update is made
        if self._pending is not None and not self._pending.complete:
            self._pending.finish()
        t0 = time.perf_counter()
        if full:
            self.layout = layout
            self._set_snapshot(self._snapshot_of(items) if self._copy_full else dict(items))
            new_spaces = self._spaces()
        elif slow:
            self._remember(state, items)
        if not full:
            self._updates2 += 1
        old_spaces = self._spaces()
        stats = UpdateStats(tensors=len(self.layout))
        for sp in old_spaces.values():
            stats.elements += sp.n
            stats.dense_bytes += sp.n * sp.w
        if full:
            stats.changed = stats.elements
            log.debug("encoding version %d as a full update (format 2): %d tensors, %d bytes%s", version,
                      stats.tensors, stats.dense_bytes, ", with state digest" if self.want_digest else "")
        else:
            log.debug("encoding version %d as a delta against version %d (format 2, %s values, %d tensors)", version,
                      self.version, self.values, stats.tensors)

        def plans():      # scanned lazily, space by space, as buckets are produced
            for dn, sp in new_spaces.items():
                old = old_spaces[dn]
                multi = len(old.druns) > 1      # a space spanning devices is coded run by run, each on one
                if full:
                    stats.tensors_changed += len(sp.names)
                    for base, _, sub in old.device_pieces(0, old.n):
                        yield _TensorPlan(dn, None, sp.w, "d", origin=base, length=sub.n, space=sub, old_space=sub,
                                          base=base)
                    continue
                def scan_runs(bounds):
                    out = []
                    for i0, i1 in _split_runs(bounds, old.druns):
                        whole = (i0, i1) == (0, len(sp.names))
                        run_new, run_old = (sp, old) if whole else (sp.sub(i0, i1), old.sub(i0, i1))
                        counts, hist, keys, total, pieces, pos = kernels.for_space(run_old).scan2(
                            run_old, run_new, self.mode, positions=True)
                        if pos is not None and i0 and not multi:
                            pos = pos + int(sp.offs[i0])      # space indices (the scan counted from the run)
                        nb = len(counts)
                        out.append((i0, i1, run_new, counts, hist, keys, nb / max(1, -(-nb // 16)), total, pieces,
                                    pos, run_old))
                    return out
                first_time = self._changes.get(dn) is None
                runs = scan_runs(self._runs(dn, len(sp.names)))
                if first_time and len(runs) == 1 and sp.kb and self.context is not False:
                    # no history yet: the pooled scan says which tensors change enough to be planned alone (one
                    # more scan of the space, on the first update only)
                    self._changes[dn] = runs[0][8]
                    bounds = self._runs(dn, len(sp.names))
                    if len(bounds) > 1:
                        runs = scan_runs(bounds)
                ctx = self.context if sp.kb else False
                pool = None
                if len(runs) > 1:       # what each tensor planned alone gains over the space's pooled plan
                    hist_all = sum(r[4].astype(np.float64) for r in runs)
                    keys_all = sum(r[5].astype(np.float64) * r[6] for r in runs)
                    pool = plan_classes(hist_all, keys_all, 1.0, sp.n, sp.w, self.mode, ctx)
                    pool_ref = (hist_all, np.maximum(keys_all, hist_all.sum(axis=1)))
                gains = self._gains.setdefault(dn, {})
                cps = [plan_classes(r[4], r[5], r[6], r[2].n, sp.w, self.mode, ctx) if r[7] else None for r in runs]
                for (i0, i1, run_new, counts, hist, keys, scale, total, pieces, pos, run_old), cp in zip(runs, cps):
                    if pool is not None and total and i1 == i0 + 1:
                        own = plan_bits(cp, hist, keys, scale, run_new.n) + tables_bits(cp)
                        gains[i0] = plan_bits(pool, hist, keys, scale, run_new.n, pool_ref) - own
                if len(runs) > 1 and not multi:
                    runs, cps = self._merged(sp, old, runs, cps, ctx)
                for (i0, i1, run_new, counts, hist, keys, scale, total, pieces, pos, run_old), cp in zip(runs, cps):
                    if not total:
                        continue
                    stats.changed += total
                    stats.tensors_changed += int(np.count_nonzero(pieces))
                    o0 = int(sp.offs[i0])
                    log.debug("space %s tensors %d..%d: %d of %d elements changed, %s, about %.3f bits per change",
                              dn, i0, i1 - 1, total, run_new.n,
                              f"{len(cp.cuts) + 1} classes" if cp.context else "order-0", cp.bits_per_change)
                    # kernels address the whole space, or the run's own space when the space spans devices
                    where = dict(space=run_new, old_space=run_old, base=o0, run=(0, pieces)) if multi else \
                        dict(space=sp, old_space=old, run=(i0, pieces))
                    for r in plan_regions(counts, run_new.n, sp.w, cp.bits_per_change):
                        if r.kind == "d":
                            yield _TensorPlan(dn, None, sp.w, "d", origin=o0 + r.start, length=r.end - r.start,
                                              **where)
                        else:
                            yield _TensorPlan(dn, None, sp.w, "s", r.log2c, None, r.chunk_counts,
                                              cp.bits_per_change / 8, origin=o0 + r.start, length=r.end - r.start,
                                              cuts=tuple(cp.cuts), freqs=cp.freqs, positions=pos, **where)
                seen = [r[8] for r in runs]
                self._changes[dn] = np.concatenate(seen) if seen else None
        return self._start(plans(), full, version, stats, t0, stream)

    def _check_devices(self, new_spaces: dict) -> None:
        """A tensor must stay on the device its snapshot is on (the kernels read both together)."""
        for dn, sp in new_spaces.items():
            old = self._spaces()[dn]
            if [r[2] for r in old.druns] == [r[2] for r in sp.druns] and \
                    [r[:2] for r in old.druns] == [r[:2] for r in sp.druns]:
                continue
            homes = self._homes if self.pinned and self._homes is not None else None
            for name, a, b in zip(sp.names, sp.tensors, old.tensors):
                was = homes.get(name) if homes is not None else kernels.device_of(b)
                if kernels.device_of(a) != was:
                    raise InvalidArgument(f"tensor {name!r} is on {a.device} but the encoder's snapshot of it was made "
                                          f"on {was or 'the host'}; keep each tensor on one device (or make a new "
                                          "Encoder)")

    def _merged(self, sp: Space, old: Space, runs: list, cps: list, ctx) -> tuple[list, list]:
        """Format 2: merge adjacent scanned runs that are cheaper planned and coded as one (plan2.merge_runs: one
        segment header, one set of classes and tables instead of two, against what coding both with the same
        classes and tables costs). The decision uses the scan's statistics only, never whether it returned the
        positions (the CUDA scan keeps fewer than the CPU one), so every encoder writes the same bytes; a merged run
        without the positions of all its parts is scanned again for its block counts and positions."""
        groups = merge_runs([(r[4], np.asarray(r[5], dtype=np.float64) * r[6], r[2].n, r[3], True)
                             for r in runs], sp.w, self.mode, ctx, cps)
        if len(groups) == len(runs):
            return runs, cps
        out = []
        for a, b, _ in groups:
            if b == a + 1:
                out.append(runs[a])
                continue
            part = runs[a:b]
            i0, i1 = part[0][0], part[-1][1]
            whole = (i0, i1) == (0, len(sp.names))
            run_new, run_old = (sp, old) if whole else (sp.sub(i0, i1), old.sub(i0, i1))
            if all(r[9] is not None for r in part):
                pos = torch.cat([r[9] for r in part])       # space indices, ascending (on the scan's device)
                counts = torch.bincount(torch.div(pos - int(sp.offs[i0]), FINE, rounding_mode="floor"),
                                        minlength=-(-run_new.n // FINE)).cpu().numpy().astype(np.uint32)
            else:
                counts, *_, pos = kernels.for_space(run_old).scan2(run_old, run_new, self.mode, positions=True)
                if pos is not None and i0:
                    pos = pos + int(sp.offs[i0])
            out.append((i0, i1, run_new, counts, sum(r[4].astype(np.float64) for r in part),
                        sum(np.asarray(r[5], dtype=np.float64) * r[6] for r in part), 1.0,
                        sum(r[7] for r in part), np.concatenate([r[8] for r in part]), pos, run_old))
        return out, [g[2] for g in groups]

    @staticmethod
    def _changed_names(tp: _TensorPlan, start: int, end: int) -> list[str]:
        """Names of the tensors with changes among those holding space elements [start, end) (a dense range may
        also cover unchanged small tensors; a full update changes every tensor)."""
        space = tp.space
        a = int(np.searchsorted(space.offs, start, side="right")) - 1
        b = int(np.searchsorted(space.offs, end, side="left"))
        if tp.run is None:
            return space.names[a:b]
        i0, pieces = tp.run
        return [space.names[i] for i in range(a, b) if pieces[i - i0] > 0]

    def _runs(self, dn: str, ntensors: int) -> list[tuple[int, int]]:
        """Format 2: the runs of a space's tensors that are planned on their own statistics (classes, chunk sizes).

        A tensor with at least RUN_CHANGES changes in the last update, among the MAX_RUNS most changed ones, is a run
        of its own (its own exponent classes: layers differ in how far Adam moves their weights, so a tensor's own
        statistics code its positions better, and it has changes enough to pay for its tables); the tensors between
        such tensors form one pooled run, so a space has at most 2 * MAX_RUNS + 1 runs.
        Decided from the last update only (no history: one pooled run), so the same states give the same bytes."""
        last = self._changes.get(dn)
        if last is None or len(last) != ntensors:
            return [(0, ntensors)]
        gains = self._gains.setdefault(dn, {})
        if self._updates2 % RUN_REVIEW == 0:
            gains.clear()                         # now and then every candidate is planned alone again
        big = np.flatnonzero(last >= RUN_CHANGES)
        # a tensor planned alone before stays alone only if that saved more than its segment's header costs
        big = np.array([b for b in big.tolist() if gains.get(b, math.inf) > RUN_GAIN_BITS], dtype=np.int64)
        if big.size == 0:
            return [(0, ntensors)]
        if big.size > MAX_RUNS:        # tens of thousands of experts: the few largest alone, the rest pooled
            order = np.argsort(-last[big], kind="stable")[:MAX_RUNS]
            big = np.sort(big[order])
        runs, i = [], 0
        for b in big.tolist():
            if b > i:
                runs.append((i, b))
            runs.append((b, b + 1))
            i = b + 1
        if i < ntensors:
            runs.append((i, ntensors))
        return runs

    def _encode_segment2(self, sp: _SegPlan, full: bool) -> tuple[Segment2, list]:
        tp = sp.tp
        dense_len = (sp.end - sp.start) * tp.w
        kern = kernels.for_space(tp.space)
        lo, hi = sp.start - tp.base, sp.end - tp.base      # in the coordinates of the kernels' space
        if tp.kind == "s":
            pos = tp.positions
            if pos is not None:      # the scan's positions: the encoder need not diff the range again
                a, b = torch.searchsorted(pos, torch.tensor([lo, hi], dtype=torch.int64, device=pos.device)).tolist()
                pos = pos[a:b]
            try:
                table, data, ks, vhash, nch = kern.encode2(tp.old_space, tp.space, self.mode, lo, hi, tp.log2c,
                                                           list(tp.cuts), tp.freqs, update_old=True,
                                                           nchanged_hint=sp.nchanged, positions=pos)
            except KernelError as exc:      # a symbol the plan did not count: the state changed meanwhile
                raise SparseSyncError(f"{tp.space.describe(sp.start, sp.end)} changed between planning and encoding "
                                      f"({exc})") from None
            if nch != sp.nchanged:
                raise SparseSyncError(f"{tp.space.describe(sp.start, sp.end)} changed between planning and encoding")
            if len(table) + len(data) < dense_len:
                if tp.packed is None:
                    tp.packed = tuple(pack_freq(f) if f.any() else b"" for f in tp.freqs)
                cls, last = [], None
                for c, k in enumerate(ks):
                    if k is None:
                        cls.append(None)
                        continue
                    ftab = tp.packed[c]
                    cls.append((k, b"" if ftab == last else ftab))   # shared with the previous present class
                    last = ftab
                cls = tuple(cls)
                return Segment2(tp.name, "s", sp.start, sp.end, tp.log2c, len(table), 0, len(table) + len(data),
                                tp.cuts, cls, vhash, nch), [table, data]
            log.debug("%s: sparse coding took %d B, dense %d B: sent dense", tp.space.describe(sp.start, sp.end),
                      len(table) + len(data), dense_len)
        got = kern.gather2(tp.space, lo, hi)
        if not full and tp.kind == "d":
            kern.put2(tp.old_space, lo, hi, got)
        raw = _host(got)
        return Segment2(tp.name, "d", sp.start, sp.end, 0, 0, 0, dense_len, (), (), None, sp.end - sp.start), [raw]

    def _encode_segment(self, sp: _SegPlan) -> tuple[Segment, list]:
        tp = sp.tp
        new_b = byte_view(tp.new)
        old = self.snapshot[tp.name]
        dense_len = (sp.end - sp.start) * tp.w
        shape, dt = tuple(tp.new.shape), name_of(tp.new.dtype)
        if tp.kind == "s":
            try:
                table, data, vhash, nch = impl().encode(byte_view(old), new_b, tp.w, self.mode, tp.log2c, sp.c0,
                                                        sp.c1, tp.freq, update_old=True, nchanged_hint=sp.nchanged)
            except KernelError as exc:      # a symbol the plan did not count: the tensor changed meanwhile
                raise SparseSyncError(f"tensor {tp.name!r} changed between planning and encoding ({exc})") from None
            if nch != sp.nchanged:
                raise SparseSyncError(f"tensor {tp.name!r} changed between planning and encoding")
            if len(table) + len(data) < dense_len:
                return Segment(tp.name, dt, shape, "s", sp.start, sp.end, tp.log2c, len(table), 0,
                               len(table) + len(data), pack_freq(tp.freq), vhash, nch), [table, data]
            # sparse turned out larger than dense: send this range dense (the snapshot already holds the new values)
            log.debug("tensor %r elements [%d, %d): sparse coding took %d B, dense %d B: sent dense", tp.name,
                      sp.start, sp.end, len(table) + len(data), dense_len)
        elif old is not tp.new:
            byte_view(old)[sp.start * tp.w: sp.end * tp.w].copy_(new_b[sp.start * tp.w: sp.end * tp.w])
        raw = new_b[sp.start * tp.w: sp.end * tp.w].numpy()
        return Segment(tp.name, dt, shape, "d", sp.start, sp.end, 0, 0, 0, dense_len, b"", None,
                       sp.end - sp.start), [raw]

    def _generate(self, update: Update, packer, ldig: bytes) -> Iterator[bytes]:
        stats = update.stats
        prev = 0
        dense_names = set()
        i = 0
        traffic = _host_traffic if self.pinned else None
        while True:
            t1 = time.perf_counter()
            h0 = traffic() if traffic else 0
            plan, last = next(packer)          # planning (scans) of the tensors in this bucket happens here
            segs, parts, off = [], [], 0
            for sp in plan:
                if sp.tp.space is not None:
                    seg, data = self._encode_segment2(sp, update.base_version is None)
                    if seg.kind == "d":
                        dense_names.update(self._changed_names(sp.tp, sp.start - sp.tp.base, sp.end - sp.tp.base))
                else:
                    seg, data = self._encode_segment(sp)
                    if seg.kind == "d":
                        dense_names.add(sp.tp.name)
                seg = dataclasses.replace(seg, off=off)
                off += seg.length
                segs.append(seg)
                parts.extend(data)
            body = b"".join(bytes(p) if not isinstance(p, (bytes, bytearray)) else p for p in parts)
            if last and self.want_digest:
                t2 = time.perf_counter()
                update.digest = self._snapshot_digest()
                log.debug("state digest of version %d computed in %.3f s: %s", update.version,
                          time.perf_counter() - t2, update.digest)
            header = Header(uid=update.uid, base=update.base_version, ver=update.version, vals=self.values, idx=i,
                            cnt=i + 1 if last else 0, layout=ldig, ntensors=len(self.layout), dig=self.want_digest,
                            digest=update.digest if last else None, body_len=len(body),
                            body_hash=impl().tree64(body), prev=prev, segs=tuple(segs), v=self.format)
            bucket = pack_bucket(header, body)
            prev = header_hash(bucket)
            stats.wire_bytes += len(bucket)
            stats.header_bytes += len(bucket) - len(body)
            stats.encode_seconds += time.perf_counter() - t1
            if traffic:
                stats.snapshot_host_bytes += traffic() - h0
            i += 1
            if last:
                stats.dense_tensors = len(dense_names)
                stats.buckets = i
                update.count = i
            yield bucket
            if last:
                return


def full_update(state: StateLike, version: int, *, bucket_bytes: int | None = None, stream: bool = True,
                digest: bool = False, format: int | None = None) -> Update:
    """A full update of ``state`` made straight from its tensors (no copy): for catching up receivers and relays.

    A full update applies at any receiver version at or below ``version`` (a receiver above it refuses it as a
    rollback unless it allows rollbacks). ``digest=True`` puts the state digest in the last bucket, and receivers
    verify it, exactly as for delta updates of ``Encoder(digest=True)``. With ``stream=True`` (default) buckets are
    made as they are consumed; ``state`` must not change meanwhile.
    """
    enc = Encoder(bucket_bytes=bucket_bytes, digest=digest, format=format)
    enc._copy_full = False
    return enc.encode(state, version, stream=stream)


# -------------------------------------------------------------------------------------------------------------------

@dataclass
class ApplyStats:
    """What applying one update did.

    ``base_version``: the update's base (None for a full update); ``version``: the version reached;
    ``previous_version``: the decoder's version before (a full update may keep it or, when allowed, lower it);
    ``kind``: ``"delta"`` or ``"full"``; ``buckets`` / ``wire_bytes``: what was received; ``changed``: elements
    written; ``decode_seconds`` / ``apply_seconds``: time spent verifying and staging / writing; ``digest_verified``:
    the state digest was recomputed and matched the encoder's; ``tensors``: names of the tensors the update wrote
    (in update order), for engines that mirror the state elsewhere; ``digest``: the state digest after applying
    when it was verified (``digest_verified``), else None, so callers need not hash the state again.
    """
    base_version: int | None
    version: int
    buckets: int
    wire_bytes: int
    changed: int
    decode_seconds: float
    apply_seconds: float
    digest_verified: bool = False
    kind: str = "delta"
    previous_version: int | None = None
    tensors: tuple = ()
    digest: str | None = None


@dataclass
class _Pending:
    header: Header
    last_hash: int
    previous_version: int
    next_idx: int = 1
    staged: list = field(default_factory=list)     # (tensor_name, kind, start, end, payload)
    ends: dict = field(default_factory=dict)       # name -> end of the tensor's last segment so far
    arena_used: list = field(default_factory=list)  # per bucket: (index count, value bytes) staged in the arena
    wire_bytes: int = 0
    changed: int = 0
    decode_seconds: float = 0.0
    digest: str | None = None
    count: int = 0


def _split_runs(bounds: list, druns: tuple) -> list[tuple[int, int]]:
    """Runs of tensors cut where the device changes (each run on one device)."""
    if len(druns) <= 1:
        return bounds
    cuts = [b for _, b, _ in druns[:-1]]
    out = []
    for i0, i1 in bounds:
        a = i0
        for c in cuts:
            if a < c < i1:
                out.append((a, c))
                a = c
        out.append((a, i1))
    return out


def _addresses(ts: list) -> tuple[np.ndarray, np.ndarray]:
    """Addresses and byte sizes of contiguous CPU tensors that keep their storage (the codec's own snapshot, a
    decoder's tensors): taken once, so that digests need no pass over the tensors in Python."""
    return (np.array([t.data_ptr() for t in ts], dtype=np.uint64),
            np.array([t.numel() * t.element_size() for t in ts], dtype=np.uint64))


_TABLES: dict = {}


def _class_tables(cls: tuple, max_sym: int) -> np.ndarray:
    """(K, 256) frequencies of a format-2 segment's classes (zeros for absent ones); tables are cached by bytes
    (a space's segments repeat them)."""
    key = (cls, max_sym)
    out = _TABLES.get(key)
    if out is None:
        out = np.zeros((len(cls), 256), dtype=np.uint32)
        last = None
        for c, entry in enumerate(cls):
            if entry is not None:
                if entry[1]:
                    last = unpack_freq(entry[1], max_sym)
                out[c] = last           # an empty table: the nearest present class's before it (FORMAT.md §6.3)
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = out
    return out


# an arena entry larger than this many times (plus the slack) what the last successful update staged at its index is
# freed after every update, successful or not
_ARENA_GROWTH, _ARENA_SLACK = 2, 1 << 16


class Decoder:
    """Applies updates to ``state`` in place, all or nothing.

    ``state``: Mapping name -> contiguous tensor (the receiver's weights), in host memory or on CUDA devices (then
    format-2 updates are decoded and applied there with the CUDA kernels; see :attr:`formats`). ``version``: the
    version it holds.
    ``verify_digest`` (default True): when an update carries the encoder's state digest (``Encoder(digest=True)``),
    recompute the digest after applying; on a mismatch the change is rolled back and :class:`BaseMismatch` is raised.
    Updates without a digest cost nothing extra.
    ``allow_rollback`` (default False): a full update to a version below the decoder's is refused with
    :class:`RollbackRefused` unless this is True (it is then applied and logged at WARNING). A full update to the
    version the decoder holds is always accepted (it re-installs those bytes).

    A delta update whose ``ver`` is not above its ``base`` is malformed (:class:`CorruptPayload`, whatever
    ``allow_rollback`` says). Any refusal (a :class:`SparseSyncError`) leaves the tensors and the version exactly as
    they were.
    """

    def __init__(self, state: StateLike, version: int = 0, *, verify_digest: bool = True,
                 allow_rollback: bool = False):
        Encoder._check_version(version)
        tensors: dict[str, torch.Tensor] = {}
        for name, t in _as_items(state):
            check_tensor(name, t)
            if t.layout != torch.strided:
                raise InvalidArgument(f"tensor {name!r} is a {t.layout} tensor; this Decoder updates dense tensors")
            if t.device.type != "cpu":
                if t.device.type != "cuda":
                    raise InvalidArgument(f"tensor {name!r} is on {t.device}; a Decoder applies to tensors in host "
                                          "memory or on CUDA devices")
                why = kernels.device_unavailable(t)
                if why is not None:
                    raise InvalidArgument(f"tensor {name!r} is on {t.device}, but the CUDA kernels cannot run in this "
                                          f"process: {why}")
            if not t.is_contiguous():
                raise InvalidArgument(f"tensor {name!r} (shape {list(t.shape)}, strides {list(t.stride())}) is not "
                                      "contiguous; it cannot be updated in place")
            if name in tensors:
                raise InvalidArgument(f"duplicate tensor name {name!r}")
            tensors[name] = t
        self.state: dict[str, torch.Tensor] = tensors
        self.layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in self.state.items()]
        self.layout_digest = layout_digest(self.layout)
        # names sharing storage (tied weights): their deltas must not be added twice, so they take the path that
        # computes new values while staging and writes them idempotently at commit
        owners: dict = {}
        for n, t in self.state.items():
            owners.setdefault(t.untyped_storage().data_ptr(), []).append(n)
        self._aliased = {n for names in owners.values() if len(names) > 1 for n in names}
        # format 2: the tensors of each dtype as one space (their addresses are taken once, here: the tensors must
        # keep their storage, as for any in-place receiver); spaces holding aliased tensors write new values
        self._spaces = spaces_of(list(self.state.items()))
        self._alias_spaces = {name_of(self.state[n].dtype) for n in self._aliased}
        #: wire format versions this decoder applies: tensors in device memory take format 2 only (sessions offer
        #: this list in their handshake, so senders encode a version the decoder reads)
        self.devices = sorted({str(r[2]) for sp in self._spaces.values() for r in sp.druns if r[2] is not None})
        self.formats = tuple(f for f in FORMATS if f >= 2) if self.devices else FORMATS
        self._digest_plan: tuple | None = None     # (DigestPlan, tensors, addresses, sizes, device groups)
        self.version = version
        self.verify_digest = verify_digest
        self.allow_rollback = allow_rollback
        self._pending: _Pending | None = None
        self.last_stats: ApplyStats | None = None
        # staging buffers reused across updates (per bucket index): no fresh allocations in the steady state. Bounded:
        # after every update only the entries of the last successful update remain, each at most _ARENA_GROWTH times
        # what that update staged there (``_arena_keep``: its (count, bytes) per bucket; a tuple, only ever replaced)
        self._arena: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        self._arena_keep: tuple[tuple[int, int], ...] = ()

    @property
    def pending(self) -> bool:
        """True while a partly received update is staged."""
        return self._pending is not None

    def abort(self) -> None:
        """Discard a partly received update (the state was never touched)."""
        self._discard()

    def _discard(self) -> None:
        self._pending = None
        self._trim_arena()

    def _trim_arena(self) -> None:
        keep = self._arena_keep
        arena = self._arena
        del arena[len(keep):]
        for i, entry in enumerate(arena):
            if entry is None:
                continue
            count, nbytes = keep[i]
            if (count == 0 and nbytes == 0) or entry[0].numel() > _ARENA_GROWTH * count + _ARENA_SLACK // 8 or \
                    entry[1].numel() > _ARENA_GROWTH * nbytes + _ARENA_SLACK:
                arena[i] = None

    def apply(self, update: UpdateLike) -> ApplyStats:
        """Apply a whole update: an :class:`Update`, one bucket, or an iterable of buckets (in order).

        The tensors change only after every bucket verified and no bucket follows the last one. Returns the
        :class:`ApplyStats`; raises a :class:`SparseSyncError` (and changes nothing) on any problem.
        """
        if self._pending is not None:
            raise SparseSyncError("a partly received update is pending; call abort() first")
        if isinstance(update, Update):
            buckets = update.iter_buckets()
        elif isinstance(update, (bytes, bytearray, memoryview)):
            buckets = [update]
        else:
            buckets = update
        try:
            it = iter(buckets)
        except TypeError:
            raise InvalidType(f"an update is an Update, a bucket or an iterable of buckets, got a "
                              f"{type(update).__name__}") from None
        try:
            for b in it:
                if self._stage(b, owned=False):
                    if next(it, None) is not None:
                        raise CorruptPayload("more buckets than the update announced")
                    p = self._pending
                    self._commit(p, p.digest)
                    return self.last_stats
            raise CorruptPayload("update truncated: the last bucket never arrived")
        finally:
            self._discard()

    def stage(self, bucket: bytes | bytearray | memoryview, *, owned: bool = False) -> bool:
        """Verify and stage one bucket without touching the tensors; True when the update is complete and verified,
        ready for :meth:`commit`. On error the partial update is discarded and the error raised."""
        try:
            return self._stage(bucket, owned)
        except BaseException:
            self._discard()
            raise

    def commit(self) -> ApplyStats:
        """Apply a staged, complete update (after :meth:`stage` returned True)."""
        p = self._pending
        if p is None or not p.count:
            raise SparseSyncError("no complete update is staged")
        try:
            self._commit(p, p.digest)
        finally:
            self._discard()
        return self.last_stats

    def feed(self, bucket: bytes | bytearray | memoryview, *, owned: bool = False) -> bool:
        """Stage one bucket; returns True when it completed (and applied) an update. On error nothing changes.

        ``owned=True`` promises that the caller will not modify ``bucket`` until the update is applied (its dense
        parts are then staged without a copy). Immutable ``bytes`` are never copied.
        """
        try:
            if not self._stage(bucket, owned):
                return False
            p = self._pending
            self._commit(p, p.digest)
            self._discard()
            return True
        except BaseException:
            self._discard()
            raise

    def _staging(self, p: _Pending, i: int, count: int, nbytes: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
        """Per-bucket staging (indices, values or differences, new values), reused across updates."""
        p.arena_used.append((count, nbytes))
        if count == 0 and nbytes == 0:          # nothing sparse in this bucket: no arena entry at all
            return (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8),
                    torch.empty(0, dtype=torch.uint8))
        arena = self._arena
        if len(arena) <= i:
            arena.extend([None] * (i + 1 - len(arena)))
        entry = arena[i]
        idx, val, new = entry if entry is not None else (None, None, None)
        if idx is None or idx.numel() < count:
            idx = torch.empty(count, dtype=torch.int64)
        if val is None or val.numel() < nbytes:
            val, new = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        arena[i] = (idx, val, new)
        return idx, val, new

    def _check_layout(self, header: Header) -> None:
        """LayoutMismatch naming the first differing tensor when the first bucket shows it, else saying precisely
        what was compared (the first bucket's tensors) and the tensor counts of both sides."""
        counts = f"the update's layout has {header.ntensors} tensors, this decoder holds {len(self.state)}"
        if header.layout == self.layout_digest:
            if header.ntensors != len(self.state):
                raise LayoutMismatch(f"the update's header says {header.ntensors} tensors, but its layout digest is "
                                     f"that of this decoder's {len(self.state)} tensors (malformed header)")
            return
        if header.v >= 2:
            raise LayoutMismatch(f"the update (format {header.v}) was made for another tensor layout: its layout "
                                 f"digest is {header.layout.hex()}, this decoder's {self.layout_digest.hex()} (names, "
                                 f"dtypes or shapes differ; {counts})")
        seen: list[str] = []
        seen_set: set[str] = set()
        for s in header.segs:
            if s.name in seen_set:
                continue
            seen.append(s.name)
            seen_set.add(s.name)
            mine = self.state.get(s.name)
            if mine is None:
                raise LayoutMismatch(f"the update has tensor {s.name!r} {s.dtype}{list(s.shape)}, which this decoder "
                                     f"does not hold; {counts}")
            if name_of(mine.dtype) != s.dtype or tuple(mine.shape) != s.shape:
                raise LayoutMismatch(f"tensor {s.name!r}: the update has {s.dtype}{list(s.shape)}, this decoder "
                                     f"holds {name_of(mine.dtype)}{list(mine.shape)}; {counts}")
        hint = ""
        if header.base is None and seen:
            # a full update carries every non-empty tensor, in the sender's order, each one whole before the next
            mine_nonempty = [n for n, t in self.state.items() if t.numel()]
            desc = lambda n: f"{n!r} {name_of(self.state[n].dtype)}{list(self.state[n].shape)}"  # noqa: E731
            if header.cnt:
                lacking = [n for n in mine_nonempty if n not in seen_set]
                if lacking:
                    more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
                    raise LayoutMismatch(f"this decoder holds tensor {desc(lacking[0])}{more}, which the update (a "
                                         f"full update in one bucket) does not carry; {counts}")
            else:
                pos = {n: i for i, n in enumerate(mine_nonempty)}
                prev = -1
                for k, n in enumerate(seen):
                    i = pos[n]
                    if i < prev:
                        break                           # the two sides list their tensors in different orders
                    if i > prev + 1:
                        skipped = mine_nonempty[prev + 1:i]
                        where = f"before {n!r}" if k == 0 else f"between {seen[k - 1]!r} and {n!r}"
                        hint = (f"; this decoder holds {desc(skipped[0])}{' and others' if len(skipped) > 1 else ''} "
                                f"{where}, which the update's first bucket carries back to back: if both sides list "
                                "their tensors in the same order, the update lacks it")
                        break
                    prev = i
        names = ", ".join(repr(n) for n in seen[:5]) + (" ..." if len(seen) > 5 else "")
        raise LayoutMismatch(f"tensor sets differ: every tensor in the update's first bucket ({names or 'none'}) "
                             f"matches this decoder, the difference lies in tensors it does not carry; {counts}"
                             f"{hint}")

    def _stage(self, bucket, owned: bool) -> bool:
        """Verify and stage one bucket; True when the update is complete and verified (not yet committed)."""
        t0 = time.perf_counter()
        header, hhash, body = parse_bucket(bucket)
        p = self._pending
        if p is None:
            if header.idx != 0:
                raise CorruptPayload(f"bucket {header.idx} arrived first (reordered or lost bucket)")
            if header.prev != 0:
                raise CorruptPayload("first bucket has a non-zero chain link")
            if update_uid(header.layout, header.base, header.ver, header.vals) != header.uid:
                raise CorruptPayload("update id does not match the update's layout and versions")
            self._check_layout(header)
            if header.base is None:
                if header.ver < self.version and not self.allow_rollback:
                    raise RollbackRefused(f"a full update to version {header.ver} would move this decoder back from "
                                          f"version {self.version}; refused (Decoder(..., allow_rollback=True) "
                                          "accepts rollbacks)")
            elif header.base != self.version:
                raise VersionMismatch(f"update goes from version {header.base} to {header.ver}, decoder is at "
                                      f"version {self.version}")
            p = _Pending(header, hhash, self.version)
        else:
            h0 = p.header
            if (header.uid, header.base, header.ver, header.vals, header.layout, header.ntensors, header.dig,
                    header.v) != (h0.uid, h0.base, h0.ver, h0.vals, h0.layout, h0.ntensors, h0.dig, h0.v):
                raise CorruptPayload("bucket belongs to another update (foreign bucket)")
            if header.idx != p.next_idx:
                raise CorruptPayload(f"expected bucket {p.next_idx}, got {header.idx} (reordered or duplicated)")
            if header.prev != p.last_hash:
                raise CorruptPayload(f"bucket {header.idx} does not chain to bucket {header.idx - 1}")
            p.next_idx += 1
            p.last_hash = hhash
        if header.v >= 2:
            return self._stage2(p, header, bucket, body, owned, t0)
        if header.v not in self.formats:
            raise InvalidArgument(f"this decoder holds tensors on {', '.join(self.devices)} and applies wire format "
                                  f"{' or '.join(map(str, self.formats))} only, not format {header.v} "
                                  "(Encoder(format=2); sessions negotiate it)")
        mode = VALUE_MODES[header.vals]
        # 1. every segment against the receiver's tensors, before anything is allocated from header numbers. The
        # segments of a tensor ascend through the update (FORMAT.md §2), so one end per tensor proves no overlap.
        ends = p.ends
        for seg in header.segs:
            t = self.state.get(seg.name)
            if t is None or name_of(t.dtype) != seg.dtype or tuple(t.shape) != seg.shape:
                raise CorruptPayload(f"segment names tensor {seg.name!r} {seg.dtype}{list(seg.shape)}, which is not "
                                     "in the layout its header claims")
            last = ends.get(seg.name, 0)
            if seg.start < last:
                raise CorruptPayload(f"segments overlap or are out of order in tensor {seg.name!r}: [{seg.start}, "
                                     f"{seg.end}) after a segment ending at {last} (a tensor's segments ascend)")
            ends[seg.name] = seg.end
        # 2. staging (bounded by the receiver's own tensor sizes now), values 8-byte aligned per segment
        sparse = [(seg, width(BY_NAME[seg.dtype])) for seg in header.segs if seg.kind == "s"]
        arena_idx, arena_val, arena_new = self._staging(p, header.idx, sum(sg.nchanged for sg, _ in sparse),
                                                        sum(-(-sg.nchanged * w // 8) * 8 for sg, w in sparse))
        # delta mode decodes the differences only; they are added (and the values hash checked) at commit, touching
        # every changed element of the tensor once
        delta = mode == VALUE_MODES["delta"]
        copy_dense = not owned and not isinstance(bucket, bytes)
        io = vo = 0
        for seg in header.segs:
            t = self.state[seg.name]
            data = body[seg.off: seg.off + seg.length]
            w = width(t.dtype)
            if seg.kind == "d":
                p.staged.append((seg.name, "d", seg.start, seg.end, bytes(data) if copy_dense else data))
            else:
                freq = unpack_freq(seg.freq, max_symbol(w, mode))
                dmode = MODE_DELTA_DEFERRED if delta and seg.name not in self._aliased else mode
                try:
                    idx, vals = impl().decode(data, seg.table_len, byte_view(t), w, dmode, seg.log2c,
                                              seg.start >> seg.log2c, -(-seg.end >> seg.log2c), freq, seg.nchanged,
                                              seg.values_hash, arena_idx[io: io + seg.nchanged],
                                              arena_val[vo: vo + seg.nchanged * w])
                except KernelError as exc:
                    if exc.code == E_HASH and mode == VALUE_MODES["delta"]:
                        raise BaseMismatch(f"tensor {seg.name!r}: the decoder's values at version {self.version} "
                                           "differ from the encoder's base (values hash mismatch)") from None
                    raise CorruptPayload(f"segment of {seg.name!r}: {exc}") from None
                new = arena_new[vo: vo + seg.nchanged * w]
                io += seg.nchanged
                vo += -(-seg.nchanged * w // 8) * 8
                if dmode == MODE_DELTA_DEFERRED:
                    p.staged.append((seg.name, "+", seg.start, seg.end, (idx, vals, new, seg.values_hash)))
                else:
                    p.staged.append((seg.name, "s", seg.start, seg.end, (idx, vals)))
            p.changed += seg.nchanged
        p.wire_bytes += len(memoryview(bucket).cast("B"))
        p.decode_seconds += time.perf_counter() - t0
        self._pending = p
        if header.cnt == 0:                    # more buckets follow
            return False
        p.digest = header.digest
        p.count = header.cnt
        return True

    def _stage2(self, p: _Pending, header: Header, bucket, body, owned: bool, t0: float) -> bool:
        """Stage one format-2 bucket (FORMAT.md §6): segments address spaces; work is per segment, not per tensor.

        Staged entries are ``(space, kind, start, end, payload, first tensor)`` on one device each: the space's own,
        or, for a space spanning devices, the space of one device run (``first tensor``: its first tensor's index in
        the whole space; start and end in its coordinates)."""
        mode = VALUE_MODES[header.vals]
        ends = p.ends
        spaces = self._spaces
        for seg in header.segs:
            sp = spaces.get(seg.space)
            if sp is None or seg.end > sp.n:
                raise CorruptPayload(f"{seg.space} segment [{seg.start}, {seg.end}) lies outside the receiver's "
                                     f"{seg.space} space ({sp.n if sp is not None else 0} elements)")
            last = ends.get(seg.space, 0)
            if seg.start < last:
                raise CorruptPayload(f"{seg.space} segments overlap or are out of order: [{seg.start}, {seg.end}) "
                                     f"after a segment ending at {last} (a space's segments ascend)")
            ends[seg.space] = seg.end
        pieces = [spaces[seg.space].device_pieces(seg.start, seg.end) for seg in header.segs]
        # host staging (the arena) for the sparse segments decoded by the CPU kernels in place
        host = [(seg, spaces[seg.space].w) for seg, pc in zip(header.segs, pieces)
                if seg.kind == "s" and len(pc) == 1 and pc[0][2].device is None]
        arena_idx, arena_val, arena_new = self._staging(p, header.idx, sum(sg.nchanged for sg, _ in host),
                                                        sum(-(-sg.nchanged * w // 8) * 8 for sg, w in host))
        delta = mode == VALUE_MODES["delta"]
        copy_dense = not owned and not isinstance(bucket, bytes)
        io = vo = 0
        for seg, pc in zip(header.segs, pieces):
            sp = spaces[seg.space]
            data = body[seg.off: seg.off + seg.length]
            w = sp.w
            if seg.kind == "d":
                payload = bytes(data) if copy_dense else data
                for base, i0, sub in pc:
                    a, b = max(seg.start, base), min(seg.end, base + sub.n)
                    part = payload if len(pc) == 1 else payload[(a - seg.start) * w: (b - seg.start) * w]
                    p.staged.append((sub, "d", a - base, b - base, part, i0))
                p.changed += seg.nchanged
                continue
            freqs = _class_tables(seg.cls, max_symbol(w, mode))
            ks = [None if c is None else c[0] for c in seg.cls]
            dmode = MODE_DELTA_DEFERRED if delta and seg.space not in self._alias_spaces else mode
            args = (list(seg.cuts), ks, freqs, seg.nchanged, seg.values_hash)
            if len(pc) > 1:
                # a segment across devices: decoded on the host against a copy of its range's base values (new
                # values, values hash checked), then scattered device by device
                idx, vals = self._decode_across(sp, seg, data, pc, mode, args)
                for base, i0, sub in pc:
                    sel = (idx >= base) & (idx < base + sub.n)
                    p.staged.append((sub, "s", seg.start, seg.end, (idx[sel] - base, vals.view(-1, w)[sel].reshape(-1)),
                                     i0))
                p.changed += seg.nchanged
                continue
            base, i0, sub = pc[0]
            lo, hi = seg.start - base, seg.end - base
            if sub.device is None:
                idx, vals = self._decode_seg(impl(), sp, seg, data, sub, dmode, lo, hi, args,
                                             arena_idx[io: io + seg.nchanged], arena_val[vo: vo + seg.nchanged * w])
                new = arena_new[vo: vo + seg.nchanged * w]
                io += seg.nchanged
                vo += -(-seg.nchanged * w // 8) * 8
            else:          # decoded into device memory
                idx, vals = self._decode_seg(kernels.device_kernels(), sp, seg, data, sub, dmode, lo, hi, args)
                new = torch.empty_like(vals) if dmode == MODE_DELTA_DEFERRED else None
            if dmode == MODE_DELTA_DEFERRED:
                p.staged.append((sub, "+", lo, hi, (idx, vals, new, seg.values_hash), i0))
            else:
                p.staged.append((sub, "s", lo, hi, (idx, vals), i0))
            p.changed += seg.nchanged
        p.wire_bytes += len(memoryview(bucket).cast("B"))
        p.decode_seconds += time.perf_counter() - t0
        self._pending = p
        if header.cnt == 0:
            return False
        p.digest = header.digest
        p.count = header.cnt
        return True

    def _decode_seg(self, kern, sp: Space, seg, data, sub: Space, dmode: int, lo: int, hi: int, args: tuple,
                    idx_out=None, val_out=None):
        """One sparse segment decoded by ``kern`` on ``sub`` (range [lo, hi) there); kernel errors become the
        codec's errors, naming the segment's tensors."""
        cuts, ks, freqs, nchanged, vhash = args
        try:
            return kern.decode2(data, seg.table_len, sub, dmode, lo, hi, seg.log2c, cuts, ks, freqs, nchanged, vhash,
                                idx_out, val_out)
        except KernelError as exc:
            where = sp.describe(seg.start, seg.end)
            if exc.code == E_HASH and dmode in (VALUE_MODES["delta"], MODE_DELTA_DEFERRED):
                raise BaseMismatch(f"{where}: the decoder's values at version {self.version} differ from the "
                                   "encoder's base (values hash mismatch)") from None
            if seg.cuts and exc.code != E_ARG:
                # context coding reads the classes from the base: with intact checksums, streams that do not decode
                # mean other base values (or a forged payload)
                raise BaseMismatch(f"{where}: the context-coded segment does not decode against the decoder's values "
                                   f"at version {self.version} ({exc}); the bucket's checksums hold, so the decoder's "
                                   "base most likely differs from the encoder's") from None
            raise CorruptPayload(f"segment of {where}: {exc}") from None

    def _decode_across(self, sp: Space, seg, data, pc: list, mode: int, args: tuple):
        """A sparse segment whose range spans devices, decoded on the host: (space indices, new values) (raw values
        in raw mode)."""
        parts = []
        for base, _, sub in pc:
            a, b = max(seg.start, base), min(seg.end, base + sub.n)
            parts.append(_host_tensor(kernels.for_space(sub).gather2(sub, a - base, b - base)))
        raw = torch.cat(parts) if len(parts) > 1 else parts[0]
        tmp = Space(sp.dtype, [sp.names_in(seg.start, seg.end)[0]], [raw.view(BY_NAME[sp.dtype])])
        tmp._druns = ((0, 1, None),)             # host memory, whatever device_of says
        idx, vals = self._decode_seg(impl(), sp, seg, data, tmp, mode, 0, seg.end - seg.start, args)
        return idx + seg.start, vals

    def _commit2(self, p: _Pending, digest: str | None) -> tuple:
        """Write a staged format-2 update; returns the names of the tensors written. Undoes exactly on a failed
        values hash or digest."""
        verify = self.verify_digest and digest is not None
        touched = {dn: np.zeros(len(sp.names), dtype=np.uint8) for dn, sp in self._spaces.items()}
        undo = []

        def tv(sp, i0):          # the touched flags of a (run) space's tensors
            return touched[sp.dtype][i0: i0 + len(sp.names)]

        def rollback():
            for sp, kind, where, old in reversed(undo):
                kern = kernels.for_space(sp)
                if kind == "d":
                    kern.put2(sp, where, where + old.numel() // sp.w, old)
                elif kind == "+":
                    kern.add_scatter2(sp, where, old, None, negate=True)
                else:
                    kern.scatter2(sp, where, old)

        for sp, kind, start, end, payload, i0 in p.staged:
            if kind != "+":
                continue
            kern = kernels.for_space(sp)
            idx, d, new, vhash = payload
            kern.add_scatter2(sp, idx, d, new, touched=tv(sp, i0))
            undo.append((sp, "+", idx, d))
            if kern.tree64(new) != vhash:
                rollback()
                raise BaseMismatch(f"{sp.describe(start, end)}: the decoder's values at version {self.version} differ "
                                   "from the encoder's base (values hash mismatch); nothing was changed")
        for sp, kind, start, end, payload, i0 in p.staged:
            kern = kernels.for_space(sp)
            if kind == "d":
                if verify:
                    undo.append((sp, "d", start, kern.gather2(sp, start, end)))
                kern.put2(sp, start, end, payload, touched=tv(sp, i0))
            elif kind == "s":
                idx, vals = payload
                if verify:
                    undo.append((sp, "s", idx, kern.take2(sp, idx)))
                kern.scatter2(sp, idx, vals, touched=tv(sp, i0))
        if verify:
            t1 = time.perf_counter()
            got = self._state_digest()
            if got != digest:
                rollback()
                raise BaseMismatch(f"after applying version {p.header.ver} the state digest differs from the "
                                   f"encoder's ({got[:16]}... != {digest[:16]}...); the update was rolled back")
            log.debug("state digest of version %d verified in %.3f s", p.header.ver, time.perf_counter() - t1)
        names = []
        for dn, sp in self._spaces.items():
            hit = np.flatnonzero(touched[dn])
            if hit.size:
                names.extend(operator.itemgetter(*hit.tolist())(sp.names) if hit.size > 1 else [sp.names[hit[0]]])
        return tuple(names)

    def _state_digest(self) -> str:
        """state_digest of the decoder's tensors (the layout's records are built once)."""
        if self._digest_plan is None:
            ts = list(self.state.values())
            self._digest_plan = (DigestPlan(self.layout), ts, *_addresses(ts), kernels.device_groups(ts))
        plan, ts, ptrs, nbytes, groups = self._digest_plan
        return plan.digest(kernels.tree64_by_device(ts, ptrs, nbytes, groups))

    def _commit(self, p: _Pending, digest: str | None) -> None:
        """Write the staged update. Only the values-hash and digest checks can still fail here; both undo exactly."""
        t0 = time.perf_counter()
        verify = self.verify_digest and digest is not None
        if p.header.v >= 2:
            written = self._commit2(p, digest)
            return self._committed(p, digest, verify, written, t0)
        undo = []                                   # what to reverse, in reverse order, if a check fails

        def rollback():
            for name, kind, where, old in reversed(undo):
                t = self.state[name]
                w = width(t.dtype)
                dst = byte_view(t)
                if kind == "d":
                    dst[where * w: where * w + old.numel()].copy_(old)
                elif kind == "+":
                    impl().add_scatter(dst, w, where, old, None, negate=True)
                else:
                    impl().scatter(dst, w, where, old)

        # 1. delta segments: dst[idx] += d in one pass, then the values hash proves the base was the encoder's
        for name, kind, start, end, payload in p.staged:
            if kind != "+":
                continue
            t = self.state[name]
            w = width(t.dtype)
            idx, d, new, vhash = payload
            impl().add_scatter(byte_view(t), w, idx, d, new)
            undo.append((name, "+", idx, d))
            if impl().tree64(new) != vhash:
                rollback()
                raise BaseMismatch(f"tensor {name!r}: the decoder's values at version {self.version} differ from "
                                   "the encoder's base (values hash mismatch); nothing was changed")
        # 2. dense ranges and raw values (cannot fail)
        for name, kind, start, end, payload in p.staged:
            if kind == "+":
                continue
            t = self.state[name]
            w = width(t.dtype)
            dst = byte_view(t)
            if kind == "d":
                if verify:
                    undo.append((name, "d", start, dst[start * w: end * w].clone()))
                dst[start * w: end * w].numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
            else:
                idx, vals = payload
                if verify:
                    undo.append((name, "s", idx, dst.view(-1, w)[idx].reshape(-1).clone() if w > 1 else
                                 dst[idx].clone()))
                impl().scatter(dst, w, idx, vals)
        if verify:
            t1 = time.perf_counter()
            got = self._state_digest()
            if got != digest:
                rollback()
                raise BaseMismatch(f"after applying version {p.header.ver} the state digest differs from the "
                                   f"encoder's ({got[:16]}... != {digest[:16]}...); the update was rolled back")
            log.debug("state digest of version %d verified in %.3f s", p.header.ver, time.perf_counter() - t1)
        self._committed(p, digest, verify, tuple(dict.fromkeys(name for name, *_ in p.staged)), t0)

    def _committed(self, p: _Pending, digest: str | None, verify: bool, written: tuple, t0: float) -> None:
        h0 = p.header
        previous = self.version
        kind = "full" if h0.base is None else "delta"
        self.version = h0.ver
        self._pending = None
        self._arena_keep = tuple(p.arena_used)
        self.last_stats = ApplyStats(base_version=h0.base, version=h0.ver, buckets=p.count, wire_bytes=p.wire_bytes,
                                     changed=p.changed, decode_seconds=p.decode_seconds,
                                     apply_seconds=time.perf_counter() - t0, digest_verified=verify, kind=kind,
                                     previous_version=previous, tensors=written,
                                     digest=digest if verify else None)
        if kind == "full":
            if h0.ver < previous:
                log.warning("full update rolled this decoder back from version %d to version %d (allow_rollback)",
                            previous, h0.ver)
            log.debug("applied a full update to version %d (was at version %d): %d bucket(s), %d bytes%s", h0.ver,
                      previous, p.count, p.wire_bytes, ", digest verified" if verify else "")
