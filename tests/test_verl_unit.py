"""The parts of the verl checkpoint-engine backend that need no verl: options, the token and version rules, the
topology, which tensors a rollout loads, that importing sparsesync never imports verl or ray, and the engine itself
driven in one process against a minimal stand-in of verl's base module (``CheckpointEngine`` ABC and registry).
The real test, against verl 0.9.1's own base class and registry in two processes, is tests/verl_real/
(scripts/verl/run_real_test.sh)."""
from __future__ import annotations

import abc
import asyncio
import importlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from sparsesync import InvalidArgument, state_digest
from sparsesync.integrations import verl as ssverl
from sparsesync.integrations.verl import core

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "unit-test-secret-0123"


# -- import hygiene ---------------------------------------------------------------------------------------------------
def test_importing_sparsesync_and_the_package_imports_neither_verl_nor_ray():
    code = ("import sys, sparsesync, sparsesync.integrations.verl, sparsesync.integrations.verl.core; "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('verl', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert ssverl.BACKEND == "sparsesync" and ssverl.BACKEND_MODULE == "sparsesync.integrations.verl.backend"


# -- options ------------------------------------------------------------------------------------------------------
def test_options_defaults_and_errors_name_the_bad_value():
    o = core.Options.from_kwargs({})
    assert (o.load, o.timeout, o.quorum, o.require_digest) == ("modules", 300.0, "all", True)
    assert o.packed_mapping() == core.STANDARD_PACKED
    with pytest.raises(InvalidArgument, match="'tokn'"):
        core.Options.from_kwargs({"tokn": "x"})
    with pytest.raises(InvalidArgument, match="'everything'"):
        core.Options.from_kwargs({"load": "everything"})
    with pytest.raises(InvalidArgument, match="timeout.*-1"):
        core.Options.from_kwargs({"timeout": -1})
    with pytest.raises(InvalidArgument, match="not both"):
        core.Options.from_kwargs({"token": TOKEN, "token_file": "/x"})
    with pytest.raises(InvalidArgument, match="'bfloat17'"):
        core.Options.from_kwargs({"dtype": "bfloat17"})
    with pytest.raises(InvalidArgument, match="udp://x:1"):
        core.Options.from_kwargs({"listen": "udp://x:1"})
    with pytest.raises(InvalidArgument, match="quorum.*'most'"):
        core.Options.from_kwargs({"quorum": "most"})
    assert core.torch_dtype("bfloat16") is torch.bfloat16
    assert core.torch_dtype("torch.float16") is torch.float16
    assert core.torch_dtype(None) is None


# -- token rules --------------------------------------------------------------------------------------------------
def test_token_sources_in_order(tmp_path):
    f = tmp_path / "tok"
    f.write_text("  file-secret-456\n")
    env = {core.TOKEN_ENV: "env-secret-789"}
    assert core.resolve_token(core.Options(token=TOKEN), env) == TOKEN
    assert core.resolve_token(core.Options(token_file=str(f)), env) == "file-secret-456"
    assert core.resolve_token(core.Options(), env) == "env-secret-789"
    assert core.resolve_token(core.Options(), {}) is None
    with pytest.raises(InvalidArgument, match="token_file .*short'.*3 characters"):
        (tmp_path / "short").write_text("abc")
        core.resolve_token(core.Options(token_file=str(tmp_path / "short")), {})
    with pytest.raises(InvalidArgument, match="missing"):
        core.resolve_token(core.Options(token_file=str(tmp_path / "missing")), {})
    with pytest.raises(InvalidArgument, match=core.TOKEN_ENV):
        core.resolve_token(core.Options(), {core.TOKEN_ENV: "abc"})


def test_topology_token_generated_once_per_run_and_never_mixed():
    none = [{"token_configured": False}] * 3
    t1, t2 = core.topology_token(none), core.topology_token(none)
    assert isinstance(t1, str) and len(t1) >= 32 and t1 == t2          # stable across steps of one run
    assert core.topology_token([{"token_configured": True}] * 3) is None
    with pytest.raises(InvalidArgument, match=r"workers \[1\]"):
        core.topology_token([{"token_configured": True}, {"token_configured": False}, {"token_configured": True}])


# -- version rule -------------------------------------------------------------------------------------------------
def test_version_rule():
    assert core.next_version(0, 0) == 1                   # verl's first sync is step 0; version 0 = empty mirror
    assert core.next_version(7, 3) == 8
    assert core.next_version(None, 0) == 1 and core.next_version(None, 8) == 8      # None: the last sync again
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(InvalidArgument, match=repr(bad).replace("(", r"\(").replace(".", r"\.")):
            core.next_version(bad, 0)


# -- topology -----------------------------------------------------------------------------------------------------
def _meta(actors=3, rollouts=2, master=0, configured=True):
    m = [{"role": "actor", "is_master": i == master, "token_configured": configured} for i in range(actors)]
    m += [{"role": "rollout", "address": f"tcp://10.0.0.{i}:{7000 + i}", "token_configured": configured}
          for i in range(rollouts)]
    return m


def test_build_topology_one_sender_to_every_rollout():
    a, r = core.build_topology(3, 2, _meta(master=1))
    assert a["rank"] == [0, 1, 2] and a["sends"] == [False, True, False]
    assert a["peers"] == [["tcp://10.0.0.0:7000", "tcp://10.0.0.1:7001"]] * 3
    assert a["token"] == [None] * 3 and r == {"rank": [0, 1], "token": [None, None]}
    a, r = core.build_topology(1, 1, _meta(1, 1, configured=False))
    assert a["token"][0] is not None and a["token"] == r["token"]


@pytest.mark.parametrize("change, match", [
    (lambda m: m.__setitem__(3, {"role": "actor", "is_master": False}), r"metadata\[3\].*rollout"),
    (lambda m: m[0].__setitem__("is_master", False), r"exactly one actor rank.*\[\]"),
    (lambda m: m[1].__setitem__("is_master", True), r"\[0, 1\]"),
    (lambda m: m[4].__setitem__("address", m[3]["address"]), "duplicate"),
    (lambda m: m[4].__setitem__("address", None), "rollout worker 1.*None"),
    (lambda m: m.pop(), "got 4 metadata entries"),
])
def test_build_topology_errors(change, match):
    m = _meta()
    change(m)
    with pytest.raises(InvalidArgument, match=match):
        core.build_topology(3, 2, m)


def test_addresses():
    assert core.listen_address("tcp://127.0.0.1:0") == "tcp://127.0.0.1:0"
    assert core.listen_address(None, ip="10.1.2.3") == "tcp://10.1.2.3:0"
    assert core.advertised("tcp://0.0.0.0:4567", ip="10.1.2.3") == "tcp://10.1.2.3:4567"
    assert core.advertised("tcp://127.0.0.1:4567") == "tcp://127.0.0.1:4567"


# -- load modes ---------------------------------------------------------------------------------------------------
NAMES = ["model.embed_tokens.weight",
         "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
         "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
         "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]


def test_names_to_load():
    changed = {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    p = core.STANDARD_PACKED
    assert core.names_to_load("modules", changed, NAMES, p, first=False) == NAMES[1:4] + NAMES[5:7]
    assert core.names_to_load("changed", changed, NAMES, p, first=False) == [NAMES[2], NAMES[6]]
    assert core.names_to_load("all", changed, NAMES, p, first=False) == NAMES
    assert core.names_to_load("modules", changed, NAMES, p, first=True) == NAMES
    assert core.names_to_load("modules", set(), NAMES, p, first=False) == []
    with pytest.raises(InvalidArgument, match="'some'"):
        core.names_to_load("some", changed, NAMES, p, first=False)


# -- the engine against a stand-in of verl's base module --------------------------------------------------------------
@pytest.fixture
def backend(monkeypatch):
    """Import sparsesync.integrations.verl.backend against a minimal stand-in of ``verl.checkpoint_engine.base``
    (the real one needs ray; tests/verl_real uses it)."""
    if importlib.util.find_spec("verl") is not None:
        pytest.skip("a real verl is installed: tests/verl_real covers the backend")

    class Registry:
        _registry: dict = {}

        def register(name):
            def wrap(cls):
                Registry._registry[name] = cls
                return cls
            return wrap

        @classmethod
        def new(cls, name, *a, **kw):
            return cls._registry[name](*a, **kw)

    class CheckpointEngine(abc.ABC):
        for _m in ("prepare", "init_process_group", "finalize", "send_weights", "receive_weights"):
            locals()[_m] = abc.abstractmethod(lambda self, *a, **k: None)

        @classmethod
        @abc.abstractmethod
        def build_topology(cls, *a):
            raise NotImplementedError

    mods = {n: types.ModuleType(n) for n in ("verl", "verl.checkpoint_engine", "verl.checkpoint_engine.base")}
    mods["verl.checkpoint_engine.base"].CheckpointEngine = CheckpointEngine
    mods["verl.checkpoint_engine.base"].CheckpointEngineRegistry = Registry
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    monkeypatch.delitem(sys.modules, "sparsesync.integrations.verl.backend", raising=False)
    mod = importlib.import_module("sparsesync.integrations.verl.backend")
    yield mod, Registry
    for e in list(_ENGINES):
        e.shutdown()
    _ENGINES.clear()
    sys.modules.pop("sparsesync.integrations.verl.backend", None)


_ENGINES: list = []


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    st = {n: torch.randn(16, 8, generator=g).to(torch.bfloat16) for n in NAMES}
    st["model.norm.weight"] = torch.randn(8, generator=g)                        # a float32 tensor
    return st


def test_engine_in_one_process(backend, monkeypatch):
    """Actor and rollout engines in one process on loopback: the rollout's adapter gets exact weights every step,
    only whole changed modules after the first, and a version that never comes fails clearly and changes nothing."""
    mod, Registry = backend
    monkeypatch.delenv(core.TOKEN_ENV, raising=False)
    kw = {"listen": "tcp://127.0.0.1:0", "timeout": 20}
    actor = Registry.new("sparsesync", bucket_size=1 << 20, is_master=True, **kw)
    rollout = Registry.new("sparsesync", bucket_size=1 << 20, **kw)
    _ENGINES.extend([actor, rollout])
    assert (actor.role, rollout.role) == ("actor", "rollout")
    adapter: dict = {}
    trainer = _state()

    async def step(gs, state, timeout=None):
        meta = [actor.prepare(), rollout.prepare()]
        a, r = type(actor).build_topology(1, 1, meta)
        actor.init_process_group(**{k: v[0] for k, v in a.items()})
        rollout.init_process_group(**{k: v[0] for k, v in r.items()})
        got = []

        async def consume():
            async for name, t in rollout.receive_weights(global_steps=gs):
                adapter[name] = t.clone()
                got.append(name)
        metrics, _ = await asyncio.gather(actor.send_weights(iter(list(state.items())), global_steps=gs), consume())
        actor.finalize(), rollout.finalize()
        return metrics, got

    rollout.prepare()
    rollout.staged.receiver.idle_timeout = 0.5      # the receiver drops the sender between steps: it must reconnect
    m, got = asyncio.run(step(0, trainer))
    assert got == NAMES and m["sparsesync/full"] == 1.0 and m["sparsesync/version"] == 1.0
    assert state_digest(adapter) == state_digest(trainer) == rollout.digest
    trainer = {k: v.clone() for k, v in trainer.items()}
    trainer["model.layers.0.self_attn.v_proj.weight"].view(torch.int16)[3, 4] += 1
    time.sleep(1.0)
    m, got = asyncio.run(step(1, trainer))
    assert got == NAMES[1:4] and m["sparsesync/changed"] == 1.0 and m["sparsesync/full"] == 0.0
    assert state_digest(adapter) == state_digest(trainer)

    before = state_digest(adapter)

    async def missing():
        async for _ in rollout.receive_weights(global_steps=5):
            raise AssertionError("nothing may be yielded")
    rollout.opts.timeout = 0.5
    with pytest.raises(mod.WeightSyncError, match=r"version 6 .*global_steps=5.*did not arrive within 0\.5 s"):
        asyncio.run(missing())
    assert state_digest(adapter) == before and rollout.staged.version == 2
    rollout.opts.timeout = 20
    trainer = {k: v.clone() for k, v in trainer.items()}
    trainer["lm_head.weight"].view(torch.int16)[0, 0] ^= 0x7FFF
    m, got = asyncio.run(step(2, trainer))
    assert got == ["lm_head.weight"] and state_digest(adapter) == state_digest(trainer)
    # global_steps=None: the last version again (verl's wake-up after sleep_replicas): every tensor reloaded
    for t in adapter.values():
        t.zero_()
    m, got = asyncio.run(step(None, trainer))
    assert got == NAMES and m["sparsesync/version"] == 3.0 and state_digest(adapter) == state_digest(trainer)
    changed = {k: v.clone() for k, v in trainer.items()}
    changed["model.norm.weight"][0] += 1
    with pytest.raises(mod.WeightSyncError, match="version 3 .*global_steps=None.*pass global_steps"):
        asyncio.run(step(None, changed))
    assert state_digest(adapter) == state_digest(trainer) and rollout.staged.version == 3


def test_non_sending_actor_rank_walks_the_whole_generator(backend):
    """Producing each tensor may be a collective (FSDP full_tensor): every actor rank must walk verl's generator to
    the end, and the ranks that do not send keep nothing and return no metrics."""
    mod, Registry = backend
    eng = Registry.new("sparsesync", bucket_size=1, is_master=False, token=TOKEN)
    _ENGINES.append(eng)
    assert eng.prepare() == {"role": "actor", "is_master": False, "token_configured": True}
    eng.init_process_group(rank=1, token=None, sends=False, peers=["tcp://127.0.0.1:9"])
    walked = []

    def gen():
        for n, t in _state().items():
            walked.append(n)
            yield n, t
    assert asyncio.run(eng.send_weights(gen(), global_steps=3)) == {}
    assert walked == NAMES and eng.sender is None and eng.last_version == 4
    with pytest.raises(InvalidArgument, match="rollout-side"):
        asyncio.run(Registry.new("sparsesync", bucket_size=1, token=TOKEN).send_weights(iter([]), 0))


@pytest.mark.parametrize("allow", [True, False])
def test_a_resumed_trainer_moves_the_rollouts_back_only_when_allowed(backend, monkeypatch, allow):
    """A trainer restarted from an earlier checkpoint (a fresh actor engine, no base) while the rollout workers kept
    running: by default its lower version is applied exactly (full update); with allow_rollback=False it is refused
    clearly and the rollout keeps what it had."""
    mod, Registry = backend
    monkeypatch.delenv(core.TOKEN_ENV, raising=False)
    kw = {"listen": "tcp://127.0.0.1:0", "timeout": 10, "token": TOKEN, "allow_rollback": allow}
    rollout = Registry.new("sparsesync", bucket_size=1, **kw)
    _ENGINES.append(rollout)
    adapter: dict = {}

    async def step(actor, gs, state):
        meta = [actor.prepare(), rollout.prepare()]
        a, r = type(actor).build_topology(1, 1, meta)
        actor.init_process_group(**{k: v[0] for k, v in a.items()})
        rollout.init_process_group(**{k: v[0] for k, v in r.items()})

        async def consume():
            async for name, t in rollout.receive_weights(global_steps=gs):
                adapter[name] = t.clone()
        await asyncio.gather(actor.send_weights(iter(list(state.items())), global_steps=gs), consume())

    first = Registry.new("sparsesync", bucket_size=1, is_master=True, **kw)
    _ENGINES.append(first)
    late = _state(1)
    for gs in range(3):
        late["model.norm.weight"][gs] += 1
        asyncio.run(step(first, gs, late))
    assert rollout.staged.version == 3 and state_digest(adapter) == state_digest(late)
    resumed = Registry.new("sparsesync", bucket_size=1, is_master=True, **kw)     # a new trainer process
    _ENGINES.append(resumed)
    early = _state(2)
    if allow:
        asyncio.run(step(resumed, 0, early))
        assert rollout.staged.version == 1 and state_digest(adapter) == state_digest(early)
        for k in early:
            assert torch.equal(adapter[k].view(torch.int16 if adapter[k].element_size() == 2 else torch.int32),
                               early[k].view(torch.int16 if early[k].element_size() == 2 else torch.int32))
    else:
        rollout.opts.timeout = 2
        with pytest.raises(mod.WeightSyncError, match="RollbackRefused|newer than"):
            asyncio.run(step(resumed, 0, early))
        assert rollout.staged.version == 3 and state_digest(adapter) == state_digest(late)
