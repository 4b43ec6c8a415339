"""RuntimeMap: learn checkpoint -> runtime copies by watching a vLLM/SGLang-style loader, then apply directly."""
from __future__ import annotations

import ctypes
import functools
import sys

import pytest
import torch
from torch import nn

from sparsesync.errors import InvalidArgument
from sparsesync.integrations.runtime_map import RuntimeMap

BF16 = torch.bfloat16


# ---------------------------------------------------------------- a toy engine model, loaders written like vLLM's
def _module_at(root: nn.Module, path: list[str]) -> nn.Module:
    m = root
    for p in path:
        if not hasattr(m, p):
            m.register_module(p, nn.Module())
        m = getattr(m, p)
    return m


def _param(root, dotted, shape, loader, dtype=BF16):
    *path, leaf = dotted.split(".")
    p = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    _module_at(root, path).register_parameter(leaf, p)
    return p


def default_loader(param, w, shard_id=None):
    assert param.shape == w.shape, (param.shape, w.shape)
    param.data.copy_(w)


def clone_loader(param, w, shard_id=None):           # whole-tensor clone first (like .to(device)): still a copy
    param.data.copy_(w.clone())


def sharded_loader(param, w, shard_id=None, *, dim, rank):
    size = param.shape[dim]
    param.data.copy_(w.narrow(dim, rank * size, size))


def stacked_loader(param, w, shard_id, *, offsets, dim0_sizes, rank):
    size = dim0_sizes[shard_id]
    param.data.narrow(0, offsets[shard_id], size).copy_(w.narrow(0, rank * size, size))


def expert_loader(param, w, shard_id, expert_id, *, rank):
    e = param.data[expert_id]
    if shard_id == "w2":                              # [H, I/tp]: row parallel, shard along dim 1
        size = e.shape[1]
        e.copy_(w.narrow(1, rank * size, size))
    else:                                             # w13 [2I/tp, H]: w1 rows first, then w3
        size = e.shape[0] // 2
        e.narrow(0, 0 if shard_id == "w1" else size, size).copy_(w.narrow(0, rank * size, size))


def bad_cast(param, w, shard_id=None):
    param.data.copy_(w.to(torch.float32))


def bad_scale(param, w, shard_id=None):
    param.data.copy_(w * 2)


def bad_transpose(param, w, shard_id=None):
    param.data.copy_(w.t().contiguous())


def bad_replace(param, w, shard_id=None):
    param.data = w.clone()


def bad_expand(param, w, shard_id=None):
    param.data.copy_(w.unsqueeze(0).expand(param.shape[0], -1))


def bad_temp(param, w, shard_id=None):
    tmp = torch.empty_like(param.data)
    tmp.copy_(w)
    param.data.copy_(tmp)


def bad_rawptr(param, w, shard_id=None):              # reads the probe through its raw address, not through aten
    raw = ctypes.string_at(w.data_ptr(), w.numel() * w.element_size())
    param.data.copy_(torch.frombuffer(bytearray(raw), dtype=BF16).view(w.shape))


BAD = {  # checkpoint name -> (loader, runtime shape, dtype, checkpoint shape, expected words in the reason)
    "model.bad_cast.weight": (bad_cast, (4, 4), torch.float32, (4, 4), "_to_copy"),
    "model.bad_copycast.weight": (default_loader, (4, 4), torch.float32, (4, 4), "copy_.default casts"),
    "model.bad_scale.weight": (bad_scale, (4, 4), BF16, (4, 4), "aten.mul"),
    "model.bad_transpose.weight": (bad_transpose, (4, 6), BF16, (6, 4), "aten.clone"),
    "model.bad_replace.weight": (bad_replace, (4, 4), BF16, (4, 4), "replaced"),
    "model.bad_expand.weight": (bad_expand, (3, 4), BF16, (4,), "aten.expand"),
    "model.bad_temp.weight": (bad_temp, (4, 4), BF16, (4, 4), "not a parameter or buffer"),
    "model.bad_rawptr.weight": (bad_rawptr, (4, 4), BF16, (4, 4), "other than the checkpoint"),
}


class ToyEngineModel(nn.Module):
    """Layer 0 dense, layer 1 MoE; TP=tp, this instance is rank ``rank``; lm_head tied to embed_tokens."""

    def __init__(self, cfg: dict, rank: int, tp: int = 2, bad: bool = True):
        super().__init__()
        self.cfg, self.rank, self.tp = cfg, rank, tp
        H, Q, KV, I, IM, E, V, L = (cfg[k] for k in ("H", "Q", "KV", "I", "IM", "E", "V", "L"))
        r = rank
        _param(self, "model.embed_tokens.weight", (V // tp, H), functools.partial(sharded_loader, dim=0, rank=r))
        for i in range(L):
            p = f"model.layers.{i}"
            _param(self, f"{p}.input_layernorm.weight", (H,), default_loader)
            sizes = {"q": Q // tp, "k": KV // tp, "v": KV // tp}
            offs = {"q": 0, "k": Q // tp, "v": (Q + KV) // tp}
            _param(self, f"{p}.self_attn.qkv_proj.weight", ((Q + 2 * KV) // tp, H),
                   functools.partial(stacked_loader, offsets=offs, dim0_sizes=sizes, rank=r))
            _param(self, f"{p}.self_attn.o_proj.weight", (H, Q // tp), functools.partial(sharded_loader, dim=1, rank=r))
            if i % 2 == 0:
                _param(self, f"{p}.mlp.gate_up_proj.weight", (2 * I // tp, H),
                       functools.partial(stacked_loader, offsets={0: 0, 1: I // tp},
                                         dim0_sizes={0: I // tp, 1: I // tp}, rank=r))
                _param(self, f"{p}.mlp.down_proj.weight", (H, I // tp),
                       functools.partial(sharded_loader, dim=1, rank=r))
            else:
                _param(self, f"{p}.mlp.gate.weight", (E, H), default_loader)
                _param(self, f"{p}.mlp.experts.w13_weight", (E, 2 * IM // tp, H),
                       functools.partial(expert_loader, rank=r))
                _param(self, f"{p}.mlp.experts.w2_weight", (E, H, IM // tp), functools.partial(expert_loader, rank=r))
        _param(self, "model.norm.weight", (H,), clone_loader)
        self.lm_head = self.model.embed_tokens       # tied: the loader skips lm_head.weight
        if bad:
            for name, (loader, shape, dtype, _, _) in BAD.items():
                _param(self, name, shape, loader, dtype)

    def load_weights(self, weights):
        stacked = [(".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"),
                   (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1)]
        experts = [(f".experts.{part}.", f".experts.{e}.{ck}.", e, sid)
                   for e in range(self.cfg["E"])
                   for part, ck, sid in (("w13_", "gate_proj", "w1"), ("w13_", "up_proj", "w3"), ("w2_", "down_proj", "w2"))]
        params = dict(self.named_parameters())
        loaded = set()
        for name, w in weights:
            if name == "lm_head.weight":
                continue
            for param_part, ck_part, shard in stacked:
                if ck_part not in name or ".experts." in name:
                    continue
                target = name.replace(ck_part, param_part)
                param = params[target]
                param.weight_loader(param, w, shard)
                break
            else:
                for param_part, ck_part, e, sid in experts:
                    if ck_part not in name:
                        continue
                    target = name.replace(ck_part, param_part)          # ...experts.w13_.weight
                    target = target.replace(f"{param_part}weight", f"{param_part}weight")
                    target = target.replace(".experts.w13_.weight", ".experts.w13_weight")
                    target = target.replace(".experts.w2_.weight", ".experts.w2_weight")
                    param = params[target]
                    param.weight_loader(param, w, sid, e)
                    break
                else:
                    param = params[name]
                    param.weight_loader(param, w)
            loaded.add(name)
        return loaded


def checkpoint(cfg: dict, seed: int = 0, bad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, Q, KV, I, IM, E, V, L = (cfg[k] for k in ("H", "Q", "KV", "I", "IM", "E", "V", "L"))
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.self_attn.q_proj.weight": (Q, H),
                       f"{p}.self_attn.k_proj.weight": (KV, H), f"{p}.self_attn.v_proj.weight": (KV, H),
                       f"{p}.self_attn.o_proj.weight": (H, Q)})
        if i % 2 == 0:
            shapes.update({f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                           f"{p}.mlp.down_proj.weight": (H, I)})
        else:
            shapes[f"{p}.mlp.gate.weight"] = (E, H)
            for e in range(E):
                shapes.update({f"{p}.mlp.experts.{e}.gate_proj.weight": (IM, H),
                               f"{p}.mlp.experts.{e}.up_proj.weight": (IM, H),
                               f"{p}.mlp.experts.{e}.down_proj.weight": (H, IM)})
    if bad:
        shapes.update({n: v[3] for n, v in BAD.items()})
    ck = {n: torch.randn(s, generator=g).to(BF16) for n, s in shapes.items()}
    ck["lm_head.weight"] = ck["model.embed_tokens.weight"].clone()
    return ck


CFG = {"H": 16, "Q": 16, "KV": 8, "I": 24, "IM": 8, "E": 4, "V": 32, "L": 2}


def loaded_model(cfg, rank, ck, bad=True):
    m = ToyEngineModel(cfg, rank, bad=bad)
    m.load_weights(list(ck.items()))
    return m


def loader_of(model):
    return lambda pairs: model.load_weights(pairs)


def ints(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_runtime(a: nn.Module, b: nn.Module):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n, x in pa.items():
        y = pb[n]
        assert x.dtype == y.dtype and x.shape == y.shape, n
        assert torch.equal(ints(x.data), ints(y.data)), f"runtime differs in {n}"


def perturb(mirror: dict, frac: float = 0.01, seed: int = 1) -> None:
    """Change ~frac of the elements of every tensor in place, bf16 special values included."""
    g = torch.Generator().manual_seed(seed)
    specials = torch.tensor([0x7FC5, 0x7F81, -0x0001 & 0xFFFF, 0x8000, 0x7F80, 0xFF80], dtype=torch.int32)
    specials = specials.to(torch.int16)       # NaN with payloads (quiet, signalling), -NaN, -0.0, +inf, -inf
    for t in mirror.values():
        flat = ints(t).view(-1)
        k = max(1, int(flat.numel() * frac))
        idx = torch.randperm(flat.numel(), generator=g)[:k]
        vals = torch.randint(-(1 << 15), 1 << 15, (k,), generator=g, dtype=torch.int32).to(torch.int16)
        vals[: min(k, len(specials))] = specials[: min(k, len(specials))]
        flat[idx] = vals


# ---------------------------------------------------------------- tests
def expected_sets(ck):
    bad = set(BAD)
    return set(ck) - bad, bad


@pytest.mark.parametrize("rank", [0, 1])
def test_learn_apply_matches_fresh_load(rank):
    ck = checkpoint(CFG)
    mirror = {n: t.clone() for n, t in ck.items()}
    model = loaded_model(CFG, rank, ck)
    rmap = RuntimeMap.learn(model, mirror, loader_of(model))

    good, bad = expected_sets(ck)
    assert set(rmap.mapped) == good, set(rmap.mapped) ^ good
    assert set(rmap.unmapped) == bad
    for n, (_, _, _, _, word) in BAD.items():
        assert word in rmap.unmapped[n], (n, rmap.unmapped[n])
    assert rmap.mapped["lm_head.weight"] == []                       # tied: the loader ignores it
    # one copy per tensor in this model, into the right runtime parameter
    assert [c.param_name for c in rmap.mapped["model.layers.1.self_attn.k_proj.weight"]] == \
        ["model.layers.1.self_attn.qkv_proj.weight"]
    assert [c.param_name for c in rmap.mapped["model.layers.1.mlp.experts.3.up_proj.weight"]] == \
        ["model.layers.1.mlp.experts.w13_weight"]
    assert all(len(rmap.mapped[n]) == 1 for n in good - {"lm_head.weight"})
    assert rmap.verify(mirror) == []

    perturb(mirror)
    # changed names in order; lm_head changes too (it equals embed_tokens in the new checkpoint as well)
    mirror["lm_head.weight"].copy_(mirror["model.embed_tokens.weight"])
    rest = rmap.apply(mirror, list(mirror))
    assert set(rest) == bad
    model.load_weights([(n, mirror[n]) for n in rest])

    fresh = loaded_model(CFG, rank, mirror)
    assert_same_runtime(model, fresh)
    assert rmap.verify(mirror) == []
    # and the runtime differs from the old checkpoint's (the update did something)
    old = loaded_model(CFG, rank, ck)
    with pytest.raises(AssertionError):
        assert_same_runtime(model, old)


def test_tp_ranks_hold_disjoint_shards():
    ck = checkpoint(CFG)
    maps = []
    for rank in (0, 1):
        model = loaded_model(CFG, rank, ck)
        maps.append(RuntimeMap.learn(model, ck, loader_of(model)))
    n = "model.layers.0.self_attn.o_proj.weight"           # row parallel: source columns differ per rank
    (c0,), (c1,) = maps[0].mapped[n], maps[1].mapped[n]
    assert c0.dst == c1.dst and c0.src != c1.src
    assert c0.src[0] == 0 and c1.src[0] == CFG["Q"] // 2
    n = "model.layers.1.self_attn.v_proj.weight"           # column parallel into qkv rows
    (c0,), (c1,) = maps[0].mapped[n], maps[1].mapped[n]
    assert c0.dst == c1.dst and c1.src[0] - c0.src[0] == (CFG["KV"] // 2) * CFG["H"]


def test_verify_catches_corruption():
    ck = checkpoint(CFG)
    model = loaded_model(CFG, 0, ck)
    rmap = RuntimeMap.learn(model, ck, loader_of(model))
    assert rmap.verify(ck) == []
    p = dict(model.named_parameters())["model.layers.1.mlp.experts.w13_weight"]
    ints(p.data)[2, 5, 3] ^= 1                                      # one bit of expert 2, w3 part (rows 4..7)
    assert rmap.verify(ck) == ["model.layers.1.mlp.experts.2.up_proj.weight"]
    rmap.apply(ck, ["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert rmap.verify(ck) == []
    # -0.0 vs +0.0 is a difference too (bitwise)
    q = dict(model.named_parameters())["model.norm.weight"]
    ck2 = {n: t.clone() for n, t in ck.items()}
    ck2["model.norm.weight"][0] = 0.0
    q.data[0] = -0.0
    assert rmap.verify(ck2, ["model.norm.weight"]) == ["model.norm.weight"]


def test_map_memory_is_per_tensor():
    small = CFG
    big = {**CFG, "H": 64, "Q": 64, "KV": 32, "I": 96, "IM": 32, "V": 128}
    sizes = []
    for cfg in (small, big):
        ck = checkpoint(cfg, bad=False)
        model = loaded_model(cfg, 0, ck, bad=False)
        rmap = RuntimeMap.learn(model, ck, loader_of(model))
        assert not rmap.unmapped
        sizes.append((rmap.nbytes_of_map, sum(t.numel() for t in ck.values()), len(ck)))
    (nb_s, el_s, n_s), (nb_b, el_b, n_b) = sizes
    assert n_s == n_b and el_b >= 10 * el_s
    assert nb_b == nb_s                                             # same tensors, 16x the elements: same map
    assert nb_s < 2000 * n_s                                        # a few hundred bytes per tensor


def _one_param_model(shape, loaders: dict):
    m = nn.Module()
    m.p = nn.Parameter(torch.zeros(shape, dtype=BF16), requires_grad=False)

    def load(pairs):
        for n, w in pairs:
            loaders[n](m.p, w)
    return m, load


def test_overlap_is_refused():
    ck = {"a": torch.randn(4, 8).to(BF16), "b": torch.randn(4, 8).to(BF16), "c": torch.randn(2, 8).to(BF16)}
    m, load = _one_param_model((10, 8), {
        "a": lambda p, w: p.data.narrow(0, 0, 4).copy_(w),
        "b": lambda p, w: p.data.narrow(0, 2, 4).copy_(w),           # rows 2..5 overlap a's rows 2..3
        "c": lambda p, w: p.data.narrow(0, 8, 2).copy_(w),
    })
    rmap = RuntimeMap.learn(m, ck, load)
    assert set(rmap.mapped) == {"c"}
    assert "overlaps" in rmap.unmapped["a"] and "'b'" in rmap.unmapped["a"]
    assert "overlaps" in rmap.unmapped["b"] and "'a'" in rmap.unmapped["b"]


def test_written_twice_and_interleaved_disjoint():
    ck = {"even": torch.randn(4, 4).to(BF16), "odd": torch.randn(4, 4).to(BF16), "twice": torch.randn(2, 8).to(BF16)}
    m, load = _one_param_model((6, 8), {
        "even": lambda p, w: p.data[:4, 0::2].copy_(w),             # byte ranges intersect, elements do not
        "odd": lambda p, w: p.data[:4, 1::2].copy_(w),
        "twice": lambda p, w: (p.data[4:6].copy_(w), p.data[4:6].copy_(w)),
    })
    rmap = RuntimeMap.learn(m, ck, load)
    assert set(rmap.mapped) == {"even", "odd"}
    assert "twice" in rmap.unmapped["twice"]
    ck2 = {n: t.clone() for n, t in ck.items()}
    perturb(ck2, frac=0.3)
    assert rmap.apply(ck2, list(ck2)) == ["twice"]
    load([("twice", ck2["twice"])])
    m2, load2 = _one_param_model((6, 8), {
        "even": lambda p, w: p.data[:4, 0::2].copy_(w),
        "odd": lambda p, w: p.data[:4, 1::2].copy_(w),
        "twice": lambda p, w: p.data[4:6].copy_(w),
    })
    load2(list(ck2.items()))
    assert torch.equal(ints(m.p.data), ints(m2.p.data))
    # when the intersecting span is too large to check exactly, intersection is refused
    m3, load3 = _one_param_model((6, 8), {
        "even": lambda p, w: p.data[:4, 0::2].copy_(w),
        "odd": lambda p, w: p.data[:4, 1::2].copy_(w),
    })
    rmap3 = RuntimeMap.learn(m3, {"even": ck["even"], "odd": ck["odd"]}, load3, exact_limit=8)
    assert not rmap3.mapped and "too large" in rmap3.unmapped["even"]


def test_side_write_and_replacement_after_learning():
    ck = {"a": torch.randn(4, 8).to(BF16)}
    m, load = _one_param_model((6, 8), {
        "a": lambda p, w: (p.data[:4].copy_(w), p.data[4:].fill_(0)),   # padding fill: a write not from the probe
    })
    rmap = RuntimeMap.learn(m, ck, load)
    assert "fill_" in rmap.unmapped["a"]
    m, load = _one_param_model((4, 8), {"a": lambda p, w: p.data.copy_(w)})
    rmap = RuntimeMap.learn(m, ck, load)
    assert list(rmap.mapped) == ["a"]
    with pytest.raises(InvalidArgument, match="layout"):
        rmap.apply({"a": ck["a"].float()}, ["a"])                    # the mirror tensor changed dtype
    with pytest.raises(InvalidArgument, match="'zz'"):
        rmap.apply(ck, ["zz"])
    m.p.data = m.p.data.clone()                                      # repacked after learning
    with pytest.raises(InvalidArgument, match="'p' was replaced"):
        rmap.apply(ck, ["a"])
    with pytest.raises(InvalidArgument, match="'p' was replaced"):
        rmap.verify(ck)


def test_replacement_during_learning_unmaps_earlier_copies():
    ck = {"a": torch.randn(4, 8).to(BF16), "b": torch.randn(4, 8).to(BF16), "c": torch.randn(4, 8).to(BF16)}
    m = nn.Module()
    m.p = nn.Parameter(torch.zeros(8, 8, dtype=BF16), requires_grad=False)
    m.sub = nn.Module()
    m.sub.q = nn.Parameter(torch.zeros(4, 8, dtype=BF16), requires_grad=False)

    def load(pairs):
        for n, w in pairs:
            if n == "a":
                m.p.data[:4].copy_(w)
            elif n == "b":                                           # loads, then repacks p into a new Parameter
                m.p.data[4:].copy_(w)
                m.p = nn.Parameter(m.p.data.clone(), requires_grad=False)
            else:                                                    # loads, then swaps the submodule
                m.sub.q.data.copy_(w)
                old = m.sub
                m.sub = nn.Module()
                m.sub.q = old.q
    rmap = RuntimeMap.learn(m, ck, load)
    assert not rmap.mapped
    assert "replaced" in rmap.unmapped["b"] and "'p'" in rmap.unmapped["b"]
    assert "stale" in rmap.unmapped["a"] and "'b'" in rmap.unmapped["a"]
    assert "replaced" in rmap.unmapped["c"] and "sub" in rmap.unmapped["c"]


def test_subset_and_unknown_names():
    ck = checkpoint(CFG)
    model = loaded_model(CFG, 0, ck)
    some = ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight", "model.bad_scale.weight"]
    rmap = RuntimeMap.learn(model, ck, loader_of(model), names=some)
    assert list(rmap.mapped) == some[:2] and list(rmap.unmapped) == some[2:]
    assert rmap.apply(ck, ["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.bad_scale.weight"]) == \
        ["model.layers.0.mlp.up_proj.weight", "model.bad_scale.weight"]
    with pytest.raises(InvalidArgument, match="'nope'"):
        RuntimeMap.learn(model, ck, loader_of(model), names=["nope"])


def test_learn_does_not_write_the_mirror():
    ck = {"a": torch.randn(4, 8).to(BF16)}
    before = ck["a"].clone()

    def scribble(p, w):
        w.zero_()
    m, load = _one_param_model((4, 8), {"a": scribble})
    rmap = RuntimeMap.learn(m, ck, load)
    assert "writes into the checkpoint tensor" in rmap.unmapped["a"]
    assert torch.equal(ints(ck["a"]), ints(before))


def test_module_imports_no_engine():
    assert "vllm" not in sys.modules and "sglang" not in sys.modules


def test_strided_mirror_tensors_and_empty():
    base = torch.randn(8, 4).to(BF16)
    ck = {"t": base.t(),                                             # dense, column-major mirror tensor
          "s": torch.randn(10, 4).to(BF16)[2:6],                     # a view with a storage offset
          "gap": torch.randn(4, 8).to(BF16)[:, ::2],                 # not dense: left to the loader
          "e": torch.zeros(0, 4, dtype=BF16)}
    m, load = _one_param_model((12, 8), {
        "t": lambda p, w: p.data[:4].copy_(w),
        "s": lambda p, w: p.data[4:8, :4].copy_(w),
        "gap": lambda p, w: p.data[8:12, :4].copy_(w),
        "e": lambda p, w: None,
    })
    rmap = RuntimeMap.learn(m, ck, load)
    assert set(rmap.mapped) == {"t", "s"} and "non-dense" in rmap.unmapped["gap"] and "empty" in rmap.unmapped["e"]
    assert rmap.mapped["t"][0].src == (0, (4, 8), (1, 4))
    perturb({"b": base, "s": ck["s"]}, frac=0.5)                    # in place: ck["t"] views base
    assert rmap.verify(ck) == ["t", "s"]
    assert rmap.apply(ck, list(ck)) == ["gap", "e"]
    assert rmap.verify(ck) == []
    assert torch.equal(ints(m.p.data[:4]), ints(ck["t"].contiguous()))
    assert torch.equal(ints(m.p.data[4:8, :4]), ints(ck["s"]))


def test_apply_refuses_a_parameter_replaced_by_a_new_object():
    """A new Parameter object (not only new .data) under a mapped name: apply must refuse, never copy into the
    orphaned old tensor."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16), requires_grad=False)

        def load_weights(self, pairs):
            for _, t in pairs:
                self.w.data.copy_(t)

    m = M()
    mirror = {"w": torch.randn(4, 4).to(torch.bfloat16)}
    rmap = RuntimeMap.learn(m, mirror, load=m.load_weights)
    assert list(rmap.mapped) == ["w"]
    m.w = nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16), requires_grad=False)
    with pytest.raises(InvalidArgument, match="no longer the object"):
        rmap.apply(mirror, ["w"])
