"""SparsePusher: one object that turns a trainer's weight push into a sparse, exact one."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from ..codec import Encoder
from ..errors import InvalidArgument, InvalidType, VersionConflict
from .state import DtypeSpec, Plan, Rename, _cast_for, is_sender

log = logging.getLogger("sparsesync.trainer")


class SparsePusher:
    """Pushes a model's weights, in checkpoint coordinates, to receivers as sparse exact deltas.

    ``model``: an ``nn.Module`` (DDP / ``torch.compile`` wrappers are unwrapped; FSDP2 DTensor parameters are
    gathered), a Mapping of name -> live tensor, or a zero-argument callable returning a module, a Mapping or an
    iterable of (name, tensor) pairs, called at every push (e.g. a Megatron bridge's export of Hugging Face tensors).
    ``peers``, ``token`` and ``**sender_kwargs`` (``timeout``, ``quorum``, ``retain``, ``ssl_context``, ...) go to
    :class:`~sparsesync.Sender`; ``digest`` defaults to True here, so receivers prove they hold the exact bytes.
    ``rename``, ``tied``, ``dtype``: how trainer tensors become checkpoint tensors (see
    :func:`~sparsesync.trainer.checkpoint_state`).
    ``base``: the state the receivers start from, in checkpoint coordinates (default: the model's state now, which
    must equal the checkpoint the receivers loaded); ``base_version``: its version (default 0).
    ``sender_rank``: the global rank that sends when ``torch.distributed`` is initialised (default 0). Every rank
    constructs the pusher and calls :meth:`push` (gathering DTensors is a collective); only that rank connects and
    sends, the others return None.

    The Sender keeps one copy of the pushed state (its snapshot, to diff against) in host memory; a cast or gathered
    state is also materialised on the host for each push (see the README, "Wrap your trainer").
    """

    def __init__(self, model, peers: str | Sequence[str], *, token: str | bytes | None = None, rename: Rename = None,
                 tied: str = "once", dtype: DtypeSpec = None, base: Mapping | None = None, base_version: int = 0,
                 sender_rank: int = 0, digest: bool = True, **sender_kwargs):
        if isinstance(model, (str, bytes)) or not (isinstance(model, (torch.nn.Module, Mapping)) or callable(model)):
            raise InvalidType(f"SparsePusher takes an nn.Module, a Mapping of name -> tensor, or a callable returning "
                              f"one; got a {type(model).__name__}")
        from ..session import Sender
        Encoder._check_version(base_version)
        _cast_for(dtype)
        self._model = model
        self._rename, self._tied, self._dtype = rename, tied, dtype
        self.sends = is_sender(sender_rank)
        self.version = base_version
        # Every argument is checked on every rank before the first gather, so that a bad one raises on all ranks
        # alike instead of leaving the others waiting in a collective: the Sender's own arguments by a Sender
        # without a base (it neither copies nor connects), and rename / tied by planning.
        Sender(peers, token=token, digest=digest, **sender_kwargs)
        plan = self._plan()
        self.names = plan.names
        self.tied = dict(plan.tied)
        self.sender = None
        if base is None:
            base = self._gather(plan)
        if self.sends:
            self.sender = Sender(peers, token=token, base=base, base_version=base_version, digest=digest,
                                 **sender_kwargs)

    # -- public ----------------------------------------------------------------------------------------------------
    def push(self, version: int | None = None):
        """Push the model's current weights as ``version`` (default: the last version + 1); returns the
        :class:`~sparsesync.PushStats` on the sending rank and None on the others.

        Raises what :meth:`Sender.push` raises (on the sending rank): :class:`~sparsesync.VersionConflict` for a
        lower version, or the same version with other bytes; :class:`~sparsesync.PushFailed` when fewer than
        ``quorum`` peers hold the version (the version is then used: the next default is one higher). A version below
        the last one is refused on every rank before anything is gathered."""
        v = self.version + 1 if version is None else version
        Encoder._check_version(v)
        if v < self.version:
            raise VersionConflict(f"cannot push version {v}: version {self.version} was pushed already, and versions "
                                  "must increase (a version identifies bytes)")
        state = self._gather(self._plan())
        if self.sender is None:
            self.version = v
            return None
        try:
            return self.sender.push(state, v)
        finally:
            if self.sender.encoder.version is not None:
                self.version = self.sender.encoder.version

    def state(self) -> dict[str, torch.Tensor]:
        """The state the next push would send (checkpoint names; gathered, cast). With DTensors this is a collective
        that every rank must call."""
        return dict(self._plan().iterate(self._dtype, "cpu"))

    def connect(self) -> dict | None:
        """Connect to the peers now (handshake and digest check) instead of in the first push (sending rank)."""
        return self.sender.connect() if self.sender is not None else None

    def close(self) -> None:
        """Close the connections (sending rank; a no-op elsewhere)."""
        if self.sender is not None:
            self.sender.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        role = "sender" if self.sends else "gather-only rank"
        return f"SparsePusher({len(self.names)} tensors, version={self.version}, {role})"

    # -- internals -------------------------------------------------------------------------------------------------
    def _source(self):
        src = self._model
        if callable(src) and not isinstance(src, (torch.nn.Module, Mapping)):
            src = src()
        return src

    def _plan(self) -> Plan:
        plan = Plan(self._source(), self._rename, self._tied)
        names = getattr(self, "names", None)
        if names is not None and plan.names != names:
            gone, new = sorted(set(names) - set(plan.names)), sorted(set(plan.names) - set(names))
            raise InvalidArgument(f"the model's checkpoint names changed since the pusher was made: missing "
                                  f"{gone[:5]}, new {new[:5]}")
        return plan

    def _gather(self, plan: Plan):
        """(name, host tensor) pairs for the Sender, which needs them all at once (``Encoder.encode`` collects the
        whole state first: the layout is part of every bucket's header). Plain CPU tensors stay views (the encoder
        reads them in place). Accelerator tensors are cast there and moved to the host one at a time, and DTensors
        are gathered one at a time and moved before the next gather, so the accelerator holds at most one extra full
        tensor. Every gather finishes before any network I/O, so no rank waits on the wire inside a collective.
        Ranks that do not send only join the gathers."""
        if not self.sends:
            if plan.sharded:
                for _ in plan.iterate(self._dtype):
                    pass
            return None
        return list(plan.iterate(self._dtype, "cpu"))


def wrap(model, peers: str | Sequence[str], **kwargs) -> SparsePusher:
    """``pusher = sparsesync.trainer.wrap(model, peers, token=...)``, then ``pusher.push(step)`` after each optimizer
    step: the same as :class:`SparsePusher` (see there for the keyword arguments)."""
    return SparsePusher(model, peers, **kwargs)
