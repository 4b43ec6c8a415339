"""Small torch models with SGLang 0.5.23's parameter names and ``weight_loader`` semantics (CPU, no SGLang needed).

SGLang 0.5.23 does not import here: it pins torch 2.14.1 (CUDA) and its package import chain pulls triton,
apache-tvm-ffi, torchvision and more (``sglang/__init__.py`` -> ``sglang/srt/utils/common.py`` imports triton at
module level). So these modules reproduce, for one tensor-parallel rank ``tp_rank`` of ``tp_size``, what the released
source does for unquantized bf16 weights on a non-CPU device (the GPU path; the ``_is_cpu`` padded-narrow branches are
not reproduced). Read from the wheel
``sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl``:

- ``sglang/srt/layers/linear.py``: ``ColumnParallelLinear.weight_loader`` (:528, narrow ``output_dim`` at
  ``tp_rank * shard``); ``MergedColumnParallelLinear.weight_loader`` (:710, shard ``i`` at
  ``sum(output_sizes[:i]) // tp_size`` of size ``output_sizes[i] // tp_size``, source narrowed at ``tp_rank * size``);
  ``QKVParallelLinear.__init__`` (:1104, ``num_kv_heads``, ``num_kv_head_replicas`` when ``tp_size >= total kv
  heads``) and ``weight_loader`` (:1329, q/k/v offsets; source rank ``tp_rank`` for q and ``tp_rank //
  num_kv_head_replicas`` for k/v); ``RowParallelLinear.weight_loader`` (:1649, narrow ``input_dim`` at
  ``tp_rank * shard``).
- ``sglang/srt/layers/vocab_parallel_embedding.py``: padding to a multiple of 64 (``DEFAULT_VOCAB_PADDING_SIZE``,
  :48), shard ranges ``_get_indices`` (:353), ``weight_loader`` (:390: copy the rank's rows of the unpadded vocab,
  zero the padding rows).
- ``sglang/srt/layers/moe/fused_moe_triton/layer.py``: ``make_expert_params_mapping`` (:1797), ``weight_loader``
  (:1163, global -> local expert id), ``_weight_loader_impl`` (:1317, ``SHARD_ID_TO_SHARDED_DIM = {"w1": 0, "w2": 1,
  "w3": 0}``), ``_load_w13`` (:788: w1 in the first half of the expert's ``w13_weight`` rows, w3 in the second;
  source narrowed by ``moe_tp_rank``), ``_load_w2`` (:881); parameter shapes from
  ``sglang/srt/layers/quantization/unquant.py`` (``w13_weight`` ``[E, 2 * I / tp, H]``, ``w2_weight``
  ``[E, H, I / tp]``).
- ``sglang/srt/model_loader/weight_utils.py:1574`` ``default_weight_loader`` (same shape, copy).
- ``sglang/srt/models/llama.py``: ``LlamaForCausalLM`` (:535; tied ``lm_head`` *is* ``model.embed_tokens`` (:570),
  ``stacked_params_mapping`` (:582)) and ``_legacy_load_weights`` (:709, the default: ``SGLANG_ENABLE_WEIGHT_LOADER_V2``
  is False, ``sglang/srt/environ.py:315``; skips ``lm_head.weight`` when tied).
- ``sglang/srt/models/qwen3.py``: ``Qwen3ForCausalLM.load_weights`` (:686; ``q_norm`` / ``k_norm``; a tied model loads
  ``model.embed_tokens.weight`` into ``lm_head.weight`` too when that parameter exists).
- ``sglang/srt/models/qwen3_moe.py``: ``Qwen3MoeForCausalLM.packed_modules_mapping`` (:999) and ``load_weights``
  (:1160: stacked mapping skipped for ``mlp.experts``; expert weights through ``FusedMoE.weight_loader(param, w,
  name, shard_id=..., expert_id=...)``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("sglang_models")


@dataclass
class Cfg:
    vocab_size: int = 1000              # padded to 1024: TP=2 rank 1 holds 488 real rows + 24 zero rows
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    tie_word_embeddings: bool = False
    num_experts: int = 4
    moe_intermediate_size: int = 32


def default_weight_loader(param, loaded_weight):
    assert param.size() == loaded_weight.size(), f"{param.size()} != {loaded_weight.size()}"
    param.data.copy_(loaded_weight)


def _param(*shape, dtype=torch.bfloat16):
    return nn.Parameter(torch.full(shape, float("nan"), dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = _param(n)


class ReplicatedLinear(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.weight = _param(o, i)
        self.weight.weight_loader = default_weight_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab, dim, tp_rank, tp_size, pad_to=64):
        super().__init__()
        self.org_vocab_size = vocab
        padded = (vocab + pad_to - 1) // pad_to * pad_to
        per = padded // tp_size
        self.org_start = min(tp_rank * per, vocab)
        self.org_end = min((tp_rank + 1) * per, vocab)
        self.weight = _param(per, dim)
        self.weight.output_dim = 0
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight):
        assert loaded_weight.shape[0] == self.org_vocab_size
        loaded_weight = loaded_weight.narrow(0, self.org_start, self.org_end - self.org_start)
        param[: loaded_weight.shape[0]].data.copy_(loaded_weight)
        param[loaded_weight.shape[0]:].data.fill_(0)


class ParallelLMHead(VocabParallelEmbedding):
    pass


class MergedColumnParallelLinear(nn.Module):
    def __init__(self, i, output_sizes, tp_rank, tp_size):
        super().__init__()
        self.output_sizes, self.tp_rank, self.tp_size = list(output_sizes), tp_rank, tp_size
        self.weight = _param(sum(output_sizes) // tp_size, i)
        self.weight.output_dim = 0
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight, loaded_shard_id):
        assert loaded_shard_id < len(self.output_sizes)
        offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        size = self.output_sizes[loaded_shard_id] // self.tp_size
        param_data = param.data.narrow(0, offset, size)
        loaded_weight = loaded_weight.narrow(0, self.tp_rank * size, size)
        assert param_data.shape == loaded_weight.shape
        param_data.copy_(loaded_weight)


class QKVParallelLinear(nn.Module):
    def __init__(self, hidden, head_size, total_heads, total_kv_heads, tp_rank, tp_size):
        super().__init__()
        self.tp_rank, self.head_size = tp_rank, head_size
        self.num_heads = total_heads // tp_size
        if tp_size >= total_kv_heads:
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp_size // total_kv_heads
        else:
            self.num_kv_heads, self.num_kv_head_replicas = total_kv_heads // tp_size, 1
        self.weight = _param((self.num_heads + 2 * self.num_kv_heads) * head_size, hidden)
        self.weight.output_dim = 0
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight, loaded_shard_id):
        assert loaded_shard_id in ("q", "k", "v")
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[loaded_shard_id]
        param_data = param.data.narrow(0, offset, size)
        shard_rank = self.tp_rank if loaded_shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        loaded_weight = loaded_weight.narrow(0, shard_rank * size, size)
        assert param_data.shape == loaded_weight.shape
        param_data.copy_(loaded_weight)


class RowParallelLinear(nn.Module):
    def __init__(self, i, o, tp_rank, tp_size):
        super().__init__()
        self.tp_rank = tp_rank
        self.weight = _param(o, i // tp_size)
        self.weight.input_dim = 1
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight):
        size = param.data.shape[1]
        loaded_weight = loaded_weight.narrow(1, self.tp_rank * size, size)
        assert param.data.shape == loaded_weight.shape
        param.data.copy_(loaded_weight)


class FusedMoE(nn.Module):
    def __init__(self, num_experts, hidden, intermediate, tp_rank, tp_size):
        super().__init__()
        self.moe_tp_rank, self.moe_tp_size = tp_rank, tp_size
        self.w13_weight = _param(num_experts, 2 * intermediate // tp_size, hidden)
        self.w2_weight = _param(num_experts, hidden, intermediate // tp_size)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader

    @staticmethod
    def make_expert_params_mapping(ckpt_gate_proj_name, ckpt_down_proj_name, ckpt_up_proj_name, num_experts):
        return [("experts.w13_" if weight_name in [ckpt_gate_proj_name, ckpt_up_proj_name] else "experts.w2_",
                 f"experts.{expert_id}.{weight_name}.", expert_id, shard_id)
                for expert_id in range(num_experts)
                for shard_id, weight_name in [("w1", ckpt_gate_proj_name), ("w2", ckpt_down_proj_name),
                                              ("w3", ckpt_up_proj_name)]]

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id):
        expert_data = param.data[expert_id]                       # EP = 1: every expert is local
        shard_dim = {"w1": 0, "w2": 1, "w3": 0}[shard_id]
        if shard_id in ("w1", "w3"):
            shard_size = expert_data.shape[shard_dim] // 2
            start = shard_size if shard_id == "w3" else 0
        else:
            shard_size, start = expert_data.shape[shard_dim], 0
        n = loaded_weight.shape[shard_dim] // self.moe_tp_size
        loaded_weight = loaded_weight.narrow(shard_dim, n * self.moe_tp_rank, n)
        expert_data.narrow(shard_dim, start, shard_size).copy_(loaded_weight)


# -- models -----------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg, r, t, qk_norm=False):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, r, t)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, r, t)
        if qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim)
            self.k_norm = RMSNorm(cfg.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg, r, t):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, r, t)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, r, t)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg, r, t):
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts)
        self.experts = FusedMoE(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, r, t)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, r, t, qk_norm=False, moe=False):
        super().__init__()
        self.self_attn = Attention(cfg, r, t, qk_norm)
        self.mlp = SparseMoeBlock(cfg, r, t) if moe else MLP(cfg, r, t)
        self.input_layernorm = RMSNorm(cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size)


class Model(nn.Module):
    def __init__(self, cfg, r, t, qk_norm=False, moe=False):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, r, t)
        self.layers = nn.ModuleList(DecoderLayer(cfg, r, t, qk_norm, moe) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size)


class _CausalLM(nn.Module):
    qk_norm = False
    moe = False

    def __init__(self, cfg: Cfg, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.config, self.tp_rank, self.tp_size = cfg, tp_rank, tp_size
        self.model = Model(cfg, tp_rank, tp_size, self.qk_norm, self.moe)
        if cfg.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)


class LlamaForCausalLM(_CausalLM):
    def __init__(self, cfg, tp_rank=0, tp_size=1):
        super().__init__(cfg, tp_rank, tp_size)
        self.stacked_params_mapping = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"),
                                       (".qkv_proj", ".v_proj", "v"), (".gate_up_proj", ".gate_proj", 0),
                                       (".gate_up_proj", ".up_proj", 1)]

    def load_weights(self, weights):            # llama.py:709 _legacy_load_weights (the parts that apply here)
        stacked_params_mapping = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"),
                                  (".qkv_proj", ".v_proj", "v"), (".gate_up_proj", ".gate_proj", 0),
                                  (".gate_up_proj", ".up_proj", 1)]
        params_dict = dict(self.named_parameters())
        for name, loaded_weight in weights:
            if "rotary_emb.inv_freq" in name or "projector" in name:
                continue
            if self.config.tie_word_embeddings and "lm_head.weight" in name:
                continue
            for param_name, weight_name, shard_id in stacked_params_mapping:
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                if name.endswith(".bias") and name not in params_dict:
                    continue
                if name not in params_dict:
                    continue
                param = params_dict[name]
                param.weight_loader(param, loaded_weight, shard_id)
                break
            else:
                if name.endswith(".bias") and name not in params_dict:
                    continue
                if name in params_dict:
                    param = params_dict[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, loaded_weight)
                else:
                    log.warning(f"Parameter {name} not found in params_dict")


class Qwen3ForCausalLM(_CausalLM):
    qk_norm = True

    def load_weights(self, weights):            # qwen3.py:686
        stacked_params_mapping = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
                                  ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", 0),
                                  ("gate_up_proj", "up_proj", 1)]
        params_dict = dict(self.named_parameters())
        for name, loaded_weight in weights:
            if name == "model.embed_tokens.weight" and self.config.tie_word_embeddings \
                    and "lm_head.weight" in params_dict:
                param = params_dict["lm_head.weight"]
                getattr(param, "weight_loader", default_weight_loader)(param, loaded_weight)
            if "rotary_emb.inv_freq" in name or "projector" in name:
                continue
            for param_name, weight_name, shard_id in stacked_params_mapping:
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                if name.endswith(".bias") and name not in params_dict:
                    continue
                param = params_dict[name]
                param.weight_loader(param, loaded_weight, shard_id)
                break
            else:
                if name.endswith(".bias") and name not in params_dict:
                    continue
                if name in params_dict:
                    param = params_dict[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, loaded_weight)
                else:
                    log.warning(f"Parameter {name} not found in params_dict")


class Qwen3MoeForCausalLM(_CausalLM):
    qk_norm = True
    moe = True
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def load_weights(self, weights):            # qwen3_moe.py:1160
        stacked_params_mapping = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
                                  ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", 0),
                                  ("gate_up_proj", "up_proj", 1)]
        expert_params_mapping = FusedMoE.make_expert_params_mapping(
            ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj",
            num_experts=self.config.num_experts)
        params_dict = dict(self.named_parameters())
        for name, loaded_weight in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            for param_name, weight_name, shard_id in stacked_params_mapping:
                if weight_name not in name:
                    continue
                if "mlp.experts" in name:
                    continue
                name = name.replace(weight_name, param_name)
                if name.endswith(".bias") and name not in params_dict:
                    continue
                if name not in params_dict:
                    continue
                param = params_dict[name]
                param.weight_loader(param, loaded_weight, shard_id)
                break
            else:
                is_expert_weight = False
                for param_name, weight_name, expert_id, shard_id in expert_params_mapping:
                    if weight_name not in name:
                        continue
                    is_expert_weight = True
                    name = name.replace(weight_name, param_name)
                    if name not in params_dict:
                        continue
                    param = params_dict[name]
                    param.weight_loader(param, loaded_weight, name, shard_id=shard_id, expert_id=expert_id)
                    break
                else:
                    if is_expert_weight:
                        continue
                    if name.endswith(".bias") and name not in params_dict:
                        continue
                    if name not in params_dict:
                        continue
                    param = params_dict[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, loaded_weight)


# -- checkpoints (Hugging Face names) and the shards each rank must hold ----------------------------------------------
def checkpoint(cfg: Cfg, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A bf16 checkpoint in Hugging Face names (no ``lm_head.weight`` when tied; MoE experts per expert)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    H, hd = cfg.hidden_size, cfg.head_dim
    out = {"model.embed_tokens.weight": t(cfg.vocab_size, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = t(cfg.num_attention_heads * hd, H)
        out[p + "self_attn.k_proj.weight"] = t(cfg.num_key_value_heads * hd, H)
        out[p + "self_attn.v_proj.weight"] = t(cfg.num_key_value_heads * hd, H)
        out[p + "self_attn.o_proj.weight"] = t(H, cfg.num_attention_heads * hd)
        if kind in ("qwen3", "qwen3_moe"):
            out[p + "self_attn.q_norm.weight"] = t(hd)
            out[p + "self_attn.k_norm.weight"] = t(hd)
        if kind == "qwen3_moe":
            out[p + "mlp.gate.weight"] = t(cfg.num_experts, H)
            for e in range(cfg.num_experts):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = t(cfg.moe_intermediate_size, H)
                out[p + f"mlp.experts.{e}.up_proj.weight"] = t(cfg.moe_intermediate_size, H)
                out[p + f"mlp.experts.{e}.down_proj.weight"] = t(H, cfg.moe_intermediate_size)
        else:
            out[p + "mlp.gate_proj.weight"] = t(cfg.intermediate_size, H)
            out[p + "mlp.up_proj.weight"] = t(cfg.intermediate_size, H)
            out[p + "mlp.down_proj.weight"] = t(H, cfg.intermediate_size)
        out[p + "input_layernorm.weight"] = t(H)
        out[p + "post_attention_layernorm.weight"] = t(H)
    out["model.norm.weight"] = t(H)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = t(cfg.vocab_size, H)
    return out


MODELS = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}


def expected_params(ckpt: dict, cfg: Cfg, kind: str, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """What rank ``tp_rank`` of ``tp_size`` must hold for every runtime parameter, cut from the full checkpoint
    tensors independently of the loaders above (plain slicing and concatenation)."""
    r, T, hd = tp_rank, tp_size, cfg.head_dim

    def rows(t, n):                      # this rank's n-row block
        return t[r * n:(r + 1) * n]

    def vocab(t):
        padded = (cfg.vocab_size + 63) // 64 * 64
        per = padded // T
        lo, hi = min(r * per, cfg.vocab_size), min((r + 1) * per, cfg.vocab_size)
        out = torch.zeros(per, t.shape[1], dtype=t.dtype)
        out[: hi - lo] = t[lo:hi]
        return out

    nh = cfg.num_attention_heads // T
    if T >= cfg.num_key_value_heads:
        nkv, kv_rank = 1, r // (T // cfg.num_key_value_heads)
    else:
        nkv, kv_rank = cfg.num_key_value_heads // T, r
    out = {"model.embed_tokens.weight": vocab(ckpt["model.embed_tokens.weight"])}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        k, v = ckpt[p + "self_attn.k_proj.weight"], ckpt[p + "self_attn.v_proj.weight"]
        out[p + "self_attn.qkv_proj.weight"] = torch.cat([
            rows(ckpt[p + "self_attn.q_proj.weight"], nh * hd),
            k[kv_rank * nkv * hd:(kv_rank + 1) * nkv * hd], v[kv_rank * nkv * hd:(kv_rank + 1) * nkv * hd]])
        o = ckpt[p + "self_attn.o_proj.weight"]
        out[p + "self_attn.o_proj.weight"] = o[:, r * o.shape[1] // T:(r + 1) * o.shape[1] // T]
        for n in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight",
                  "post_attention_layernorm.weight", "mlp.gate.weight"):
            if p + n in ckpt:
                out[p + n] = ckpt[p + n]
        if kind == "qwen3_moe":
            I = cfg.moe_intermediate_size // T
            w13, w2 = [], []
            for e in range(cfg.num_experts):
                q = p + f"mlp.experts.{e}."
                w13.append(torch.cat([rows(ckpt[q + "gate_proj.weight"], I), rows(ckpt[q + "up_proj.weight"], I)]))
                d = ckpt[q + "down_proj.weight"]
                w2.append(d[:, r * I:(r + 1) * I])
            out[p + "mlp.experts.w13_weight"] = torch.stack(w13)
            out[p + "mlp.experts.w2_weight"] = torch.stack(w2)
        else:
            I = cfg.intermediate_size // T
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([rows(ckpt[p + "mlp.gate_proj.weight"], I),
                                                            rows(ckpt[p + "mlp.up_proj.weight"], I)])
            d = ckpt[p + "mlp.down_proj.weight"]
            out[p + "mlp.down_proj.weight"] = d[:, r * I:(r + 1) * I]
    out["model.norm.weight"] = ckpt["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = vocab(ckpt["lm_head.weight"])
    return out


def load_full(model, ckpt: dict) -> None:
    """The engine's start: load the whole checkpoint through the model's own loader."""
    with torch.no_grad():
        model.load_weights(list(ckpt.items()))
