"""Trainer side: turn an existing weight push into a sparse, exact one.

    pusher = sparsesync.trainer.wrap(model, ["tcp://rollout-0:7000"], token=TOKEN, dtype=torch.bfloat16)
    for step in ...:
        ...; optimizer.step()
        pusher.push(step)                 # every rank calls it; with torch.distributed only rank 0 sends

Receivers hold checkpoint (Hugging Face) coordinates: the names of the model's safetensors checkpoint, tied weights
once (no ``lm_head.weight`` when ``tie_word_embeddings`` is true), full unsharded tensors. :func:`checkpoint_state`
turns a module or a state dict into exactly that; :class:`SparsePusher` pushes it through a
:class:`~sparsesync.Sender` after every step.

FSDP2 / DTensor parameters are gathered per tensor with ``full_tensor()`` (every rank joins; only rank 0 sends).
Receivers hold full tensors in checkpoint coordinates, and gathering one tensor at a time bounds the accelerator
memory to one full tensor. Encoding shard-local with global positions would avoid the gather, but needs an encoder
on every rank and a merge of their buckets into one update; that is left for later. The Sender's encoder needs the
whole state at once on the host anyway (it keeps a snapshot to diff against), so the gather costs no extra
accelerator memory beyond one tensor.

Importing this package imports neither ``torch.distributed.tensor`` nor ``transformers``.
"""
from .pusher import SparsePusher, wrap
from .state import (CASTABLE, WRAPPER_PREFIXES, Plan, checkpoint_state, is_sender, iter_checkpoint_state,
                    strip_prefixes)

__all__ = ["SparsePusher", "wrap", "checkpoint_state", "iter_checkpoint_state", "strip_prefixes", "is_sender",
           "WRAPPER_PREFIXES", "CASTABLE", "Plan"]
