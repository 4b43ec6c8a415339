"""The engine side every integration shares: a host mirror in checkpoint coordinates, kept by a background receiver.

An inference engine (vLLM, SGLang, a verl rollout worker) holds its weights in its own runtime layout (fused,
sharded, repacked). sparsesync updates arrive in checkpoint (Hugging Face) coordinates, so every engine worker keeps a
**mirror**: name -> CPU tensor, exactly the checkpoint's tensors. A :class:`~sparsesync.Receiver` keeps the mirror
current in the background (received, verified and committed all-or-nothing while the engine generates); the engine
applies a version when its driver asks, by loading the tensors that changed through its own loader.

:class:`StagedMirror` is that shared part: the receiver, which mirror tensors changed since the version the engine
last applied, waiting for a version with a timeout and saying precisely why it cannot be applied, and the digest of
what the engine holds. The engine-specific part (how tensors reach the runtime parameters) stays with each
integration::

    sm = StagedMirror(mirror, listen="tcp://0.0.0.0:7000", token=TOKEN, version=0)
    sm.start()
    ...
    with sm.prepare(version, timeout=60, expand=whole_modules) as plan:   # no commit can happen inside
        if plan.problem:
            raise RuntimeError(plan.problem)                              # nothing was touched
        engine_load(plan.names)                                           # engine-specific
        sm.applied(plan)                                                  # now the engine holds plan.version

Memory: one CPU copy of the checkpoint per mirror (each engine worker that keeps one), plus the receiver's staging
of one update at a time (about the size of the update's changed tensors).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ..digest import state_digest
from ..errors import InvalidArgument
from ..session import Receiver

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What one apply will do, decided with the mirror held (no commit can change it meanwhile).

    ``version``: the version the mirror holds (the one asked for, unless ``problem``); ``changed``: mirror tensors
    written by updates since the engine's last applied version; ``names``: the tensors to load (``changed`` widened
    by the ``expand`` function, in mirror order; every tensor after a failed apply or the first full update into an
    adopted layout); ``problem``: why it cannot be applied (nothing may be touched then), else None; ``wait_s``:
    seconds spent waiting for the version; ``digest_verified``: the update(s) carried the trainer's state digest
    and it matched.
    """
    version: int
    changed: set = field(default_factory=set)
    names: list = field(default_factory=list)
    problem: str | None = None
    wait_s: float = 0.0
    digest_verified: bool | None = None


class StagedMirror:
    """A host mirror (name -> CPU tensor, checkpoint coordinates) kept current by a background
    :class:`~sparsesync.Receiver`, and the bookkeeping an engine needs to apply versions from it exactly.

    ``mirror``: the tensors the engine's weights were loaded from, at ``version``; with ``adopt_layout=True`` it may
    be an empty dict, filled by the first sender (see :class:`~sparsesync.Receiver`), and the engine's first apply
    then loads every tensor. ``listen``, ``token``, ``ssl_context``, ``stall_timeout``: the receiver's.
    ``require_digest``: refuse to apply a version whose update did not carry the trainer's state digest (senders
    made with ``digest=True`` carry it). ``status``: extra fields (a function returning a dict) for the status that
    every handshake reports; :func:`sparsesync.probe` reads it remotely.
    """

    def __init__(self, mirror: dict, *, listen: str, token: str | bytes | None, version: int = 0,
                 stall_timeout: float | None = None, require_digest: bool = False, adopt_layout: bool = False,
                 ssl_context=None, status: Callable[[], dict] | None = None, allow_unauthenticated: bool = False):
        if not isinstance(mirror, dict):
            raise InvalidArgument(f"mirror must be a dict of name -> CPU tensor, got {type(mirror).__name__}")
        if not mirror and not adopt_layout:
            raise InvalidArgument("mirror is empty: pass the checkpoint's tensors, or adopt_layout=True to take the "
                                  "first sender's layout")
        self.mirror = mirror
        self.version = version                 # the version the engine holds (applied)
        self.digest: str | None = state_digest(mirror) if mirror else None
        self.require_digest = bool(require_digest)
        self.broken: str | None = None         # an apply failed and recovery failed too: next apply loads everything
        self.error: str | None = None          # why the last apply failed (None after a success)
        self.last_update: dict = {}
        self._extra_status = status
        self._changed: set[str] = set()        # mirror tensors committed since the last applied version
        self._everything = not mirror          # adopted layout: the first apply loads every tensor
        self._verified: dict[int, bool] = {}   # version -> its update carried the digest and it matched
        self._committed_digest: tuple[int, str] | None = None
        self._lock = threading.Lock()          # one apply at a time
        kw = {} if stall_timeout is None else {"stall_timeout": float(stall_timeout)}
        self.receiver = Receiver(mirror, listen, token=token, version=version, on_commit=self._on_commit,
                                 adopt_layout=adopt_layout, ssl_context=ssl_context, status=self.status,
                                 allow_unauthenticated=allow_unauthenticated, **kw)

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> str:
        """Start receiving; returns the address (with the real port when port 0 was asked)."""
        self.receiver.start()
        return self.receiver.address

    def stop(self) -> None:
        self.receiver.stop()

    @property
    def address(self) -> str:
        return self.receiver.address

    @property
    def names(self) -> list[str]:
        """The mirror's tensor names, in mirror order."""
        return list(self.mirror)

    # -- apply --------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prepare(self, version: int, timeout: float, expand: Callable[[set], Iterable[str]] | None = None, *,
                exact: bool = False) -> Iterator[Plan]:
        """Wait up to ``timeout`` seconds until the mirror holds ``version`` (or a newer one, which is a problem;
        ``exact=True`` keeps waiting for exactly ``version``, for senders that may move receivers back), then hold it
        (no commit inside the block) and yield the :class:`Plan`. If ``plan.problem`` is set the engine must not
        touch its weights. Call :meth:`applied` inside the block once the engine holds the plan's tensors."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidArgument(f"version must be an int >= 0, got {version!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
            raise InvalidArgument(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        with self._lock:
            r = self.receiver
            t0 = time.perf_counter()
            arrived = r.wait_for(version, timeout, exact=exact)
            wait_s = time.perf_counter() - t0
            with r.hold() as held:
                plan = Plan(held, wait_s=wait_s)
                try:
                    plan.problem = self._problem(version, held, arrived, timeout)
                    if plan.problem is None:
                        plan.changed = set(self._changed)
                        plan.digest_verified = self._verified.get(held)
                        if self.broken is not None or self._everything:
                            plan.names = list(self.mirror)
                        else:
                            widened = set(expand(plan.changed)) if expand is not None else set(plan.changed)
                            plan.names = [n for n in self.mirror if n in widened]
                            missing = sorted(widened - set(self.mirror))
                            if missing:
                                plan.problem = (f"tensors {missing[:5]} are not in the mirror; nothing was applied")
                except Exception as exc:          # noqa: BLE001 - reported as the plan's problem
                    plan.problem = f"{type(exc).__name__}: {exc}"
                if plan.problem is not None:
                    self.error = plan.problem
                yield plan

    def applied(self, plan: Plan, **figures) -> None:
        """The engine now holds ``plan.version`` (call inside :meth:`prepare`'s block). ``figures`` are kept in
        ``last_update`` (timings, counts)."""
        self._changed.clear()
        self._everything = False
        self.broken = None
        self.error = None
        self.version = plan.version
        cached = self._committed_digest
        self.digest = cached[1] if cached is not None and cached[0] == plan.version else state_digest(self.mirror)
        self.last_update = {"version": plan.version, "changed_tensors": len(plan.changed),
                            "loaded_tensors": len(plan.names), "wait_s": round(plan.wait_s, 4),
                            "digest": self.digest, "digest_verified": plan.digest_verified, **figures}

    def failed(self, plan: Plan, message: str, *, consistent: bool) -> None:
        """An apply of ``plan`` failed. ``consistent``: the engine still holds exactly what it held before (or was
        brought to ``plan.version`` some other way: then call :meth:`applied` instead); False marks the engine
        broken: the next apply loads every tensor."""
        self.error = message
        if not consistent:
            self.broken = message

    # -- status -------------------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """What this engine worker holds: ``applied_version`` and ``digest`` (state digest of the engine's weights in
        checkpoint coordinates, equal to the trainer's ``state_digest`` of that version), the receiver's version
        (received, maybe not applied yet), the last apply's figures, and ``error`` / ``broken`` when an apply
        failed. Sent in every handshake (:func:`sparsesync.probe`)."""
        out = {"pid": os.getpid(), "applied_version": self.version, "digest": self.digest,
               "error": self.error, "broken": self.broken, "tensors": len(self.mirror),
               "last_update": dict(self.last_update)}
        if self._extra_status is not None:
            out.update(self._extra_status())
        return out

    def refusal(self) -> str:
        """The receiver's most recent errors (refused updates, ended connections), for error messages."""
        errs = list(self.receiver.errors)[-3:]
        if not errs:
            return "; the receiver has refused nothing"
        return "; the receiver's most recent errors (newest last): " + " | ".join(errs)

    # -- internals ----------------------------------------------------------------------------------------------------
    def _problem(self, want: int, held: int, arrived: bool, timeout: float) -> str | None:
        if not arrived:
            return (f"version {want} did not arrive within {timeout:g} s at {self.receiver.address}; the receiver "
                    f"holds version {held} and the engine applies version {self.version}{self.refusal()}")
        if held != want:
            return (f"version {want} was asked, but the receiver already holds version {held} (a newer push arrived "
                    f"before this apply); an apply takes exactly the requested version: ask for version {held}")
        if not self.mirror:
            return f"version {want}: the mirror is still empty (no sender has given it a layout)"
        if self.require_digest and not self._verified.get(held, held == self.version and self.digest is not None):
            return (f"version {want} arrived without a verified state digest (require_digest=True): push with "
                    "Sender(digest=True)")
        return None

    def _on_commit(self, version: int, stats) -> None:
        """Receiver thread, commit lock held: note what changed and keep the digest the decoder verified."""
        if stats.kind == "full" and not stats.tensors:
            self._everything = True
        self._changed.update(stats.tensors)
        self._committed_digest = (version, stats.digest if stats.digest is not None else state_digest(self.mirror))
        self._verified[version] = bool(getattr(stats, "digest_verified", False))
        if len(self._verified) > 64:
            for v in sorted(self._verified)[:-64]:
                del self._verified[v]


def offset_port(listen: str, k: int) -> str:
    """The address of engine worker ``k`` of a node: ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+k`` (worker 0 keeps
    it; port 0, meaning a free port, and other schemes are kept as they are)."""
    if k == 0 or not listen.startswith("tcp://"):
        return listen
    host, _, port = listen[len("tcp://"):].rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return listen
    return f"tcp://{host}:{int(port) + k}"


def describe_problems(problems: list[tuple[int, str]], single: bool, label: str = "rank") -> str:
    """One message for the problems of the workers of an engine, ``[(rank, message), ...]``: the message alone for a
    single worker, else each distinct message with the ranks that had it."""
    if single and len(problems) == 1:
        return problems[0][1]
    msgs: dict[str, list[int]] = {}
    for rk, p in problems:
        msgs.setdefault(p, []).append(rk)
    return "; ".join(f"{label} {','.join(map(str, rks))}: {p}" for p, rks in msgs.items())
