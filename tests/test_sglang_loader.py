"""The SGLang custom weight loader (sparsesync.integrations.sglang.loader) against models that reproduce SGLang
0.5.23's parameter names and weight_loader semantics (tests/sglang_models.py): Llama (untied and tied), Qwen3 and a
Qwen3-MoE fused-expert layout, TP=1 and TP=2, exact to the bit; all-or-nothing failures; the engine-side digest."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
import sglang_models as sm
import torch

from sparsesync import PushFailed, Sender, probe, state_digest
from sparsesync.integrations.sglang import COMMAND, decode_command, encode_command, loader
from sparsesync.safetensors_io import save

TOKEN = "sglang-test-token"


# -- helpers ---------------------------------------------------------------------------------------------------------
def free_base_port(n: int = 2) -> int:
    """A port p with p .. p+n-1 free (each TP rank listens on port + rank)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n >= 65535:
            continue
        socks = []
        try:
            for k in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p + k))
            return p
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port range")


def cmd(**c):
    return [(COMMAND, encode_command(c))]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 1: torch.uint8}[t.element_size()])


def assert_exact(model, ckpt, cfg, kind, rank=0, size=1):
    want = sm.expected_params(ckpt, cfg, kind, rank, size)
    got = dict(model.named_parameters())
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    bad = [n for n in want if got[n].shape != want[n].shape or not torch.equal(bits(got[n]), bits(want[n]))]
    assert not bad, f"rank {rank}/{size}: parameters differ from the checkpoint's shards: {bad[:6]}"


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, snap):
    bad = [n for n, p in model.named_parameters() if not torch.equal(bits(p), bits(snap[n]))]
    assert not bad, f"parameters changed: {bad[:6]}"


def perturb(state: dict, step: int, density: float = 0.01, specials: bool = True) -> dict:
    """A sparse bf16 update (~density of the elements moved by +-1 ulp, never across zero) plus, with ``specials``,
    a NaN, a -0.0 and an inf written into one tensor."""
    g = torch.Generator().manual_seed(1000 + step)
    out = {}
    for n, t in state.items():
        v = t.clone()
        b = v.view(torch.int16).reshape(-1)
        mask = torch.rand(b.numel(), generator=g) < density
        mag = b & 0x7FFF
        mask &= (mag > 1) & (mag < 0x7F00)                 # stay finite, never cross zero
        delta = torch.where(torch.rand(b.numel(), generator=g) < 0.5, 1, -1).to(torch.int16)
        b[mask] += delta[mask]
        out[n] = v
    if specials:
        name = sorted(n for n in out if n.endswith("o_proj.weight"))[0]
        flat = out[name].view(torch.int16).reshape(-1)
        flat[3 * step] = 0x7FC0          # NaN
        flat[3 * step + 1] = -0x8000     # -0.0 (0x8000)
        flat[3 * step + 2] = 0x7F80      # +inf
    return out


def write_ckpt(tmp_path, ckpt) -> str:
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    names = sorted(ckpt)
    half = len(names) // 2                                   # two shards, like real checkpoints
    save({n: ckpt[n] for n in names[:half]}, d / "model-00001-of-00002.safetensors")
    save({n: ckpt[n] for n in names[half:]}, d / "model-00002-of-00002.safetensors")
    return str(d)


class Rank:
    """Which TP rank the loader believes it is (loader._tp is patched; one thread may act as several ranks)."""

    def __init__(self, size=1):
        self.size = size
        self.local = threading.local()
        self.group = None

    def __call__(self):
        r = getattr(self.local, "rank", 0)
        return r, self.size, r, self.group

    def set(self, r):
        self.local.rank = r


@pytest.fixture
def ranks(monkeypatch):
    r = Rank()
    monkeypatch.setattr(loader, "_tp", r)
    return r


@pytest.fixture(params=[False, True], ids=["loader", "direct"])
def direct(request):
    """Every scenario runs twice: apply through load_weights only, and with init 'direct' (the runtime map)."""
    return request.param


@pytest.fixture
def cleanup():
    workers = []
    yield workers
    for m in workers:
        w = loader._workers.get(m)
        if w is not None and w.staged is not None:
            w.staged.stop()


def start(kind, tmp_path, cleanup, *, tied=False, tp=1, ranks=None, port=None, direct=False, model_cls=None,
          **init):
    if direct:
        init["direct"] = True
    cfg = sm.Cfg(tie_word_embeddings=tied)
    ckpt = sm.checkpoint(cfg, kind)
    path = write_ckpt(tmp_path, ckpt)
    port = port or free_base_port(tp)
    models = []
    for r in range(tp):
        if ranks is not None:
            ranks.size = tp
            ranks.set(r)
        m = (model_cls or sm.MODELS[kind])(cfg, r, tp)
        sm.load_full(m, ckpt)
        if model_cls is None:
            assert_exact(m, ckpt, cfg, kind, r, tp)
        out = loader.load(m, cmd(op="init", listen=f"tcp://127.0.0.1:{port}", token=TOKEN, checkpoint=path, **init))
        cleanup.append(m)
        assert out["ok"], out["message"]
        assert out["direct"]["enabled"] is bool(direct)
        if direct:
            assert out["direct"]["mapped"] > 0 and "direct:" in out["message"]
        assert out["address"] == f"tcp://127.0.0.1:{port + r}"
        models.append(m)
    addrs = [f"tcp://127.0.0.1:{port + r}" for r in range(tp)]
    return cfg, ckpt, models, addrs


def apply(model, version, timeout=10.0, ranks=None, rank=0):
    if ranks is not None:
        ranks.set(rank)
    return loader.load(model, cmd(op="apply", version=version, timeout=timeout))


# -- tests -------------------------------------------------------------------------------------------------------------
def test_importing_the_plugin_loader_and_client_never_imports_sglang():
    code = ("import sys, sparsesync, sparsesync.integrations.sglang as p, sparsesync.integrations.sglang.loader, "
            "sparsesync.integrations.sglang.client; "
            "bad = [m for m in sys.modules if m == 'sglang' or m.startswith('sglang.') or m == 'vllm' "
            "or m.startswith('vllm.')]; print(bad); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_command_round_trip_and_refusals():
    c = {"op": "apply", "version": 3, "timeout": 1.5}
    t = encode_command(c)
    assert t.dtype == torch.uint8 and t.dim() == 1
    assert decode_command(t) == c
    with pytest.raises(ValueError, match="'op'"):
        encode_command({"version": 1})
    with pytest.raises(ValueError, match="not JSON"):
        decode_command(torch.tensor(list(b"\xff{"), dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        decode_command(torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("named", [
    [("model.norm.weight", torch.zeros(4))],
    [(COMMAND, encode_command({"op": "apply", "version": 1})), ("x", torch.zeros(1))],
    [(COMMAND, torch.tensor(list(b"not json"), dtype=torch.uint8))],
    [(COMMAND, encode_command({"op": "explode"}))],
])
def test_bad_calls_are_refused_without_raising(named, ranks):
    model = sm.LlamaForCausalLM(sm.Cfg())
    out = loader.load(model, named)
    assert out["ok"] is False and out["message"].startswith("sparsesync:")
    assert loader.take_outcome() is out and loader.take_outcome() is None


def test_apply_before_init_and_bad_apply_keys(ranks):
    model = sm.LlamaForCausalLM(sm.Cfg())
    out = loader.load(model, cmd(op="apply", version=1))
    assert not out["ok"] and "before init" in out["message"]
    out = loader.load(model, cmd(op="apply", version=-2))
    assert not out["ok"] and "-2" in out["message"]
    out = loader.load(model, cmd(op="apply", version=1, timeout="soon"))
    assert not out["ok"] and "'soon'" in out["message"]
    out = loader.load(model, cmd(op="apply", version=1, wait=3))
    assert not out["ok"] and "wait" in out["message"]


def test_init_refusals_name_the_bad_value(tmp_path, ranks, cleanup):
    model = sm.LlamaForCausalLM(sm.Cfg())
    path = write_ckpt(tmp_path, sm.checkpoint(sm.Cfg(), "llama"))
    for c, needle in [({"listen": "tcp://127.0.0.1:0", "token": TOKEN}, "port 0"),
                      ({"listen": "udp://x:1", "token": TOKEN}, "udp://x:1"),
                      ({"token": TOKEN, "token_file": "/x"}, "exactly one"),
                      ({"token_file": str(tmp_path / "missing")}, "missing"),
                      ({"token": TOKEN, "version": "0"}, "'0'"),
                      ({"token": TOKEN, "colour": 1}, "colour"),
                      ({"token": TOKEN, "checkpoint": str(tmp_path / "nope")}, "nope")]:
        out = loader.load(model, cmd(op="init", **{"checkpoint": path, **c}))
        assert not out["ok"] and needle in out["message"], (c, out["message"])
    assert loader.worker_for(model).staged is None


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True),
                                       ("qwen3_moe", False)])
def test_sparse_updates_apply_exactly_with_the_engine_digest(kind, tied, tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start(kind, tmp_path, cleanup, tied=tied, require_digest=True, direct=direct)
    sender = Sender([addr], token=TOKEN, base={n: t.clone() for n, t in ckpt.items()}, base_version=0, digest=True)
    state = ckpt
    try:
        for v in (1, 2, 3):
            state = perturb(state, v)
            stats = sender.push(state, version=v)
            assert stats.ok, stats.as_dict()
            out = apply(model, v)
            assert out["ok"], out["message"]
            assert_exact(model, state, cfg, kind)
            assert out["digest"] == state_digest(state)                  # engine-side digest == trainer's
            st = probe(addr, token=TOKEN, timeout=5)["status"]
            assert st["applied_version"] == v and st["digest"] == state_digest(state) and st["error"] is None
            assert st["tp_rank"] == 0 and st["engine"] == "sglang"
            assert 0 < out["changed"] <= out["loaded"] <= len(ckpt)
            assert out["direct_tensors"] + out["loader_tensors"] == out["loaded"]
            assert (out["direct_tensors"] > 0) is direct
            assert st["last_update"]["direct_tensors"] == out["direct_tensors"]
    finally:
        sender.close()


def spy_loads(model):
    seen = []
    orig = model.load_weights

    def spy(weights):
        weights = list(weights)
        seen.append([n for n, _ in weights])
        return orig(weights)
    model.load_weights = spy
    return seen


@pytest.mark.parametrize("kind,tied,changed,want", [
    ("llama", False, ["model.layers.0.self_attn.k_proj.weight"],
     {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}),
    ("llama", False, ["model.layers.1.mlp.up_proj.weight"],
     {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"}),
    ("llama", True, ["model.embed_tokens.weight"], {"model.embed_tokens.weight"}),
    ("qwen3", False, ["model.layers.0.self_attn.q_norm.weight"], {"model.layers.0.self_attn.q_norm.weight"}),
    ("qwen3_moe", False, ["model.layers.1.mlp.experts.2.down_proj.weight"],
     {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")}),
])
def test_changes_are_widened_to_whole_runtime_modules(kind, tied, changed, want, tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start(kind, tmp_path, cleanup, tied=tied, direct=direct)
    state = {n: t.clone() for n, t in ckpt.items()}
    for n in changed:
        state[n].view(torch.int16).reshape(-1)[:5] += 1
    seen = spy_loads(model)
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(state, version=1).ok
    out = apply(model, 1)
    assert out["ok"], out["message"]
    if not direct:
        assert set(seen[0]) == want and len(seen) == 1
    else:
        # the same tensors, split between the map and the loader; the loader sees only names the map left to it
        rmap = loader.worker_for(model).rmap
        assert out["direct_tensors"] + out["loader_tensors"] == len(want) == out["loaded"]
        through = [n for call in seen for n in call]
        assert len(through) == out["loader_tensors"] and set(through) <= want
        assert all(not rmap.mapped.get(n) for n in through)
    assert_exact(model, state, cfg, kind)


def test_tp2_each_rank_holds_its_exact_shard(tmp_path, ranks, cleanup, direct):
    kind = "qwen3_moe"
    cfg, ckpt, models, addrs = start(kind, tmp_path, cleanup, tp=2, ranks=ranks, direct=direct)
    state = ckpt
    with Sender(addrs, token=TOKEN, base=ckpt, base_version=0, digest=True) as s:
        for v in (1, 2):
            state = perturb(state, v)
            assert s.push(state, version=v).ok
            for r, m in enumerate(models):
                out = apply(m, v, ranks=ranks, rank=r)
                assert out["ok"], out["message"]
                assert out["digest"] == state_digest(state)
                assert (out["direct_tensors"] > 0) is direct
                assert_exact(m, state, cfg, kind, r, 2)
    for r, a in enumerate(addrs):
        st = probe(a, token=TOKEN, timeout=5)["status"]
        assert (st["tp_rank"], st["tp_size"], st["applied_version"]) == (r, 2, 2)


def test_tp2_kv_heads_replicated_when_tp_exceeds_them(tmp_path, ranks, cleanup, direct):
    # 1 kv head, TP=2: both ranks hold the same k/v rows (num_kv_head_replicas = 2)
    cfg = sm.Cfg(num_key_value_heads=1)
    ckpt = sm.checkpoint(cfg, "llama")
    path = write_ckpt(tmp_path, ckpt)
    port = free_base_port(2)
    ranks.size = 2
    models = []
    for r in range(2):
        ranks.set(r)
        m = sm.LlamaForCausalLM(cfg, r, 2)
        sm.load_full(m, ckpt)
        assert loader.load(m, cmd(op="init", listen=f"tcp://127.0.0.1:{port}", token=TOKEN,
                                  checkpoint=path, **({"direct": True} if direct else {})))["ok"]
        cleanup.append(m)
        models.append(m)
    state = perturb(ckpt, 1)
    with Sender([f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"], token=TOKEN, base=ckpt,
                base_version=0) as s:
        assert s.push(state, version=1).ok
    for r, m in enumerate(models):
        out = apply(m, 1, ranks=ranks, rank=r)
        assert out["ok"] and (out["direct_tensors"] > 0) is direct, out
        assert_exact(m, state, cfg, "llama", r, 2)


def test_version_that_never_arrives_times_out_and_changes_nothing(tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start("llama", tmp_path, cleanup, direct=direct)
    s1 = perturb(ckpt, 1)
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0, digest=True) as s:
        assert s.push(s1, version=1).ok
        assert apply(model, 1)["ok"]
        snap = snapshot(model)
        out = apply(model, 2, timeout=0.3)
        assert not out["ok"] and "did not arrive within 0.3 s" in out["message"] and "version 1" in out["message"]
        assert_unchanged(model, snap)
        st = probe(addr, token=TOKEN, timeout=5)["status"]
        assert st["applied_version"] == 1 and "did not arrive" in st["error"]
        s2 = perturb(s1, 2)
        assert s.push(s2, version=2).ok
        out = apply(model, 2)
        assert out["ok"], out["message"]
        assert_exact(model, s2, cfg, "llama")
        assert probe(addr, token=TOKEN, timeout=5)["status"]["error"] is None


def test_a_newer_version_than_asked_is_refused(tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start("qwen3", tmp_path, cleanup, direct=direct)
    snap = snapshot(model)
    s1, s2 = perturb(ckpt, 1), None
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(s1, version=1).ok
        s2 = perturb(s1, 2)
        assert s.push(s2, version=2).ok
    out = apply(model, 1, timeout=1)
    assert not out["ok"] and "already holds version 2" in out["message"]
    assert_unchanged(model, snap)
    assert apply(model, 2)["ok"]
    assert_exact(model, s2, cfg, "qwen3")


def test_a_refused_push_changes_nothing_and_a_wrong_base_gets_a_full_update(tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start("llama", tmp_path, cleanup, direct=direct)
    snap = snapshot(model)
    s1 = perturb(ckpt, 1)
    with Sender([addr], token="not-the-token", base=ckpt, base_version=0, retries=0) as s:
        with pytest.raises(PushFailed, match="authentication"):
            s.push(s1, version=1)                      # refused at the handshake
    out = apply(model, 1, timeout=0.5)
    assert not out["ok"] and "did not arrive" in out["message"] and "version 0" in out["message"]
    assert_unchanged(model, snap)
    st = probe(addr, token=TOKEN, timeout=5)
    assert st["version"] == 0 and st["status"]["applied_version"] == 0
    # a sender whose idea of version 0 is wrong: the receiver's digest differs, so it gets a full update
    wrong = perturb(ckpt, 7, specials=False)
    with Sender([addr], token=TOKEN, base=wrong, base_version=0, digest=True) as s:
        assert s.push(s1, version=1).ok
    out = apply(model, 1)
    assert out["ok"], out["message"]
    assert_exact(model, s1, cfg, "llama")
    assert out["digest"] == state_digest(s1)


def test_load_weights_failing_part_way_is_finished_from_the_mirror(tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start("qwen3_moe", tmp_path, cleanup, direct=direct)
    orig = model.load_weights
    calls = {"n": 0}

    def flaky(weights):
        calls["n"] += 1
        if calls["n"] == 1:
            it = iter(list(weights))
            orig([next(it), next(it)])                    # two tensors written, then the failure
            raise RuntimeError("CUDA error: injected")
        return orig(weights)
    model.load_weights = flaky
    s1 = perturb(ckpt, 1)
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(s1, version=1).ok
    out = apply(model, 1)
    assert out["ok"], out["message"]
    assert "injected" in out["message"] and calls["n"] == 2
    assert_exact(model, s1, cfg, "qwen3_moe")


def test_load_weights_failing_twice_reports_inconsistent_then_recovers(tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start("llama", tmp_path, cleanup, direct=direct)
    orig = model.load_weights
    broken = {"on": True}
    seen = []

    def bad(weights):
        weights = list(weights)
        seen.append(len(weights))
        if broken["on"]:
            orig(weights[:1])
            raise RuntimeError("injected twice")
        return orig(weights)
    model.load_weights = bad
    s1 = perturb(ckpt, 1)
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(s1, version=1).ok
        out = apply(model, 1)
        assert not out["ok"] and "INCONSISTENT" in out["message"]
        st = probe(addr, token=TOKEN, timeout=5)["status"]
        assert st["broken"] and st["applied_version"] == 0
        broken["on"] = False
        s2 = perturb(s1, 2)
        assert s.push(s2, version=2).ok
        out = apply(model, 2)
        assert out["ok"], out["message"]
        if not direct:
            assert seen[-1] == len(ckpt)                  # after a broken apply every tensor is loaded
        else:
            assert out["loaded"] == len(ckpt) == out["direct_tensors"] + out["loader_tensors"]
            assert out["direct_tensors"] > 0 and seen[-1] == out["loader_tensors"]
        assert_exact(model, s2, cfg, "llama")
        assert probe(addr, token=TOKEN, timeout=5)["status"]["broken"] is None


def test_tp_workers_agree_all_or_nothing(tmp_path, ranks, cleanup, monkeypatch, direct):
    """Rank 1 never receives version 1: neither rank applies it (the go / no-go exchange), then both apply 2."""
    kind = "llama"
    cfg, ckpt, models, addrs = start(kind, tmp_path, cleanup, tp=2, ranks=ranks, direct=direct)
    barrier = threading.Barrier(2)
    box: dict = {}

    def all_gather(obj, group):                   # two threads stand for the two TP ranks
        rank = obj[0]
        box[rank] = obj
        barrier.wait()
        out = [box[0], box[1]]
        barrier.wait()
        return out
    monkeypatch.setattr(loader, "_all_gather", all_gather)
    ranks.group = "tp"
    snaps = [snapshot(m) for m in models]
    s1 = perturb(ckpt, 1)
    with Sender([addrs[0]], token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(s1, version=1).ok

    def both(version, timeout):
        outs = [None, None]

        def run(r):
            outs[r] = apply(models[r], version, timeout=timeout, ranks=ranks, rank=r)
        ts = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        return outs
    outs = both(1, 0.5)
    assert not outs[0]["ok"] and not outs[1]["ok"]
    assert "tp_rank 1" in outs[0]["message"] and "did not arrive" in outs[0]["message"]
    for m, snap in zip(models, snaps):
        assert_unchanged(m, snap)
    assert probe(addrs[0], token=TOKEN, timeout=5)["status"]["applied_version"] == 0
    s2 = perturb(s1, 2)
    with Sender(addrs, token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(s2, version=2).ok
    outs = both(2, 10)
    assert outs[0]["ok"] and outs[1]["ok"], outs
    assert all((o["direct_tensors"] > 0) is direct for o in outs)
    for r, m in enumerate(models):
        assert_exact(m, s2, cfg, kind, r, 2)


def test_shutdown_and_init_again_keeps_the_mirror(tmp_path, ranks, cleanup, direct):
    cfg, ckpt, (model,), (addr,) = start("llama", tmp_path, cleanup, direct=direct)
    s1 = perturb(ckpt, 1)
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(s1, version=1).ok
    assert apply(model, 1)["ok"]
    port = int(addr.rsplit(":", 1)[1])
    out = loader.load(model, cmd(op="init", listen=addr, token=TOKEN))
    assert not out["ok"] and "already receives" in out["message"]
    assert loader.load(model, cmd(op="shutdown"))["ok"]
    out = loader.load(model, cmd(op="init", listen=f"tcp://127.0.0.1:{port}", token=TOKEN, version=0))
    assert not out["ok"] and "version 1" in out["message"]
    out = loader.load(model, cmd(op="init", listen=f"tcp://127.0.0.1:{port}", token=TOKEN, version=1,
                                 **({"direct": True} if direct else {})))
    assert out["ok"], out["message"]
    assert out["direct"]["enabled"] is direct           # learned again on the kept mirror (== the weights)
    assert_exact(model, s1, cfg, "llama")
    s2 = perturb(s1, 2)
    with Sender([addr], token=TOKEN, base=s1, base_version=1) as s:
        assert s.push(s2, version=2).ok
    out = apply(model, 2)
    assert out["ok"] and (out["direct_tensors"] > 0) is direct, out
    assert_exact(model, s2, cfg, "llama")


def test_token_file_and_structure_helpers(tmp_path, ranks, cleanup):
    tf = tmp_path / "tok"
    tf.write_text(TOKEN + "\n")
    _, _, (model,), _ = start("llama", tmp_path, cleanup, tied=True)
    assert loader.tied_aliases(model) == {"lm_head": "model.embed_tokens"}
    assert loader.packed_mapping(model)["qkv_proj"] == ["q_proj", "k_proj", "v_proj"]
    cfg = sm.Cfg()
    moe_ckpt = sm.checkpoint(cfg, "qwen3_moe")
    (tmp_path / "moe").mkdir()
    m2 = sm.Qwen3MoeForCausalLM(cfg)
    sm.load_full(m2, moe_ckpt)
    port = free_base_port(1)
    out = loader.load(m2, cmd(op="init", listen=f"tcp://127.0.0.1:{port}", token_file=str(tf),
                              checkpoint=write_ckpt(tmp_path / "moe", moe_ckpt)))
    cleanup.append(m2)
    assert out["ok"], out["message"]
    assert probe(f"tcp://127.0.0.1:{port}", token=TOKEN, timeout=5)["status"]["applied_version"] == 0


def test_tp_placement_is_read_from_sglangs_runtime_context(monkeypatch):
    import types
    par = types.SimpleNamespace(tp_rank=1, tp_size=2, pp_rank=1, tp_group=types.SimpleNamespace(cpu_group="G"))
    rc = types.ModuleType("sglang.srt.runtime_context")
    rc.get_parallel = lambda: par
    rc.get_server_args = lambda: types.SimpleNamespace(model_path="/models/x")
    for name in ("sglang", "sglang.srt"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.runtime_context", rc)
    assert loader._tp() == (1, 2, 3, "G")              # port offset pp_rank * tp_size + tp_rank
    assert loader._model_path() == "/models/x"
    assert loader.offset_port("tcp://0.0.0.0:7000", 3) == "tcp://0.0.0.0:7003"
    monkeypatch.setitem(sys.modules, "sglang.srt.runtime_context", None)
    assert loader._tp() == (0, 1, 0, None)


# -- init 'direct': the runtime map ------------------------------------------------------------------------------------
def test_direct_copies_replace_the_loader_for_mapped_tensors(tmp_path, ranks, cleanup):
    """Qwen3-MoE, every tensor changed: the loader sees only the tensors the map left to it (the vocab-padded
    embeddings, whose loader zero-fills), every expert goes by direct copies, and the result is exact."""
    cfg, ckpt, (model,), (addr,) = start("qwen3_moe", tmp_path, cleanup, direct=True)
    w = loader.worker_for(model)
    assert set(w.rmap.unmapped) == {"model.embed_tokens.weight", "lm_head.weight"}, w.rmap.unmapped
    assert all("fill_" in why for why in w.rmap.unmapped.values())
    seen = spy_loads(model)
    state = ckpt
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0, digest=True) as s:
        for v in (1, 2):
            state = perturb(state, v)
            assert s.push(state, version=v).ok
            out = apply(model, v)
            assert out["ok"], out["message"]
            assert (out["direct_tensors"], out["loader_tensors"]) == (out["loaded"] - 2, 2)
            assert out["loaded"] > len(ckpt) // 2            # (small norms may see no change)
            assert sorted(seen[-1]) == ["lm_head.weight", "model.embed_tokens.weight"] and len(seen) == v
            assert_exact(model, state, cfg, "qwen3_moe")
            assert out["digest"] == state_digest(state)
    st = probe(addr, token=TOKEN, timeout=5)["status"]
    assert st["direct"]["enabled"] and st["direct"]["mapped"] == len(ckpt) - 2 and st["direct"]["map_bytes"] > 0
    assert st["last_update"]["direct_tensors"] == out["direct_tensors"] and st["last_update"]["loader_tensors"] == 2


class ScaledNormQwen3(sm.Qwen3ForCausalLM):
    """A loader that is not a pure copy for some tensors: q_norm weights are stored doubled."""

    def __init__(self, cfg, tp_rank=0, tp_size=1):
        super().__init__(cfg, tp_rank, tp_size)
        for layer in self.model.layers:
            layer.self_attn.q_norm.weight.weight_loader = lambda param, w: param.data.copy_(w * 2)


def test_direct_mixes_with_a_loader_that_is_not_a_copy(tmp_path, ranks, cleanup):
    cfg, ckpt, (model,), (addr,) = start("qwen3", tmp_path, cleanup, direct=True, model_cls=ScaledNormQwen3)
    scaled = [n for n in ckpt if n.endswith("q_norm.weight")]
    rmap = loader.worker_for(model).rmap
    assert all(n in rmap.unmapped and "mul" in rmap.unmapped[n] for n in scaled), rmap.unmapped
    assert "model.layers.0.self_attn.k_norm.weight" in rmap.mapped

    def check(state):
        want = sm.expected_params(state, cfg, "qwen3", 0, 1)
        for n in scaled:
            want[n] = state[n] * 2
        got = dict(model.named_parameters())
        bad = [n for n in want if not torch.equal(bits(got[n]), bits(want[n]))]
        assert not bad, bad
    check(ckpt)                                           # learning loaded the mirror: nothing changed
    seen = spy_loads(model)
    state = ckpt
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        for v in (1, 2):
            state = perturb(state, v)
            for n in scaled:                                  # make sure the scaled tensors change too
                state[n].view(torch.int16)[:3] += 1
            assert s.push(state, version=v).ok
            out = apply(model, v)
            assert out["ok"], out["message"]
            assert set(scaled) <= set(seen[-1]) and out["direct_tensors"] > 0
            assert len(seen[-1]) == out["loader_tensors"] and all(not rmap.mapped.get(n) for n in seen[-1])
            check(state)


def _replace_data(model):
    p = model.model.layers[1].self_attn.o_proj.weight
    p.data = p.data.clone()


def _replace_parameter(model):
    mod = model.model.layers[0].mlp.experts
    old = mod.w2_weight
    new = torch.nn.Parameter(old.detach().clone(), requires_grad=False)
    new.weight_loader = old.weight_loader
    mod.w2_weight = new


@pytest.mark.parametrize("replace", [_replace_data, _replace_parameter], ids=["param.data", "new Parameter"])
def test_direct_falls_back_to_the_loader_when_a_parameter_was_replaced(replace, tmp_path, ranks, cleanup):
    cfg, ckpt, (model,), (addr,) = start("qwen3_moe", tmp_path, cleanup, direct=True)
    replace(model)
    assert_exact(model, ckpt, cfg, "qwen3_moe")
    state = ckpt
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        for v in (1, 2):
            state = perturb(state, v)
            assert s.push(state, version=v).ok
            out = apply(model, v)
            assert out["ok"], out["message"]
            assert out["direct_tensors"] == 0 and out["loader_tensors"] == out["loaded"] > len(ckpt) // 2
            assert_exact(model, state, cfg, "qwen3_moe")
    st = probe(addr, token=TOKEN, timeout=5)["status"]
    assert st["direct"]["enabled"] is False and "replaced" in st["direct"]["off"] and st["error"] is None


def test_direct_copies_failing_part_way_are_finished_through_load_weights(tmp_path, ranks, cleanup, monkeypatch):
    cfg, ckpt, (model,), (addr,) = start("llama", tmp_path, cleanup, direct=True)
    w = loader.worker_for(model)
    orig_apply, orig_load = w.rmap.apply, model.load_weights
    fail = {"direct": 1, "loader": 0}
    seen = []

    def bad_apply(mirror, names):
        names = list(names)
        orig_apply(mirror, names[:3])                     # three tensors copied, then the failure
        if fail["direct"]:
            fail["direct"] -= 1
            raise RuntimeError("CUDA error: injected in a copy")
        return orig_apply(mirror, names)

    def load_weights(weights):
        weights = list(weights)
        seen.append(len(weights))
        if fail["loader"]:
            fail["loader"] -= 1
            raise RuntimeError("injected in load_weights")
        return orig_load(weights)
    monkeypatch.setattr(w.rmap, "apply", bad_apply)
    model.load_weights = load_weights
    s1 = perturb(ckpt, 1)
    with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
        assert s.push(s1, version=1).ok
        out = apply(model, 1)
        assert out["ok"], out["message"]
        assert "direct copies" in out["message"] and "injected in a copy" in out["message"]
        assert seen == [out["loaded"]] and out["direct_tensors"] == 0   # the retry: all through the loader
        assert_exact(model, s1, cfg, "llama")
        # both paths fail: inconsistent, then the next apply loads everything (direct again) and recovers
        fail.update(direct=1, loader=1)
        s2 = perturb(s1, 2)
        assert s.push(s2, version=2).ok
        out = apply(model, 2)
        assert not out["ok"] and "INCONSISTENT" in out["message"] and "direct copies" in out["message"]
        assert probe(addr, token=TOKEN, timeout=5)["status"]["broken"]
        s3 = perturb(s2, 3)
        assert s.push(s3, version=3).ok
        out = apply(model, 3)
        assert out["ok"], out["message"]
        assert out["loaded"] == len(ckpt) and out["direct_tensors"] > 0
        assert_exact(model, s3, cfg, "llama")


class PostLoadLlama(sm.LlamaForCausalLM):
    def post_load_weights(self, weight_names=None):       # like DeepSeek MLA's w_kc / w_vc: state the map cannot see
        pass


def test_direct_init_refusals(tmp_path, ranks, cleanup):
    cfg = sm.Cfg()
    ckpt = sm.checkpoint(cfg, "llama")
    path = write_ckpt(tmp_path, ckpt)
    port = free_base_port(1)
    base = {"listen": f"tcp://127.0.0.1:{port}", "token": TOKEN, "checkpoint": path}
    model = sm.LlamaForCausalLM(cfg)
    sm.load_full(model, ckpt)
    out = loader.load(model, cmd(op="init", direct="yes", **base))
    assert not out["ok"] and "'yes'" in out["message"]
    m2 = PostLoadLlama(cfg)
    sm.load_full(m2, ckpt)
    out = loader.load(m2, cmd(op="init", direct=True, **base))
    assert not out["ok"] and "post_load_weights" in out["message"]

    def broken_loader(weights):
        raise RuntimeError("loader exploded")
    model.load_weights = broken_loader
    out = loader.load(model, cmd(op="init", direct=True, **base))
    assert not out["ok"] and "loader exploded" in out["message"] and "without 'direct'" in out["message"]
    assert loader.worker_for(model).staged is None
    with socket.socket() as sk:                           # no receiver was left listening
        sk.bind(("127.0.0.1", port))
    # a mirror that is not what the engine holds is never learned from
    from sparsesync.integrations.staging import StagedMirror
    staged = StagedMirror(dict(ckpt), listen=f"tcp://127.0.0.1:{port}", token=TOKEN, version=0)
    staged.version = 3
    with pytest.raises(loader.CommandError, match="engine is at version 3"):
        loader.worker_for(m2)._learn(staged)


def test_direct_under_inference_mode(tmp_path, ranks, cleanup):
    """SGLang's scheduler loop runs under torch.inference_mode (DynamicGradMode): learning and applying there."""
    with torch.inference_mode():
        cfg, ckpt, (model,), (addr,) = start("qwen3", tmp_path, cleanup, tied=True, direct=True)
        s1 = perturb(ckpt, 1)
        with Sender([addr], token=TOKEN, base=ckpt, base_version=0) as s:
            assert s.push(s1, version=1).ok
        out = apply(model, 1)
    assert out["ok"] and out["direct_tensors"] > 0, out
    assert_exact(model, s1, cfg, "qwen3")
