"""One verl-side process of the real test: an actor rank or a rollout worker, holding a real verl-registered
``sparsesync`` checkpoint engine, driven by the test through JSON lines on stdin/stdout (one command at a time).

The engine is built exactly as verl 0.9.1 builds it: ``import_external_libs(custom_backend_module)`` then
``CheckpointEngineRegistry.new(backend, [is_master=...,] bucket_size=..., **engine_kwargs)`` (the actor worker passes
``is_master``, the rollout ``CheckpointEngineWorker`` does not). A rollout's update is what
``CheckpointEngineWorker.update_weights`` does: ``server_adapter.update_weights(engine.receive_weights(global_steps),
global_steps=..., wire_format=engine.wire_format)``, into a fake server adapter that writes the pairs into its own
state dict (it starts with dummy weights of the right layout).

Usage: worker.py actor|rollout RANK IS_MASTER(0|1) TIED(0|1) ENGINE_KWARGS_JSON
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback

import model
import torch
from verl.checkpoint_engine import CheckpointEngineRegistry
from verl.utils.import_utils import import_external_libs
from verl.workers.rollout.utils import ensure_async_iterator

from sparsesync import state_digest

BACKEND, MODULE = "sparsesync", "sparsesync.integrations.verl.backend"
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


class FakeServerAdapter:
    """Stands in for verl's rollout ServerAdapter: consumes (name, tensor) pairs into its own weights."""

    def __init__(self, state):
        self.state = state
        self.loaded: list[str] = []

    async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
        assert wire_format == "named_tensors", wire_format
        self.loaded = []
        async for name, t in ensure_async_iterator(weights):
            assert name in self.state, f"unknown tensor {name!r}"
            dst = self.state[name]
            assert dst.shape == t.shape and dst.dtype == t.dtype, (name, dst.shape, t.shape, dst.dtype, t.dtype)
            dst.copy_(t)
            self.loaded.append(name)


def exact(a: dict, b: dict) -> list[str]:
    """Names whose integer views differ (bitwise comparison), plus names present in only one."""
    bad = sorted(set(a) ^ set(b))
    for n in set(a) & set(b):
        x, y = a[n], b[n]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(INT[x.dtype]), y.view(INT[y.dtype])):
            bad.append(n)
    return bad


def main() -> None:
    role, rank, is_master, tied, kwargs = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1", \
        json.loads(sys.argv[5])
    import_external_libs(MODULE)                                     # verl's custom_backend_module hook
    extra = {"is_master": is_master} if role == "actor" else {}      # as verl's actor / rollout workers do
    engine = CheckpointEngineRegistry.new(BACKEND, bucket_size=64 << 20, **extra, **kwargs)
    adapter = FakeServerAdapter(model.dummy(tied)) if role == "rollout" else None

    def reply(**kw):
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    reply(ok=True, ready=True, role=role, rank=rank, cls=f"{type(engine).__module__}.{type(engine).__qualname__}",
          registered=sorted(CheckpointEngineRegistry._registry))
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            if op == "prepare":
                reply(ok=True, metadata=engine.prepare())
            elif op == "init":
                engine.init_process_group(**cmd["kwargs"])
                reply(ok=True)
            elif op == "finalize":
                engine.finalize()
                reply(ok=True)
            elif op == "send":
                gs = cmd["global_steps"]
                state = model.state_at(cmd["step"], tied)

                def weights(state=state):    # verl's per-tensor generator: yields lazily, one tensor at a time
                    yield from state.items()
                t0 = time.perf_counter()
                metrics = asyncio.run(engine.send_weights(weights(), global_steps=gs))
                reply(ok=True, metrics=metrics, digest=state_digest(state), s=time.perf_counter() - t0)
            elif op == "receive":
                gs = cmd["global_steps"]
                if "timeout" in cmd:
                    engine.opts.timeout = cmd["timeout"]
                before = {n: t.clone() for n, t in adapter.state.items()}
                t0 = time.perf_counter()
                try:
                    weights = engine.receive_weights(global_steps=gs)
                    asyncio.run(adapter.update_weights(weights, global_steps=gs,
                                                       wire_format=getattr(engine, "wire_format", "named_tensors")))
                    error = None
                except Exception as exc:    # noqa: BLE001 - reported to the test
                    error = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - t0
                out = {"ok": True, "error": error, "s": elapsed, "loaded": list(adapter.loaded),
                       "digest": state_digest(adapter.state), "engine_digest": engine.digest,
                       "unchanged": not exact(before, adapter.state)}
                if cmd.get("expect_step") is not None:
                    out["mismatch"] = exact(adapter.state, model.state_at(cmd["expect_step"], tied))
                reply(**out)
            elif op == "exit":
                engine.shutdown()
                reply(ok=True)
                return
            else:
                reply(ok=False, error=f"unknown op {op!r}")
        except Exception as exc:            # noqa: BLE001 - reported to the test
            reply(ok=False, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc())


if __name__ == "__main__":
    main()
