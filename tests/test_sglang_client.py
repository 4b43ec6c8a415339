"""The SGLang client, the plug-in hook and the SGLang 0.5.23 API facts they rely on.

SGLang does not run (nor import) here, so the client is tested against a fake ``Engine`` and a fake HTTP server
whose methods / routes have SGLang 0.5.23's signatures and behaviour, and which call our loader in-process through a
replica of ``WeightUpdater.update_weights_from_tensor``. Where the released source is present
(``SPARSESYNC_SGLANG_SRC``, default ``~/.cache/sparsesync/sglang-0.5.23``: the unpacked wheel, put there by
``scripts/sglang/fetch_source.sh``, which ``.ci/run`` runs), the tests check those signatures,
routes, request fields and the unpickler's allow-list against it with ``ast`` (its modules do not import without a
GPU stack); elsewhere those checks skip and the fakes keep the values read from it (file:line cited below).
"""
from __future__ import annotations

import ast
import asyncio
import base64
import functools
import importlib
import inspect
import io
import json
import os
import pickle
import pickletools
import sys
import threading
import types
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import sglang_models as sm
import torch
from test_sglang_loader import (
    TOKEN,
    Rank,
    assert_exact,
    assert_unchanged,
    free_base_port,
    perturb,
    snapshot,
    write_ckpt,
)

from sparsesync import Sender, state_digest
from sparsesync.integrations import sglang as plugin
from sparsesync.integrations.sglang import COMMAND, LOADER, SGLangUpdateError, loader
from sparsesync.integrations.sglang.client import SGLangClient

SRC = Path(os.environ.get("SPARSESYNC_SGLANG_SRC", Path.home() / ".cache/sparsesync/sglang-0.5.23")) / "sglang"
needs_src = pytest.mark.skipif(not (SRC / "srt").is_dir(),
                               reason=f"SGLang 0.5.23 source not at {SRC} (run scripts/sglang/fetch_source.sh)")


# -- reading the released source --------------------------------------------------------------------------------------
def _tree(rel: str) -> ast.Module:
    return ast.parse((SRC / rel).read_text())


def _class(tree, name) -> ast.ClassDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)


def _method(cls: ast.ClassDef, name):
    return next((n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name),
                None)


def _params(fn) -> list[tuple[str, str | None]]:
    a = fn.args
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    out = list(zip([p.arg for p in pos], defaults))
    out += [(p.arg, ast.unparse(d) if d is not None else None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return out


def _sig(fn) -> list[tuple[str, str | None]]:
    return [(p.name, None if p.default is inspect.Parameter.empty else repr(p.default))
            for p in inspect.signature(fn).parameters.values()]


def _fields(tree, cls_name) -> dict[str, str | None]:
    cls = _class(tree, cls_name)
    return {n.target.id: (ast.unparse(n.value) if n.value is not None else None)
            for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _routes() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for fn in ast.walk(_tree("srt/entrypoints/http_server.py")):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for d in fn.decorator_list:
            if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.args \
                    and isinstance(d.args[0], ast.Constant):
                kind = d.func.attr
                if kind in ("get", "post"):
                    out.setdefault(d.args[0].value, set()).add(kind.upper())
                elif kind == "api_route":
                    methods = next((k.value for k in d.keywords if k.arg == "methods"), None)
                    out.setdefault(d.args[0].value, set()).update(ast.literal_eval(methods) if methods else {"GET"})
    return out


def _allowed_globals() -> set[tuple[str, str]]:
    cls = _class(_tree("srt/utils/common.py"), "SafeUnpickler")
    node = next(n for n in cls.body if isinstance(n, ast.Assign) and n.targets[0].id == "ALLOWED_GLOBALS")
    return set(ast.literal_eval(node.value))


# -- SGLang 0.5.23, reproduced ----------------------------------------------------------------------------------------
# srt/managers/io_struct.py:1927 PauseGenerationReqInput, :1949 ContinueGenerationReqInput,
# :2155 UpdateWeightVersionReqInput (fields and defaults checked against the source in test_io_struct_fields)
IO_FIELDS = {"PauseGenerationReqInput": {"mode": "'abort'"},
             "ContinueGenerationReqInput": {"torch_empty_cache": "True"},
             "UpdateWeightVersionReqInput": {"new_version": None, "abort_all_requests": "True"},
             "UpdateWeightsFromTensorReqInput": {"serialized_named_tensors": None, "load_format": "None",
                                                 "flush_cache": "True", "abort_all_requests": "False",
                                                 "weight_version": "None", "selector": "'all'",
                                                 "torch_empty_cache": "False"},
             "BeginWeightUpdateReqInput": {"selector": "'all'"}, "EndWeightUpdateReqInput": {}}


def _io_class(name):
    spec = IO_FIELDS[name]

    def __init__(self, **kw):
        unknown = set(kw) - set(spec)
        if unknown:
            raise TypeError(f"{name}: unexpected {sorted(unknown)}")
        for k, default in spec.items():
            if k not in kw and default is None:
                raise TypeError(f"{name}: missing {k}")
            setattr(self, k, kw.get(k, None if default is None else ast.literal_eval(default)))
    return type(name, (), {"__init__": __init__})


# SafeUnpickler (srt/utils/common.py:3144): the allow-list this test needs (checked against the source)
_ALLOWED = {("builtins", "list"), ("builtins", "tuple"), ("collections", "OrderedDict"),
            ("torch._utils", "_rebuild_tensor_v2"), ("torch", "uint8"), ("torch.storage", "_load_from_bytes")}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda b: torch.load(io.BytesIO(b), weights_only=True)      # _safe_load_torch_storage
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


ALLOWED = set(_ALLOWED)


def dynamic_import(func_path: str):                       # srt/utils/common.py:4339
    module_path, func_name = func_path.rsplit(".", 1)
    return getattr(importlib.import_module(module_path), func_name)


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightUpdater:
    """srt/model_executor/model_runner_components/weight_updater.py:87 (the fields this path uses) and
    update_weights_from_tensor (:343; the flattened_bucket / direct branches and the device move left out)."""
    custom_weight_loaders: list
    model: object = None

    def update_weights_from_tensor(self, named_tensors, load_format=None):
        if load_format in self.custom_weight_loaders:
            custom_loader = dynamic_import(load_format)
            custom_loader(self.model, named_tensors)
        elif load_format is None:
            self.model.load_weights(named_tensors)
        else:
            raise NotImplementedError(f"Unknown load_format={load_format}")
        return True, "Success"


def around(hook):
    """HookRegistry's AROUND wrapping (srt/plugins/hook_registry.py:_wrap_fn)."""
    original = WeightUpdater.update_weights_from_tensor

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return hook(original, *args, **kwargs)
    return wrapper


class SchedulerDied(Exception):
    """What SGLang 0.5.23 does when a custom loader raises: run_scheduler_process logs it and SIGQUITs the server."""


class FakeSGLang:
    """Tokenizer manager + scheduler + one WeightUpdater per TP rank (each rank one model in this process)."""

    def __init__(self, models, ranks: Rank, *, flag=True, hook=False):
        self.models, self.ranks, self.calls = models, ranks, []
        cls = WeightUpdater
        if hook:
            cls = type("HookedWeightUpdater", (WeightUpdater,), {
                "__slots__": (), "update_weights_from_tensor": around(plugin._around_update_weights_from_tensor)})
        self.updaters = [cls(custom_weight_loaders=[LOADER] if flag else [], model=m) for m in models]
        self.session = False
        self.paused = None
        self.weight_version = "default"
        self.fail_update_with: Exception | None = None

    # srt/managers/tokenizer_manager.py:2267 / :2282 (the scheduler side: scheduler.py:5817 / :5934)
    def pause(self, mode):
        assert mode in ("abort", "retract", "in_place")
        self.calls.append(("pause", mode))
        self.paused = mode

    def resume(self):
        self.calls.append(("continue",))
        self.paused = None

    # srt/managers/scheduler_components/weight_updater.py:309 / :323
    def begin(self, selector="all"):
        self.calls.append(("begin",))
        if self.session:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session = True
        return True, "Success"

    def end(self):
        self.calls.append(("end",))
        if not self.session:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session = False
        return True, "Success"

    # srt/managers/scheduler_components/weight_updater.py:232 + tokenizer_control_mixin.py:563
    def update(self, serialized: list, load_format, flush_cache, weight_version=None):
        self.calls.append(("update", load_format, flush_cache))
        if self.fail_update_with is not None:
            raise self.fail_update_with
        if not self.session:
            return False, ("update_weights_from_tensor must run between begin_weight_update() and "
                           "end_weight_update()")
        assert len(serialized) == len(self.models)
        results = []
        for r, up in enumerate(self.updaters):
            self.ranks.set(r)
            named = SafeUnpickler(io.BytesIO(serialized[r])).load()           # tp_worker.deserialize_own_rank
            named = [(n, t.to("cpu")) for n, t in named]                       # _unwrap_tensor(..., device=...)
            try:
                results.append(up.update_weights_from_tensor(named_tensors=named, load_format=load_format))
            except Exception as exc:
                raise SchedulerDied(f"scheduler tp_rank {r} died: {exc}") from exc
        success = all(ok for ok, _ in results)
        if success and weight_version is not None:
            self.weight_version = weight_version
        return success, " | ".join(m for _, m in results[:1])

    def set_version(self, v):
        self.calls.append(("weight_version", v))
        self.weight_version = v


class FakeTokenizerManager:
    def __init__(self, core):
        self.core = core

    async def pause_generation(self, obj):                      # tokenizer_manager.py:2267
        self.core.pause(obj.mode)

    async def continue_generation(self, obj):                   # tokenizer_manager.py:2282
        self.core.resume()

    async def update_weight_version(self, obj):                 # tokenizer_control_mixin.py:1065
        self.core.set_version(obj.new_version)


class FakeEngine:
    """sglang.Engine 0.5.23 (srt/entrypoints/engine.py): the methods the client uses, same signatures."""

    def __init__(self, core: FakeSGLang):
        self.core = core
        self.loop = asyncio.new_event_loop()
        self.tokenizer_manager = FakeTokenizerManager(core)
        self.server_args = types.SimpleNamespace(tp_size=len(core.models))

    def flush_cache(self):                                      # :1506
        return True

    def begin_weight_update(self, selector: str = "all"):      # :1643
        return self.core.begin(selector)

    def end_weight_update(self):                                # :1650
        return self.core.end()

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):   # :1679
        serialized = []
        for _ in range(len(self.core.models)):                 # _serialize_tensors_per_rank (:1743)
            buf = io.BytesIO()
            ForkingPickler(buf).dump(named_tensors)
            serialized.append(buf.getvalue())
        # SGLang unpickles these in the scheduler processes (shared-memory handles, allowed by its SafeUnpickler);
        # here they are unpickled in this process and re-pickled plainly for the reduced allow-list of this fake
        return self.core.update([pickle.dumps(pickle.loads(s)) for s in serialized], load_format, flush_cache)

    def get_model_info(self):                                   # :1587
        return {"weight_version": self.core.weight_version}


@pytest.fixture
def fake_io_struct(monkeypatch):
    mods = {}
    for name in ("sglang", "sglang.srt", "sglang.srt.managers", "sglang.srt.managers.io_struct"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    io_mod = mods["sglang.srt.managers.io_struct"]
    for cls in IO_FIELDS:
        setattr(io_mod, cls, _io_class(cls))
    mods["sglang"].srt = mods["sglang.srt"]
    mods["sglang.srt"].managers = mods["sglang.srt.managers"]
    mods["sglang.srt.managers"].io_struct = io_mod
    return io_mod


class FakeHTTP:
    """The SGLang 0.5.23 HTTP routes the client uses (srt/entrypoints/http_server.py), on loopback."""
    ROUTES = {("POST", "/pause_generation"), ("POST", "/continue_generation"), ("POST", "/begin_weight_update"),
              ("POST", "/end_weight_update"), ("POST", "/update_weights_from_tensor"),
              ("POST", "/update_weight_version"), ("GET", "/server_info"), ("GET", "/model_info")}

    def __init__(self, core: FakeSGLang):
        self.core, self.bodies, self.died = core, [], None
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, status, obj):
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/server_info":
                    return self._reply(200, {"tp_size": len(outer.core.models), "version": "0.5.23"})
                if self.path == "/model_info":
                    return self._reply(200, {"weight_version": outer.core.weight_version})
                self._reply(404, {"detail": "Not Found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                outer.bodies.append((self.path, body))
                try:
                    status, obj = outer.route(self.path, body)
                except SchedulerDied as exc:            # the server is gone: no reply
                    outer.died = str(exc)
                    self.close_connection = True
                    return
                self._reply(status, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def route(self, path, body):
        c = self.core
        if path == "/pause_generation":                         # http_server.py:1831
            _io_class("PauseGenerationReqInput")(**body)
            c.pause(body.get("mode", "abort"))
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if path == "/continue_generation":                      # :1844
            _io_class("ContinueGenerationReqInput")(**body)
            c.resume()
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if path in ("/begin_weight_update", "/end_weight_update"):   # :1458 / :1473
            ok, msg = c.begin(**body) if path.startswith("/begin") else c.end()
            return (200 if ok else 400), {"success": ok, "message": msg}
        if path == "/update_weights_from_tensor":               # :1436
            req = _io_class("UpdateWeightsFromTensorReqInput")(**body)
            raw = [base64.b64decode(s, validate=True) for s in req.serialized_named_tensors]
            ok, msg = c.update(raw, req.load_format, req.flush_cache, req.weight_version)
            return (200 if ok else 400), {"success": ok, "message": msg}
        if path == "/update_weight_version":                    # :1527
            req = _io_class("UpdateWeightVersionReqInput")(**body)
            c.set_version(req.new_version)
            return 200, {"success": True, "message": f"Weight version updated to {req.new_version}",
                         "new_version": req.new_version}
        return 404, {"detail": "Not Found"}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# -- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """TP ranks of a Llama model (the fake SGLang's workers), their checkpoint, and a port range."""
    ranks = Rank()
    monkeypatch.setattr(loader, "_tp", ranks)
    made = []

    def make(tp=1, kind="llama", **kw):
        cfg = sm.Cfg()
        ckpt = sm.checkpoint(cfg, kind)
        path = write_ckpt(tmp_path, ckpt)
        ranks.size = tp
        models = [sm.MODELS[kind](cfg, r, tp) for r in range(tp)]
        for m in models:
            sm.load_full(m, ckpt)
        made.extend(models)
        core = FakeSGLang(models, ranks, **kw)
        return types.SimpleNamespace(cfg=cfg, ckpt=ckpt, path=path, models=models, core=core, ranks=ranks,
                                     port=free_base_port(tp), kind=kind)
    yield make
    for m in made:
        w = loader._workers.get(m)
        if w is not None and w.staged is not None:
            w.staged.stop()


def order(calls):
    return [c[0] for c in calls]


# -- client over an in-process Engine ---------------------------------------------------------------------------------
def test_engine_init_update_and_call_order(cluster, fake_io_struct):
    c = cluster(tp=2)
    eng = FakeEngine(c.core)
    client = SGLangClient(eng, listen=f"tcp://0.0.0.0:{c.port}", token=TOKEN)
    assert client.workers == [f"tcp://127.0.0.1:{c.port}", f"tcp://127.0.0.1:{c.port + 1}"]
    client.init(checkpoint=c.path)
    assert order(c.core.calls) == ["pause", "begin", "update", "end", "continue"]
    assert c.core.calls[0] == ("pause", "retract") and c.core.calls[2] == ("update", LOADER, False)
    state = c.ckpt
    with Sender(client.workers, token=TOKEN, base=c.ckpt, base_version=0, digest=True) as s:
        for v in (1, 2):
            c.core.calls.clear()
            state = perturb(state, v)
            assert s.push(state, version=v).ok
            rep = client.update(v, timeout=10)
            assert order(c.core.calls) == ["pause", "begin", "update", "end", "continue", "weight_version"]
            assert c.core.calls[2] == ("update", LOADER, True) and c.core.weight_version == str(v)
            assert rep["version"] == v and set(rep["digests"]) == set(client.workers)
            assert set(rep["digests"].values()) == {state_digest(state)}
            assert {"pause", "begin", "update", "end", "resume", "probe", "total"} <= set(rep["timings"])
            for r, m in enumerate(c.models):
                assert_exact(m, state, c.cfg, c.kind, r, 2)
    assert c.core.paused is None and not c.core.session


def test_engine_failed_apply_raises_names_the_worker_and_still_continues(cluster, fake_io_struct):
    c = cluster(tp=1)
    client = SGLangClient(FakeEngine(c.core), listen=f"tcp://127.0.0.1:{c.port}", token=TOKEN)
    client.init(checkpoint=c.path)
    snap = snapshot(c.models[0])
    c.core.calls.clear()
    with pytest.raises(SGLangUpdateError, match=r"applied_version=0.*did not arrive within 0.3 s") as ei:
        client.update(1, timeout=0.3)
    # without the plug-in SGLang reports success for the failed command: only the probe tells
    assert order(c.core.calls) == ["pause", "begin", "update", "end", "continue"]
    assert c.core.weight_version == "default"            # never set to a version that is not served
    assert ei.value.workers[0]["status"]["error"]
    assert_unchanged(c.models[0], snap)


def test_engine_begin_refused_or_update_raising_still_continues(cluster, fake_io_struct):
    c = cluster(tp=1)
    client = SGLangClient(FakeEngine(c.core), listen=f"tcp://127.0.0.1:{c.port}", token=TOKEN)
    c.core.session = True                                  # someone left a session open
    with pytest.raises(SGLangUpdateError, match="already open"):
        client.update(1, timeout=1)
    assert order(c.core.calls) == ["pause", "begin", "continue"]
    c.core.session, c.core.calls = False, []
    c.core.fail_update_with = ConnectionError("tokenizer manager went away")
    with pytest.raises(ConnectionError, match="went away"):
        client.update(1, timeout=1)
    assert order(c.core.calls) == ["pause", "begin", "update", "end", "continue"]
    assert not c.core.session and c.core.paused is None


def test_client_argument_errors_name_the_value():
    with pytest.raises(ValueError, match="exactly one of token"):
        SGLangClient("http://x:1", token=None)
    with pytest.raises(ValueError, match="'paused'"):
        SGLangClient("http://x:1", token=TOKEN, pause_mode="paused")
    with pytest.raises(ValueError, match="port 0"):
        SGLangClient("http://x:1", token=TOKEN, listen="tcp://0.0.0.0:0")
    with pytest.raises(ValueError, match="'ftp://x'"):
        SGLangClient("ftp://x", token=TOKEN)
    with pytest.raises(ValueError, match="no update_weights_from_tensor"):
        SGLangClient(object(), token=TOKEN)
    with pytest.raises(ValueError, match="-1"):
        SGLangClient("http://x:1", token=TOKEN).update(-1)


# -- client over HTTP -------------------------------------------------------------------------------------------------
def test_http_init_update_failure_and_bodies(cluster):
    c = cluster(tp=2)
    srv = FakeHTTP(c.core)
    try:
        client = SGLangClient(srv.url, listen=f"tcp://0.0.0.0:{c.port}", token=TOKEN, pause_mode="retract")
        assert client.tp_size == 2 and client.workers[1] == f"tcp://127.0.0.1:{c.port + 1}"
        client.init(checkpoint=c.path)
        state = perturb(c.ckpt, 1)
        with Sender(client.workers, token=TOKEN, base=c.ckpt, base_version=0, digest=True) as s:
            assert s.push(state, version=1).ok
        srv.bodies.clear()
        c.core.calls.clear()
        rep = client.update(1, timeout=10)
        assert [p for p, _ in srv.bodies] == ["/pause_generation", "/begin_weight_update",
                                             "/update_weights_from_tensor", "/end_weight_update",
                                             "/continue_generation", "/update_weight_version"]
        body = dict(srv.bodies)["/update_weights_from_tensor"]
        assert body["load_format"] == LOADER and body["flush_cache"] is True and body["selector"] == "target"
        assert len(body["serialized_named_tensors"]) == 2
        assert dict(srv.bodies)["/pause_generation"] == {"mode": "retract"}
        assert dict(srv.bodies)["/update_weight_version"] == {"new_version": "1", "abort_all_requests": False}
        assert set(rep["digests"].values()) == {state_digest(state)}
        for r, m in enumerate(c.models):
            assert_exact(m, state, c.cfg, c.kind, r, 2)
        # a version that never comes: error, generation continued, version untouched
        srv.bodies.clear()
        with pytest.raises(SGLangUpdateError, match="did not arrive"):
            client.update(2, timeout=0.3)
        assert [p for p, _ in srv.bodies][-1] == "/continue_generation"
        assert c.core.weight_version == "1" and c.core.paused is None
    finally:
        srv.close()


def test_http_with_the_plugin_hook_reports_failure_through_sglang(cluster):
    c = cluster(tp=1, flag=False, hook=True)                 # no --custom-weight-loader flag: the hook allows it
    srv = FakeHTTP(c.core)
    try:
        client = SGLangClient(srv.url, listen=f"tcp://127.0.0.1:{c.port}", token=TOKEN)
        client.init(checkpoint=c.path)
        with pytest.raises(SGLangUpdateError, match=r"SGLang said 'sparsesync: version 1 not applied"):
            client.update(1, timeout=0.3)
        state = perturb(c.ckpt, 1)
        with Sender(client.workers, token=TOKEN, base=c.ckpt, base_version=0) as s:
            assert s.push(state, version=1).ok
        rep = client.update(1, timeout=10)
        assert "applied version 1" in rep["message"]
        assert_exact(c.models[0], state, c.cfg, c.kind)
    finally:
        srv.close()


def test_without_flag_or_hook_sglang_refuses_the_load_format(cluster):
    c = cluster(tp=1, flag=False, hook=False)
    srv = FakeHTTP(c.core)
    try:
        client = SGLangClient(srv.url, listen=f"tcp://127.0.0.1:{c.port}", token=TOKEN)
        with pytest.raises(Exception):
            client.init(checkpoint=c.path)
        assert "Unknown load_format" in srv.died
    finally:
        srv.close()


# -- the plug-in ------------------------------------------------------------------------------------------------------
def test_register_uses_sglangs_hook_registry_once(monkeypatch):
    registered = []

    class HookType:
        AROUND = "around"

    class HookRegistry:
        @classmethod
        def register(cls, target, hook, hook_type):
            registered.append((target, hook, hook_type))
    mod = types.ModuleType("sglang.srt.plugins.hook_registry")
    mod.HookRegistry, mod.HookType = HookRegistry, HookType
    for name in ("sglang", "sglang.srt", "sglang.srt.plugins"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", mod)
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    plugin.register()
    assert registered == [(plugin.HOOK_TARGET, plugin._around_update_weights_from_tensor, "around")]


def test_register_without_sglang_only_warns(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "sglang", None)
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    assert "--custom-weight-loader" in caplog.text and not plugin._registered


def test_hook_passes_other_load_formats_through_and_catches_errors():
    calls = []

    def original(self, named_tensors=None, load_format=None):
        calls.append(load_format)
        if load_format == LOADER:
            raise RuntimeError("device move failed")
        return True, "Success"
    up = WeightUpdater(custom_weight_loaders=[])
    assert plugin._around_update_weights_from_tensor(original, up, named_tensors=[], load_format="direct") \
        == (True, "Success")
    assert up.custom_weight_loaders == []
    ok, msg = plugin._around_update_weights_from_tensor(original, up, named_tensors=[], load_format=LOADER)
    assert not ok and "device move failed" in msg and up.custom_weight_loaders == [LOADER]


def test_pyproject_entry_point_if_declared():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    if "sglang.srt.plugins" not in text:
        pytest.skip("pyproject.toml does not declare the sglang.srt.plugins entry point yet")
    assert 'sparsesync = "sparsesync.integrations.sglang:register"' in text.split("sglang.srt.plugins", 1)[1]


# -- SGLang 0.5.23's API, read from the released source ---------------------------------------------------------------
@needs_src
def test_engine_signatures_match_the_release():
    eng = _class(_tree("srt/entrypoints/engine.py"), "Engine")
    for name in ("begin_weight_update", "end_weight_update", "update_weights_from_tensor", "flush_cache",
                 "get_model_info"):
        assert _params(_method(eng, name)) == _sig(getattr(FakeEngine, name)), name
    # 0.5.23's Engine has no pause / continue / weight-version methods: the client goes through its tokenizer manager
    for name in ("pause_generation", "continue_generation", "update_weight_version", "get_weight_version"):
        assert _method(eng, name) is None, name
    tm = _class(_tree("srt/managers/tokenizer_manager.py"), "TokenizerManager")
    assert [p for p, _ in _params(_method(tm, "pause_generation"))] == ["self", "obj"]
    assert [p for p, _ in _params(_method(tm, "continue_generation"))] == ["self", "obj"]
    mixin = _class(_tree("srt/managers/tokenizer_control_mixin.py"), "TokenizerControlMixin")
    assert [p for p, _ in _params(_method(mixin, "update_weight_version"))] == ["self", "obj"]


@needs_src
def test_http_routes_exist_in_the_release():
    routes = _routes()
    for method, path in FakeHTTP.ROUTES:
        assert method in routes.get(path, set()), (method, path, routes.get(path))


@needs_src
def test_io_struct_fields_match_the_release():
    tree = _tree("srt/managers/io_struct.py")
    for cls, fields in IO_FIELDS.items():
        got = _fields(tree, cls)
        assert got == fields, (cls, got)


@needs_src
def test_http_payload_passes_the_release_unpickler():
    allowed = _allowed_globals()
    assert _ALLOWED - {("torch.storage", "_load_from_bytes")} <= allowed
    src = (SRC / "srt/utils/common.py").read_text()
    assert '("torch.storage", "_load_from_bytes")' in src and "_safe_load_torch_storage" in src
    # every global our HTTP payload pickles is allowed (or the storage special case)
    payload = pickle.dumps([(COMMAND, plugin.encode_command({"op": "apply", "version": 1}))])
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(payload):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
    assert found and found <= allowed | {("torch.storage", "_load_from_bytes")}, found - allowed


@needs_src
def test_weight_updater_and_scheduler_behaviour_the_loader_relies_on():
    wu_src = (SRC / "srt/model_executor/model_runner_components/weight_updater.py").read_text()
    wu = _class(ast.parse(wu_src), "WeightUpdater")
    assert _params(_method(wu, "update_weights_from_tensor")) == [("self", None), ("named_tensors", None),
                                                                  ("load_format", "None")]
    deco = ast.unparse(wu.decorator_list[0])
    assert "frozen=True" in deco and "slots=True" in deco
    assert "custom_weight_loaders" in _fields(ast.parse(wu_src), "WeightUpdater")
    body = ast.unparse(_method(wu, "update_weights_from_tensor"))
    assert "custom_loader(self.get_model(), named_tensors)" in body and "try:" not in body
    mgr_src = (SRC / "srt/managers/scheduler_components/weight_updater.py").read_text()
    mgr = _method(_class(ast.parse(mgr_src), "SchedulerWeightUpdaterManager"), "update_weights_from_tensor")
    text = ast.unparse(mgr)
    assert "update_weights_from_tensor(named_tensors=named_tensors, load_format=recv_req.load_format)" in text
    assert "try:" not in text                      # a raising loader is not caught here ...
    sched = (SRC / "srt/managers/scheduler.py").read_text()
    assert "parent_process.send_signal(signal.SIGQUIT)" in sched          # ... and kills the server
    assert "record_weight_version_after_update(recv_req.weight_version)" in text
    plugins = (SRC / "srt/plugins/__init__.py").read_text()
    assert 'GENERAL_PLUGINS_GROUP = "sglang.srt.plugins"' in plugins
    hooks = ast.unparse(next(n for n in ast.walk(_tree("srt/plugins/hook_registry.py"))
                             if isinstance(n, ast.FunctionDef) and n.name == "_wrap_fn"))
    assert "return hook(original_fn, *args, **kwargs)" in hooks
    assert "load_plugins()" in sched               # the scheduler (worker) process loads plug-ins itself
    # where the loader finds its TP rank / group and the model path (sparsesync.integrations.sglang.loader._tp)
    assert "get_parallel().tp_group.cpu_group" in mgr_src and "tp_rank = get_parallel().tp_rank" in wu_src
    rc = _tree("srt/runtime_context.py")
    assert {"get_parallel", "get_server_args"} <= {n.name for n in rc.body if isinstance(n, ast.FunctionDef)}
    assert '"pp_rank": local // tp_size' in (SRC / "srt/runtime_context.py").read_text()
