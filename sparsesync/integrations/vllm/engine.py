"""The ``sparsesync`` weight-transfer engine for vLLM (worker side; imported by vLLM when it creates the backend).

One engine object lives in every vLLM worker process (one per tensor-parallel rank). ``init_transfer_engine`` loads
the checkpoint the engine started from into a host **mirror** (name -> CPU tensor, exactly the checkpoint's tensors
in Hugging Face coordinates) and starts a :class:`sparsesync.Receiver` on it. Trainers push sparse updates to that
receiver at any time; they are received, verified and committed to the mirror in the background while vLLM keeps
generating. ``update_weights({"version": v})`` then waits until the mirror holds ``v`` and pushes every checkpoint
tensor of each runtime module the updates since the last apply touched through vLLM's own loader
(``initialize_layerwise_reload`` -> ``model.load_weights`` -> ``finalize_layerwise_reload``) plus the post-load steps
vLLM 0.32 misses on the CPU backend. The engine pause is that apply only.

init_info keys (``llm.init_weight_transfer_engine({"init_info": {...}})``):

- ``listen`` (str, default ``tcp://127.0.0.1:7000``): where the receiver listens. With tensor parallelism every
  worker runs its own receiver on ``port + local rank`` (rank 0 on ``port``, rank 1 on ``port + 1``, ...): the
  trainer's ``Sender`` lists every one of them (each worker decodes the whole, small, update and loads its own
  shard through vLLM's loaders). Port 0 picks a free port per worker (see ``sparsesync_status``).
- ``token`` (str) or ``token_file`` (path; surrounding whitespace stripped): the shared secret (>= 8 characters).
- ``version`` (int, default 0): the version the engine's checkpoint is, for the trainer.
- ``checkpoint`` (path, default the engine's model directory): the safetensors checkpoint the engine loaded.
- ``stall_timeout`` (float, optional): the receiver's ``stall_timeout``.
- ``require_digest`` (bool, default False): refuse to apply an update that did not carry the state digest (send with
  ``Sender(digest=True)``; without it the receiver cannot prove it holds the trainer's bytes).

update_info keys (``llm.update_weights({"update_info": {...}})``):

- ``version`` (int, required): the version to apply. v1 semantics: exactly this version, or an error.
- ``timeout`` (float seconds, default 60): how long to wait for that version to be received and verified.

After a successful ``update_weights`` the driver must call ``llm.reset_prefix_cache()``: vLLM does not drop cached
KV computed under the old weights, and the worker cannot reach the scheduler's cache.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
try:
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
except ImportError:     # a vLLM without the weight-transfer registry: the worker extension constructs the engine
    from .worker import _WeightTransferEngine as WeightTransferEngine
    from .worker import _Info as WeightTransferInitInfo
    from .worker import _Info as WeightTransferUpdateInfo

from ...errors import InvalidArgument
from ...session import Receiver
from ..staging import StagedMirror, describe_problems, offset_port
from . import WeightUpdateError
from .checkpoint import load_mirror, model_directory, read_layout
from .groups import expand, group_key

log = logging.getLogger(__name__)

_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


@dataclass
class SparseSyncInitInfo(WeightTransferInitInfo):
    listen: str = "tcp://127.0.0.1:7000"
    token: str | None = None
    token_file: str | None = None
    version: int = 0
    checkpoint: str | None = None
    stall_timeout: float | None = None
    require_digest: bool = False

    def __post_init__(self):
        if not isinstance(self.listen, str) or not self.listen:
            raise ValueError(f"init_info 'listen' must be an address string like 'tcp://0.0.0.0:7000', "
                             f"got {self.listen!r}")
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 0:
            raise ValueError(f"init_info 'version' must be an int >= 0, got {self.version!r}")
        if self.token is not None and self.token_file is not None:
            raise ValueError("init_info: give 'token' or 'token_file', not both")
        if self.token is None and self.token_file is None:
            raise ValueError("init_info needs 'token' (or 'token_file'): the secret the trainer's Sender uses")
        if self.stall_timeout is not None and not (isinstance(self.stall_timeout, (int, float))
                                                   and self.stall_timeout > 0):
            raise ValueError(f"init_info 'stall_timeout' must be > 0 seconds, got {self.stall_timeout!r}")


@dataclass
class SparseSyncUpdateInfo(WeightTransferUpdateInfo):
    version: int
    timeout: float = 60.0

    def __post_init__(self):
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 0:
            raise ValueError(f"update_info 'version' must be an int >= 0, got {self.version!r}")
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool) \
                or not (self.timeout >= 0 and math.isfinite(self.timeout)):
            raise ValueError(f"update_info 'timeout' must be a finite number of seconds >= 0, got {self.timeout!r}")


def _local_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_world_group
        return int(get_world_group().local_rank)
    except Exception:                 # noqa: BLE001 - not initialised (unit use): one worker
        return 0


class SparseSyncWeightTransferEngine(WeightTransferEngine[SparseSyncInitInfo, SparseSyncUpdateInfo]):
    """Weight-transfer backend ``sparsesync``: see the module docstring."""

    init_info_cls = SparseSyncInitInfo
    update_info_cls = SparseSyncUpdateInfo
    supports_draft_weight_update = False     # one mirror per worker, for the main model

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.staged: StagedMirror | None = None  # mirror + receiver + what changed since the last apply (shared core)
        self.names: list[str] = []
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.last_update: dict = {}
        self._running = False
        self._apply_lock = threading.Lock()

    @property
    def receiver(self) -> Receiver | None:
        return self.staged.receiver if self.staged is not None and self._running else None

    @property
    def mirror(self) -> dict[str, torch.Tensor]:
        return self.staged.mirror if self.staged is not None else {}

    @property
    def version(self) -> int | None:
        """The version the runtime model holds."""
        return self.staged.version if self.staged is not None else None

    @property
    def digest(self) -> str | None:
        """state_digest of the engine's weights in checkpoint coordinates (of the mirror at ``version``)."""
        return self.staged.digest if self.staged is not None else None

    @property
    def broken(self) -> str | None:
        return self.staged.broken if self.staged is not None else None

    # -- vLLM API ---------------------------------------------------------------------------------------------------
    def init_transfer_engine(self, init_info: SparseSyncInitInfo) -> None:
        if self._running:
            raise RuntimeError("sparsesync: init_weight_transfer_engine was already called on this worker "
                               f"(receiver at {self.receiver.address}); call shutdown_weight_transfer_engine first")
        token = init_info.token
        if init_info.token_file is not None:
            try:
                token = open(init_info.token_file).read().strip()
            except OSError as exc:
                raise ValueError(f"init_info 'token_file' {init_info.token_file!r}: {exc.strerror or exc}") from None
        t0 = time.perf_counter()
        if self.mirror:
            # again after shutdown_weight_transfer_engine: the weights may have moved past the checkpoint, so the
            # live mirror (equal to them after every successful apply) is kept, and the version must be its own
            unapplied = bool(self.staged._changed) or self.broken is not None
            if unapplied or init_info.version != self.version:
                raise ValueError(f"sparsesync: this worker's weights are at version {self.version}"
                                 f"{' (with an unapplied update)' if unapplied else ''}; "
                                 f"initialise again with version {self.version}, not {init_info.version}")
            mirror, path = self.mirror, "the mirror kept from before the shutdown"
        else:
            path = init_info.checkpoint
            if path is None:
                path = model_directory(self.model_config.model, getattr(self.model_config, "revision", None))
                if path is None:
                    raise ValueError(f"sparsesync: cannot find the checkpoint of model {self.model_config.model!r} "
                                     "locally; pass init_info 'checkpoint' (the safetensors files the engine loaded)")
            mirror = load_mirror(path)
            self._check_against_model_dir(path, mirror)
        self.names = list(mirror)
        self.layout = {n: (t.dtype, tuple(t.shape)) for n, t in mirror.items()}
        self._packed = dict(getattr(self.model, "packed_modules_mapping", {}) or {})
        self._aliases = self._tied_aliases()
        listen = offset_port(init_info.listen, _local_rank())
        self.staged = StagedMirror(mirror, listen=listen, token=token, version=init_info.version,
                                   stall_timeout=init_info.stall_timeout, require_digest=init_info.require_digest)
        self.staged.start()
        self._running = True
        nbytes = sum(t.numel() * t.element_size() for t in mirror.values())
        log.info("sparsesync: worker %d receiving on %s at version %d; mirror of %d tensors (%.1f MB) from %s "
                 "loaded in %.2f s", os.getpid(), self.receiver.address, self.version, len(mirror), nbytes / 1e6,
                 path, time.perf_counter() - t0)

    def start_weight_update(self) -> None:
        pass                                      # everything happens in receive_weights (it may raise cleanly)

    def finish_weight_update(self) -> None:
        pass                                      # must not raise: vLLM would keep its "update active" flag

    def receive_weights(self, update_info: SparseSyncUpdateInfo) -> None:
        if self.receiver is None:
            raise WeightUpdateError("sparsesync: update_weights before init_weight_transfer_engine")
        with self._apply_lock:
            try:
                self._receive(update_info)
            except WeightUpdateError:
                g = _world()
                # vLLM 0.32's MultiprocExecutor.collective_rpc raises at the first failed rank it reads (in rank
                # order) and leaves the other ranks' replies queued, where the NEXT rpc reads them: every later call
                # gets a stale answer. All ranks agreed on the failure, so only the last rank raises; the others
                # end their update session the way vLLM does for a failed update (flag cleared) and return.
                if g is not None and g.rank_in_group != g.world_size - 1 and _end_worker_session():
                    log.warning("sparsesync: update_weights failed on every rank; rank %d leaves the raising to the "
                                "last rank", g.rank_in_group)
                    return
                raise

    def shutdown(self) -> None:
        if self._running:
            self.staged.stop()
            self._running = False

    # -- status / proof ---------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """What this worker holds: the applied version, the state digest of its weights in checkpoint coordinates
        (equal to the trainer's ``state_digest`` of that version), the receiver's address and version, and the
        last apply's figures. Reachable from the driver with the worker extension (``sparsesync_status``)."""
        r = self.receiver
        return {"pid": os.getpid(), "version": self.version, "digest": self.digest,
                "address": r.address if r is not None else None,
                "receiver_version": r.version if r is not None else None,
                "errors": list(r.errors)[-3:] if r is not None else [], "broken": self.broken,
                "last_update": dict(self.last_update)}

    # -- internals --------------------------------------------------------------------------------------------------
    def _check_against_model_dir(self, path, mirror) -> None:
        """A checkpoint given explicitly must have the tensor layout of the one the engine loaded."""
        model_dir = model_directory(self.model_config.model, getattr(self.model_config, "revision", None))
        if model_dir is None or os.path.realpath(model_dir) == os.path.realpath(str(path)):
            return
        try:
            want = read_layout(model_dir)
        except InvalidArgument:
            return
        got = {n: (t.dtype, tuple(t.shape)) for n, t in mirror.items()}
        if want != got:
            diff = sorted(set(want) ^ set(got)) or sorted(n for n in want if want[n] != got.get(n))
            raise ValueError(f"sparsesync: checkpoint {str(path)!r} does not match the engine's model {model_dir!r} "
                             f"(first differences: {diff[:5]})")

    def _tied_aliases(self) -> dict[str, str]:
        """Modules that share one embedding weight (tied lm_head): alias module -> canonical module."""
        try:
            from vllm.model_executor.layers.vocab_parallel_embedding import (
                VocabParallelEmbedding,
            )
        except ImportError:
            return {}
        by_weight: dict[int, list[str]] = {}
        for mname, mod in self.model.named_modules(remove_duplicate=False):
            w = getattr(mod, "weight", None)
            if isinstance(mod, VocabParallelEmbedding) and w is not None:
                by_weight.setdefault(id(w), []).append(mname)
        aliases = {}
        for members in by_weight.values():
            if len(members) > 1:
                canon = next((m for m in members if m.endswith("embed_tokens")), sorted(members)[0])
                aliases.update({m: canon for m in members if m != canon})
        return aliases

    def _receive(self, info: SparseSyncUpdateInfo) -> None:
        """Wait, check, agree with the other workers, apply. Every worker decides *before* touching the model whether
        it can apply; with tensor parallelism they exchange that decision (one small all-gather on vLLM's CPU group),
        so either every rank applies the version or none does."""
        sm = self.staged
        with sm.prepare(info.version, info.timeout,
                        expand=lambda changed: expand(changed, self.names, self._packed, self._aliases)) as plan:
            problem = plan.problem
            if problem is None:
                try:
                    problem = self._validate(plan.names)
                except Exception as exc:      # noqa: BLE001 - must reach the agreement below on every rank
                    problem = f"{type(exc).__name__}: {exc}"
            problems = _agree(problem)
            if problems:
                raise WeightUpdateError(f"sparsesync: {_describe(problems)}. The engine keeps serving version "
                                        f"{self.version}.")
            t1 = time.perf_counter()
            failure = None
            try:
                fixed = self._apply(plan.names) if plan.names else []
            except BaseException as exc:      # noqa: BLE001
                failure = self._recover(plan, exc)
                fixed = []
            apply_s = time.perf_counter() - t1
            if failure is None:
                t2 = time.perf_counter()
                sm.applied(plan, modules=len({group_key(n, self._packed, self._aliases) for n in plan.names}),
                           fixups=fixed, apply_s=round(apply_s, 4))
                sm.last_update["digest_s"] = round(time.perf_counter() - t2, 4)
            problems = _agree(failure)
            if problems:
                raise WeightUpdateError(f"sparsesync: applying version {plan.version} failed: {_describe(problems)}")
        self.last_update = dict(sm.last_update)
        log.info("sparsesync: applied version %d: %d changed tensors -> %d loaded (%d modules) in %.3f s "
                 "(waited %.3f s); digest %s", plan.version, len(plan.changed), len(plan.names),
                 self.last_update["modules"], apply_s, plan.wait_s, self.digest)

    def _validate(self, names) -> str | None:
        """Everything that can be checked before the model is touched: every tensor is in the mirror with the layout
        the engine was loaded with, and no runtime module gets only part of its checkpoint tensors."""
        bad = [n for n in names if n not in self.mirror
               or (self.mirror[n].dtype, tuple(self.mirror[n].shape)) != self.layout.get(n)]
        if bad:
            return f"tensors {bad[:5]} are missing from the mirror or changed layout; nothing was applied"
        full = expand(names, self.names, self._packed, self._aliases)
        if len(full) != len(names):
            return f"internal error: partial modules {sorted(set(full) - set(names))[:5]}"
        return None

    def _apply(self, names) -> list[str]:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
        model = self.model
        with torch.no_grad():
            initialize_layerwise_reload(model)
            # a fresh view per tensor: vLLM's WeightsMapper sets attributes (shard_id) on the tensor it is given
            loaded = model.load_weights((n, self.mirror[n].view_as(self.mirror[n])) for n in names)
            with _quiet(_LAYERWISE_LOGGER):    # one "Failed to load weights" warning per module not in this update
                finalize_layerwise_reload(model, self.model_config)
            touched = set(names) | set(loaded or ())
            return self._fixups(touched) if self.device.type == "cpu" else []

    def _fixups(self, touched: set[str]) -> list[str]:
        """Post-load steps vLLM 0.32's layerwise reload skips on the CPU backend (measured, docs/notes/vllm.md §12):
        1. unquantized MoE: ``_setup_kernel`` treats a reload as a weight update and skips the CPU prepack of the
           experts (``moe_kernel.fused_experts.process_weights_after_loading``): redo it on every reloaded layer;
        2. tied embeddings: only the module that received the weight is re-processed, so the tied ``lm_head`` keeps the
           packed copy of the old embedding for the logits: re-process every member of a touched tied group."""
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            VocabParallelEmbedding,
        )
        try:
            from vllm.model_executor.layers.fused_moe.routed_experts import (
                RoutedExperts,
            )
        except ImportError:
            RoutedExperts = ()
        done = []

        def hit(mname: str) -> bool:
            return any(n.startswith(mname + ".") for n in touched)

        # the experts module a checkpoint expert tensor loads into ("...mlp.experts"); vLLM 0.28 nests the
        # RoutedExperts one level below it ("...mlp.experts.routed_experts"), 0.32 has it there
        expert_keys = {group_key(n) for n in touched if ".experts" in n}

        def hit_experts(mname: str) -> bool:
            return hit(mname) or any(mname == k or mname.startswith(k + ".") for k in expert_keys)

        for mname, mod in self.model.named_modules():
            if RoutedExperts and isinstance(mod, RoutedExperts) and hit_experts(mname):
                kernel = getattr(getattr(mod, "quant_method", None), "moe_kernel", None)
                experts = getattr(kernel, "fused_experts", None)
                if experts is not None and hasattr(experts, "process_weights_after_loading"):
                    experts.process_weights_after_loading(mod)
                    done.append(mname)
        tied: dict[int, list] = {}
        for mname, mod in self.model.named_modules(remove_duplicate=False):
            if isinstance(mod, VocabParallelEmbedding) and getattr(mod, "weight", None) is not None:
                tied.setdefault(id(mod.weight), []).append((mname, mod))
        for members in tied.values():
            if len(members) > 1 and any(hit(m) for m, _ in members):
                for mname, mod in members:
                    mod.quant_method.process_weights_after_loading(mod)
                    done.append(mname)
        return done

    def _recover(self, plan, exc: BaseException) -> str:
        """An apply failed half way: put the layerwise state back, then reload every touched module from the mirror
        (a consistent, verified version). Returns what happened (the caller raises)."""
        log.exception("sparsesync: apply failed")
        _abort_layerwise(self.model)
        try:
            self._apply(plan.names)
        except BaseException as exc2:           # noqa: BLE001
            _abort_layerwise(self.model)
            why = f"{type(exc2).__name__}: {exc2}"
            msg = (f"{type(exc).__name__}: {exc}; reloading the touched modules failed too ({why}): the engine's "
                   f"weights are INCONSISTENT; the next update_weights reloads every tensor")
            self.staged.failed(plan, why, consistent=False)
            return msg
        self.staged.applied(plan, recovered=True)
        return (f"{type(exc).__name__}: {exc}; the touched modules were reloaded from the verified mirror, so the "
                f"engine now holds version {self.version} (digest {self.digest})")


def _world():
    """vLLM's group of this engine's workers, or None for a single worker."""
    try:
        from vllm.distributed.parallel_state import get_world_group
        g = get_world_group()
    except Exception:                     # noqa: BLE001 - not initialised: one worker
        return None
    return g if getattr(g, "world_size", 1) > 1 else None


def _agree(problem: str | None) -> list[tuple[int, str]]:
    """Every worker's problem (rank, message), exchanged between the workers of the engine."""
    g = _world()
    if g is None:
        return [(0, problem)] if problem else []
    out: list = [None] * g.world_size
    torch.distributed.all_gather_object(out, (g.rank_in_group, problem), group=g.cpu_group)
    return [(rk, p) for rk, p in out if p]


def _describe(problems: list[tuple[int, str]]) -> str:
    return describe_problems(problems, single=_world() is None)


def _abort_layerwise(model) -> int:
    """Undo ``initialize_layerwise_reload`` for every module not processed yet (its kernel tensors go back, its
    buffered loads are dropped), so the model is usable again."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        LOADING_LAYERS,
        _place_kernel_tensors,
        get_layerwise_info,
    )
    restored = 0
    for layer in model.modules():
        info = get_layerwise_info(layer)
        if info.can_load():
            _place_kernel_tensors(layer, info)
            info.reset()
            restored += 1
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    LOADING_LAYERS.clear()
    return restored


def _end_worker_session() -> bool:
    """Clear the calling vLLM worker's "weight update active" flag, as its own update_weights does on an exception.
    Finds the worker in the call stack (Worker.update_weights -> engine.update_weights -> here). False if not found."""
    f = sys._getframe(1)
    while f is not None:
        w = f.f_locals.get("self")
        if w is not None and hasattr(w, "_weight_update_active") and hasattr(w, "weight_transfer_engine"):
            w._weight_update_active = False
            try:
                w.weight_transfer_engine.reset_weight_update_target()
            except Exception:             # noqa: BLE001
                pass
            return True
        f = f.f_back
    return False


@contextlib.contextmanager
def _quiet(name: str):
    lg = logging.getLogger(name)
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)
