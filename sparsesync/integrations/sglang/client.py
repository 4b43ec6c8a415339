"""Drive a running SGLang 0.5.23 server (HTTP) or in-process ``sglang.Engine`` through sparsesync updates.

::

    from sparsesync.integrations.sglang.client import SGLangClient
    client = SGLangClient("http://127.0.0.1:30000", listen="tcp://0.0.0.0:7000", token_file="/secrets/ss")
    client.init(version=0)                         # once: every TP worker loads its mirror, starts its receiver
    ...                                            # trainer: Sender(client.workers, token=..., digest=True).push(...)
    report = client.update(step, timeout=60)       # pause, begin, apply, end, continue; then probe every worker
    report["digests"]                              # {worker address: engine-side state digest}

or ``SGLangClient(engine, ...)`` with an in-process ``sglang.Engine``. What one :meth:`SGLangClient.update` does
(SGLang 0.5.23 calls; HTTP routes in ``sglang/srt/entrypoints/http_server.py``):

1. pause generation: ``POST /pause_generation {"mode": pause_mode}``; ``Engine`` has no such method in 0.5.23, so
   the client calls its ``tokenizer_manager.pause_generation(PauseGenerationReqInput(mode=...))`` on the engine's
   loop. Default mode ``"retract"``: running requests go back to the queue and are recomputed under the new weights,
   which is what lets SGLang flush the KV cache (with ``"in_place"`` its flush fails while requests are running).
2. ``begin_weight_update`` (``POST /begin_weight_update``): SGLang requires an open weight-update session;
3. ``update_weights_from_tensor([("__sparsesync__", apply command)], load_format=LOADER, flush_cache=...)``;
4. ``end_weight_update`` (always, once 2 succeeded);
5. continue generation (always, once 1 was sent: ``finally``);
6. :func:`sparsesync.probe` every worker's receiver: each reports ``applied_version``, ``digest``, ``error``,
   ``broken``. Any worker not at ``version`` raises :class:`~sparsesync.integrations.sglang.SGLangUpdateError`
   naming it (SGLang itself reports success for a failed apply unless the plug-in is installed).
7. SGLang's weight version is set to ``str(version)`` only after 6 succeeded (``POST /update_weight_version`` /
   the tokenizer manager's ``update_weight_version``), so SGLang never reports a version that is not served.

Versions: ``update(v)`` applies exactly ``v`` (pushed by the trainer, received and verified by every worker within
``timeout`` seconds) or nothing. Timeouts: ``timeout`` is how long each worker waits for ``v`` inside the pause;
``http_timeout`` (default ``timeout + 60``) bounds each HTTP call; ``probe_timeout`` each probe.
"""
from __future__ import annotations

import base64
import json
import pickle
import time
import urllib.error
import urllib.parse
import urllib.request

from ... import probe
from ...wire import parse_url
from . import COMMAND, LOADER, SGLangUpdateError, encode_command

PAUSE_MODES = ("retract", "in_place", "abort")


class SGLangClient:
    """See the module docstring. ``target``: an ``http(s)://host:port`` URL of an SGLang server, or an in-process
    ``sglang.Engine``. ``listen``: the receivers' base address (``tcp://HOST:PORT``; TP worker ``r`` listens on
    ``PORT + r``). ``tp_size`` / ``pp_size``: the server's tensor- / pipeline-parallel sizes (default: read
    from ``/server_info`` or ``engine.server_args``). ``workers``: the receiver addresses to probe (default:
    derived from ``listen``, ``tp_size`` and ``pp_size``, with a wildcard host replaced by the server's host).
    ``api_key``: SGLang's admin / API key, sent as a bearer token on HTTP."""

    def __init__(self, target, *, listen: str = "tcp://127.0.0.1:7000", token: str | None = None,
                 token_file: str | None = None, tp_size: int | None = None, pp_size: int | None = None,
                 workers: list[str] | None = None,
                 pause_mode: str = "retract", http_timeout: float | None = None, probe_timeout: float = 10.0,
                 api_key: str | None = None):
        if (token is None) == (token_file is None):
            raise ValueError("SGLangClient needs exactly one of token and token_file (the receivers' secret), got "
                             f"token={'set' if token is not None else None}, token_file={token_file!r}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        if not isinstance(listen, str) or not listen.startswith("tcp://"):
            raise ValueError(f"listen must be 'tcp://HOST:PORT', got {listen!r}")
        _, _, port = parse_url(listen)
        if not port:
            raise ValueError(f"listen {listen!r}: port 0 cannot be used (workers listen on port + tp_rank)")
        self.listen = listen
        self.token_file = token_file
        self._token = token if token is not None else _read_token(token_file)
        self._token_in_command = token
        self.pause_mode = pause_mode
        self.http_timeout = http_timeout
        self.probe_timeout = probe_timeout
        if isinstance(target, str):
            if not target.startswith(("http://", "https://")):
                raise ValueError(f"target must be an http(s):// URL or an sglang.Engine, got {target!r}")
            self.api = HTTPApi(target, api_key=api_key)
        else:
            self.api = EngineApi(target)
        self._tp_size = tp_size
        self._pp_size = pp_size
        self._workers = list(workers) if workers is not None else None

    # -- addresses ------------------------------------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        if self._tp_size is None:
            n = self.api.size("tp_size")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"cannot read the server's tp_size (got {n!r}); pass tp_size=")
            self._tp_size = n
        return self._tp_size

    @property
    def pp_size(self) -> int:
        if self._pp_size is None:
            n = self.api.size("pp_size") or 1
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"cannot read the server's pp_size (got {n!r}); pass pp_size=")
            self._pp_size = n
        return self._pp_size

    @property
    def workers(self) -> list[str]:
        """Every worker's receiver address (what the trainer's ``Sender`` pushes to): ``port + pp_rank * tp_size +
        tp_rank``, the rule of the loader."""
        if self._workers is None:
            _, host, port = parse_url(self.listen)
            if host in ("0.0.0.0", "::", ""):
                host = self.api.host()
            h = f"[{host}]" if ":" in host else host
            self._workers = [f"tcp://{h}:{port + r}" for r in range(self.tp_size * self.pp_size)]
        return self._workers

    # -- commands -------------------------------------------------------------------------------------------------
    def init(self, *, version: int = 0, checkpoint: str | None = None, require_digest: bool = False,
             stall_timeout: float | None = None, direct: bool = False) -> dict:
        """Start every worker's receiver on its mirror at ``version`` (no pause needed: the weights do not change).
        ``direct``: every worker also learns a runtime map (the loader's init key ``direct``; opt-in, costs a learn
        pass over every tensor at init) and later applies mapped tensors by direct copies.
        Returns ``{"message", "workers": [probe results]}``; raises :class:`SGLangUpdateError` if any worker has no
        receiver at ``version`` afterwards."""
        cmd = {"op": "init", "listen": self.listen, "version": version, "require_digest": require_digest}
        if self._token_in_command is not None:
            cmd["token"] = self._token_in_command
        else:
            cmd["token_file"] = self.token_file
        if checkpoint is not None:
            cmd["checkpoint"] = str(checkpoint)
        if stall_timeout is not None:
            cmd["stall_timeout"] = stall_timeout
        if direct:
            cmd["direct"] = True
        ok, message = self._session(cmd, flush_cache=False, timeout=600.0)
        workers = self.probe_all()
        bad = [w for w in workers if w.get("error_probe") or w.get("status", {}).get("applied_version") != version]
        if not ok or bad:
            raise SGLangUpdateError(f"sparsesync init failed: SGLang said {message!r}; "
                                    f"{_describe_workers(bad or workers, version)}", workers)
        return {"message": message, "workers": workers}

    def update(self, version: int, *, timeout: float = 60.0, flush_cache: bool = True,
               set_weight_version: bool = True) -> dict:
        """Apply ``version`` on every worker (see the module docstring). Returns ``{"version", "digests" (address ->
        digest), "workers" (probe results), "message" (SGLang's), "timings" (seconds: pause, begin, update, end,
        resume, probe, total)}``. Raises :class:`SGLangUpdateError` when any worker does not hold ``version``."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        t0 = time.perf_counter()
        timings: dict = {}
        ok, message = self._session({"op": "apply", "version": version, "timeout": timeout},
                                    flush_cache=flush_cache, timeout=timeout, timings=timings)
        t = time.perf_counter()
        workers = self.probe_all()
        timings["probe"] = time.perf_counter() - t
        bad = [w for w in workers if w.get("error_probe") or w["status"].get("applied_version") != version
               or w["status"].get("error")]
        if not ok or bad:
            raise SGLangUpdateError(f"sparsesync: version {version} was not applied everywhere: SGLang said "
                                    f"{message!r}; {_describe_workers(bad or workers, version)}", workers)
        if set_weight_version:
            self.api.set_weight_version(str(version))
        timings["total"] = time.perf_counter() - t0
        return {"version": version, "digests": {w["address"]: w["status"]["digest"] for w in workers},
                "workers": workers, "message": message, "timings": {k: round(v, 4) for k, v in timings.items()}}

    def shutdown(self) -> tuple[bool, str]:
        """Stop every worker's receiver (mirrors kept)."""
        return self._session({"op": "shutdown"}, flush_cache=False, timeout=60.0)

    def probe_all(self) -> list[dict]:
        """Every worker's :func:`sparsesync.probe` result (``status`` holds what it applied); an unreachable worker
        gives ``{"address", "error_probe"}``."""
        out = []
        for addr in self.workers:
            try:
                r = probe(addr, token=self._token, timeout=self.probe_timeout)
                r["status"] = r.get("status") or {}
                out.append(r)
            except Exception as exc:            # noqa: BLE001 - reported with the others
                out.append({"address": addr, "error_probe": f"{type(exc).__name__}: {exc}", "status": {}})
        return out

    # -- one SGLang weight-update session ---------------------------------------------------------------------------
    def _session(self, cmd: dict, *, flush_cache: bool, timeout: float, timings: dict | None = None):
        timings = {} if timings is None else timings
        tensor = encode_command(cmd)
        call_timeout = self.http_timeout if self.http_timeout is not None else float(timeout) + 60.0
        paused = False
        try:
            t = time.perf_counter()
            self.api.pause(self.pause_mode, call_timeout)
            paused = True
            timings["pause"] = time.perf_counter() - t
            t = time.perf_counter()
            ok, msg = self.api.begin(call_timeout)
            timings["begin"] = time.perf_counter() - t
            if not ok:
                raise SGLangUpdateError(f"SGLang refused begin_weight_update: {msg}")
            try:
                t = time.perf_counter()
                ok, message = self.api.update(tensor, self.tp_size, flush_cache, call_timeout)
                timings["update"] = time.perf_counter() - t
            finally:
                t = time.perf_counter()
                end_ok, end_msg = self.api.end(call_timeout)
                timings["end"] = time.perf_counter() - t
            if not end_ok:
                raise SGLangUpdateError(f"SGLang refused end_weight_update: {end_msg} (update said {message!r})")
            return ok, message
        finally:
            if paused:
                t = time.perf_counter()
                self.api.resume(call_timeout)
                timings["resume"] = time.perf_counter() - t


def _read_token(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def _describe_workers(workers: list[dict], version: int) -> str:
    parts = []
    for w in workers:
        if w.get("error_probe"):
            parts.append(f"{w['address']}: not reachable ({w['error_probe']})")
            continue
        s = w.get("status") or {}
        bits = [f"applied_version={s.get('applied_version')!r}"]
        if s.get("error"):
            bits.append(f"error={s['error']!r}")
        if s.get("broken"):
            bits.append("INCONSISTENT")
        parts.append(f"{w['address']} (tp_rank {s.get('tp_rank')}): " + ", ".join(bits))
    return f"wanted version {version}: " + "; ".join(parts)


# -- the two ways to reach SGLang 0.5.23 -----------------------------------------------------------------------------
class HTTPApi:
    """SGLang 0.5.23's HTTP routes (``sglang/srt/entrypoints/http_server.py``)."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key

    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"

    def _call(self, method: str, route: str, body: dict | None, timeout: float):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + route, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return status, payload

    def _ok(self, route: str, body: dict | None, timeout: float) -> tuple[bool, str]:
        status, payload = self._call("POST", route, body, timeout)
        if isinstance(payload, dict) and "success" in payload:
            return bool(payload["success"]) and status == 200, str(payload.get("message", ""))
        return status == 200, str(payload)

    def size(self, key: str):
        if getattr(self, "_info", None) is None:
            status, info = self._call("GET", "/server_info", None, 30.0)
            if status != 200 or not isinstance(info, dict):
                raise SGLangUpdateError(f"GET {self.url}/server_info answered {status}: {str(info)[:200]}")
            self._info = info
        return self._info.get(key)

    def pause(self, mode: str, timeout: float) -> None:
        status, payload = self._call("POST", "/pause_generation", {"mode": mode}, timeout)
        if status != 200:
            raise SGLangUpdateError(f"POST {self.url}/pause_generation answered {status}: {payload}")

    def resume(self, timeout: float) -> None:
        status, payload = self._call("POST", "/continue_generation", {}, timeout)
        if status != 200:
            raise SGLangUpdateError(f"POST {self.url}/continue_generation answered {status}: {payload}")

    def begin(self, timeout: float) -> tuple[bool, str]:
        return self._ok("/begin_weight_update", {}, timeout)

    def end(self, timeout: float) -> tuple[bool, str]:
        return self._ok("/end_weight_update", {}, timeout)

    def update(self, tensor, tp_size: int, flush_cache: bool, timeout: float) -> tuple[bool, str]:
        # UpdateWeightsFromTensorReqInput.serialized_named_tensors: one payload per TP rank, each a pickled
        # [(name, tensor)] list, base64 over JSON. Plain pickle (not ForkingPickler: no shared-memory handles, so it
        # works across hosts); SGLang's SafeUnpickler allows _rebuild_tensor_v2 and storage bytes.
        payload = base64.b64encode(pickle.dumps([(COMMAND, tensor)])).decode()
        # selector "target": the command goes to the served model only, not to a speculative draft model (whose
        # worker state would try to bind the same receiver ports); Engine.update_weights_from_tensor has no selector
        body = {"serialized_named_tensors": [payload] * tp_size, "load_format": LOADER, "flush_cache": flush_cache,
                "selector": "target"}
        return self._ok("/update_weights_from_tensor", body, timeout)

    def set_weight_version(self, version: str) -> None:
        ok, msg = self._ok("/update_weight_version", {"new_version": version, "abort_all_requests": False}, 30.0)
        if not ok:
            raise SGLangUpdateError(f"the weights were applied, but SGLang refused update_weight_version: {msg}")


class EngineApi:
    """An in-process ``sglang.Engine`` (``sglang/srt/entrypoints/engine.py``)."""

    def __init__(self, engine):
        for attr in ("update_weights_from_tensor", "begin_weight_update", "end_weight_update"):
            if not callable(getattr(engine, attr, None)):
                raise ValueError(f"target {type(engine).__name__} is not an sglang.Engine of 0.5.23 (no {attr}())")
        self.engine = engine

    def host(self) -> str:
        return "127.0.0.1"

    def size(self, key: str):
        return getattr(getattr(self.engine, "server_args", None), key, None)

    def _tokenizer_call(self, method: str, req_name: str, **fields):
        from sglang.srt.managers import io_struct
        obj = getattr(io_struct, req_name)(**fields)
        return self.engine.loop.run_until_complete(getattr(self.engine.tokenizer_manager, method)(obj))

    def pause(self, mode: str, timeout: float) -> None:
        if callable(getattr(self.engine, "pause_generation", None)):       # newer Engines
            self.engine.pause_generation(mode=mode)
        else:                                                               # 0.5.23: only the tokenizer manager
            self._tokenizer_call("pause_generation", "PauseGenerationReqInput", mode=mode)

    def resume(self, timeout: float) -> None:
        if callable(getattr(self.engine, "continue_generation", None)):
            self.engine.continue_generation()
        else:
            self._tokenizer_call("continue_generation", "ContinueGenerationReqInput")

    def begin(self, timeout: float) -> tuple[bool, str]:
        return _pair(self.engine.begin_weight_update())

    def end(self, timeout: float) -> tuple[bool, str]:
        return _pair(self.engine.end_weight_update())

    def update(self, tensor, tp_size: int, flush_cache: bool, timeout: float) -> tuple[bool, str]:
        return _pair(self.engine.update_weights_from_tensor(named_tensors=[(COMMAND, tensor)], load_format=LOADER,
                                                            flush_cache=flush_cache))

    def set_weight_version(self, version: str) -> None:
        self._tokenizer_call("update_weight_version", "UpdateWeightVersionReqInput", new_version=version,
                             abort_all_requests=False)


def _pair(result) -> tuple[bool, str]:
    if isinstance(result, tuple) and len(result) >= 2:
        return bool(result[0]), str(result[1])
    if isinstance(result, dict):
        return bool(result.get("success")), str(result.get("message", ""))
    return bool(result), ""
