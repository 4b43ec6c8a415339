"""The trainer side of the ``sparsesync`` backend, through vLLM's own ``WeightTransferTrainerFactory``.

    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory, HTTPVLLMWeightSyncClient
    from sparsesync.integrations.vllm.trainer import SparseSyncTrainerInitInfo

    client = HTTPVLLMWeightSyncClient("http://rollout-0:8000")          # or any VLLMWeightSyncClient
    engine = WeightTransferTrainerFactory.trainer_init(
        SparseSyncTrainerInitInfo(peers=["tcp://rollout-0:7000"], token=TOKEN, base_version=0,
                                  base_checkpoint=CKPT_DIR,            # the checkpoint the engine loaded
                                  listen="tcp://0.0.0.0:7000",         # optional: also init the engine side
                                  rank=0),
        client=client)
    for step in ...:
        ...; optimizer.step()
        engine.send_weights(model, version=step)   # sparse push, then start / update_weights / finish on vLLM

``send_weights(state=None, version=None)``: ``state`` is what :class:`sparsesync.trainer.SparsePusher` takes (an
``nn.Module``, a Hugging Face model, a Mapping of checkpoint names to tensors, or a callable returning one; FSDP2
DTensors are gathered per tensor); None means the ``source`` given to ``trainer_init`` (a ``ModuleSource`` pushes its
module, any other ``WeightSource`` its ``(name, tensor)`` pairs) or the state of the previous call. ``version``
defaults to the last version + 1. It pushes the state as a sparse exact delta to every peer (each engine worker's
receiver stages and verifies it in the background), then drives the engine through ``client``:
``start_weight_update()``, ``update_weights({"version": v, "timeout": update_timeout})`` (applies exactly ``v``),
``finish_weight_update(weight_version=str(v))``, and ``reset_prefix_cache()`` where the client has it (vLLM keeps KV
computed under the old weights; ``VLLMWeightSyncClient`` has no such method, so with vLLM's HTTP / Ray clients call
the server's ``/reset_prefix_cache`` yourself). Returns the :class:`~sparsesync.PushStats` (None on other ranks).

Multi-rank trainers: ``trainer_init`` and ``send_weights`` run on every rank (DTensor gathers are collectives);
only ``init_info.rank == 0`` talks to the engines (``is_sender``), and it must be ``torch.distributed``'s
``sender_rank`` (default 0), which is the rank the pusher sends from.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

from ...errors import PushFailed
from . import BACKEND

log = logging.getLogger(__name__)

try:
    from typing import Self
except ImportError:                     # Python < 3.11
    from typing_extensions import Self


@dataclass
class SparseSyncTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info of the ``sparsesync`` backend (plus the keyword-only ``rank`` of vLLM's base class).

    - ``peers``: the ``tcp://host:port`` receivers of every engine worker (with tensor parallelism: one per rank, on
      ``listen`` port + local rank).
    - ``token`` or ``token_file``: the shared secret (the engine side's ``init_info`` uses the same).
    - ``base_version``: the version the engines hold now (their checkpoint's, usually 0).
    - ``base_checkpoint``: a safetensors checkpoint directory (or file) equal to what the engines hold at
      ``base_version``. Without it the base is the state of the ``source`` at ``trainer_init`` (which must then
      equal the engines' weights); one of the two is required.
    - ``digest`` (default True): every push carries the state digest and each receiver proves it holds those bytes.
    - ``listen``: when set, ``trainer_init`` also initialises the engine side through the client
      (``init_weight_transfer_engine({"listen": listen, "token"/"token_file": ..., "version": base_version})``);
      leave None when the engines were initialised already.
    - ``update_timeout``: seconds ``update_weights`` waits for the pushed version on the engine (default 60).
    - ``rename``, ``tied``, ``dtype``: how trainer tensors become checkpoint tensors
      (:func:`sparsesync.trainer.checkpoint_state`); ``sender_kwargs``: more :class:`~sparsesync.Sender` arguments
      (``timeout``, ``quorum``, ``ssl_context``, ...).
    """

    backend: ClassVar[str] = BACKEND

    peers: list = field(default_factory=list)
    token: str | None = None
    token_file: str | None = None
    base_version: int = 0
    digest: bool = True
    base_checkpoint: str | None = None
    listen: str | None = None
    update_timeout: float = 60.0
    rename: object = None
    tied: str = "once"
    dtype: object = None
    sender_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.peers, str):
            self.peers = [self.peers]
        if not self.peers or not all(isinstance(p, str) and p for p in self.peers):
            raise ValueError(f"SparseSyncTrainerInitInfo 'peers' must list the engine workers' receivers "
                             f"('tcp://host:port'), got {self.peers!r}")
        if (self.token is None) == (self.token_file is None):
            raise ValueError("SparseSyncTrainerInitInfo needs exactly one of 'token' and 'token_file'")
        if not isinstance(self.base_version, int) or isinstance(self.base_version, bool) or self.base_version < 0:
            raise ValueError(f"'base_version' must be an int >= 0, got {self.base_version!r}")
        if not (isinstance(self.update_timeout, (int, float)) and self.update_timeout >= 0):
            raise ValueError(f"'update_timeout' must be >= 0 seconds, got {self.update_timeout!r}")

    def secret(self) -> str:
        if self.token is not None:
            return self.token
        with open(self.token_file) as f:
            return f.read().strip()


class SparseSyncTrainerWeightTransferEngine(TrainerWeightTransferEngine[SparseSyncTrainerInitInfo]):
    """Trainer engine of the ``sparsesync`` backend: see the module docstring."""

    init_info_cls = SparseSyncTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender: bool = True, init_info: SparseSyncTrainerInitInfo):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.init_info = init_info
        self.pusher = None              # sparsesync.trainer.SparsePusher, made at trainer_init or the first send
        self.version = init_info.base_version
        self.last_stats = None
        self._current = None            # what the pusher's source callable returns at the next push

    @classmethod
    def trainer_init(cls, init_info: SparseSyncTrainerInitInfo, *, client, source=None) -> Self:
        if not isinstance(init_info, SparseSyncTrainerInitInfo):
            raise TypeError(f"sparsesync trainer_init needs a SparseSyncTrainerInitInfo, got "
                            f"{type(init_info).__name__}")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, init_info=init_info)
        if engine.is_sender and init_info.listen is not None:
            worker_info = {"listen": init_info.listen, "version": init_info.base_version}
            if init_info.token_file is not None:
                worker_info["token_file"] = init_info.token_file
            else:
                worker_info["token"] = init_info.token
            client.init_weight_transfer_engine(worker_info)
        if source is not None:
            engine._make_pusher(engine._from_source())
        return engine

    def send_weights(self, state=None, version: int | None = None):
        """Push ``state`` (default: the source, or the previous state) as ``version`` (default: last + 1), then apply
        it on the engines through the client. Raises :class:`~sparsesync.PushFailed` if the push did not reach the
        engines (nothing is then started on them), or what the client raises when ``update_weights`` fails (the
        engines keep serving the previous version)."""
        if state is None:
            state = self._from_source() if self.source is not None else self._current
        if state is None:
            raise ValueError("send_weights: give the state to push (an nn.Module or a Mapping of checkpoint names to "
                             "tensors), or pass a source to trainer_init")
        if self.pusher is None:
            self._make_pusher(state)
        self._current = state
        stats = self.pusher.push(version)
        v = self.pusher.version
        self.last_stats = stats
        if not self.is_sender:
            self.version = v
            return None
        if stats is None:
            raise RuntimeError("sparsesync: init_info.rank is 0 but this process is not the pusher's sending rank "
                               "(torch.distributed rank 0): give rank=torch.distributed.get_rank()")
        if not stats.ok:          # a Sender with quorum=0 returns instead of raising
            raise PushFailed(f"sparsesync: push of version {v} did not reach every engine: {stats}")
        self.client.start_weight_update()
        # a failed update_weights ends vLLM's update session on the workers (no finish_weight_update then)
        self.client.update_weights({"version": v, "timeout": float(self.init_info.update_timeout)})
        self.client.finish_weight_update(weight_version=str(v))
        reset = getattr(self.client, "reset_prefix_cache", None)
        if callable(reset):
            reset()
        self.version = v
        return stats

    def shutdown(self) -> None:
        if self.pusher is not None:
            self.pusher.close()

    # -- internals --------------------------------------------------------------------------------------------------
    def _from_source(self):
        src = self.source
        module = getattr(src, "_module", None)          # vLLM's ModuleSource: push the module (checkpoint names)
        if module is not None:
            return module
        return lambda: iter(src)

    def _make_pusher(self, state) -> None:
        from ...trainer import SparsePusher
        info = self.init_info
        base = None
        if info.base_checkpoint is not None:
            from .checkpoint import load_mirror
            base = load_mirror(info.base_checkpoint)
        elif self.source is None:
            raise ValueError("sparsesync: the trainer engine needs the state the engines hold now: set "
                             "SparseSyncTrainerInitInfo.base_checkpoint (the checkpoint they loaded) or pass a "
                             "source to trainer_init whose current weights equal theirs")
        self._current = state
        self.pusher = SparsePusher(self._source, info.peers, token=info.secret(), rename=info.rename, tied=info.tied,
                                   dtype=info.dtype, base=base, base_version=info.base_version, digest=info.digest,
                                   **info.sender_kwargs)
        if not self.is_sender and self.pusher.sender is not None:
            # init_info.rank decides who talks to the engines (vLLM's contract), also without torch.distributed
            self.pusher.sender.close()
            self.pusher.sender, self.pusher.sends = None, False

    def _source(self):
        cur = self._current
        if callable(cur) and not isinstance(cur, Mapping) and not hasattr(cur, "state_dict"):
            return cur()
        return cur
