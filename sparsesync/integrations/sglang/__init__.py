"""sparsesync for SGLang (0.5.23): a custom weight loader, a client, and a ``sglang.srt.plugins`` plug-in.

How an update flows (see ``docs/notes/sglang.md`` for the SGLang internals this relies on):

- Every tensor-parallel worker (SGLang scheduler process) runs a background :class:`~sparsesync.Receiver` on a host
  **mirror** of the checkpoint (checkpoint / Hugging Face coordinates), on ``port + tp_rank``. The trainer's
  ``Sender(digest=True)`` pushes sparse updates to all of them while SGLang keeps generating; they are received,
  verified and committed to the mirrors in the background.
- SGLang's ``update_weights_from_tensor(..., load_format=LOADER)`` carries only a small **command**: one named tensor
  ``("__sparsesync__", uint8 tensor of JSON)``. SGLang calls :func:`sparsesync.integrations.sglang.loader.load`
  (``fn(model, named_tensors)``) in every worker; ``{"op": "apply", "version": v}`` waits for ``v`` and loads the
  changed tensors, widened to whole runtime modules, through the model's own ``load_weights`` (SGLang's exact
  semantics for fused ``qkv_proj`` / ``gate_up_proj``, TP shards, tied embeddings and fused MoE experts).
- :mod:`sparsesync.integrations.sglang.client` drives one update: pause generation, ``begin_weight_update``, the
  command, ``end_weight_update``, continue generation, then :func:`sparsesync.probe` of every worker's receiver for
  the version and the engine-side digest each one holds.

Server flags: ``--custom-weight-loader sparsesync.integrations.sglang.loader.load`` (always works). With the
``sglang.srt.plugins`` entry point ``sparsesync = "sparsesync.integrations.sglang:register"`` installed,
:func:`register` makes the loader usable without that flag and turns a failed apply into SGLang's own
``success=False`` reply (instead of a success the client must correct by probing).

Importing this module never imports SGLang (nor torch).
"""
from __future__ import annotations

import logging

LOADER = "sparsesync.integrations.sglang.loader.load"
COMMAND = "__sparsesync__"
HOOK_TARGET = ("sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater."
               "update_weights_from_tensor")

log = logging.getLogger(__name__)

__all__ = ["COMMAND", "LOADER", "SGLangUpdateError", "decode_command", "encode_command", "register"]

_registered = False


class SGLangUpdateError(RuntimeError):
    """An SGLang worker did not apply (or initialise) what was asked. ``workers`` holds what each worker reported
    (its receiver's status, or why it could not be reached)."""

    def __init__(self, message: str, workers: list | None = None):
        super().__init__(message)
        self.workers = workers or []


def encode_command(cmd: dict):
    """The command as SGLang carries it: a 1-D uint8 tensor of its JSON (SGLang moves it to the worker's device)."""
    import json

    import torch
    if not isinstance(cmd, dict) or not isinstance(cmd.get("op"), str):
        raise ValueError(f"a sparsesync command is a dict with an 'op' string, got {cmd!r}")
    raw = json.dumps(cmd, sort_keys=True, allow_nan=False).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def decode_command(tensor) -> dict:
    import json

    import torch
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"the {COMMAND!r} tensor must be a 1-D uint8 tensor of JSON, got "
                         f"{getattr(tensor, 'dtype', type(tensor).__name__)} of shape "
                         f"{tuple(getattr(tensor, 'shape', ()))}")
    raw = bytes(tensor.detach().cpu().numpy().tobytes())
    try:
        cmd = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"the {COMMAND!r} tensor is not JSON ({exc}): {raw[:80]!r}") from None
    if not isinstance(cmd, dict) or not isinstance(cmd.get("op"), str):
        raise ValueError(f"a sparsesync command is a JSON object with an 'op' string, got {cmd!r}")
    return cmd


def register() -> None:
    """Entry point for SGLang's ``sglang.srt.plugins`` group (``sglang.srt.plugins.load_plugins`` calls it in the
    engine / server process, the scheduler (worker) processes and the others; idempotent).

    Registers an AROUND hook on ``WeightUpdater.update_weights_from_tensor`` that, for ``load_format == LOADER``
    only: (1) adds :data:`LOADER` to that worker's allowed custom loaders (so ``--custom-weight-loader`` is not
    needed), and (2) returns SGLang's ``(False, message)`` when the loader reports a failed command, so that
    SGLang neither records the weight version nor reports success. Every other ``load_format`` is passed through
    untouched. Without SGLang's hook registry (another SGLang) it logs a warning and does nothing.
    """
    global _registered
    if _registered:
        return
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError as exc:
        log.warning("sparsesync: this SGLang has no plug-in hook registry (%s); start the server with "
                    "--custom-weight-loader %s", exc, LOADER)
        return
    HookRegistry.register(HOOK_TARGET, _around_update_weights_from_tensor, HookType.AROUND)
    _registered = True


def _around_update_weights_from_tensor(original, self, *args, **kwargs):
    """AROUND hook (see :func:`register`); SGLang 0.5.23 calls the method as
    ``update_weights_from_tensor(named_tensors=..., load_format=...)`` and expects ``(success, message)``."""
    load_format = kwargs.get("load_format", args[1] if len(args) > 1 else None)
    if load_format != LOADER:
        return original(self, *args, **kwargs)
    loaders = getattr(self, "custom_weight_loaders", None)
    if loaders is None or LOADER not in loaders:
        # WeightUpdater is a frozen dataclass: replace the field with a new list (the server args stay as they were)
        object.__setattr__(self, "custom_weight_loaders", [*(loaders or ()), LOADER])
    from . import loader
    loader.take_outcome()
    try:
        result = original(self, *args, **kwargs)
    except Exception as exc:
        log.exception("sparsesync: update_weights_from_tensor failed before or around the loader")
        return False, f"sparsesync: {type(exc).__name__}: {exc}"
    outcome = loader.take_outcome()
    if outcome is not None and not outcome.get("ok", False):
        return False, outcome.get("message") or "sparsesync: the command failed"
    if outcome is not None and isinstance(result, tuple) and len(result) == 2 and result[0]:
        return True, outcome.get("message") or result[1]
    return result
