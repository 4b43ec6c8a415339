"""Trainer side (sparsesync.trainer): checkpoint coordinates (renames, tied weights once, casts, DTensor gathering),
the SparsePusher over real loopback receivers, and the runnable examples."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import sparsesync as ss
from sparsesync.errors import InvalidArgument, InvalidType, SparseSyncError, VersionConflict
from sparsesync.models import LlamaModel, ModelConfig
from sparsesync.trainer import (SparsePusher, checkpoint_state, is_sender, iter_checkpoint_state, strip_prefixes,
                                wrap)

# torch.distributed / torch.compile imports warn about torch.jit internals: not ours
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "trainer-test-token"
BF16 = torch.bfloat16


def tiny(tied: bool, seed: int = 0) -> LlamaModel:
    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, max_seq_len=32, multiple_of=32)
    m = LlamaModel(cfg, torch.Generator().manual_seed(seed))
    if tied:
        m.lm_head.weight = m.embed_tokens.weight
    return m


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def train_step(m: torch.nn.Module, opt, g: torch.Generator) -> None:
    x = torch.randint(0, 128, (2, 17), generator=g)
    logits = m(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


def engine_copy(state: dict) -> dict:
    """What an engine holds: its own copy of the checkpoint tensors."""
    return {k: v.detach().clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint coordinates

def test_tied_weights_are_sent_once_under_the_first_name():
    m = tiny(tied=True)
    st = checkpoint_state(m)
    assert "lm_head.weight" not in st and "embed_tokens.weight" in st
    assert "rope_cos" not in st and "rope_sin" not in st                # non-persistent buffers are not weights
    assert len(st) == len(m.state_dict()) - 1
    assert st["embed_tokens.weight"].data_ptr() == m.embed_tokens.weight.data_ptr()      # a view, no copy
    everything = checkpoint_state(m, tied="all")
    assert "lm_head.weight" in everything and len(everything) == len(m.state_dict())
    untied = checkpoint_state(tiny(tied=False))
    assert "lm_head.weight" in untied                                    # different memory: both are sent
    # an alias dropped by rename does not hide the tensor: the surviving name is sent
    st = checkpoint_state(m, rename={"embed_tokens.weight": None})
    assert "lm_head.weight" in st and "embed_tokens.weight" not in st


def test_views_are_not_copies_and_empty_tensors_are_not_aliases():
    state = {"a": torch.zeros(0), "b": torch.zeros(0), "w": torch.randn(3, 4, requires_grad=True)}
    st = checkpoint_state(state)
    assert list(st) == ["a", "b", "w"]                                   # zero-size tensors share no memory
    assert st["w"].data_ptr() == state["w"].data_ptr() and not st["w"].requires_grad
    pairs = list(iter_checkpoint_state(state.items()))                   # an iterable of pairs works too
    assert [n for n, _ in pairs] == ["a", "b", "w"]
    view = {"x": torch.arange(12.0), "head": None}
    view["head"] = view["x"][:6]                                          # overlapping, not identical: not tied
    assert list(checkpoint_state(view)) == ["x", "head"]


def test_rename_dict_and_callable_and_drop():
    m = tiny(tied=False)
    st = checkpoint_state(m, rename={"lm_head.weight": "output.weight", "norm.weight": None})
    assert "output.weight" in st and "lm_head.weight" not in st and "norm.weight" not in st
    assert st["layers.0.attn.q_proj.weight"] is not None                 # unlisted names are kept

    # Megatron-style names -> checkpoint names, with a callable; None drops a tensor
    meg = {"embedding.word_embeddings.weight": torch.randn(8, 4), "decoder.layers.0.self_attention.linear_proj"
           ".weight": torch.randn(4, 4), "decoder.final_layernorm.weight": torch.ones(4),
           "decoder.layers.0.self_attention.core_attention._extra_state": torch.zeros(3, dtype=torch.uint8),
           "rng_state": torch.zeros(2)}
    table = {"embedding.word_embeddings": "model.embed_tokens", "decoder.final_layernorm": "model.norm",
             "self_attention.linear_proj": "self_attn.o_proj", "decoder.layers": "model.layers"}

    def to_hf(name: str):
        if name == "rng_state":
            return None
        for a, b in table.items():
            name = name.replace(a, b)
        return name
    st = checkpoint_state(meg, rename=to_hf)
    assert sorted(st) == ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"]
    assert bits_equal(st["model.norm.weight"], meg["decoder.final_layernorm.weight"])


def test_rename_errors_name_the_bad_value():
    m = tiny(tied=False)
    with pytest.raises(InvalidArgument, match=r"'lm_head.weight'.*'embed_tokens.weight'|'embed_tokens.weight'.*"
                                              r"'lm_head.weight'") as e:
        checkpoint_state(m, rename={"lm_head.weight": "embed_tokens.weight"})
    assert isinstance(e.value, ValueError) and isinstance(e.value, SparseSyncError)
    with pytest.raises(InvalidArgument, match="lm_head.wieght"):
        checkpoint_state(m, rename={"lm_head.wieght": "output.weight"})
    with pytest.raises(InvalidType, match=r"rename\('norm.weight'\) returned 3"):
        checkpoint_state(m, rename=lambda n: 3 if n == "norm.weight" else n)
    with pytest.raises(InvalidType, match="rename"):
        checkpoint_state(m, rename=42)
    # two names of one tied tensor renamed onto one name: one tensor, no error
    t = tiny(tied=True)
    st = checkpoint_state(t, rename=lambda n: "embed_tokens.weight" if n == "lm_head.weight" else n, tied="all")
    assert "lm_head.weight" not in st and "embed_tokens.weight" in st


def test_strip_prefixes():
    strip = strip_prefixes()
    assert strip("module._orig_mod.model.norm.weight") == "model.norm.weight"
    assert strip("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert strip("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert strip("model._fsdp_wrapped_module.layers.1._fsdp_wrapped_module.attn.weight") == "model.layers.1.attn.weight"
    assert strip("model.module.weight") == "model.module.weight"          # "module." only at the start
    assert strip_prefixes("model.")("model.layers.0.w") == "layers.0.w"
    assert strip("lm_head.weight") == "lm_head.weight"
    with pytest.raises(InvalidArgument, match="prefix"):
        strip_prefixes("")
    ddp_like = {"module." + k: v for k, v in tiny(tied=True).state_dict().items()}
    st = checkpoint_state(ddp_like, rename=strip_prefixes())
    assert sorted(st) == sorted(checkpoint_state(tiny(tied=True)))        # tied detection works through renames


def test_wrappers_are_unwrapped():
    m = tiny(tied=True)
    compiled = torch.compile(m)                                           # not run: only the wrapper's names
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    assert list(checkpoint_state(compiled)) == list(checkpoint_state(m))


def test_dtype_cast():
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(64, 32, generator=g), "h": torch.randn(8, generator=g).half(),
             "q": torch.randn(16, generator=g).to(torch.float8_e4m3fn), "i": torch.arange(5), "b": torch.ones(2, 2,
                                                                                                     dtype=BF16)}
    state["w"][0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), 1 + 2 ** -9])   # rounding ties to even
    st = checkpoint_state(state, dtype=BF16)
    assert bits_equal(st["w"], state["w"].to(BF16)) and bits_equal(st["h"], state["h"].to(BF16))
    assert st["q"].dtype == torch.float8_e4m3fn and st["i"].dtype == torch.int64    # fp8 / ints are not cast
    assert st["b"].data_ptr() == state["b"].data_ptr()                    # already bf16: still a view
    assert st["w"].data_ptr() != state["w"].data_ptr()                    # a cast is a copy
    per = checkpoint_state(state, dtype=lambda n, t: BF16 if n == "w" else None)
    assert per["w"].dtype == BF16 and per["h"].dtype == torch.float16
    with pytest.raises(InvalidType, match="dtype"):
        checkpoint_state(state, dtype="bf16")
    with pytest.raises(InvalidType, match="'w'"):
        checkpoint_state(state, dtype=lambda n, t: "bf16")


def test_bad_inputs_are_sparsesync_errors():
    with pytest.raises(InvalidType, match="str"):
        checkpoint_state("model.safetensors")
    with pytest.raises(InvalidType, match="'x'"):
        checkpoint_state({"x": [1, 2, 3]})
    with pytest.raises(InvalidArgument, match="'twice'"):
        checkpoint_state(tiny(tied=True), tied="twice")
    with pytest.raises(InvalidType):
        SparsePusher(42, ["tcp://127.0.0.1:1"], token=TOKEN)
    assert is_sender()                                                     # no torch.distributed: this process sends


# ---------------------------------------------------------------------------------------------------------------------
# pushing through real receivers on loopback

@pytest.mark.parametrize("tied,dtype", [(True, BF16), (False, None)], ids=["tied-bf16", "untied-fp32"])
def test_pusher_receiver_ends_bit_exact(tied, dtype):
    m = tiny(tied=tied)
    engine = engine_copy(checkpoint_state(m, dtype=dtype))            # the engine loaded the checkpoint
    assert ("lm_head.weight" in engine) is not tied
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    with ss.Receiver(engine, "tcp://127.0.0.1:0", token=TOKEN) as rx, \
            wrap(m, [rx.address], token=TOKEN, dtype=dtype, progress=False) as pusher:
        assert pusher.tied == ({"lm_head.weight": "embed_tokens.weight"} if tied else {})
        for step in range(1, 4):
            train_step(m, opt, g)
            stats = pusher.push()                                         # default version: last + 1
            assert stats.version == step and pusher.version == step and stats.changed > 0
            assert stats.peers[0].kind == "delta" and stats.peers[0].ok
            assert rx.wait_for(step, 10)
            want = checkpoint_state(m, dtype=dtype)
            assert rx.digest() == ss.state_digest(want)
            assert all(bits_equal(rx.state[k], want[k]) for k in want)
        if tied:   # the receiver's embedding is the trainer's tied head
            assert bits_equal(rx.state["embed_tokens.weight"], m.lm_head.weight.detach().to(BF16))


def test_pusher_versions():
    m = tiny(tied=False)
    engine = engine_copy(checkpoint_state(m))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    with ss.Receiver(engine, "tcp://127.0.0.1:0", token=TOKEN, version=10) as rx, \
            SparsePusher(lambda: m, [rx.address], token=TOKEN, base_version=10, progress=False) as pusher:
        train_step(m, opt, g)
        assert pusher.push().version == 11
        train_step(m, opt, g)
        assert pusher.push(20).version == 20
        assert pusher.push(20).kind == "repush"                           # same bytes, same version: allowed
        with pytest.raises(VersionConflict, match="20"):
            pusher.push(15)
        train_step(m, opt, g)
        with pytest.raises(VersionConflict, match="20"):
            pusher.push(20)                                               # other bytes under a used version
        assert pusher.push().version == 21
        assert rx.wait_for(21, 10) and rx.digest() == ss.state_digest(checkpoint_state(m))
        m.extra = torch.nn.Linear(2, 2)                                    # the model changed shape
        with pytest.raises(InvalidArgument, match="extra"):
            pusher.push()


def test_pusher_explicit_base_and_rename():
    m = tiny(tied=False)
    ren = {"lm_head.weight": "output.weight"}
    base = engine_copy(checkpoint_state(m, rename=ren))
    with ss.Receiver(engine_copy(base), "tcp://127.0.0.1:0", token=TOKEN) as rx, \
            SparsePusher(m, [rx.address], token=TOKEN, rename=ren, base=base, progress=False) as pusher:
        with torch.no_grad():
            m.lm_head.weight[0, 0] += 1.0
        stats = pusher.push()
        assert stats.changed == 1 and rx.wait_for(1, 10)
        assert bits_equal(rx.state["output.weight"], m.lm_head.weight.detach())


# ---------------------------------------------------------------------------------------------------------------------
# DTensor / FSDP2

@pytest.fixture
def gloo_world_of_one():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            from torch.distributed.tensor import init_device_mesh
            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def test_dtensor_full_tensor_gives_exact_bytes(gloo_world_of_one):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    mesh = gloo_world_of_one
    g = torch.Generator().manual_seed(4)
    full = {"a": torch.randn(10, 7, generator=g), "b": torch.randn(5, generator=g).to(BF16)}
    full["a"][3, 2], full["a"][0, 0] = float("nan"), -0.0
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    sharded["tied"] = sharded["a"]
    assert isinstance(sharded["a"], DTensor)
    out = checkpoint_state(sharded)
    assert list(out) == ["a", "b"] and not any(isinstance(t, DTensor) for t in out.values())
    assert all(bits_equal(out[k], full[k]) for k in full) and ss.state_digest(out) == ss.state_digest(full)
    cast = checkpoint_state(sharded, dtype=BF16, device="cpu")          # cast on the shard, then gathered
    assert bits_equal(cast["a"], full["a"].to(BF16))
    assert is_sender() and not is_sender(rank=1)


def test_fsdp2_model_pushes_exactly(gloo_world_of_one):
    from torch.distributed.fsdp import fully_shard
    m = tiny(tied=True)
    engine = engine_copy(checkpoint_state(m, dtype=BF16))
    for blk in m.layers:
        fully_shard(blk, mesh=gloo_world_of_one)
    fully_shard(m, mesh=gloo_world_of_one)
    assert type(m.state_dict()["embed_tokens.weight"]).__name__ == "DTensor"
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(5)
    with ss.Receiver(engine, "tcp://127.0.0.1:0", token=TOKEN) as rx, \
            wrap(m, [rx.address], token=TOKEN, dtype=BF16, progress=False) as pusher:
        assert pusher.tied == {"lm_head.weight": "embed_tokens.weight"}
        for step in (1, 2):
            train_step(m, opt, g)
            assert pusher.push().changed > 0 and rx.wait_for(step, 10)
        assert rx.digest() == ss.state_digest(pusher.state())


FSDP2_WORKER = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import sparsesync as ss
    from sparsesync.models import LlamaModel, ModelConfig
    from sparsesync.trainer import wrap

    def main(rank, store, addr):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, max_seq_len=32, multiple_of=32)
        m = LlamaModel(cfg, torch.Generator().manual_seed(0))
        m.lm_head.weight = m.embed_tokens.weight
        for blk in m.layers:
            fully_shard(blk, mesh=mesh)
        fully_shard(m, mesh=mesh)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(7)
        pusher = wrap(m, [addr], token=%r, dtype=torch.bfloat16, progress=False)
        res = []
        for step in (1, 2):
            x = torch.randint(0, 128, (2, 17), generator=g)
            logits = m(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), x[:, 1:].reshape(-1))
            opt.zero_grad(); loss.backward(); opt.step()
            stats = pusher.push()
            res.append(None if stats is None else [stats.version, stats.changed])
        digest = ss.state_digest(pusher.state())          # a collective: both ranks
        pusher.close()
        dist.destroy_process_group()
        line = json.dumps({"rank": rank, "pushes": res, "digest": digest,
                           "local": list(m.embed_tokens.weight.to_local().shape), "sends": pusher.sends})
        os.write(1, (line + "\\n").encode())        # one write: the two ranks share the pipe

    # the imports above are paid once: rank 1 is a fork of this process (nothing has started threads yet)
    pid = os.fork()
    if pid == 0:
        try:
            main(1, sys.argv[1], sys.argv[2])
            code = 0
        except BaseException:
            import traceback; traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    main(0, sys.argv[1], sys.argv[2])
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""" % TOKEN)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fsdp2_two_ranks_only_rank0_sends():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    engine = engine_copy(checkpoint_state(tiny(tied=True), dtype=BF16))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as d, ss.Receiver(engine, "tcp://127.0.0.1:0", token=TOKEN) as rx:
        p = subprocess.run([sys.executable, "-c", FSDP2_WORKER, f"{d}/store", rx.address], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        res = sorted((json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")), key=lambda r: r["rank"])
        assert [r["rank"] for r in res] == [0, 1], p.stdout
        assert rx.wait_for(2, 10)
        assert res[0]["sends"] and not res[1]["sends"] and res[1]["pushes"] == [None, None]
        assert [v for v, _ in res[0]["pushes"]] == [1, 2] and all(c > 0 for _, c in res[0]["pushes"])
        assert res[0]["local"] == [64, 64]                                  # really sharded across the two ranks
        assert res[0]["digest"] == res[1]["digest"] == rx.digest()
        assert "lm_head.weight" not in rx.state


# ---------------------------------------------------------------------------------------------------------------------
# examples and import weight

def run_example(name: str, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([python, str(ROOT / "examples" / name), *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)


def test_plain_loop_example_runs():
    p = run_example("plain_loop.py", "--steps", "3", "--layers", "1", "--hidden", "64", "--vocab", "256", "--tied")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().split(" ")[0].isdigit()]
    assert len(lines) == 3 and all("digest matches" in ln for ln in lines), p.stdout
    assert "sent once" in p.stdout and "all digests match" in p.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_example_runs():
    p = run_example("hf_model.py", "--steps", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "lm_head.weight in it: False" in p.stdout
    assert "receiver == the trainer's final checkpoint (save_pretrained, bf16): True" in p.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_hf_example_says_what_is_missing():
    p = run_example("hf_model.py")
    assert p.returncode == 2 and "pip install transformers" in p.stderr


def test_import_stays_light():
    code = ("import sys, json, sparsesync, sparsesync.trainer; print(json.dumps(sorted(m for m in sys.modules if "
            "m.split('.')[0] == 'transformers' or m.startswith('torch.distributed.tensor') or "
            "m.startswith('torch.distributed.fsdp'))))")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []


def test_pusher_checks_arguments_before_gathering():
    m = tiny(tied=False)
    with pytest.raises(InvalidArgument, match="token"):
        SparsePusher(m, ["tcp://127.0.0.1:1"])
    with pytest.raises(InvalidArgument, match="quorum"):
        SparsePusher(m, ["tcp://127.0.0.1:1"], token=TOKEN, quorum=5)
    with pytest.raises(InvalidType, match="dtype"):
        SparsePusher(m, ["tcp://127.0.0.1:1"], token=TOKEN, dtype="bf16")
    with pytest.raises(InvalidArgument, match="version"):
        SparsePusher(m, ["tcp://127.0.0.1:1"], token=TOKEN, base_version=-1)
    # a callable source is read at every push, e.g. an exporter that yields (hf name, tensor) pairs
    p = SparsePusher(lambda: ((k.replace("layers.", "model.layers."), v) for k, v in m.state_dict().items()),
                     ["tcp://127.0.0.1:1"], token=TOKEN)
    assert "model.layers.0.attn.q_proj.weight" in p.names and p.sender.encoder.version == 0
    p.close()
