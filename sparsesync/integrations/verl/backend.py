"""The ``sparsesync`` checkpoint engine for verl (imports verl; see :mod:`sparsesync.integrations.verl` for usage).

verl imports this module on every worker through ``rollout.checkpoint_engine.custom_backend_module`` and then builds
``CheckpointEngineRegistry.new("sparsesync", bucket_size=..., [is_master=...,] **engine_kwargs["sparsesync"])``:
the actor worker passes ``is_master`` (True on its rank 0), the rollout ``CheckpointEngineWorker`` does not. That is
how an engine knows its side before anything else happens.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any

import torch
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry

from ...errors import InvalidArgument, PushFailed, SparseSyncError, VersionConflict
from ...wire import token_bytes
from . import core
from .core import Options, WeightSyncError

log = logging.getLogger(__name__)

__all__ = ["SparseSyncCheckpointEngine", "WeightSyncError"]


@CheckpointEngineRegistry.register("sparsesync")
class SparseSyncCheckpointEngine(CheckpointEngine):
    """Sparse, bit-exact weight sync from verl's actor to its rollout workers over TCP (see the package docs).

    ``bucket_size``: verl's ``update_weights_bucket_megabytes`` in bytes (unused: sparsesync buckets its own
    stream). ``is_master``: given by verl's actor worker only (True on the actor rank that sends); its absence
    makes this engine a rollout-side engine. ``**engine_kwargs``: :class:`~sparsesync.integrations.verl.core.Options`.
    """

    wire_format = "named_tensors"

    def __init__(self, bucket_size: int | None = None, is_master: bool | None = None, **engine_kwargs: Any) -> None:
        self.bucket_size = bucket_size
        self.opts = Options.from_kwargs(engine_kwargs)
        self.role = core.ROLE_ROLLOUT if is_master is None else core.ROLE_ACTOR
        self.is_master = bool(is_master)
        self.token = core.resolve_token(self.opts)
        self.dtype = core.torch_dtype(self.opts.dtype)
        self.rank: int | None = None
        self.last_version = 0             # the version this engine sent (actor) or loaded (rollout) last
        # actor side
        self.sends = False
        self.sender = None
        self._sender_key: tuple | None = None
        self.last_stats = None
        # rollout side
        self.mirror: dict[str, torch.Tensor] = {}
        self.staged = None
        self.address: str | None = None

    # -- verl's CheckpointEngine ----------------------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Actor: says which rank sends. Rollout: starts the receiver and its host mirror (first call only; both
        persist across steps) and reports its address."""
        if self.role == core.ROLE_ACTOR:
            return {"role": self.role, "is_master": self.is_master, "token_configured": self.token is not None}
        if self.staged is None:
            from ..staging import StagedMirror
            # Without a configured secret the receiver starts with a random one nobody knows, replaced by the
            # run's secret in init_process_group before any sender is told this address.
            tok = self.token if self.token is not None else secrets.token_urlsafe(32)
            staged = StagedMirror(self.mirror, listen=core.listen_address(self.opts.listen), token=tok, version=0,
                                  stall_timeout=self.opts.stall_timeout, require_digest=self.opts.require_digest,
                                  adopt_layout=True)
            staged.start()
            self.staged = staged
            self.address = core.advertised(staged.address)
            log.info("sparsesync rollout receiver listening on %s (advertised %s)", staged.address, self.address)
        return {"role": self.role, "address": self.address, "token_configured": self.token is not None}

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
        return core.build_topology(actor_wg_world_size, rollout_world_size, metadata)

    def init_process_group(self, rank: int, token: str | None = None, sends: bool = False,
                           peers: list[str] | None = None) -> None:
        """Actor: the sending rank (re)builds its Sender when the rollout addresses or the secret changed (the new
        Sender starts from the old one's snapshot, so peers it already fed get deltas and new peers a full update).
        Rollout: adopts the run's secret when none is configured."""
        self.rank = rank
        if self.token is None and token is None:
            raise InvalidArgument("no sparsesync secret: none is configured on this worker and the topology carries "
                                  "none")
        tok = self.token if self.token is not None else token
        if self.role == core.ROLE_ROLLOUT:
            if self.staged is None:
                raise InvalidArgument("init_process_group before prepare() on a rollout engine")
            self.staged.receiver.token = token_bytes(tok)
            return
        self.sends = bool(sends)
        if not self.sends:
            return
        if not peers:
            raise InvalidArgument(f"the sending actor rank {rank} got no rollout addresses: {peers!r}")
        key = (tuple(peers), tok)
        if self.sender is not None and key == self._sender_key:
            return
        from ...session import Sender
        base = base_version = None
        if self.sender is not None:
            base, base_version = self.sender.encoder.snapshot, self.sender.encoder.version
            self.sender.close()
            log.info("sparsesync: rollout addresses changed; new peers get a full update")
        quorum = len(peers) if self.opts.quorum == "all" else min(self.opts.quorum, len(peers))
        self.sender = Sender(list(peers), token=tok, base=base, base_version=base_version, digest=True,
                             timeout=self.opts.timeout, connect_timeout=self.opts.connect_timeout, quorum=quorum,
                             compress=self.opts.compress, streams=self.opts.streams, progress=False,
                             allow_rollback=self.opts.allow_rollback)
        self._sender_key = key

    def finalize(self) -> None:
        """Per step: nothing to free (the receiver, the mirror and the Sender's snapshot are the next step's base;
        :meth:`shutdown` releases them)."""

    @torch.no_grad()
    async def send_weights(self, weights, global_steps: int | None = None) -> dict[str, float]:
        """Every actor rank walks ``weights`` (verl's per-tensor generator; producing a tensor may be a collective);
        the sending rank copies each tensor to the host (cast to ``dtype`` if set) and pushes them as version
        ``global_steps + 1``, or the last version again for ``global_steps=None`` (see
        :func:`~sparsesync.integrations.verl.core.next_version`). Returns the push's
        figures on the sending rank (verl merges them into the step's metrics), ``{}`` elsewhere."""
        if self.role != core.ROLE_ACTOR:
            raise InvalidArgument("send_weights on a rollout-side sparsesync engine (it was built without is_master)")
        version = core.next_version(global_steps, self.last_version)
        keep = self.sends
        if keep and self.sender is None:
            raise InvalidArgument("send_weights before init_process_group on the sending actor rank")
        t0 = time.perf_counter()
        state: dict[str, torch.Tensor] = {}
        async for name, t in _aiter(weights):
            if not keep:
                continue
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise InvalidArgument(f"verl's weight generator yielded ({type(name).__name__}, "
                                      f"{type(t).__name__}), not (str, torch.Tensor)")
            if name in state:
                raise InvalidArgument(f"verl's weight generator yielded {name!r} twice")
            t = t.detach()
            if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)
            state[name] = t.to("cpu", copy=True).contiguous()
        if not keep:
            self.last_version = version
            return {}
        gather_s = time.perf_counter() - t0
        try:
            stats = await asyncio.to_thread(self.sender.push, state, version)
        except PushFailed as exc:
            raise WeightSyncError(f"sparsesync push of version {version} (verl global_steps={global_steps}) "
                                  f"failed: {exc}") from exc
        except VersionConflict as exc:
            hint = (" (global_steps=None re-syncs the last sync's weights; pass global_steps for new weights)"
                    if global_steps is None else "")
            raise WeightSyncError(f"sparsesync push of version {version} (verl global_steps={global_steps}) "
                                  f"refused: {exc}{hint}") from exc
        self.last_version = version
        self.last_stats = stats
        return {"sparsesync/version": float(version), "sparsesync/full": float(stats.kind == "full"),
                "sparsesync/changed": float(stats.changed), "sparsesync/update_bytes": float(stats.wire_bytes),
                "sparsesync/sent_bytes": float(stats.sent_bytes), "sparsesync/dense_bytes": float(stats.dense_bytes),
                "sparsesync/encode_s": float(stats.encode_s), "sparsesync/push_s": float(stats.total_s),
                "sparsesync/gather_s": float(gather_s), "sparsesync/peers_ok": float(stats.succeeded)}

    @torch.no_grad()
    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        """Waits (up to ``timeout``) until this rollout's mirror holds version ``global_steps + 1``, then yields
        ``(name, tensor)`` for what changed since the version this engine last loaded (widened per ``load``;
        everything on the first load and when the same version is asked again, e.g. ``global_steps=None``). The mirror cannot change while the
        pairs are consumed. Raises :class:`WeightSyncError` naming the version, the address and the receiver's
        recent errors when the version cannot be loaded; nothing is yielded then."""
        if self.role != core.ROLE_ROLLOUT or self.staged is None:
            raise InvalidArgument("receive_weights needs a rollout-side sparsesync engine after prepare()")
        version = core.next_version(global_steps, self.last_version)
        sm, opts = self.staged, self.opts
        deadline = time.monotonic() + opts.timeout
        # wait off the event loop; the hold below then finds the version (or the problem) at once
        where = f"sparsesync rollout {self.address} (rank {self.rank})"
        # exactly this version: the actor is the authority and may move the rollouts back (a resumed trainer)
        if not await asyncio.to_thread(lambda: sm.receiver.wait_for(version, opts.timeout, exact=True)):
            raise WeightSyncError(f"{where}: version {version} (verl global_steps={global_steps}) did not arrive "
                                  f"within {opts.timeout:g} s; the receiver holds version {sm.receiver.version} and "
                                  f"the rollout keeps version {sm.version}{sm.refusal()}")
        again = version == sm.version and sm.version > 0 and not sm.broken

        def expand(changed: set) -> list[str]:      # called with the mirror held
            return core.names_to_load(opts.load, changed, sm.names, opts.packed_mapping(), first=again)

        with sm.prepare(version, max(0.0, deadline - time.monotonic()), expand=expand, exact=True) as plan:
            if plan.problem is not None:
                raise WeightSyncError(f"{where}: cannot load version {version} (verl global_steps={global_steps}): "
                                      f"{plan.problem}; the rollout keeps version {sm.version}"
                                      + _refusal(sm, plan.problem))
            load = list(sm.names) if again else plan.names
            device = opts.device
            sent = 0
            try:
                for name in load:
                    t = sm.mirror[name]
                    yield name, (t if device is None else t.to(device))
                    sent += 1
            except BaseException as exc:
                # the adapter may hold part of this version: the next load sends every tensor
                sm.failed(plan, f"loading version {version} stopped after {sent}/{len(load)} tensors: "
                          f"{type(exc).__name__}: {exc}", consistent=sent == 0)
                raise
            sm.applied(plan, loaded=len(load))
        self.last_version = version

    # -- extras -------------------------------------------------------------------------------------------------------
    @property
    def digest(self) -> str | None:
        """Rollout: the state digest of the mirror at the version last loaded (equals the trainer's
        ``state_digest`` of that version)."""
        return None if self.staged is None else self.staged.digest

    def status(self) -> dict:
        if self.staged is not None:
            return {"role": self.role, "address": self.address, **self.staged.status()}
        return {"role": self.role, "sends": self.sends, "version": self.last_version,
                "last_push": None if self.last_stats is None else str(self.last_stats)}

    def shutdown(self) -> None:
        """Stop the receiver / close the Sender (idempotent; also run when the engine is garbage collected)."""
        staged, self.staged = getattr(self, "staged", None), None
        sender, self.sender = getattr(self, "sender", None), None
        for what, close in ((staged, "stop"), (sender, "close")):
            if what is not None:
                try:
                    getattr(what, close)()
                except (SparseSyncError, OSError) as exc:      # best effort at shutdown
                    log.warning("sparsesync shutdown: %s", exc)

    def __del__(self):
        try:
            self.shutdown()
        except Exception:      # noqa: BLE001 - never raise from __del__ (interpreter shutdown)
            pass


def _refusal(sm, problem: str) -> str:
    r = sm.refusal()
    return "" if r in problem else r


async def _aiter(weights):
    if hasattr(weights, "__aiter__"):
        async for item in weights:
            yield item
    else:
        for item in weights:
            yield item
