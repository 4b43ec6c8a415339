"""The SGLang custom weight loader (``--custom-weight-loader sparsesync.integrations.sglang.loader.load``).

SGLang 0.5.23 calls ``load(model, named_tensors)`` in every tensor-parallel worker (scheduler process) when a client
sends ``update_weights_from_tensor(named_tensors, load_format=LOADER)``
(``sglang/srt/model_executor/model_runner_components/weight_updater.py``, ``WeightUpdater.update_weights_from_tensor``),
after moving every tensor to the worker's device; it ignores the return value. ``named_tensors`` must be exactly one
command, ``[("__sparsesync__", <uint8 tensor of JSON>)]`` (:func:`sparsesync.integrations.sglang.encode_command`):

``{"op": "init", ...}`` (once, before the first apply): load the checkpoint into a host mirror and start this worker's
background receiver. Keys:

- ``listen`` (str, default ``tcp://127.0.0.1:7000``): the receiver address; worker ``tp_rank`` listens on
  ``port + tp_rank`` (with pipeline parallelism, ``port + pp_rank * tp_size + tp_rank``). Port 0 is refused (the
  client could not find the workers).
- ``token`` or ``token_file`` (one of them): the shared secret (>= 8 characters). ``token_file`` (read by each
  worker, whitespace stripped) keeps the secret out of SGLang's request path.
- ``version`` (int >= 0, default 0): the version the engine's weights are.
- ``checkpoint`` (path, default the server's ``--model-path`` when it is a local directory or in the Hugging Face
  cache): the safetensors checkpoint the engine loaded.
- ``require_digest`` (bool, default False): refuse versions whose update did not carry the trainer's state digest.
- ``stall_timeout`` (seconds, optional): the receiver's.
- ``direct`` (bool, default False): learn a :class:`~sparsesync.integrations.runtime_map.RuntimeMap` and apply the
  tensors it maps by direct strided copies from the mirror into the parameters instead of through ``load_weights``
  (see below).

``direct``: before the receiver starts (so no push can change the mirror meanwhile; refused unless the mirror holds
exactly the engine's version and is not inconsistent), every mirror tensor is loaded once through the model's
``load_weights`` under a dispatch mode that records which ones land as pure copies (``RuntimeMap.learn``; it verifies
the map bitwise against what the loader wrote). The engine's weights equal the mirror at init (the init contract:
``checkpoint`` is what the engine loaded, at ``version``), so this writes the values they already hold. A worker whose
learning fails refuses the init (all TP workers then refuse). Models with ``post_load_weights`` (DeepSeek MLA's
``w_kc`` / ``w_vc`` and others: state derived from parameters outside them, invisible to the map) are refused. An
apply then copies the mapped tensors directly (the map is checked for replaced parameters and mirror layouts before
any copy) and passes the rest (tensors whose loader is not a pure copy, e.g. vocab padding that is zero-filled, or
a tensor the map saw no copy for) to ``load_weights``. A failure in either part is handled like a failing
``load_weights``: the same tensors are loaded again, all through ``load_weights``. If a parameter was replaced since
learning (``param.data = ...`` or a new Parameter), the apply goes entirely through ``load_weights`` and direct stays
off until the next ``init`` with ``direct`` (status ``direct.off`` says why). Costs: the learn time at init (one
``load_weights`` call per checkpoint tensor plus dispatch-mode and per-call parameter-identity checks: more than one
full load), map memory O(tensors) (about 1 KB per tensor as Python objects), an O(parameters) identity check per
apply. Status (``direct``: ``enabled``, ``mapped``, ``unmapped``, ``copies``, ``learn_s``, ``map_bytes``, ``off``) and
every apply (``direct_tensors``, ``loader_tensors``, ``direct_s``, ``loader_s``) report both paths. Not run on a live
SGLang; opt-in.

``{"op": "apply", "version": v, "timeout": s}``: wait up to ``s`` seconds (default 60) until this worker's receiver
holds exactly ``v``, then load every checkpoint tensor of each runtime module the updates since the last apply
touched (fused q/k/v and gate/up, every expert of a touched MoE layer, both names of a tied embedding) through the
model's own ``load_weights``: SGLang's exact semantics for fused, TP-sharded, tied and MoE parameters (with init
``direct``: the mapped ones by direct copies, the rest through ``load_weights``).

``{"op": "shutdown"}``: stop the receiver (the mirror is kept; ``init`` again with the version the engine holds).

All-or-nothing: everything that can fail is checked before the model is touched (version there in time, not
refused, not superseded, digest when required), and the workers of a TP group exchange their go / no-go first (one
small all-gather on SGLang's TP CPU group), so every worker applies the version or none does. If ``load_weights``
raises part way, the worker loads the same tensors again from the mirror (which holds the new version, verified):
when that succeeds it holds the new version (with ``direct``: a failure in the direct copies is handled the same way,
and the second attempt loads every tensor through ``load_weights``); otherwise it is reported **inconsistent** (``broken``) and the next apply
loads every tensor.

Failures never raise out of :func:`load`: SGLang 0.5.23 does not catch an exception from a custom loader
(``SchedulerWeightUpdaterManager.update_weights_from_tensor`` -> ``Scheduler.process_input_requests`` ->
``run_scheduler_process``, which logs it and sends SIGQUIT to the server: the whole server dies). The outcome is
recorded instead: in the receiver's status (``applied_version``, ``digest``, ``error``, ``broken``; read remotely
with :func:`sparsesync.probe`, which the client does after every update), in the log, and for the plug-in hook
(:func:`sparsesync.integrations.sglang.register`), which turns it into SGLang's ``(False, message)`` reply.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref

import torch

from ...errors import InvalidArgument
from ..runtime_map import RuntimeMap
from ..staging import StagedMirror, describe_problems, offset_port
from ..vllm.checkpoint import load_mirror, model_directory
from ..vllm.groups import expand, group_key
from . import COMMAND, decode_command

log = logging.getLogger(__name__)

STANDARD_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_INIT_KEYS = {"op", "listen", "token", "token_file", "version", "checkpoint", "require_digest", "stall_timeout",
              "direct"}
_APPLY_KEYS = {"op", "version", "timeout"}

_workers: weakref.WeakKeyDictionary[torch.nn.Module, SGLangWorker] = weakref.WeakKeyDictionary()
_workers_lock = threading.Lock()
_outcome = threading.local()


class CommandError(Exception):
    """A command this worker refuses (nothing was changed)."""


# -- the function SGLang calls ---------------------------------------------------------------------------------------
def load(model, named_tensors) -> dict:
    """SGLang's custom weight loader entry point. Never raises (see the module docstring); returns the outcome
    ``{"ok", "op", "message", ...}`` (SGLang ignores it; the plug-in hook reads it through :func:`take_outcome`)."""
    t0 = time.perf_counter()
    try:
        cmd = _command(named_tensors)
    except Exception as exc:                 # noqa: BLE001 - identical on every rank (same bytes): no exchange
        out = {"ok": False, "op": None, "message": f"sparsesync: refused the update_weights_from_tensor call: {exc}"}
        log.error(out["message"])
        return _record(out)
    op = cmd["op"]
    try:
        worker = worker_for(model)
        if op == "init":
            out = worker.init(cmd)
        elif op == "apply":
            out = worker.apply(cmd)
        elif op == "shutdown":
            out = worker.shutdown()
        else:
            out = {"ok": False, "message": f"sparsesync: unknown command op {op!r} (expected 'init', 'apply' or "
                                           f"'shutdown')"}
    except Exception as exc:
        log.exception("sparsesync: %s failed", op)
        out = {"ok": False, "message": f"sparsesync: {op} failed: {type(exc).__name__}: {exc}"}
    out["op"] = op
    out["seconds"] = round(time.perf_counter() - t0, 4)
    (log.info if out["ok"] else log.error)("%s", out["message"])
    return _record(out)


def take_outcome() -> dict | None:
    """The outcome of the last :func:`load` call on this thread, cleared (used by the plug-in hook)."""
    out = getattr(_outcome, "value", None)
    _outcome.value = None
    return out


def _record(out: dict) -> dict:
    _outcome.value = out
    return out


def _command(named_tensors) -> dict:
    items = list(named_tensors)
    names = [n for n, _ in items]
    if len(items) != 1 or names[0] != COMMAND:
        raise ValueError(f"load_format {__name__}.load takes exactly one named tensor {COMMAND!r} (a sparsesync "
                         f"command; the weights themselves come through the sparsesync receivers), got names "
                         f"{names[:5]}{'...' if len(names) > 5 else ''}")
    return decode_command(items[0][1])


def worker_for(model) -> SGLangWorker:
    """This process's worker state for ``model`` (one per model object)."""
    with _workers_lock:
        w = _workers.get(model)
        if w is None:
            w = _workers[model] = SGLangWorker(model)
        return w


# -- tensor-parallel placement (SGLang's runtime context; one worker when it is not there) ---------------------------
def _tp() -> tuple[int, int, int, object]:
    """(tp_rank, tp_size, port offset, TP CPU group or None) of this worker, from SGLang's runtime context
    (``sglang.srt.runtime_context.get_parallel()``, published in every scheduler process); one worker without it."""
    try:
        from sglang.srt.runtime_context import get_parallel
        p = get_parallel()
        rank, size = int(p.tp_rank), int(p.tp_size)
    except Exception:                        # noqa: BLE001 - no SGLang runtime (tests, other hosts): one worker
        return 0, 1, 0, None
    try:
        pp_rank = int(p.pp_rank)
    except Exception:                        # noqa: BLE001 - not published: no pipeline parallelism
        pp_rank = 0
    group = None
    if size > 1:
        try:
            group = p.tp_group.cpu_group
        except Exception as exc:             # noqa: BLE001
            log.warning("sparsesync: no TP CPU group (%s): the workers cannot agree before applying", exc)
    return rank, size, pp_rank * size + rank, group


def _all_gather(obj, group) -> list:
    out: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def _model_path() -> str | None:
    try:
        from sglang.srt.runtime_context import get_server_args
        return get_server_args().model_path
    except Exception:                        # noqa: BLE001
        return None


# -- model structure ------------------------------------------------------------------------------------------------
def packed_mapping(model) -> dict[str, list[str]]:
    """Fused runtime module -> its checkpoint parts: the standard ``qkv_proj`` / ``gate_up_proj`` plus what the model
    declares (``packed_modules_mapping``; SGLang's ``stacked_params_mapping`` entries ``(param, shard, id)``).
    Widening an update to a whole fused module is always exact (the loader just writes more of it)."""
    out = {k: list(v) for k, v in STANDARD_PACKED.items()}

    def add(fused: str, part: str) -> None:
        fused, part = fused.strip("."), part.strip(".")
        if fused and part and part not in out.setdefault(fused, []):
            out[fused].append(part)

    for fused, parts in (getattr(model, "packed_modules_mapping", None) or {}).items():
        for p in parts:
            add(fused, p)
    for entry in getattr(model, "stacked_params_mapping", None) or ():
        if isinstance(entry, (tuple, list)) and len(entry) >= 2 and all(isinstance(x, str) for x in entry[:2]):
            add(entry[0], entry[1])
    return out


def tied_aliases(model) -> dict[str, str]:
    """Modules that share one weight (a tied ``lm_head`` is ``model.embed_tokens`` in SGLang): alias -> canonical."""
    by_weight: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "_parameters", {}).get("weight")
        if isinstance(w, torch.Tensor) and mname:
            by_weight.setdefault(id(w), []).append(mname)
    aliases: dict[str, str] = {}
    for members in by_weight.values():
        if len(set(members)) > 1:
            canon = next((m for m in members if m.endswith("embed_tokens")), sorted(members)[0])
            aliases.update({m: canon for m in members if m != canon})
    return aliases


# -- one worker -----------------------------------------------------------------------------------------------------
class SGLangWorker:
    """The sparsesync state of one SGLang worker (one model in one scheduler process)."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.staged: StagedMirror | None = None
        self.rank, self.size, self.offset, _ = _tp()
        self.packed = packed_mapping(model)
        self.aliases = tied_aliases(model)
        self.last: dict = {}
        self._receiving = False
        self._lock = threading.Lock()
        self.rmap: RuntimeMap | None = None       # init 'direct': how checkpoint tensors land in the parameters
        self._map_params: dict = {}               # param name -> the live tensor object the map copies into
        self.direct: dict = {"enabled": False}    # what status reports about the direct path

    @property
    def model(self):
        m = self._model()
        if m is None:
            raise RuntimeError("the model this sparsesync worker served is gone")
        return m

    # status sent in every receiver handshake (on top of StagedMirror's applied_version / digest / error / broken)
    def status(self) -> dict:
        sm = self.staged
        return {"engine": "sglang", "tp_rank": self.rank, "tp_size": self.size,
                "address": sm.address if sm is not None else None,
                "receiver_version": sm.receiver.version if sm is not None else None,
                "direct": dict(self.direct), "last_command": dict(self.last)}

    # -- init ---------------------------------------------------------------------------------------------------------
    def init(self, cmd: dict) -> dict:
        with self._lock:
            self.rank, self.size, self.offset, group = _tp()
            staged, problem, where, learned = None, None, None, None
            try:
                staged, where, learned = self._start(cmd)
            except Exception as exc:          # noqa: BLE001 - reported after the exchange, on every rank
                problem = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CommandError) else str(exc)
            problems = _agree(problem, group)
            if problems:
                if staged is not None:
                    staged.stop()
                msg = f"sparsesync: init refused: {_describe(problems, self.size)}; no receiver was started"
                self.last = {"op": "init", "ok": False, "message": msg}
                return {"ok": False, "message": msg}
            self.staged, self._receiving = staged, True
            if learned is None:
                self.rmap, self._map_params, self.direct = None, {}, {"enabled": False}
            else:
                self.rmap, self._map_params, self.direct = learned
            msg = (f"sparsesync: worker tp_rank {self.rank}/{self.size} receiving on {staged.address} at version "
                   f"{staged.version}; mirror of {len(staged.mirror)} tensors from {where}")
            if learned is not None:
                d = self.direct
                msg += (f"; direct: {d['mapped']} tensors mapped to direct copies, {d['unmapped']} through "
                        f"load_weights (learned in {d['learn_s']:.3f} s, map {d['map_bytes']} bytes)")
            self.last = {"op": "init", "ok": True, "version": staged.version}
            return {"ok": True, "message": msg, "address": staged.address, "version": staged.version,
                    "direct": dict(self.direct)}

    def _start(self, cmd: dict):
        bad = sorted(set(cmd) - _INIT_KEYS)
        if bad:
            raise CommandError(f"unknown init keys {bad}; expected some of {sorted(_INIT_KEYS - {'op'})}")
        listen = cmd.get("listen", "tcp://127.0.0.1:7000")
        if not isinstance(listen, str) or not listen.startswith(("tcp://", "inproc://")):
            raise CommandError(f"init 'listen' must be an address like 'tcp://0.0.0.0:7000', got {listen!r}")
        if listen.startswith("tcp://") and listen.rpartition(":")[2] == "0":
            raise CommandError(f"init 'listen' {listen!r}: port 0 is refused (each worker listens on port + "
                               "tp_rank, and the trainer and the client must know those ports)")
        version = cmd.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise CommandError(f"init 'version' must be an int >= 0, got {version!r}")
        token, token_file = cmd.get("token"), cmd.get("token_file")
        if (token is None) == (token_file is None):
            raise CommandError("init needs exactly one of 'token' and 'token_file' (the secret of the trainer's "
                               f"Sender), got token={'set' if token is not None else None}, token_file={token_file!r}")
        if token_file is not None:
            try:
                with open(token_file) as fh:
                    token = fh.read().strip()
            except OSError as exc:
                raise CommandError(f"init 'token_file' {token_file!r}: {exc.strerror or exc}") from None
        stall = cmd.get("stall_timeout")
        if stall is not None and not (isinstance(stall, (int, float)) and not isinstance(stall, bool) and stall > 0):
            raise CommandError(f"init 'stall_timeout' must be > 0 seconds, got {stall!r}")
        require_digest = cmd.get("require_digest", False)
        if not isinstance(require_digest, bool):
            raise CommandError(f"init 'require_digest' must be true or false, got {require_digest!r}")
        direct = cmd.get("direct", False)
        if not isinstance(direct, bool):
            raise CommandError(f"init 'direct' must be true or false, got {direct!r}")
        if direct and callable(getattr(self.model, "post_load_weights", None)):
            raise CommandError(f"init 'direct' refused: {type(self.model).__name__} has post_load_weights (state "
                               "derived from the loaded parameters, e.g. DeepSeek MLA's w_kc / w_vc, which the "
                               "runtime map cannot see and direct copies would leave stale); initialise without "
                               "'direct'")
        if self.staged is not None:
            sm = self.staged
            if self._receiving:
                raise CommandError(f"init: this worker already receives on {sm.address} (version {sm.version}); "
                                   "send {'op': 'shutdown'} first")
            moved = sm.receiver.version != sm.version
            if sm.broken is not None or moved or version != sm.version:
                raise CommandError(f"init: this worker's weights are at version {sm.version}"
                                   f"{' (inconsistent)' if sm.broken else ''}"
                                   f"{' (with an unapplied version in the mirror)' if moved else ''}"
                                   f"; initialise again with version {sm.version}, not {version}")
            mirror, where = sm.mirror, "the mirror kept from before the shutdown"
        else:
            path = cmd.get("checkpoint")
            if path is None:
                mp = _model_path()
                path = model_directory(mp) if mp else None
                if path is None:
                    raise CommandError(f"init: cannot find the checkpoint of model {mp!r} locally; pass "
                                       "'checkpoint' (the safetensors files the engine loaded)")
            if not isinstance(path, (str, os.PathLike)):
                raise CommandError(f"init 'checkpoint' must be a path, got {path!r}")
            mirror, where = load_mirror(path), str(path)
        staged = StagedMirror(mirror, listen=offset_port(listen, self.offset), token=token, version=version,
                              stall_timeout=stall, require_digest=require_digest, status=self.status)
        # learn before the receiver starts: no push can change the mirror while the loader runs over it
        learned = self._learn(staged) if direct else None
        staged.start()
        return staged, where, learned

    def _learn(self, staged: StagedMirror) -> tuple:
        """Learn the :class:`RuntimeMap` by loading every mirror tensor once through ``load_weights`` (the engine's
        weights equal the mirror here, so this changes nothing). Returns (map, its parameters, status figures)."""
        model = self.model
        with staged.receiver.hold() as held:
            if held != staged.version or staged.broken is not None:
                raise CommandError(f"init 'direct' refused: the mirror holds version {held} but the engine is at "
                                   f"version {staged.version}{' (inconsistent)' if staged.broken else ''}; learning "
                                   "would load weights the engine does not hold")
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    rmap = RuntimeMap.learn(model, staged.mirror, load=lambda pairs: model.load_weights(pairs))
            except Exception as exc:
                raise CommandError(f"init 'direct': learning the runtime map failed ({type(exc).__name__}: {exc}); "
                                   "initialise without 'direct'") from exc
            learn_s = time.perf_counter() - t0
        params = {c.param_name: c.param for copies in rmap.mapped.values() for c in copies}
        info = {"enabled": True, "mapped": sum(1 for c in rmap.mapped.values() if c),
                "unmapped": len(rmap.unmapped) + sum(1 for c in rmap.mapped.values() if not c),
                "copies": sum(len(c) for c in rmap.mapped.values()), "learn_s": round(learn_s, 4),
                "map_bytes": rmap.nbytes_of_map, "off": None}
        if rmap.unmapped:
            why = {}
            for n, r in rmap.unmapped.items():
                why.setdefault(r, n)
            log.info("sparsesync: direct: %d tensors go through load_weights, e.g. %s",
                     info["unmapped"], "; ".join(f"{n}: {r}" for r, n in list(why.items())[:3]))
        return rmap, params, info

    # -- apply --------------------------------------------------------------------------------------------------------
    def apply(self, cmd: dict) -> dict:
        with self._lock:
            self.rank, self.size, self.offset, group = _tp()
            problem, version, timeout = None, cmd.get("version"), cmd.get("timeout", 60.0)
            bad = sorted(set(cmd) - _APPLY_KEYS)
            if bad:
                problem = f"unknown apply keys {bad}; expected 'version' and 'timeout'"
            elif not isinstance(version, int) or isinstance(version, bool) or version < 0:
                problem = f"apply 'version' must be an int >= 0, got {version!r}"
            elif not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                    or not (timeout >= 0 and math.isfinite(timeout)):
                problem = f"apply 'timeout' must be a finite number of seconds >= 0, got {timeout!r}"
            elif self.staged is None:
                problem = "apply before init (send {'op': 'init', ...} first)"
            if problem is not None:
                problems = _agree(problem, group)
                return self._fail(None, f"sparsesync: apply of version {version!r} refused: "
                                        f"{_describe(problems, self.size)}")
            return self._apply(version, float(timeout), group)

    def _apply(self, version: int, timeout: float, group) -> dict:
        sm = self.staged
        held_before = sm.version
        with sm.prepare(version, timeout, expand=self._expand) as plan:
            problem = plan.problem
            problems = _agree(problem, group)
            if problems:
                msg = (f"sparsesync: version {version} not applied: {_describe(problems, self.size)}. The engine "
                       f"keeps serving version {held_before}.")
                sm.failed(plan, msg, consistent=True)
                return self._fail(version, msg)
            t1 = time.perf_counter()
            failure, note, figs = None, "", {}
            try:
                figs = self._load(plan.names, figs)
            except Exception as exc:
                stage = figs.get("stage", "load_weights")
                log.exception("sparsesync: %s failed part way; loading the same tensors again through load_weights",
                              stage)
                first = f"{type(exc).__name__}: {exc}"
                try:
                    # the recovery path is the model's own loader for every tensor (never the map)
                    figs = self._load(plan.names, {}, direct=False)
                    note = (f" (the first load failed part way in {stage} ({first}); loading the same tensors "
                            "again through load_weights succeeded)")
                except Exception as exc2:     # noqa: BLE001
                    failure = (f"{stage} failed part way ({first}) and loading the same tensors again through "
                               f"load_weights failed too ({type(exc2).__name__}: {exc2}): the weights of this "
                               "worker are INCONSISTENT; the next apply loads every tensor")
            apply_s = time.perf_counter() - t1
            figs.pop("stage", None)
            modules = len({group_key(n, self.packed, self.aliases) for n in plan.names})
            if failure is None:
                sm.applied(plan, apply_s=round(apply_s, 4), modules=modules, tp_rank=self.rank, **figs)
            else:
                sm.failed(plan, f"sparsesync: {failure}", consistent=False)
            problems = _agree(failure, group)
        if problems:
            msg = f"sparsesync: applying version {version} failed: {_describe(problems, self.size)}"
            if failure is None:
                sm.error = msg            # this worker holds the new version; another one does not
            return self._fail(version, msg)
        msg = (f"sparsesync: applied version {plan.version} on tp_rank {self.rank}: {len(plan.changed)} changed "
               f"tensors -> {len(plan.names)} loaded ({modules} modules; {figs['direct_tensors']} by direct copies "
               f"in {figs['direct_s']:.3f} s, {figs['loader_tensors']} through load_weights in "
               f"{figs['loader_s']:.3f} s) in {apply_s:.3f} s (waited {plan.wait_s:.3f} s); digest {sm.digest}{note}")
        self.last = {"op": "apply", "ok": True, "version": plan.version}
        return {"ok": True, "message": msg, "version": plan.version, "digest": sm.digest,
                "changed": len(plan.changed), "loaded": len(plan.names), "modules": modules,
                "apply_s": round(apply_s, 4), "wait_s": round(plan.wait_s, 4), **figs}

    def shutdown(self) -> dict:
        with self._lock:
            if self.staged is not None:
                self.staged.stop()
            self._receiving = False
            self.last = {"op": "shutdown", "ok": True}
            return {"ok": True, "message": "sparsesync: receiver stopped (the mirror is kept)"}

    def _fail(self, version, msg: str) -> dict:
        self.last = {"op": "apply", "ok": False, "version": version, "message": msg}
        return {"ok": False, "message": msg, "version": version}

    def _expand(self, changed: set) -> list[str]:
        return expand(changed, self.staged.names, self.packed, self.aliases)

    def _load(self, names: list[str], figs: dict, direct: bool = True) -> dict:
        """Load ``names`` from the mirror: the mapped ones by direct copies (``init`` with ``direct``; the map is
        checked before any copy), the others through ``load_weights``. Fills and returns ``figs`` (counts and
        seconds of each path; ``figs["stage"]`` names the path that was running if this raises)."""
        mirror, model = self.staged.mirror, self.model
        chosen: list[str] = []
        t0 = time.perf_counter()
        with torch.no_grad():
            if direct and self.rmap is not None:
                figs["stage"] = "the direct copies"
                stale = self._stale(model)
                if stale is None:
                    mapped = self.rmap.mapped
                    chosen = [n for n in names if mapped.get(n)]   # a name mapped to no copy goes to the loader
                    try:
                        left = self.rmap.apply(mirror, chosen)     # checks everything, then copies
                    except InvalidArgument as exc:                 # refused before any copy: nothing touched
                        stale, chosen = str(exc), []
                    else:
                        if left:                                   # not expected: they were chosen as mapped
                            chosen = [n for n in chosen if n not in set(left)]
                if stale is not None:
                    self._direct_off(stale)
            t1 = time.perf_counter()
            picked = set(chosen)
            rest = [n for n in names if n not in picked]
            figs["stage"] = "load_weights"
            if rest or not chosen:
                # a fresh view per tensor: loaders may narrow it or set attributes on it, never on the mirror itself
                model.load_weights([(n, mirror[n].view_as(mirror[n])) for n in rest])
            t2 = time.perf_counter()
        figs.update(direct_tensors=len(chosen), loader_tensors=len(rest), direct_s=round(t1 - t0, 4),
                    loader_s=round(t2 - t1, 4))
        figs.pop("stage", None)
        return figs

    def _stale(self, model) -> str | None:
        """Why the map no longer describes ``model`` (a parameter object replaced since learning), else None.
        (:meth:`RuntimeMap.apply` itself catches a replaced ``param.data``, not a replaced Parameter object.)"""
        live = dict(model.named_parameters())
        live.update(model.named_buffers())
        for pname, t in self._map_params.items():
            if live.get(pname) is not t:
                return f"model tensor {pname!r} was replaced since the map was learned"
        return None

    def _direct_off(self, why: str) -> None:
        log.warning("sparsesync: direct copies turned off (%s); every tensor goes through load_weights until the "
                    "next init with 'direct'", why)
        self.rmap, self._map_params = None, {}
        self.direct = {**self.direct, "enabled": False, "off": why}


def _agree(problem: str | None, group) -> list[tuple[int, str]]:
    """Every worker's problem (tp_rank, message), exchanged between the workers of the TP group (all of them call
    this the same number of times per command)."""
    if group is None:
        return [(0, problem)] if problem else []
    rank = _tp()[0]
    return [(rk, p) for rk, p in _all_gather((rank, problem), group) if p]


def _describe(problems: list[tuple[int, str]], size: int) -> str:
    return describe_problems(problems, single=size <= 1, label="tp_rank")
