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

Or through vLLM's trainer factory (``register`` also registers the trainer side):
``WeightTransferTrainerFactory.trainer_init(SparseSyncTrainerInitInfo(peers=[...], token=TOKEN, base_version=0,
base_checkpoint=CKPT, rank=0), client=client).send_weights(model, version=step)`` pushes and then drives
``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` through the client
(:mod:`sparsesync.integrations.vllm.trainer`).

vLLMs without the weight-transfer registry: ``LLM(..., worker_extension_cls=WORKER_EXTENSION)`` and
``llm.collective_rpc("sparsesync_init", kwargs={"init_info": {...}})`` /
``llm.collective_rpc("sparsesync_update", kwargs={"update_info": {...}})`` run the same engine
(:mod:`sparsesync.integrations.vllm.worker`).

See :mod:`sparsesync.integrations.vllm.engine` for the init/update keys and what the backend guarantees.
"""
from __future__ import annotations

import logging

BACKEND = "sparsesync"
ENGINE_MODULE = "sparsesync.integrations.vllm.engine"
ENGINE_CLASS = "SparseSyncWeightTransferEngine"
TRAINER_MODULE = "sparsesync.integrations.vllm.trainer"
TRAINER_CLASS = "SparseSyncTrainerWeightTransferEngine"
WORKER_EXTENSION = "sparsesync.integrations.vllm.worker.SparseSyncWorkerExtension"

log = logging.getLogger(__name__)

__all__ = ["BACKEND", "WORKER_EXTENSION", "WeightUpdateError", "register"]   # trainer side: .trainer (imports vLLM)


class WeightUpdateError(RuntimeError):
    """``update_weights`` could not apply the requested version (not there in time, refused by the receiver, a
    newer version already staged, or the apply failed). The engine keeps serving the weights it held before, except
    where the message says otherwise."""


def register() -> None:
    """Register the ``sparsesync`` backend with vLLM's ``WeightTransferEngineFactory`` (engine side) and
    ``WeightTransferTrainerFactory`` (trainer side).

    Called by vLLM's plugin loader (``vllm.general_plugins``), possibly several times and in several processes; it
    is idempotent. Registration is by module path, so the engine / trainer modules are imported only when vLLM
    creates one. A vLLM without the registry gets a warning (use the worker extension, :data:`WORKER_EXTENSION`); a
    vLLM with the engine registry but no trainer registry gets the engine side only.
    """
    try:
        from vllm.distributed import weight_transfer as wt
        engines = wt.WeightTransferEngineFactory
    except (ImportError, AttributeError) as exc:       # a vLLM without the weight-transfer registry (< 0.2x)
        log.warning("sparsesync: this vLLM has no WeightTransferEngineFactory (%s); the 'sparsesync' backend is "
                    "not available: use worker_extension_cls=%r and collective_rpc('sparsesync_init' / "
                    "'sparsesync_update') instead", exc, WORKER_EXTENSION)
        return
    _register(engines, ENGINE_MODULE, ENGINE_CLASS)
    trainers = getattr(wt, "WeightTransferTrainerFactory", None)
    if trainers is not None:
        _register(trainers, TRAINER_MODULE, TRAINER_CLASS)


def _register(factory, module: str, cls: str) -> None:
    registry = getattr(factory, "_registry", None)
    if isinstance(registry, dict) and BACKEND in registry:
        return
    try:
        factory.register_engine(BACKEND, module, cls)
    except ValueError:               # registered meanwhile (the factories refuse duplicates)
        pass
