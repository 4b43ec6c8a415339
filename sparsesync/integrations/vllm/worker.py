"""Worker extension: the sparsesync backend driven by ``collective_rpc``, and what every worker holds (no vLLM import
at module level).

With vLLM's weight-transfer registry (vLLM 0.32), the extension only reports::

    llm = LLM(..., weight_transfer_config={"backend": "sparsesync"},
              worker_extension_cls="sparsesync.integrations.vllm.worker.SparseSyncWorkerExtension")
    for st in llm.collective_rpc("sparsesync_status"):     # one dict per worker (tensor-parallel rank)
        print(st["version"], st["digest"], st["address"])

Without the registry (or without ``weight_transfer_config``), the extension runs the same engine itself
(:class:`~sparsesync.integrations.vllm.engine.SparseSyncWeightTransferEngine`, constructed directly instead of by
vLLM's factory: the same receiver, mirror, apply and proof)::

    llm = LLM(model=ckpt, worker_extension_cls="sparsesync.integrations.vllm.worker.SparseSyncWorkerExtension")
    llm.collective_rpc("sparsesync_init", kwargs={"init_info": {"listen": "tcp://0.0.0.0:7000", "token": TOKEN,
                                                                 "version": 0}})
    ...   # trainer: sparsesync.Sender([...], token=TOKEN, base=..., base_version=0, digest=True).push(state, step)
    llm.collective_rpc("sparsesync_update", kwargs={"update_info": {"version": step, "timeout": 60}})
    llm.reset_prefix_cache()

``init_info`` / ``update_info`` take the same keys as the registered backend (see
:mod:`sparsesync.integrations.vllm.engine`). ``sparsesync_update`` raises
:class:`~sparsesync.integrations.vllm.WeightUpdateError` as ``update_weights`` does; the engine then keeps serving the
previous version. ``sparsesync_shutdown()`` stops the receiver (the mirror is kept; init again at the version held).

vLLM appends this class to the worker's bases and refuses attribute names the worker already has, so every name here
starts with ``sparsesync_``. ``st["digest"]`` is the ``state_digest`` of the weights the worker applied, in checkpoint
coordinates: a trainer compares it with ``sparsesync.state_digest`` of the state it pushed as that version.
"""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Generic, TypeVar

_ENGINE_ATTR = "_sparsesync_rpc_engine"     # where the extension keeps the engine it constructed itself


def _engine_of(worker, create: bool = False):
    """The sparsesync engine of a worker: vLLM's (weight_transfer_config backend 'sparsesync') if there is one, else
    the one the extension constructed (created here when ``create``)."""
    eng = getattr(worker, "weight_transfer_engine", None)
    if eng is not None and hasattr(eng, "status"):             # vLLM's built-in engines have no status()
        return eng
    eng = worker.__dict__.get(_ENGINE_ATTR)
    if eng is None and create:
        from .engine import SparseSyncWeightTransferEngine
        try:
            from vllm.config import WeightTransferConfig
            config = WeightTransferConfig(backend="sparsesync")
        except Exception:                     # noqa: BLE001 - a vLLM without it: the engine does not read it
            config = None
        model = worker.model_runner.get_model()
        eng = SparseSyncWeightTransferEngine(config, worker.vllm_config, worker.device, model)
        setattr(worker, _ENGINE_ATTR, eng)
    return eng


class SparseSyncWorkerExtension:
    def sparsesync_init(self, init_info: dict | None = None) -> dict:
        """Start this worker's receiver (same keys as ``init_weight_transfer_engine``'s ``init_info``); returns the
        worker's status (its receiver ``address`` included)."""
        eng = _engine_of(self, create=True)
        eng.init_transfer_engine(eng.parse_init_info(dict(init_info or {})))
        return eng.status()

    def sparsesync_update(self, update_info: dict) -> dict:
        """Apply exactly ``update_info["version"]`` (waiting up to ``update_info["timeout"]`` s for it); returns the
        worker's status (``version``, ``digest``, ``last_update``)."""
        eng = _engine_of(self)
        if eng is None:
            raise RuntimeError("sparsesync_update before sparsesync_init")
        eng.update_weights(dict(update_info))
        return eng.status()

    def sparsesync_shutdown(self) -> None:
        """Stop this worker's sparsesync receiver (the mirror is kept; initialise again at the version the engine
        holds): the registry backend's engine (vLLMs whose ``LLM`` has no ``shutdown_weight_transfer_engine``, such
        as 0.28) or the one the extension constructed."""
        eng = _engine_of(self)
        if eng is not None:
            eng.shutdown()

    def sparsesync_status(self) -> dict:
        engine = _engine_of(self)
        if engine is None or not hasattr(engine, "status"):
            raise RuntimeError("sparsesync_status: this worker has no sparsesync engine (start the LLM with "
                               "weight_transfer_config={'backend': 'sparsesync'} and call init_weight_transfer_engine,"
                               " or call collective_rpc('sparsesync_init', kwargs={'init_info': {...}}))")
        return engine.status()

    def sparsesync_digest(self) -> str | None:
        return self.sparsesync_status()["digest"]


# -- stand-ins for vLLM's weight-transfer base classes, for vLLMs without them (engine.py imports these then) ---------
A = TypeVar("A")
B = TypeVar("B")


@dataclass
class _Info(ABC):
    pass


class _WeightTransferEngine(ABC, Generic[A, B]):
    """What engine.py uses of vLLM 0.32's ``WeightTransferEngine`` (``base.py``), for older vLLMs."""

    init_info_cls: type
    update_info_cls: type

    def __init__(self, config, vllm_config, device, model):
        self.config = config
        self.vllm_config = vllm_config
        self.parallel_config = vllm_config.parallel_config
        self.model_config = vllm_config.model_config
        self.device = device
        self.model = model

    def parse_init_info(self, init_dict: dict):
        try:
            return self.init_info_cls(**init_dict)
        except TypeError as exc:
            raise ValueError(f"Invalid init_info for {type(self).__name__}: {exc}") from exc

    def parse_update_info(self, update_dict: dict):
        try:
            return self.update_info_cls(**update_dict)
        except TypeError as exc:
            raise ValueError(f"Invalid update_info for {type(self).__name__}: {exc}") from exc

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def reset_weight_update_target(self) -> None:
        pass
