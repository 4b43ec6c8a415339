"""Encoder, Update and Decoder: weights at version v as a compact, self-checking update against version v-1."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import config
from .digest import layout_digest, state_digest
from .dtypes import BY_NAME, byte_view, check_tensor, compare_layouts, name_of, width
from .errors import BaseMismatch, CorruptPayload, LayoutMismatch, SparseSyncError, VersionMismatch
from .format import (VALUE_MODES, Header, Segment, build_freq, entropy_bits, header_hash, pack_bucket, pack_freq,
                     parse_bucket, rice_bits, unpack_freq, update_uid)
from .kernels import impl
from .reference import E_HASH, MODE_DELTA_DEFERRED, KernelError, extra_bits_for, max_symbol

CHUNK_TARGET = 1024          # aim for about this many changed elements per chunk (parallel decode granularity)
MIN_LOG2C, MAX_LOG2C = 12, 30


@dataclass
class UpdateStats:
    """What an update costs. ``bytes_per_changed`` counts every wire byte (headers included) per changed element."""
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

    @property
    def density(self) -> float:
        return self.changed / self.elements if self.elements else 0.0

    @property
    def bytes_per_changed(self) -> float:
        return self.wire_bytes / self.changed if self.changed else math.inf if self.wire_bytes else 0.0

    @property
    def compression(self) -> float:
        return self.dense_bytes / self.wire_bytes if self.wire_bytes else math.inf

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(density=self.density, bytes_per_changed=self.bytes_per_changed, compression=self.compression)
        return d

    def __str__(self) -> str:
        return (f"{self.changed}/{self.elements} changed ({100 * self.density:.3f}%) in {self.tensors_changed}/"
                f"{self.tensors} tensors, {self.wire_bytes} wire bytes in {self.buckets} bucket(s) "
                f"({self.bytes_per_changed:.3f} B/changed, {self.compression:.1f}x vs dense {self.dense_bytes} B)")


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


@dataclass
class _SegPlan:
    tp: _TensorPlan
    start: int
    end: int
    c0: int = 0
    c1: int = 0
    nchanged: int = 0


class Update:
    """One update: ``buckets`` (list of bytes), ``stats``, ``base_version``, ``version``, ``uid``, ``values``,
    ``count`` (number of buckets; None until the last bucket has been made).

    Buckets are produced lazily by :meth:`iter_buckets` when the update was made with ``Encoder.encode(...,
    stream=True)``; otherwise they are all made at ``encode`` time.
    """

    def __init__(self, base_version, version, uid, values, count, stats, gen):
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
    def complete(self) -> bool:
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
        for _ in self.iter_buckets():
            pass

    @property
    def buckets(self) -> list[bytes]:
        self.finish()
        return self._buckets

    def __repr__(self) -> str:
        return f"Update(base={self.base_version}, version={self.version}, buckets={self.count}, {self.stats})"


def _prepare(name: str, t) -> torch.Tensor:
    check_tensor(name, t)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def _as_items(state) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(state, Mapping):
        return state.items()
    return state


class Encoder:
    """Turns successive states into updates against the state receivers hold.

    ``base``: the state receivers already hold (copied; ``None`` = the first update is a full one).
    ``values``: ``"delta"`` (difference of bit patterns, default) or ``"raw"`` (new bit patterns).
    ``bucket_bytes``: target body size of one bucket (default ``SPARSESYNC_BUCKET_BYTES``, 32 MiB).
    ``digest``: put the state digest of each new state in the last bucket so receivers can prove equality.
    """

    def __init__(self, base=None, base_version: int | None = None, *, values: str = "delta",
                 bucket_bytes: int | None = None, digest: bool = False):
        if values not in VALUE_MODES:
            raise ValueError(f"values must be 'delta' or 'raw', got {values!r}")
        bucket_bytes = config.get_int("SPARSESYNC_BUCKET_BYTES") if bucket_bytes is None else bucket_bytes
        if not isinstance(bucket_bytes, int) or bucket_bytes < 4096:
            raise ValueError(f"bucket_bytes must be an int >= 4096, got {bucket_bytes!r}")
        self.values = values
        self.mode = VALUE_MODES[values]
        self.bucket_bytes = bucket_bytes
        self.want_digest = digest
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.layout: list | None = None
        self.version: int | None = None
        self._pending: Update | None = None
        self._copy_full = True
        if base is not None:
            if base_version is None:
                base_version = 0
            self._check_version(base_version)
            self.snapshot = {}
            for name, t in _as_items(base):
                if name in self.snapshot:
                    raise ValueError(f"duplicate tensor name {name!r} in base")
                self.snapshot[name] = _prepare(name, t).clone()
            self.layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in self.snapshot.items()]
            self.version = base_version
        elif base_version is not None:
            raise ValueError("base_version given without base")

    @staticmethod
    def _check_version(v) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"version must be a non-negative int, got {v!r}")

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
            n = tp.new.numel()
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
                    cur.append(_SegPlan(tp, pos, pos + take, nchanged=take))
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
                cur.append(_SegPlan(tp, c * C, min(c1 * C, n), c, c1, int(tp.chunk_counts[c:c1].sum())))
                used += size + 64
                c = c1
        yield cur, True

    # -- encoding ---------------------------------------------------------------------------------------------------
    def encode(self, state, version: int, *, stream: bool = False) -> Update:
        """Encode ``state`` (Mapping or iterable of (name, tensor)) as version ``version``.

        The state must have the encoder's layout (names, dtypes, shapes). With ``stream=True`` the buckets are made
        as they are consumed (``update.iter_buckets()``) and the tensors in ``state`` must not change meanwhile; the
        next ``encode`` finishes an unfinished stream first.
        """
        self._check_version(version)
        if self._pending is not None and not self._pending.complete:
            self._pending.finish()
        t0 = time.perf_counter()
        full = self.snapshot is None
        items = []
        seen = set()
        for name, t in _as_items(state):
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r}")
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r} in state")
            seen.add(name)
            items.append((name, _prepare(name, t)))
        layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in items]
        if full:
            self.layout = layout
            self.snapshot = {}
        else:
            compare_layouts(self.layout, layout)
            if [n for n, *_ in layout] != [n for n, *_ in self.layout]:
                order = {n: i for i, (n, *_) in enumerate(self.layout)}
                items.sort(key=lambda kv: order[kv[0]])
        stats = UpdateStats(tensors=len(items))
        for name, t in items:
            stats.elements += t.numel()
            stats.dense_bytes += t.numel() * t.element_size()
            if full:
                self.snapshot[name] = t.clone() if self._copy_full else t
                stats.changed += t.numel()

        def plans():      # scanned lazily, tensor by tensor, as buckets are produced
            for name, t in items:
                tp = self._plan_tensor(name, self.snapshot[name] if full else t, full, stats)
                if tp is not None:
                    stats.tensors_changed += 1
                    yield tp
        ldig = layout_digest(self.layout)
        base = None if full else self.version
        uid = update_uid(ldig, base, version, self.values)
        stats.encode_seconds = time.perf_counter() - t0
        update = Update(base, version, uid, self.values, None, stats, None)
        update._gen = self._generate(update, self._pack(plans()), ldig)
        self.version = version
        self._pending = update
        if not stream:
            update.finish()
        return update

    def _encode_segment(self, sp: _SegPlan) -> tuple[Segment, list]:
        tp = sp.tp
        new_b = byte_view(tp.new)
        old = self.snapshot[tp.name]
        dense_len = (sp.end - sp.start) * tp.w
        shape, dt = tuple(tp.new.shape), name_of(tp.new.dtype)
        if tp.kind == "s":
            table, data, vhash, nch = impl().encode(byte_view(old), new_b, tp.w, self.mode, tp.log2c, sp.c0, sp.c1,
                                                    tp.freq, update_old=True, nchanged_hint=sp.nchanged)
            if nch != sp.nchanged:
                raise SparseSyncError(f"tensor {tp.name!r} changed between planning and encoding")
            if len(table) + len(data) < dense_len:
                return Segment(tp.name, dt, shape, "s", sp.start, sp.end, tp.log2c, len(table), 0,
                               len(table) + len(data), pack_freq(tp.freq), vhash, nch), [table, data]
            # sparse turned out larger than dense: send this range dense (the snapshot already holds the new values)
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
        while True:
            t1 = time.perf_counter()
            plan, last = next(packer)          # planning (scans) of the tensors in this bucket happens here
            segs, parts, off = [], [], 0
            for sp in plan:
                seg, data = self._encode_segment(sp)
                seg = Segment(**{**seg.__dict__, "off": off})
                off += seg.length
                segs.append(seg)
                parts.extend(data)
                if seg.kind == "d":
                    dense_names.add(sp.tp.name)
            body = b"".join(bytes(p) if not isinstance(p, (bytes, bytearray)) else p for p in parts)
            if last and self.want_digest:
                update.digest = state_digest(self.snapshot)
            header = Header(uid=update.uid, base=update.base_version, ver=update.version, vals=self.values, idx=i,
                            cnt=i + 1 if last else 0, layout=ldig, ntensors=len(self.layout),
                            digest=update.digest if last else None, body_len=len(body),
                            body_hash=impl().tree64(body), prev=prev, segs=tuple(segs))
            bucket = pack_bucket(header, body)
            prev = header_hash(bucket)
            stats.wire_bytes += len(bucket)
            stats.header_bytes += len(bucket) - len(body)
            stats.encode_seconds += time.perf_counter() - t1
            i += 1
            if last:
                stats.dense_tensors = len(dense_names)
                stats.buckets = i
                update.count = i
            yield bucket
            if last:
                return


def full_update(state, version: int, *, bucket_bytes: int | None = None, stream: bool = True) -> Update:
    """A full update of ``state`` made straight from its tensors (no copy): for catching up receivers and relays.

    With ``stream=True`` (default) buckets are made as they are consumed; ``state`` must not change meanwhile.
    """
    enc = Encoder(bucket_bytes=bucket_bytes)
    enc._copy_full = False
    return enc.encode(state, version, stream=stream)


# -------------------------------------------------------------------------------------------------------------------

@dataclass
class ApplyStats:
    base_version: int | None
    version: int
    buckets: int
    wire_bytes: int
    changed: int
    decode_seconds: float
    apply_seconds: float
    digest_verified: bool = False


@dataclass
class _Pending:
    header: Header
    last_hash: int
    next_idx: int = 1
    staged: list = field(default_factory=list)     # (tensor_name, kind, start, end, payload)
    ranges: dict = field(default_factory=dict)     # name -> list of (start, end)
    wire_bytes: int = 0
    changed: int = 0
    decode_seconds: float = 0.0
    digest: str | None = None
    count: int = 0


class Decoder:
    """Applies updates to ``state`` in place, all or nothing.

    ``state``: Mapping name -> contiguous CPU tensor (the receiver's weights). ``version``: the version it holds.
    ``verify_digest`` (default True): when an update carries the encoder's state digest (``Encoder(digest=True)``),
    recompute the digest after applying; on a mismatch the change is rolled back and :class:`BaseMismatch` is raised.
    Updates without a digest cost nothing extra.
    """

    def __init__(self, state, version: int = 0, *, verify_digest: bool = True):
        Encoder._check_version(version)
        self.state: dict[str, torch.Tensor] = {}
        for name, t in _as_items(state):
            check_tensor(name, t)
            if t.device.type != "cpu":
                raise ValueError(f"tensor {name!r} is on {t.device}; this Decoder applies to CPU tensors")
            if not t.is_contiguous():
                raise ValueError(f"tensor {name!r} is not contiguous; it cannot be updated in place")
            if name in self.state:
                raise ValueError(f"duplicate tensor name {name!r}")
            self.state[name] = t
        self.layout = [(n, name_of(t.dtype), tuple(t.shape)) for n, t in self.state.items()]
        self.layout_digest = layout_digest(self.layout)
        # names sharing storage (tied weights): their deltas must not be added twice, so they take the path that
        # computes new values while staging and writes them idempotently at commit
        owners: dict = {}
        for n, t in self.state.items():
            owners.setdefault(t.untyped_storage().data_ptr(), []).append(n)
        self._aliased = {n for names in owners.values() if len(names) > 1 for n in names}
        self.version = version
        self.verify_digest = verify_digest
        self._pending: _Pending | None = None
        self.last_stats: ApplyStats | None = None
        # staging buffers reused across updates (per bucket index): no fresh allocations in the steady state
        self._arena: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def pending(self) -> bool:
        """True while a partly received update is staged."""
        return self._pending is not None

    def abort(self) -> None:
        """Discard a partly received update (the state was never touched)."""
        self._pending = None

    def apply(self, update) -> ApplyStats:
        """Apply a whole update: an :class:`Update`, one bucket, or an iterable of buckets (in order).

        The tensors change only after every bucket verified and no bucket follows the last one.
        """
        if self._pending is not None:
            raise SparseSyncError("a partly received update is pending; call abort() first")
        if isinstance(update, Update):
            buckets = update.iter_buckets()
        elif isinstance(update, (bytes, bytearray, memoryview)):
            buckets = [update]
        else:
            buckets = update
        it = iter(buckets)
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
            self._pending = None

    def stage(self, bucket, *, owned: bool = False) -> bool:
        """Verify and stage one bucket without touching the tensors; True when the update is complete and verified,
        ready for :meth:`commit`. On error the partial update is discarded and the error raised."""
        try:
            return self._stage(bucket, owned)
        except BaseException:
            self._pending = None
            raise

    def commit(self) -> ApplyStats:
        """Apply a staged, complete update (after :meth:`stage` returned True)."""
        p = self._pending
        if p is None or not p.count:
            raise SparseSyncError("no complete update is staged")
        try:
            self._commit(p, p.digest)
        finally:
            self._pending = None
        return self.last_stats

    def feed(self, bucket, *, owned: bool = False) -> bool:
        """Stage one bucket; returns True when it completed (and applied) an update. On error nothing changes.

        ``owned=True`` promises that the caller will not modify ``bucket`` until the update is applied (its dense
        parts are then staged without a copy). Immutable ``bytes`` are never copied.
        """
        try:
            if not self._stage(bucket, owned):
                return False
            p = self._pending
            self._commit(p, p.digest)
            return True
        except BaseException:
            self._pending = None
            raise

    def _staging(self, i: int, count: int, nbytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-bucket staging (indices, values or differences, new values), reused across updates."""
        while len(self._arena) <= i:
            self._arena.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8),
                                torch.empty(0, dtype=torch.uint8)))
        idx, val, new = self._arena[i]
        if idx.numel() < count:
            idx = torch.empty(count, dtype=torch.int64)
        if val.numel() < nbytes:
            val, new = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        self._arena[i] = (idx, val, new)
        return idx, val, new

    def _check_layout(self, header: Header) -> None:
        if header.layout == self.layout_digest:
            return
        theirs = {s.name: (s.dtype, s.shape) for s in header.segs}
        for name, (dt, shape) in theirs.items():
            mine = self.state.get(name)
            if mine is None:
                raise LayoutMismatch(f"update has tensor {name!r}, which this decoder does not hold")
            if name_of(mine.dtype) != dt or tuple(mine.shape) != shape:
                raise LayoutMismatch(f"tensor {name!r}: update has {dt}{list(shape)}, decoder holds "
                                     f"{name_of(mine.dtype)}{list(mine.shape)}")
        raise LayoutMismatch(f"tensor sets differ: the update's layout has {header.ntensors} tensors, this decoder "
                             f"holds {len(self.state)}")

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
            if header.base is not None and header.base != self.version:
                raise VersionMismatch(f"update goes from version {header.base} to {header.ver}, decoder is at "
                                      f"version {self.version}")
            p = _Pending(header, hhash)
        else:
            h0 = p.header
            if (header.uid, header.base, header.ver, header.vals, header.layout) != \
                    (h0.uid, h0.base, h0.ver, h0.vals, h0.layout):
                raise CorruptPayload("bucket belongs to another update (foreign bucket)")
            if header.idx != p.next_idx:
                raise CorruptPayload(f"expected bucket {p.next_idx}, got {header.idx} (reordered or duplicated)")
            if header.prev != p.last_hash:
                raise CorruptPayload(f"bucket {header.idx} does not chain to bucket {header.idx - 1}")
            p.next_idx += 1
            p.last_hash = hhash
        mode = VALUE_MODES[header.vals]
        # 1. every segment against the receiver's tensors, before anything is allocated from header numbers
        for seg in header.segs:
            t = self.state.get(seg.name)
            if t is None or name_of(t.dtype) != seg.dtype or tuple(t.shape) != seg.shape:
                raise CorruptPayload(f"segment names tensor {seg.name!r} {seg.dtype}{list(seg.shape)}, which is not "
                                     "in the layout its header claims")
            for a, b in p.ranges.setdefault(seg.name, []):
                if seg.start < b and a < seg.end:
                    raise CorruptPayload(f"segments overlap in tensor {seg.name!r}")
            p.ranges[seg.name].append((seg.start, seg.end))
        # 2. staging (bounded by the receiver's own tensor sizes now), values 8-byte aligned per segment
        sparse = [(seg, width(BY_NAME[seg.dtype])) for seg in header.segs if seg.kind == "s"]
        arena_idx, arena_val, arena_new = self._staging(header.idx, sum(sg.nchanged for sg, _ in sparse),
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

    def _commit(self, p: _Pending, digest: str | None) -> None:
        """Write the staged update. Only the values-hash and digest checks can still fail here; both undo exactly."""
        t0 = time.perf_counter()
        verify = self.verify_digest and digest is not None
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
        if verify and state_digest(self.state) != digest:
            rollback()
            raise BaseMismatch(f"after applying version {p.header.ver} the state digest differs from the encoder's; "
                               "the update was rolled back")
        h0 = p.header
        self.version = h0.ver
        self._pending = None
        self.last_stats = ApplyStats(h0.base, h0.ver, p.count, p.wire_bytes, p.changed, p.decode_seconds,
                                     time.perf_counter() - t0, verify)
