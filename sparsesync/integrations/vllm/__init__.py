"""sparsesync as a vLLM weight-transfer backend (``weight_transfer_config={"backend": "sparsesync"}``).

vLLM finds the backend through the ``vllm.general_plugins`` entry point ``sparsesync =
"sparsesync.integrations.vllm:register"`` (pyproject.toml): vLLM calls :func:`register` in every process it starts
(driver, EngineCore, workers), and the engine module (:mod:`sparsesync.integrations.vllm.engine`, which imports vLLM)
is loaded only when vLLM creates the backend in a worker. Importing this module never imports vLLM.

Inference side::

    llm = LLM(model=ckpt_dir, weight_transfer_config={"backend": "sparsesync"}, ...)
    llm.init_weight_transfer_engine({"init_info": {"listen": "tcp://0.0.0.0:7000", "token": TOKEN, "version": 0}})
    ...
    llm.start_weight_update()
    llm.update_weights({"update_info": {"version": step, "timeout": 60}})
    llm.finish_weight_update(weight_version=str(step))
    llm.reset_prefix_cache()          # vLLM does not drop KV computed under the old weights by itself

Trainer side: ``sparsesync.Sender([...], token=TOKEN, base=<the checkpoint's tensors>, base_version=0,
digest=True).push(state, version=step)`` with ``state`` in checkpoint (Hugging Face) names.

See :mod:`sparsesync.integrations.vllm.engine` for the init/update keys and what the backend guarantees.
"""
from __future__ import annotations

import logging

BACKEND = "sparsesync"
ENGINE_MODULE = "sparsesync.integrations.vllm.engine"
ENGINE_CLASS = "SparseSyncWeightTransferEngine"
WORKER_EXTENSION = "sparsesync.integrations.vllm.worker.SparseSyncWorkerExtension"

log = logging.getLogger(__name__)

__all__ = ["BACKEND", "WORKER_EXTENSION", "WeightUpdateError", "register"]


class WeightUpdateError(RuntimeError):
    """``update_weights`` could not apply the requested version (not there in time, refused by the receiver, a
    newer version already staged, or the apply failed). The engine keeps serving the weights it held before, except
    where the message says otherwise."""


def register() -> None:
    """Register the ``sparsesync`` weight-transfer backend with vLLM's ``WeightTransferEngineFactory``.

    Called by vLLM's plugin loader (``vllm.general_plugins``), possibly several times and in several processes; it
    is idempotent. Registration is by module path, so the engine module is imported only when an engine is created.
    """
    try:
        from vllm.distributed.weight_transfer import WeightTransferEngineFactory
    except ImportError as exc:       # a vLLM without the weight-transfer registry (< 0.2x)
        log.warning("sparsesync: this vLLM has no WeightTransferEngineFactory (%s); the 'sparsesync' backend is "
                    "not available", exc)
        return
    registry = getattr(WeightTransferEngineFactory, "_registry", None)
    if isinstance(registry, dict) and BACKEND in registry:
        return
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, ENGINE_MODULE, ENGINE_CLASS)
    except ValueError:               # registered meanwhile (the factory refuses duplicates)
        pass
