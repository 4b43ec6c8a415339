"""The parts of the vLLM integration that need no vLLM: plug-in registration (against a fake factory), grouping of
checkpoint tensors into runtime modules, the checkpoint mirror, the worker extension, and that importing sparsesync
never imports vLLM. The real test is tests/vllm_real/test_vllm_real.py (scripts/vllm/run_real_test.sh)."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sparsesync import InvalidArgument, safetensors_io
from sparsesync.integrations import vllm as ssv
from sparsesync.integrations.vllm import groups
from sparsesync.integrations.vllm.checkpoint import (
    load_mirror,
    read_layout,
    safetensors_files,
)
from sparsesync.integrations.vllm.worker import SparseSyncWorkerExtension

ROOT = Path(__file__).resolve().parent.parent

LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def llama_names(layers=2, tied=False):
    out = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        out += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        out += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    out.append("model.norm.weight")
    if not tied:
        out.append("lm_head.weight")
    return out


def moe_names(layers=2, experts=8):
    out = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        out += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight", p + "mlp.gate.weight"]
        out += [p + f"mlp.experts.{e}.{x}_proj.weight" for e in range(experts) for x in ("gate", "up", "down")]
        out += [p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
    return out


# -- registration -----------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_vllm(monkeypatch):
    """A fake ``vllm.distributed.weight_transfer`` whose factory behaves like vLLM 0.32's (duplicates raise)."""
    class Factory:
        _registry: dict = {}
        calls: list = []

        @classmethod
        def register_engine(cls, name, module_path_or_cls, class_name=None):
            if name in cls._registry:
                raise ValueError(f"Weight transfer engine '{name}' is already registered.")
            cls.calls.append((name, module_path_or_cls, class_name))
            cls._registry[name] = lambda: (module_path_or_cls, class_name)

    Factory._registry = {"nccl": lambda: None}
    Factory.calls = []
    mods = {}
    for name in ("vllm", "vllm.distributed", "vllm.distributed.weight_transfer"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["vllm.distributed.weight_transfer"].WeightTransferEngineFactory = Factory
    return Factory


def test_register_is_lazy_and_idempotent(fake_vllm):
    ssv.register()
    ssv.register()                    # vLLM loads plugins in every process, sometimes more than once
    assert fake_vllm.calls == [("sparsesync", "sparsesync.integrations.vllm.engine", "SparseSyncWeightTransferEngine")]
    assert set(fake_vllm._registry) == {"nccl", "sparsesync"}
    assert "sparsesync.integrations.vllm.engine" not in sys.modules        # registered by path, not imported


def test_register_tolerates_a_concurrent_registration(fake_vllm):
    real = fake_vllm.register_engine.__func__

    def racing(cls, name, *a):        # someone registers between our check and our call
        cls._registry[name] = lambda: None
        return real(cls, name, *a)
    fake_vllm.register_engine = classmethod(racing)
    ssv.register()                    # no ValueError
    assert "sparsesync" in fake_vllm._registry


def test_register_without_the_registry_only_warns(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", None)       # import fails
    ssv.register()
    assert "WeightTransferEngineFactory" in caplog.text


def test_entry_point_declared_in_pyproject():
    import tomllib
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert proj["project"]["entry-points"]["vllm.general_plugins"] == {
        "sparsesync": "sparsesync.integrations.vllm:register"}
    pkgs = proj["tool"]["setuptools"]["packages"]
    assert "sparsesync.integrations" in pkgs and "sparsesync.integrations.vllm" in pkgs


def test_importing_sparsesync_and_the_plugin_never_imports_vllm():
    code = ("import sys, json, sparsesync, sparsesync.integrations.vllm, sparsesync.integrations.vllm.groups, "
            "sparsesync.integrations.vllm.checkpoint, sparsesync.integrations.vllm.worker\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))))")
    p = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []


# -- grouping ---------------------------------------------------------------------------------------------------------
def test_group_keys_follow_vllm_runtime_modules():
    k = lambda n, **kw: groups.group_key(n, LLAMA_PACKED, **kw)
    assert k("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.qkv_proj"
    assert k("model.layers.0.self_attn.v_proj.bias") == "model.layers.0.self_attn.qkv_proj"
    assert k("model.layers.0.self_attn.o_proj.weight") == "model.layers.0.self_attn.o_proj"
    assert k("model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.gate_up_proj"
    assert k("model.layers.1.mlp.down_proj.weight") == "model.layers.1.mlp.down_proj"
    assert k("model.norm.weight") == "model.norm"
    assert k("model.layers.1.mlp.experts.7.up_proj.weight") == "model.layers.1.mlp.experts"
    assert k("model.layers.1.mlp.experts.gate_up_proj") == "model.layers.1.mlp.experts"       # pre-fused layout
    assert k("model.layers.1.mlp.shared_expert.up_proj.weight") == "model.layers.1.mlp.shared_expert.gate_up_proj"
    assert k("model.layers.1.mlp.shared_experts.up_proj.weight") == "model.layers.1.mlp.shared_experts.gate_up_proj"
    assert k("lm_head.weight", aliases={"lm_head": "model.embed_tokens"}) == "model.embed_tokens"
    assert groups.group_key("q_proj.weight", LLAMA_PACKED) == "qkv_proj"
    assert groups.group_key("model.layers.0.self_attn.q_proj.weight", {}) == "model.layers.0.self_attn.q_proj"


def test_expand_sends_whole_fused_modules():
    names = llama_names()
    got = groups.expand(["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                         "model.norm.weight"], names, LLAMA_PACKED)
    assert got == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"] + \
        ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert groups.expand([], names, LLAMA_PACKED) == []
    # every tensor lands in exactly one group; the groups of a 2-layer Llama: 2 x (2 norms, qkv, o, gate_up, down)
    gs = groups.groups(names, LLAMA_PACKED)
    assert sum(len(v) for v in gs.values()) == len(names) and len(gs) == 2 * 6 + 3


def test_expand_sends_every_expert_of_a_touched_moe_layer():
    names = moe_names()
    got = groups.expand(["model.layers.1.mlp.experts.3.down_proj.weight"], names, {"qkv_proj": ["q_proj", "k_proj",
                                                                                                 "v_proj"]})
    assert len(got) == 8 * 3 and all(n.startswith("model.layers.1.mlp.experts.") for n in got)
    got = groups.expand(["model.layers.0.mlp.gate.weight"], names, {})
    assert got == ["model.layers.0.mlp.gate.weight"]                       # the router is a module of its own


def test_expand_tied_embeddings():
    names = llama_names(tied=True) + ["lm_head.weight"]        # a checkpoint that also stores the tied copy
    got = groups.expand(["lm_head.weight"], names, LLAMA_PACKED, {"lm_head": "model.embed_tokens"})
    assert got == ["model.embed_tokens.weight", "lm_head.weight"]


# -- checkpoint mirror ------------------------------------------------------------------------------------------------
def test_mirror_loads_every_shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"x.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16), "y": torch.arange(5)}
    b = {"z.weight": torch.randn(7, generator=g)}
    b["z.weight"][2] = float("nan")
    safetensors_io.save(a, tmp_path / "model-00001-of-00002.safetensors")
    safetensors_io.save(b, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x.weight": "model-00001-of-00002.safetensors", "y": "model-00001-of-00002.safetensors",
        "z.weight": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "stray.safetensors").write_bytes(b"not named by the index")
    m = load_mirror(tmp_path)
    assert set(m) == {"x.weight", "y", "z.weight"}
    for n, t in {**a, **b}.items():
        assert m[n].dtype == t.dtype and torch.equal(m[n].view(torch.uint8), t.view(torch.uint8))
    assert read_layout(tmp_path) == {n: (t.dtype, tuple(t.shape)) for n, t in m.items()}
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(InvalidArgument):          # without the index every *.safetensors counts: stray is invalid
        load_mirror(tmp_path)
    (tmp_path / "stray.safetensors").unlink()
    assert [p.name for p in safetensors_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                              "model-00002-of-00002.safetensors"]
    safetensors_io.save({"y": torch.zeros(1)}, tmp_path / "model-00003.safetensors")
    with pytest.raises(InvalidArgument, match="more than one shard"):
        load_mirror(tmp_path)
    with pytest.raises(InvalidArgument):
        load_mirror(tmp_path / "missing")


# -- worker extension -------------------------------------------------------------------------------------------------
def test_worker_extension_names_are_prefixed_and_report_status():
    assert all(n.startswith("sparsesync_") for n in vars(SparseSyncWorkerExtension) if not n.startswith("__"))

    class Engine:
        def status(self):
            return {"version": 3, "digest": "abc"}

    class Worker(SparseSyncWorkerExtension):
        weight_transfer_engine = Engine()
    assert Worker().sparsesync_status() == {"version": 3, "digest": "abc"}
    assert Worker().sparsesync_digest() == "abc"

    class Bare(SparseSyncWorkerExtension):
        weight_transfer_engine = None
    with pytest.raises(RuntimeError, match="sparsesync"):
        Bare().sparsesync_status()
    assert ssv.WORKER_EXTENSION == "sparsesync.integrations.vllm.worker.SparseSyncWorkerExtension"


def test_register_registers_the_trainer_side_too(fake_vllm):
    class Trainers:
        _registry: dict = {"nccl": lambda: None}
        calls: list = []

        @classmethod
        def register_engine(cls, name, module_path_or_cls, class_name=None):
            if name in cls._registry:
                raise ValueError("already registered")
            cls.calls.append((name, module_path_or_cls, class_name))
            cls._registry[name] = lambda: None
    sys.modules["vllm.distributed.weight_transfer"].WeightTransferTrainerFactory = Trainers
    ssv.register()
    ssv.register()
    assert Trainers.calls == [("sparsesync", "sparsesync.integrations.vllm.trainer",
                               "SparseSyncTrainerWeightTransferEngine")]
    assert "sparsesync.integrations.vllm.trainer" not in sys.modules
    assert len(fake_vllm.calls) == 1


# -- trainer side (against a fake vLLM base module with 0.32's contract) -----------------------------------------------
@pytest.fixture
def trainer_mod(monkeypatch):
    import abc
    import dataclasses
    from typing import Any, ClassVar

    @dataclasses.dataclass
    class TrainerInitInfo:
        backend: ClassVar[str]
        rank: int = dataclasses.field(kw_only=True)

        def __init_subclass__(cls, **kw: Any) -> None:
            super().__init_subclass__(**kw)
            if not getattr(cls, "backend", None):
                raise TypeError("backend")

        @property
        def is_sender(self) -> bool:
            return self.rank == 0

    class TrainerWeightTransferEngine(abc.ABC):
        def __class_getitem__(cls, item):
            return cls

        def __init__(self, *, client, source=None, is_sender=True):
            self.client, self.source, self.is_sender = client, source, is_sender

        @classmethod
        @abc.abstractmethod
        def trainer_init(cls, init_info, *, client, source=None): ...

        @abc.abstractmethod
        def send_weights(self): ...

    for name in ("vllm", "vllm.distributed", "vllm.distributed.weight_transfer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    base = types.ModuleType("vllm.distributed.weight_transfer.base")
    base.TrainerInitInfo, base.TrainerWeightTransferEngine = TrainerInitInfo, TrainerWeightTransferEngine
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer.base", base)
    monkeypatch.delitem(sys.modules, "sparsesync.integrations.vllm.trainer", raising=False)
    import importlib
    mod = importlib.import_module("sparsesync.integrations.vllm.trainer")
    yield mod
    sys.modules.pop("sparsesync.integrations.vllm.trainer", None)


class RecordingClient:
    def __init__(self, receiver=None):
        self.calls, self.receiver = [], receiver

    def init_weight_transfer_engine(self, init_info):
        self.calls.append(("init", dict(init_info)))

    def start_weight_update(self):
        self.calls.append(("start",))

    def update_weights(self, update_info):
        # the push finished before the engine is asked to apply: the receiver holds the version already
        assert self.receiver is None or self.receiver.version == update_info["version"]
        self.calls.append(("update", dict(update_info)))

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))


def test_trainer_engine_pushes_then_drives_the_engine(trainer_mod, tmp_path):
    import sparsesync as ss
    torch.manual_seed(0)
    v0 = {"model.embed_tokens.weight": torch.randn(64, 16).to(torch.bfloat16),
          "model.norm.weight": torch.ones(16, dtype=torch.bfloat16)}
    safetensors_io.save(v0, tmp_path / "model.safetensors")
    rx = ss.Receiver({n: t.clone() for n, t in v0.items()}, "tcp://127.0.0.1:0", token="unit-token-123",
                     version=0).start()
    try:
        client = RecordingClient(rx)
        info = trainer_mod.SparseSyncTrainerInitInfo(peers=rx.address, token="unit-token-123",
                                                     base_checkpoint=str(tmp_path), listen="tcp://0.0.0.0:7000",
                                                     update_timeout=5, sender_kwargs={"progress": False}, rank=0)
        eng = trainer_mod.SparseSyncTrainerWeightTransferEngine.trainer_init(info, client=client)
        assert client.calls == [("init", {"listen": "tcp://0.0.0.0:7000", "version": 0, "token": "unit-token-123"})]
        v1 = {n: t.clone() for n, t in v0.items()}
        v1["model.norm.weight"][3] = -0.0
        v1["model.embed_tokens.weight"][5, 7] = float("nan")
        st = eng.send_weights(v1)
        assert st.ok and [p.kind for p in st.peers] == ["delta"] and eng.version == 1
        assert ss.state_digest(rx.state) == ss.state_digest(v1)
        eng.send_weights(version=4)                              # the previous state again, as version 4
        assert rx.version == 4
        assert client.calls[1:] == [("start",), ("update", {"version": 1, "timeout": 5.0}), ("finish", "1"),
                                    ("start",), ("update", {"version": 4, "timeout": 5.0}), ("finish", "4")]
        eng.shutdown()
    finally:
        rx.stop()


def test_trainer_init_info_is_checked(trainer_mod):
    I = trainer_mod.SparseSyncTrainerInitInfo
    assert I.backend == "sparsesync"
    with pytest.raises(ValueError, match="peers"):
        I(token="x" * 10, rank=0)
    with pytest.raises(ValueError, match="token"):
        I(peers=["tcp://h:1"], rank=0)
    with pytest.raises(TypeError):
        I(peers=["tcp://h:1"], token="x" * 10)                 # vLLM's base makes rank a required keyword
    eng = trainer_mod.SparseSyncTrainerWeightTransferEngine.trainer_init(
        I(peers=["tcp://127.0.0.1:9"], token="x" * 10, rank=1), client=RecordingClient())
    assert not eng.is_sender
    with pytest.raises(ValueError, match="base_checkpoint"):    # no base known: refused before anything is sent
        eng.send_weights({"w": torch.zeros(2)})



def test_trainer_engine_other_ranks_neither_send_nor_call_the_engine(trainer_mod, tmp_path):
    safetensors_io.save({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    client = RecordingClient()
    eng = trainer_mod.SparseSyncTrainerWeightTransferEngine.trainer_init(
        trainer_mod.SparseSyncTrainerInitInfo(peers=["tcp://127.0.0.1:9"], token="x" * 10, listen="tcp://0:1",
                                              base_checkpoint=str(tmp_path), rank=1), client=client)
    assert eng.send_weights({"w": torch.ones(4)}) is None       # nothing listens on port 9: it did not connect
    assert eng.version == 1 and client.calls == []


def test_worker_extension_drives_its_own_engine_without_the_registry():
    calls = []

    class Engine:
        def update_weights(self, info):
            calls.append(info)

        def status(self):
            return {"version": len(calls), "digest": "d"}

        def shutdown(self):
            calls.append("shutdown")

    class Worker(SparseSyncWorkerExtension):
        weight_transfer_engine = None
    w = Worker()
    with pytest.raises(RuntimeError, match="sparsesync_init"):
        w.sparsesync_update({"version": 1})
    w._sparsesync_rpc_engine = Engine()
    assert w.sparsesync_update({"version": 1, "timeout": 2}) == {"version": 1, "digest": "d"}
    assert w.sparsesync_status()["version"] == 1
    w.sparsesync_shutdown()
    assert calls == [{"version": 1, "timeout": 2}, "shutdown"]


def test_engine_imports_without_the_weight_transfer_base(monkeypatch):
    """A vLLM without ``vllm.distributed.weight_transfer``: engine.py falls back to the extension's stand-in base
    class, so the worker extension can construct the engine itself."""
    import importlib

    from sparsesync.integrations.vllm import worker
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", None)
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer.base", None)
    monkeypatch.delitem(sys.modules, "sparsesync.integrations.vllm.engine", raising=False)
    try:
        eng_mod = importlib.import_module("sparsesync.integrations.vllm.engine")
        cls = eng_mod.SparseSyncWeightTransferEngine
        assert issubclass(cls, worker._WeightTransferEngine)
        cfg = types.SimpleNamespace(parallel_config=None, model_config=types.SimpleNamespace(model="m"))
        eng = cls(None, cfg, torch.device("cpu"), torch.nn.Linear(2, 2))
        assert eng.parse_update_info({"version": 2}).version == 2
        assert eng.parse_init_info({"token": "x" * 10}).listen == "tcp://127.0.0.1:7000"
        with pytest.raises(ValueError, match="Invalid update_info"):
            eng.parse_update_info({"versoin": 2})
        with pytest.raises(ssv.WeightUpdateError, match="before init"):
            eng.update_weights({"version": 1})
    finally:
        sys.modules.pop("sparsesync.integrations.vllm.engine", None)
