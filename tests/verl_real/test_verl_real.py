"""The real test of the verl checkpoint-engine backend: verl 0.9.1's own ``CheckpointEngineRegistry`` and
``CheckpointEngine`` base class, the backend imported through verl's ``import_external_libs`` (its
``custom_backend_module`` hook), actor and rollout engines in separate processes on loopback.

Runs only where verl is installed (the venv of scripts/verl/make_venv.sh); run it with scripts/verl/run_real_test.sh.
Elsewhere the module is skipped. Marked ``verl`` and ``slow``.

This test plays verl's ``CheckpointEngineManager.update_weights`` (the driver): per step it calls ``prepare`` on
every actor and rollout engine, the real class's ``build_topology`` (checking each list's length as verl does),
``init_process_group``, then the actor ranks' ``send_weights(per-tensor generator, global_steps)`` and the rollout
workers' ``receive_weights`` -> fake server adapter (tests/verl_real/worker.py) concurrently, then ``finalize``.
Ray itself is not started (the Manager's Ray plumbing only transports these calls). Proven for an untied model (2
actor ranks, 1 rollout, driver-generated secret) and a tied one (1 actor rank, 2 rollouts, configured secret):
1. after every step each rollout adapter's weights equal the trainer's bit for bit (integer views, torch.equal, in
   the rollout process) and ``state_digest(adapter) == state_digest(trainer)`` (computed in the actor process);
2. step 0 loads every tensor into the dummy-initialised adapter (full update); later steps load exactly the runtime
   modules holding changed tensors (``load="modules"``), and the push reports exactly the changed element count;
3. a version that never comes: ``receive_weights`` raises within its timeout naming the version and the address,
   the adapter is untouched, and the next step still works; the same step again, and ``global_steps=None``,
   reload every tensor at the same version.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("verl.checkpoint_engine")
pytest.importorskip("ray")

import torch

pytestmark = [pytest.mark.verl, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import model

BACKEND, MODULE = "sparsesync", "sparsesync.integrations.verl.backend"
TOKEN = "verl-real-test-secret-42"
TIMES: list[str] = []


class Proc:
    """A worker process (tests/verl_real/worker.py) spoken to with JSON lines."""

    def __init__(self, role, rank, is_master, tied, kwargs, env):
        self.name = f"{role}{rank}"
        self.p = subprocess.Popen([sys.executable, str(HERE / "worker.py"), role, str(rank), "1" if is_master else "0",
                                   "1" if tied else "0", json.dumps(kwargs)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=None, text=True, env=env, cwd=str(HERE))
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line)
        self.q.put(None)

    def send(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def recv(self, timeout=120.0) -> dict:
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no reply within {timeout} s") from None
        if line is None:
            raise AssertionError(f"{self.name}: exited with {self.p.wait()}")
        r = json.loads(line)
        assert r.get("ok"), f"{self.name}: {r.get('error')}\n{r.get('tb', '')}"
        return r

    def call(self, **cmd) -> dict:
        self.send(**cmd)
        return self.recv()

    def close(self):
        if self.p.poll() is None:
            try:
                self.call(op="exit")
            except (AssertionError, OSError):
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()


def changed_elements(a: dict, b: dict) -> tuple[set, int]:
    """Names whose bits differ between two states, and how many elements differ (tied duplicates counted once per
    name, as the Sender sees separate tensors)."""
    names, count = set(), 0
    for n in a:
        x, y = a[n], b[n]
        it = torch.int16 if x.element_size() == 2 else torch.int32
        d = int((x.view(it) != y.view(it)).sum())
        if d:
            names.add(n)
            count += d
    return names, count


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_sync_through_verl_registry(variant):
    from verl.checkpoint_engine import CheckpointEngine, CheckpointEngineRegistry
    from verl.utils.import_utils import import_external_libs

    from sparsesync.integrations.verl.core import STANDARD_PACKED
    from sparsesync.integrations.vllm.groups import expand

    tied = variant == "tied"
    n_actors, n_rollouts = (1, 2) if tied else (2, 1)
    kwargs = {"listen": "tcp://127.0.0.1:0", "timeout": 60, "load": "modules"}
    if tied:
        kwargs["token"] = TOKEN                     # configured secret; untied: the driver generates one
    env = {k: v for k, v in os.environ.items() if k != "SPARSESYNC_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])

    import_external_libs(MODULE)                    # the driver imports custom_backend_module as verl's Manager does
    cls = CheckpointEngineRegistry.get(BACKEND)
    assert issubclass(cls, CheckpointEngine) and cls.__module__ == MODULE

    t0 = time.perf_counter()
    actors = [Proc("actor", i, i == 0, tied, kwargs, env) for i in range(n_actors)]
    rollouts = [Proc("rollout", i, False, tied, kwargs, env) for i in range(n_rollouts)]
    procs = actors + rollouts
    try:
        for p in procs:
            r = p.recv()
            assert r["cls"] == f"{MODULE}.SparseSyncCheckpointEngine" and BACKEND in r["registered"], r
        TIMES.append(f"{variant}: {len(procs)} processes up in {time.perf_counter() - t0:.1f} s")
        names = list(model.state_at(0, tied))

        def build_process_group():
            metadata = [p.call(op="prepare")["metadata"] for p in procs]
            a_kw, r_kw = cls.build_topology(n_actors, n_rollouts, metadata)
            for k, v in a_kw.items():
                assert len(v) == n_actors, k
            for k, v in r_kw.items():
                assert len(v) == n_rollouts, k
            for i, p in enumerate(actors):
                p.call(op="init", kwargs={k: v[i] for k, v in a_kw.items()})
            for i, p in enumerate(rollouts):
                p.call(op="init", kwargs={k: v[i] for k, v in r_kw.items()})
            return metadata, a_kw

        def update(step, gs, expect_loaded):
            ts = time.perf_counter()
            build_process_group()
            for p in actors:
                p.send(op="send", step=step, global_steps=gs)
            for p in rollouts:
                p.send(op="receive", global_steps=gs, expect_step=step)
            sent = [p.recv() for p in actors]
            got = [p.recv() for p in rollouts]
            for p in procs:
                p.call(op="finalize")
            master = sent[0]
            assert all(s["metrics"] == {} for s in sent[1:])       # only the master rank pushes
            for g in got:
                assert g["error"] is None, g["error"]
                assert g["mismatch"] == [], f"step {step}: tensors differ bitwise: {g['mismatch']}"
                assert g["digest"] == master["digest"] == g["engine_digest"], (step, g["digest"], master["digest"])
                assert g["loaded"] == expect_loaded, (step, len(g["loaded"]), len(expect_loaded))
            m = master["metrics"]
            TIMES.append(f"{variant} step {step} (global_steps={gs}): {time.perf_counter() - ts:.2f} s, "
                         f"loaded {len(got[0]['loaded'])}/{len(names)} tensors, pushed "
                         f"{int(m.get('sparsesync/sent_bytes', 0))} B for {int(m.get('sparsesync/changed', 0))} "
                         f"changed, encode {m.get('sparsesync/encode_s', 0):.3f} s")
            return m, got

        # step 0: the rollouts hold dummy weights and an empty mirror: a full update, every tensor loaded
        m, _ = update(0, 0, names)
        assert m["sparsesync/full"] == 1.0 and m["sparsesync/version"] == 1.0 and m["sparsesync/peers_ok"] == n_rollouts
        for step in (1, 2, 3):
            changed, count = changed_elements(model.state_at(step - 1, tied), model.state_at(step, tied))
            want = expand(changed, names, STANDARD_PACKED)
            assert 0 < len(want) < len(names)
            m, _ = update(step, step, want)
            assert m["sparsesync/full"] == 0.0 and m["sparsesync/version"] == step + 1
            assert m["sparsesync/changed"] == count, (step, m["sparsesync/changed"], count)
            assert m["sparsesync/sent_bytes"] < 0.1 * n_rollouts * m["sparsesync/dense_bytes"]

        # a version that never comes: a clear error within the timeout, nothing touched
        for p in rollouts:
            p.send(op="receive", global_steps=10, timeout=3, expect_step=3)
        for p, g in zip(rollouts, [p.recv() for p in rollouts]):
            assert g["error"] is not None and "WeightSyncError" in g["error"], g
            assert "version 11" in g["error"] and "global_steps=10" in g["error"] and "within 3 s" in g["error"], g
            assert "tcp://127.0.0.1:" in g["error"]
            assert 2.5 <= g["s"] < 8, g["s"]
            assert g["unchanged"] and g["mismatch"] == [] and g["loaded"] == []
        TIMES.append(f"{variant}: missing version refused in {g['s']:.2f} s: {g['error'][:160]}...")

        # the next step still works; the same step again (verl re-syncs to wake replicas) reloads every tensor
        changed, _ = changed_elements(model.state_at(3, tied), model.state_at(4, tied))
        update(4, 4, expand(changed, names, STANDARD_PACKED))
        update(4, 4, names)
        # global_steps=None (verl's wake-up after sleep_replicas): the last version again, every tensor reloaded
        m, _ = update(4, None, names)
        assert m["sparsesync/version"] == 5.0
    finally:
        for p in procs:
            p.close()
    TIMES.append(f"{variant}: total {time.perf_counter() - t0:.1f} s")


def teardown_module(module):
    print("\n" + "\n".join(TIMES))
