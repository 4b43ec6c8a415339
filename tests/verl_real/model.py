"""The trainer's weights at every step, computed identically in every process of the real-verl test.

A tiny Llama-like state dict in Hugging Face names (fused-style q/k/v and gate/up parts), bf16 except one float32
norm, built from random tensors; step 0 holds NaN, -0.0, +-inf; each later step changes about 1% of the bf16
elements by one ulp, bitwise on the int16 view (4% of every fourth tensor, so that some runtime modules change and
others do not), and step 2 flips the sign of a zero and changes NaN payloads.
``tied``: ``lm_head.weight`` is the same tensor object as ``model.embed_tokens.weight`` (both yielded, as a tied
model's ``state_dict()`` has them).
"""
from __future__ import annotations

import torch

LAYERS, HIDDEN, INTER, VOCAB, KV = 2, 128, 256, 512, 64


def names(tied: bool) -> list[str]:
    out = ["model.embed_tokens.weight"]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        out += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        out += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    out += ["model.norm.weight", "lm_head.weight"]
    return out


def _shape(name: str):
    if "embed_tokens" in name or "lm_head" in name:
        return (VOCAB, HIDDEN)
    if "norm" in name:
        return (HIDDEN,)
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return (KV, HIDDEN)
    if name.endswith(("q_proj.weight", "o_proj.weight")):
        return (HIDDEN, HIDDEN)
    if name.endswith("down_proj.weight"):
        return (HIDDEN, INTER)
    return (INTER, HIDDEN)


def _initial(tied: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(20261129)
    st = {}
    for n in names(tied):
        if tied and n == "lm_head.weight":
            st[n] = st["model.embed_tokens.weight"]          # the same tensor object
            continue
        dt = torch.float32 if n == "model.norm.weight" else torch.bfloat16
        st[n] = (torch.randn(_shape(n), generator=g) * 0.02).to(dt)
    o = st["model.layers.0.self_attn.o_proj.weight"]
    o[0, 0], o[0, 1], o[0, 2], o[0, 3], o[0, 4] = float("nan"), -0.0, float("inf"), float("-inf"), 0.0
    return st


def _step(prev: dict[str, torch.Tensor], step: int, tied: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    st = {}
    for i, (n, t) in enumerate(prev.items()):
        if tied and n == "lm_head.weight":
            st[n] = st["model.embed_tokens.weight"]
            continue
        t = t.clone()
        if t.dtype == torch.bfloat16 and (i + step) % 4 == 0:      # a quarter of the tensors, 4% of each: ~1%
            bits = t.view(torch.int16).view(-1)
            pick = torch.rand(bits.numel(), generator=g) < 0.04
            sign = torch.where(torch.rand(bits.numel(), generator=g) < 0.5, -1, 1).to(torch.int16)
            bits[pick] += sign[pick]
        elif t.dtype == torch.float32 and step % 2 == 0:
            t.view(torch.int32).view(-1)[step % t.numel()] += 1
        st[n] = t
    o = st["model.layers.0.self_attn.o_proj.weight"].view(torch.int16)
    if step == 2:
        o[0, 4] = -32768                           # +0.0 -> -0.0: only the sign bit changes
        o[0, 0] = 0x7FC1                           # NaN -> NaN with another payload
        st["model.norm.weight"].view(torch.int32)[5] = 0x7FC00001      # a float32 NaN with a payload
    return st


_CACHE: dict = {}


def state_at(step: int, tied: bool) -> dict[str, torch.Tensor]:
    """The trainer's weights after ``step`` (cached; do not modify the result)."""
    key = (step, tied)
    if key not in _CACHE:
        _CACHE[key] = _initial(tied) if step == 0 else _step(state_at(step - 1, tied), step, tied)
    return _CACHE[key]


def dummy(tied: bool) -> dict[str, torch.Tensor]:
    """What a rollout started with ``load_format=dummy`` holds: the right layout, other values."""
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(t.shape, generator=g).to(t.dtype) for n, t in state_at(0, tied).items()}
