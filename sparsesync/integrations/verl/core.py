"""The verl-independent parts of the ``sparsesync`` checkpoint-engine backend: options, token and version rules,
the topology, and which tensors a rollout loads. Imports neither verl nor ray (the unit tests run it without them);
:mod:`sparsesync.integrations.verl.backend` wires it into verl's ``CheckpointEngine``.
"""
from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import InvalidArgument, InvalidType

#: The packed (fused) modules of Llama-style models in vLLM / SGLang: a change to one of the parts reloads all.
STANDARD_PACKED: dict[str, list[str]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                         "gate_up_proj": ["gate_proj", "up_proj"]}
LOAD_MODES = ("modules", "changed", "all")
TOKEN_ENV = "SPARSESYNC_TOKEN"
DEFAULT_LISTEN = "tcp://{host}:0"
ROLE_ACTOR, ROLE_ROLLOUT = "actor", "rollout"


class WeightSyncError(RuntimeError):
    """A rollout could not load the requested version (it did not arrive in time, the receiver refused it, a newer
    one is already there, or its digest was not verified). The rollout's weights and the mirror are unchanged."""


@dataclass
class Options:
    """``rollout.checkpoint_engine.engine_kwargs.sparsesync`` (the same dict reaches the actor and the rollout side).

    ``token`` / ``token_file``: the shared secret (8+ characters); else env ``SPARSESYNC_TOKEN``; else a secret the
    driver generates once per run and hands to both sides through the topology (see :func:`topology_token`).
    ``listen``: the rollout receiver's address (default ``tcp://<this host's IP>:0``: a free port; a wildcard host
    such as ``0.0.0.0`` is advertised as this host's IP). ``timeout``: seconds a push, and a rollout's wait for its
    version, may take (default 300). ``load``: which tensors a rollout hands to its server adapter after a sparse
    update: ``modules`` (default: every tensor of each runtime module that changed, fused projections whole),
    ``changed`` (only changed tensors; for adapters that load tensor by tensor), ``all``. ``packed``: fused module ->
    checkpoint parts for ``modules`` (default :data:`STANDARD_PACKED`). ``dtype``: cast floating tensors to this
    dtype before sending (e.g. ``"bfloat16"``; default: as verl yields them). ``device``: copy each loaded tensor to
    this device before yielding it (default: yield the host mirror's tensors). ``quorum``: rollout receivers that must
    hold each version for the push to succeed (default ``"all"``). ``require_digest``: a rollout loads only updates
    whose digest it verified (default True; the actor always sends digests). ``stall_timeout``: seconds a receiver
    waits on a silent sender mid-update. ``compress``, ``streams``, ``connect_timeout``: see ``sparsesync.Sender``.
    ``allow_rollback`` (default True): the actor may move rollouts to a lower version than they hold (a trainer
    resumed from an earlier checkpoint while the rollout workers kept running; the trainer's step is the
    authority); False refuses such pushes (``RollbackRefused``).
    """
    token: str | None = None
    token_file: str | None = None
    listen: str | None = None
    timeout: float = 300.0
    load: str = "modules"
    packed: dict = field(default_factory=lambda: {k: list(v) for k, v in STANDARD_PACKED.items()})
    dtype: Any = None
    device: str | None = None
    quorum: Any = "all"
    require_digest: bool = True
    stall_timeout: float | None = None
    compress: bool = False
    streams: int = 1
    connect_timeout: float = 10.0
    allow_rollback: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "Options":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgument(f"unknown sparsesync checkpoint-engine option(s) {unknown}; "
                                  f"known: {sorted(known)}")
        o = cls(**dict(kwargs))
        o.validate()
        return o

    def validate(self) -> None:
        if self.load not in LOAD_MODES:
            raise InvalidArgument(f"load must be one of {list(LOAD_MODES)}, got {self.load!r}")
        for name in ("timeout", "connect_timeout") + (("stall_timeout",) if self.stall_timeout is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidArgument(f"{name} must be a number of seconds > 0, got {v!r}")
        if not isinstance(self.packed, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Sequence) and not isinstance(v, str)
                and all(isinstance(p, str) for p in v) for k, v in self.packed.items()):
            raise InvalidArgument(f"packed must map a fused module name to a list of part names, got {self.packed!r}")
        if not isinstance(self.allow_rollback, bool):
            raise InvalidArgument(f"allow_rollback must be true or false, got {self.allow_rollback!r}")
        if self.token is not None and self.token_file is not None:
            raise InvalidArgument("give token or token_file, not both")
        if self.listen is not None and (not isinstance(self.listen, str) or not self.listen.startswith("tcp://")):
            raise InvalidArgument(f"listen must be a tcp://HOST:PORT address, got {self.listen!r}")
        if self.quorum != "all" and (isinstance(self.quorum, bool) or not isinstance(self.quorum, int)
                                     or self.quorum < 0):
            raise InvalidArgument(f"quorum must be 'all' or an int >= 0, got {self.quorum!r}")
        torch_dtype(self.dtype)

    def packed_mapping(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.packed.items()}


def torch_dtype(spec):
    """``None``, a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.bfloat16"``) -> ``torch.dtype`` or None."""
    if spec is None:
        return None
    import torch
    if isinstance(spec, torch.dtype):
        return spec
    if isinstance(spec, str):
        d = getattr(torch, spec.removeprefix("torch."), None)
        if isinstance(d, torch.dtype):
            return d
        raise InvalidArgument(f"dtype {spec!r} is not a torch dtype name")
    raise InvalidType(f"dtype must be None, a torch.dtype or its name, got {spec!r}")


# -- token ---------------------------------------------------------------------------------------------------------
def resolve_token(opts: Options, environ: Mapping[str, str] | None = None) -> str | None:
    """The configured secret of this worker: ``token``, else the contents of ``token_file`` (surrounding whitespace
    stripped), else env ``SPARSESYNC_TOKEN``; None when none is given (the driver then generates one)."""
    from ...wire import token_bytes
    env = os.environ if environ is None else environ
    if opts.token is not None:
        tok, where = opts.token, "token"
    elif opts.token_file is not None:
        try:
            with open(opts.token_file, encoding="utf-8") as f:
                tok = f.read().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read token_file {opts.token_file!r}: {exc.strerror or exc}") from None
        where = f"token_file {opts.token_file!r}"
    elif env.get(TOKEN_ENV):
        tok, where = env[TOKEN_ENV], f"env {TOKEN_ENV}"
    else:
        return None
    try:
        token_bytes(tok)
    except (InvalidArgument, InvalidType) as exc:
        raise InvalidArgument(f"sparsesync secret from {where}: {exc}") from None
    return tok


_RUN_TOKEN: list[str] = []     # the secret generated by this (driver) process, reused by every later topology


def topology_token(metadata: Sequence[Mapping]) -> str | None:
    """The secret ``build_topology`` hands to every worker: None when every worker has one configured (each uses
    its own), a per-run secret generated once in the driver process when none has; a mix raises (a worker without
    a secret could not talk to one with a configured secret)."""
    have = [bool(m.get("token_configured")) for m in metadata]
    if all(have):
        return None
    if any(have):
        missing = [i for i, h in enumerate(have) if not h]
        raise InvalidArgument(f"workers {missing} (in prepare() order: actor ranks, then rollout ranks) have no "
                              f"sparsesync token while the others have one: configure token / token_file / "
                              f"{TOKEN_ENV} for all of them, or for none (then the driver generates one per run)")
    if not _RUN_TOKEN:
        _RUN_TOKEN.append(secrets.token_urlsafe(32))
    return _RUN_TOKEN[0]


# -- versions ------------------------------------------------------------------------------------------------------
def next_version(global_steps: int | None, last: int) -> int:
    """The sparsesync version of a sync: ``global_steps + 1`` (version 0 is the rollout's empty mirror, so verl's
    first sync, step 0, must be a new version). ``global_steps=None`` re-syncs the version of the last sync
    (``last``; version 1 when there was none): verl 0.9.1 passes None only to wake replicas after
    ``sleep_replicas()`` with unchanged weights, between syncs that do pass the step, so a counter of its own would
    collide with the next step's version. The actor pushes the same bytes again (a changed state under None is
    refused: pass ``global_steps`` for new weights) and the rollout reloads every tensor. ``last``: the version this
    engine sent / loaded last (0 before the first)."""
    if global_steps is None:
        return max(last, 1)
    if isinstance(global_steps, bool) or not isinstance(global_steps, int) or global_steps < 0:
        raise InvalidArgument(f"global_steps must be an int >= 0 or None, got {global_steps!r}")
    return global_steps + 1


# -- addresses and topology ----------------------------------------------------------------------------------------
def host_ip() -> str:
    """This host's IP as other hosts reach it: Ray's node IP when ray is importable, else the address of the
    interface that routes outwards, else loopback."""
    try:
        import ray.util
        return ray.util.get_node_ip_address().strip("[]")
    except Exception:     # noqa: BLE001 - no ray, or no ray node: fall back
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))       # no packet is sent; only picks the outward interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def listen_address(listen: str | None, ip: str | None = None) -> str:
    """The address a rollout receiver binds (``listen``, default this host's IP with a free port)."""
    if listen is None:
        ip = ip or host_ip()
        return DEFAULT_LISTEN.format(host=f"[{ip}]" if ":" in ip else ip)
    return listen


def advertised(bound: str, ip: str | None = None) -> str:
    """The address senders dial for a receiver bound to ``bound`` (a wildcard host becomes this host's IP)."""
    from ...wire import parse_url
    _, host, port = parse_url(bound)
    if host in ("0.0.0.0", "::", ""):
        host = ip or host_ip()
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def build_topology(actor_world_size: int, rollout_world_size: int, metadata: Sequence[Mapping]
                   ) -> tuple[dict[str, list], dict[str, list]]:
    """verl's ``build_topology``: ``metadata`` is what ``prepare()`` returned on every actor rank, then on every
    rollout rank. One actor rank sends (the one constructed with ``is_master=True``: verl's actor rank 0) to every
    rollout receiver; the other actor ranks only walk verl's weight generator (it may be a collective)."""
    for name, v in (("actor_wg_world_size", actor_world_size), ("rollout_world_size", rollout_world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgument(f"{name} must be an int >= 1, got {v!r}")
    if len(metadata) != actor_world_size + rollout_world_size:
        raise InvalidArgument(f"build_topology got {len(metadata)} metadata entries for {actor_world_size} actor "
                              f"and {rollout_world_size} rollout workers")
    for i, m in enumerate(metadata):
        want = ROLE_ACTOR if i < actor_world_size else ROLE_ROLLOUT
        if not isinstance(m, Mapping) or m.get("role") != want:
            raise InvalidArgument(f"metadata[{i}] should come from a {want} engine, got {m!r} (the actor side is the "
                                  "engine verl constructs with is_master=True/False, the rollout side the one "
                                  "without is_master)")
    actors, rollouts = metadata[:actor_world_size], metadata[actor_world_size:]
    masters = [i for i, m in enumerate(actors) if m.get("is_master")]
    if len(masters) != 1:
        raise InvalidArgument(f"exactly one actor rank must be constructed with is_master=True, got ranks {masters}")
    peers = [m.get("address") for m in rollouts]
    for i, a in enumerate(peers):
        if not isinstance(a, str) or not a.startswith("tcp://"):
            raise InvalidArgument(f"rollout worker {i} reported no receiver address: {a!r}")
    if len(set(peers)) != len(peers):
        raise InvalidArgument(f"rollout workers report duplicate receiver addresses: {peers}")
    token = topology_token(metadata)
    actor_kwargs = {"rank": list(range(actor_world_size)),
                    "sends": [i == masters[0] for i in range(actor_world_size)],
                    "peers": [list(peers) for _ in range(actor_world_size)],
                    "token": [token] * actor_world_size}
    rollout_kwargs = {"rank": list(range(rollout_world_size)),
                      "token": [token] * rollout_world_size}
    return actor_kwargs, rollout_kwargs


# -- what a rollout loads ------------------------------------------------------------------------------------------
def names_to_load(load: str, changed, all_names: Sequence[str], packed: Mapping[str, Sequence[str]] | None,
                  first: bool) -> list[str]:
    """The mirror tensors a rollout hands to its server adapter, in mirror order: every tensor on the ``first``
    load (the rollout may hold dummy weights) and for ``load="all"``; the changed tensors for ``"changed"``; every
    tensor of each runtime module holding a changed tensor for ``"modules"`` (see
    :func:`sparsesync.integrations.vllm.groups.expand`)."""
    if load not in LOAD_MODES:
        raise InvalidArgument(f"load must be one of {list(LOAD_MODES)}, got {load!r}")
    if first or load == "all":
        return list(all_names)
    changed = set(changed)
    if load == "changed":
        return [n for n in all_names if n in changed]
    from ..vllm.groups import expand
    return expand(changed, all_names, packed)


def recent_errors(receiver, n: int = 3) -> str:
    """The receiver's last ``n`` errors, for error messages."""
    errs = list(getattr(receiver, "errors", []) or [])[-n:]
    return "; ".join(str(e) for e in errs) if errs else "none"
