"""Small models built from a config (no downloads): a Llama-style decoder for demos, tests and benchmarks.

Used by ``sparsesync demo`` and by ``bench/trace.py`` (which trains it the way RL post-training does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: Optional[int] = None  # None: Llama rule, 2/3 * 4h rounded up to a multiple of `multiple_of`
    num_layers: int = 8
    num_heads: Optional[int] = None  # None: hidden_size // 64 (at least 1)
    num_kv_heads: Optional[int] = None  # None: num_heads // 2 (grouped-query attention, at least 1)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    multiple_of: int = 128

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            inter = int(2 * 4 * self.hidden_size / 3)
            self.intermediate_size = self.multiple_of * ((inter + self.multiple_of - 1) // self.multiple_of)
        if self.num_heads is None:
            self.num_heads = max(1, self.hidden_size // 64)
        if self.num_kv_heads is None:
            self.num_kv_heads = max(1, self.num_heads // 2)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim), Llama/HF "rotate_half" convention
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_heads
        self.n_kv = cfg.num_kv_heads
        self.hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class LlamaModel(nn.Module):
    """Decoder-only Llama-style LM: token embedding, pre-norm blocks (RMSNorm, RoPE GQA attention, SwiGLU MLP),
    final RMSNorm, untied lm_head; all linears bias-free."""

    def __init__(self, cfg: ModelConfig, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # Llama / HF LlamaPreTrainedModel._init_weights: normal(0, initializer_range) for linears and embeddings,
        # RMSNorm weights at 1.0.  Iterate in registration order so the init is a pure function of the seed.
        for _, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.normal_(0.0, self.cfg.init_std, generator=generator)
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed_tokens(tokens)
        for blk in self.layers:
            x = blk(x, cos, sin)
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------------------------------------------------
# Data: a seeded sparse bigram Markov chain ("synthetic language")
# ----------------------------------------------------------------------------------------------------------------------


class SyntheticLanguage:
    """A seeded, learnable synthetic language: a sparse bigram Markov chain with Zipfian token frequencies.

    Tokens get Zipf(`zipf_s`) unigram probabilities over a random permutation of the vocabulary.  Every token has
    `branching` successors drawn from that unigram distribution, with random weights.  Each next token follows the
    bigram table with probability ``1 - mix`` and is a fresh unigram draw with probability `mix` (so rare tokens
    still occur).  The loss falls quickly from ~log(vocab) as the model learns the token frequencies (lm_head /
    embeddings), then slowly as it learns the transition table.  Fixed entirely by `seed`."""

    def __init__(
        self, vocab_size: int, branching: int = 4, zipf_s: float = 1.1, mix: float = 0.1, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.mix = mix
        ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
        zipf = ranks.pow(-zipf_s)
        zipf = zipf / zipf.sum()
        perm = torch.randperm(vocab_size, generator=g)
        self.unigram = torch.empty(vocab_size, dtype=torch.float64)
        self.unigram[perm] = zipf
        self.succ = torch.multinomial(self.unigram, vocab_size * branching, replacement=True, generator=g).view(
            vocab_size, branching
        )
        w = -torch.log(torch.rand(vocab_size, branching, generator=g, dtype=torch.float64).clamp_min(1e-12))
        self.probs = (w / w.sum(-1, keepdim=True)).float()
        self.unigram_entropy = float(-(self.unigram * self.unigram.log()).sum())
        p = self.probs.double()
        # per-token entropy of the bigram part alone (the model's loss floor is roughly mixed between the two)
        self.bigram_entropy = float(-(p * p.log()).sum(-1).mean())

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        uni = self.unigram.float()
        toks = torch.empty(batch_size, seq_len, dtype=torch.long)
        cur = torch.multinomial(uni, batch_size, replacement=True, generator=generator)
        toks[:, 0] = cur
        for i in range(1, seq_len):
            j = torch.multinomial(self.probs[cur], 1, generator=generator).squeeze(1)
            nxt = self.succ[cur, j]
            fresh = torch.rand(batch_size, generator=generator) < self.mix
            if bool(fresh.any()):
                nxt = torch.where(
                    fresh, torch.multinomial(uni, batch_size, replacement=True, generator=generator), nxt
                )
            cur = nxt
            toks[:, i] = cur
        return toks


# ----------------------------------------------------------------------------------------------------------------------
# Snapshots and change statistics
# ----------------------------------------------------------------------------------------------------------------------


def bf16_snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach().to(torch.bfloat16).clone() for name, p in model.named_parameters()}
