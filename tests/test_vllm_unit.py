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
