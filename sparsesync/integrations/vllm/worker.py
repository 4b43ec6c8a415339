"""Worker extension: lets the driver ask every worker what it holds (no vLLM import here).

    llm = LLM(..., weight_transfer_config={"backend": "sparsesync"},
              worker_extension_cls="sparsesync.integrations.vllm.worker.SparseSyncWorkerExtension")
    for st in llm.collective_rpc("sparsesync_status"):     # one dict per worker (tensor-parallel rank)
        print(st["version"], st["digest"], st["address"])

vLLM appends this class to the worker's bases and refuses attribute names the worker already has, so every name here
starts with ``sparsesync_``. ``st["digest"]`` is the ``state_digest`` of the weights the worker applied, in checkpoint
coordinates: a trainer compares it with ``sparsesync.state_digest`` of the state it pushed as that version.
"""
from __future__ import annotations


class SparseSyncWorkerExtension:
    def sparsesync_status(self) -> dict:
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is None or not hasattr(engine, "status"):
            raise RuntimeError("sparsesync_status: this worker has no sparsesync weight-transfer engine (start the "
                               "LLM with weight_transfer_config={'backend': 'sparsesync'} and call "
                               "init_weight_transfer_engine)")
        return engine.status()

    def sparsesync_digest(self) -> str | None:
        return self.sparsesync_status()["digest"]
