"""sparsesync as a verl checkpoint engine (verl 0.9.x): sparse, bit-exact weight sync from the actor to the rollouts.

Switch with configuration alone (verl imports ``custom_backend_module`` on every worker before it builds the
engine; the module registers the backend ``sparsesync`` in verl's ``CheckpointEngineRegistry``)::

    actor_rollout_ref:
      rollout:
        checkpoint_engine:
          backend: sparsesync
          custom_backend_module: sparsesync.integrations.verl.backend
          engine_kwargs:
            sparsesync:
              token_file: /secrets/sparsesync     # or token: ..., or env SPARSESYNC_TOKEN; or none (see below)
              # timeout: 300        load: modules   dtype: bfloat16   listen: tcp://0.0.0.0:0   quorum: all

or on the command line: ``actor_rollout_ref.rollout.checkpoint_engine.backend=sparsesync
actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module=sparsesync.integrations.verl.backend
+actor_rollout_ref.rollout.checkpoint_engine.engine_kwargs.sparsesync.timeout=300``. sparsesync must be installed on
every node (actor and rollout workers). Options (all optional): see :class:`~.core.Options`.

How it works, per ``CheckpointEngineManager.update_weights(global_steps)``:

- **Rollout side** (each rollout worker's engine; it lives as long as the worker): the first ``prepare()`` starts a
  :class:`sparsesync.Receiver` on a free port (``tcp://<this host's IP>:0``, or ``listen``) keeping a host
  **mirror**: name -> CPU tensor, in the trainer's (Hugging Face) names. The mirror starts empty and adopts the
  layout of the first push (verl rollouts may start from dummy weights, and the rollout side need not know the
  checkpoint). ``receive_weights(global_steps)`` waits up to ``timeout`` for the version, then yields
  ``(name, mirror tensor)`` for the tensors that changed since the version this worker last loaded, widened to whole
  runtime modules (``load="modules"``: q/k/v and gate/up load together, as vLLM's fused modules need); the first
  load, and a repeat of the version already loaded, yield every tensor. verl's server adapter consumes them with
  ``wire_format="named_tensors"``. The mirror cannot change while they are consumed; an update is committed
  all-or-nothing (a failed or refused update leaves the mirror at the previous version, and ``receive_weights``
  raises :class:`~.core.WeightSyncError` naming the version, the address and the receiver's recent errors).
- **Actor side**: every actor rank walks verl's per-tensor generator (producing a tensor may be a collective, e.g.
  FSDP's ``full_tensor``); the rank verl built with ``is_master=True`` (actor rank 0) copies each tensor to the host
  and pushes the state with a :class:`sparsesync.Sender` (``digest=True``) to every rollout receiver. The Sender
  lives across steps: its snapshot is the base of the next delta, so only changed elements travel (about 1.0-1.25
  bytes per changed bf16 element). The first push is a full update. ``send_weights`` returns the push's figures
  (``sparsesync/changed``, ``sparsesync/sent_bytes``, ``sparsesync/encode_s``, ...) which verl merges into the
  step's metrics.
- **Versions**: sparsesync version = ``global_steps + 1`` (version 0 is the empty mirror; verl's first sync is step
  0). ``global_steps=None`` re-syncs the last version (verl 0.9.1 passes None only to wake replicas after
  ``sleep_replicas()``, weights unchanged, between syncs that pass the step): the actor pushes the same bytes again
  (changed weights under None are refused with a clear error) and every rollout reloads all tensors. Syncing the
  same step again does the same.
- **Secret**: ``token`` / ``token_file`` / env ``SPARSESYNC_TOKEN`` on every worker; if none is configured anywhere,
  the driver generates a random secret once per run in ``build_topology`` and hands it to all workers through the
  topology (it then travels through Ray like the rest of the topology; configure one if Ray's channels are not
  trusted). A mix of configured and unconfigured workers is refused.

Memory: each rollout worker keeps one CPU copy of the model (its mirror), plus the receiver's staging of one update;
the sending actor rank keeps one CPU snapshot (the Sender's base) and, during a push, the host copy of the new
state (two CPU copies at peak). Other actor ranks keep nothing.

Importing this package imports neither verl nor ray (:mod:`.backend` does; verl imports it).
"""
from __future__ import annotations

BACKEND = "sparsesync"
BACKEND_MODULE = "sparsesync.integrations.verl.backend"

__all__ = ["BACKEND", "BACKEND_MODULE"]
