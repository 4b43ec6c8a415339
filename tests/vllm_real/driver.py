"""One vLLM engine of the real test, in its own process (a SIGILL, hang or crash stays contained).

    python driver.py SPEC_JSON          SPEC: {"mode": "fresh" | "update" | "rpc", "model": dir, "dtype": ..., "out": file, ...}

``fresh``: start an engine on a checkpoint, record prompt logprobs (float bits) and greedy tokens.
``update``: start an engine with ``weight_transfer_config={"backend": "sparsesync"}`` at version 0, start the trainer
(tests/vllm_real/trainer.py) in another process, and run the scenario: versions 1 and 2 applied (2 requested before the
trainer's push finished), a corrupted and a wrong-base version 3 refused, a stale request refused, the correct version
3 applied; after every step the engine's digest (through the worker extension) and its logprobs are recorded.
With SPEC["factory"], the update engine then also runs the trainer side through vLLM's WeightTransferTrainerFactory in
this process (``run_factory``). ``rpc``: an engine with the worker extension and no ``weight_transfer_config``, driven
by ``collective_rpc("sparsesync_init" / "sparsesync_update")`` (``run_rpc``).
Writes one JSON result to SPEC["out"].
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

PROMPTS = [
    [11, 523, 87, 901, 42],
    [7, 7, 7, 300, 301, 302, 303, 17, 99],
    [1000, 2, 555, 64, 128, 256, 512, 3, 9, 27, 81, 243],
    [5, 400, 13],
]
MAX_TOKENS = 8
ENGINE_KW = dict(enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=8, seed=0)
TOKEN = "vllm-real-test-token"
HERE = Path(__file__).resolve().parent


def record(llm) -> dict:
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, prompt_logprobs=1, detokenize=False,
                        ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    gens, plps = [], []
    for o in outs:
        gens.append(list(o.outputs[0].token_ids))
        rows = []
        for pos, d in enumerate(o.prompt_logprobs or []):
            rows.append(None if d is None else float(d[o.prompt_token_ids[pos]].logprob).hex())
        plps.append(rows)
    h = hashlib.sha256(json.dumps([gens, plps]).encode()).hexdigest()[:16]
    return {"gen": gens, "plp": plps, "hash": h, "gen_s": round(time.perf_counter() - t, 3)}


class Trainer:
    def __init__(self, ckpt: str, addresses: list, log_path: str):
        self.log = open(log_path, "w")
        self.p = subprocess.Popen([sys.executable, str(HERE / "trainer.py"), ckpt, ",".join(addresses), TOKEN],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def send(self, **cmd) -> None:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"trainer exited (rc={self.p.poll()}); see {self.log.name}")
            if line.startswith("@@ "):
                msg = json.loads(line[3:])
                if "error" in msg:
                    raise RuntimeError(f"trainer: {msg['error']}")
                return msg
            self.log.write(line)

    def ask(self, **cmd) -> dict:
        self.send(**cmd)
        return self.read()

    def close(self) -> None:
        try:
            self.send(cmd="quit")
            self.p.wait(30)
        except Exception:          # noqa: BLE001
            self.p.kill()


def _inject_apply_failure(worker) -> None:
    """In-process engines only (collective_rpc with a callable): the next model.load_weights loads 5 tensors, then
    raises, once (the engine's recovery then reloads from the mirror through the real load_weights)."""
    model = worker.weight_transfer_engine.model
    real = type(model).load_weights

    def failing(weights):
        del model.load_weights                   # one shot
        it = iter(weights)
        real(model, [next(it) for _ in range(5)])
        raise RuntimeError("injected failure after 5 tensors")
    model.load_weights = failing


def run_update(llm, spec: dict, res: dict) -> None:

    def status() -> list:
        return llm.collective_rpc("sparsesync_status")

    steps = res["steps"] = []

    def apply(version: int, timeout: float, send_push: bool = False, trainer=None, inject: bool = False) -> dict:
        st = {"version": version, "timeout": timeout}
        if inject:
            llm.collective_rpc(_inject_apply_failure)
            st["kind"] = "injected"
        t = time.perf_counter()
        try:
            llm.start_weight_update()
            if send_push:                         # the push is still in flight: update_weights waits for it
                trainer.send(cmd="push", version=version)
            llm.update_weights({"update_info": {"version": version, "timeout": timeout}})
            llm.finish_weight_update(weight_version=str(version))
            st["ok"] = True
        except Exception as exc:                  # noqa: BLE001
            st["ok"] = False
            st["error"] = f"{type(exc).__name__}: {exc}"
        st["update_s"] = round(time.perf_counter() - t, 3)
        llm.reset_prefix_cache()                  # required after every update: vLLM keeps KV of the old weights
        st["weight_version"] = llm.get_weight_version()
        st["status"] = status()
        st["record"] = record(llm)
        return st

    t0 = time.perf_counter()
    llm.init_weight_transfer_engine({"init_info": {"listen": "tcp://127.0.0.1:0", "token": TOKEN, "version": 0}})
    res["init_s"] = round(time.perf_counter() - t0, 3)
    st0 = status()
    res["status0"] = st0
    addresses = [w["address"] for w in st0]          # one receiver per worker (tensor-parallel rank)
    res["addresses"] = addresses
    tr = Trainer(spec["model"], addresses, spec["out"] + ".trainer.log")
    try:
        ready = tr.read()
        res["trainer_v0"] = ready
        # versions 1 and 2
        p1 = tr.ask(cmd="push", version=1)
        s = apply(1, 60)
        s["trainer"] = p1
        steps.append(s)
        inject = bool(spec.get("inject_failure"))      # version 2's apply fails half way (in-process engines)
        s = apply(2, 60, send_push=True, trainer=tr, inject=inject)
        s["trainer"] = tr.read()
        steps.append(s)
        if inject:
            res["v2_saved"] = tr.ask(cmd="save", dir=spec["final_dir"] + "-v2")
        # refused: a damaged bucket, then a delta from a wrong base (both for version 3)
        for kind in ("corrupt", "wrongbase"):
            ack = tr.ask(cmd=kind, version=3)
            s = apply(3, spec.get("refused_timeout", 3.0))
            s["kind"] = kind
            s["trainer"] = ack
            steps.append(s)
        # the correct version 3, then a stale request for version 2
        p3 = tr.ask(cmd="push", version=3)
        s = apply(3, 60)
        s["trainer"] = p3
        steps.append(s)
        s = apply(2, 5)
        s["kind"] = "stale"
        steps.append(s)
        res["final"] = tr.ask(cmd="save", dir=spec["final_dir"])
    finally:
        tr.close()
    # shut the receivers down and start them again: the live mirror is kept, at the version the engine holds
    shutdown_engines(llm)
    if len(st0) == 1:       # (a refused init on every rank of a TP engine would hit vLLM's collective_rpc desync)
        try:
            llm.init_weight_transfer_engine({"init_info": {"listen": "tcp://127.0.0.1:0", "token": TOKEN,
                                                           "version": 0}})
            res["reinit_wrong_version"] = "accepted"
        except Exception as exc:                  # noqa: BLE001
            res["reinit_wrong_version"] = f"{type(exc).__name__}: {exc}"
    llm.init_weight_transfer_engine({"init_info": {"listen": "tcp://127.0.0.1:0", "token": TOKEN, "version": 3}})
    res["status_reinit"] = status()
    if spec.get("factory"):
        res["factory"] = run_factory(llm, spec)


def shutdown_engines(llm) -> None:
    """Stop every worker's receiver: vLLM's API where it has one (0.32), else the worker extension (0.28)."""
    if hasattr(llm, "shutdown_weight_transfer_engine"):
        llm.shutdown_weight_transfer_engine()
    else:
        llm.collective_rpc("sparsesync_shutdown")


class InProcessClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over an in-process ``LLM`` (plus ``reset_prefix_cache``)."""

    def __init__(self, llm):
        self.llm = llm
        self.calls: list = []

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.calls.append(["init", init_info.get("version")])
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.calls.append(["start"])
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.calls.append(["update", update_info.get("version")])
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version=None) -> None:
        self.calls.append(["finish", weight_version])
        self.llm.finish_weight_update(weight_version=weight_version)

    def reset_prefix_cache(self) -> None:
        self.calls.append(["reset"])
        self.llm.reset_prefix_cache()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_factory(llm, spec: dict) -> dict:
    """The trainer side through vLLM's WeightTransferTrainerFactory, in this process: trainer_init initialises the
    engine side through the client (after a shutdown, at the version it holds: 3), then send_weights pushes version
    4 = the bytes of version 2 and version 5 = the bytes of version 3 and drives start / update / finish."""
    import sparsesync as ss
    from sparsesync.integrations.vllm.checkpoint import load_mirror
    from sparsesync.integrations.vllm.trainer import SparseSyncTrainerInitInfo
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory
    out: dict = {"registered": "sparsesync" in WeightTransferTrainerFactory._registry}   # by the plugin, in vLLM
    shutdown_engines(llm)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    client = InProcessClient(llm)
    info = SparseSyncTrainerInitInfo(peers=[addr], token=TOKEN, base_version=3, base_checkpoint=spec["final_dir"],
                                     listen=addr, update_timeout=30, sender_kwargs={"progress": False}, rank=0)
    eng = WeightTransferTrainerFactory.trainer_init(info, client=client)
    out["engine"] = type(eng).__name__
    v2, v3 = load_mirror(spec["final_dir"] + "-v2"), load_mirror(spec["final_dir"])
    out["steps"] = []
    for state, version in ((v2, 4), (v3, None)):
        t = time.perf_counter()
        st = eng.send_weights(state, version=version)
        step = {"version": eng.version, "send_s": round(time.perf_counter() - t, 3), "ok": st.ok,
                "kinds": [p.kind for p in st.peers], "trainer_digest": ss.state_digest(state),
                "weight_version": llm.get_weight_version(), "status": llm.collective_rpc("sparsesync_status"),
                "record": record(llm)}
        out["steps"].append(step)
    eng.shutdown()
    out["calls"] = client.calls
    return out


def run_rpc(llm, spec: dict, res: dict) -> None:
    """The worker-extension path (no weight_transfer_config): collective_rpc("sparsesync_init" / "sparsesync_update")
    with the trainer of trainer.py pushing versions 1..3; version 3 asked before it was pushed is refused."""
    def update(version: int, timeout: float) -> dict:
        st = {"version": version}
        t = time.perf_counter()
        try:
            st["status"] = llm.collective_rpc("sparsesync_update",
                                              kwargs={"update_info": {"version": version, "timeout": timeout}})
            st["ok"] = True
        except Exception as exc:                  # noqa: BLE001
            st["ok"] = False
            st["error"] = f"{type(exc).__name__}: {exc}"
            st["status"] = llm.collective_rpc("sparsesync_status")
        st["update_s"] = round(time.perf_counter() - t, 3)
        llm.reset_prefix_cache()
        st["record"] = record(llm)
        return st

    res["has_registry_engine"] = llm.collective_rpc(_has_weight_transfer_engine)
    st0 = llm.collective_rpc("sparsesync_init", kwargs={"init_info": {"listen": "tcp://127.0.0.1:0", "token": TOKEN,
                                                                       "version": 0}})
    res["status0"] = st0
    tr = Trainer(spec["model"], [w["address"] for w in st0], spec["out"] + ".trainer.log")
    steps = res["steps"] = []
    try:
        res["trainer_v0"] = tr.read()
        for v in (1, 2):
            p = tr.ask(cmd="push", version=v)
            s = update(v, 60)
            s["trainer"] = p
            steps.append(s)
        s = update(3, 1.0)                      # not pushed: refused within its timeout, version 2 kept
        s["kind"] = "missing"
        steps.append(s)
        p = tr.ask(cmd="push", version=3)
        s = update(3, 60)
        s["trainer"] = p
        steps.append(s)
        res["final"] = tr.ask(cmd="save", dir=spec["final_dir"])
    finally:
        tr.close()
    llm.collective_rpc("sparsesync_shutdown")


def _has_weight_transfer_engine(worker) -> bool:
    return getattr(worker, "weight_transfer_engine", None) is not None


def main() -> int:
    spec = json.loads(sys.argv[1])
    res: dict = {"mode": spec["mode"], "pid": os.getpid(), "mp": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")}
    try:
        t = time.perf_counter()
        from vllm import LLM
        res["import_s"] = round(time.perf_counter() - t, 2)
        kw = dict(ENGINE_KW)
        if spec["mode"] in ("update", "rpc"):
            from sparsesync.integrations.vllm import WORKER_EXTENSION
            kw.update(worker_extension_cls=WORKER_EXTENSION)
        if spec["mode"] == "update":
            kw.update(weight_transfer_config={"backend": "sparsesync"})
        t = time.perf_counter()
        llm = LLM(model=spec["model"], dtype=spec["dtype"], tensor_parallel_size=spec.get("tp", 1), **kw)
        res["startup_s"] = round(time.perf_counter() - t, 2)
        res["initial"] = record(llm)
        if spec["mode"] == "update":
            run_update(llm, spec, res)
        elif spec["mode"] == "rpc":
            run_rpc(llm, spec, res)
        res["rc"] = 0
    except BaseException as exc:     # noqa: BLE001 - reported in the result
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
        res["rc"] = 1
    Path(spec["out"]).write_text(json.dumps(res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)                      # skip interpreter teardown of vLLM's threads / processes (can hang on CPU)


if __name__ == "__main__":
    main()
