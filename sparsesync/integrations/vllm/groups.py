"""Which checkpoint tensors must be loaded together (pure Python; no vLLM, no torch).

vLLM reloads weights module by module: a runtime module is rebuilt from the tensors it receives, and elements it
does not receive are left uninitialised (vLLM 0.32's layerwise reload processes a partially loaded module anyway).
So an update that changed one checkpoint tensor must push *every* checkpoint tensor of the runtime module it lands
in:

- fused projections: ``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj``, ``gate_proj``/``up_proj`` -> ``gate_up_proj``
  (from the model's ``packed_modules_mapping``);
- mixture-of-experts: every expert of a layer lands in one fused experts module (``...mlp.experts``);
- tied embeddings: ``lm_head`` and ``model.embed_tokens`` share one weight (their keys are merged).

Weights and biases of one module belong together (the module is the unit).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

_EXPERTS = re.compile(r"^(.*?\.experts)(?:\.|$)")


def module_of(name: str) -> str:
    """The checkpoint module path of a tensor name (``a.b.weight`` -> ``a.b``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def group_key(name: str, packed: Mapping[str, Sequence[str]] | None = None,
              aliases: Mapping[str, str] | None = None) -> str:
    """The runtime module a checkpoint tensor ``name`` is loaded into.

    ``packed``: the model's ``packed_modules_mapping`` (fused name -> checkpoint names, e.g. ``{"qkv_proj": ["q_proj",
    "k_proj", "v_proj"]}``). ``aliases``: module path -> canonical module path for modules that share weights (tied
    embeddings: ``{"lm_head": "model.embed_tokens"}``).
    """
    m = _EXPERTS.match(name)
    if m:                                   # "...mlp.experts.<E>.<proj>.weight" or fused "...mlp.experts.<proj>"
        key = m.group(1)
    else:
        key = module_of(name)
        parent, _, last = key.rpartition(".")
        for fused, parts in (packed or {}).items():
            if last in parts:
                key = f"{parent}.{fused}" if parent else fused
                break
    if aliases:
        key = aliases.get(key, key)
    return key


def expand(changed: Iterable[str], all_names: Sequence[str], packed: Mapping[str, Sequence[str]] | None = None,
           aliases: Mapping[str, str] | None = None) -> list[str]:
    """Every name of ``all_names`` (in that order) that shares a runtime module with a name in ``changed``."""
    keys = {group_key(n, packed, aliases) for n in changed}
    return [n for n in all_names if group_key(n, packed, aliases) in keys]


def groups(all_names: Sequence[str], packed: Mapping[str, Sequence[str]] | None = None,
           aliases: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Runtime module key -> its checkpoint tensor names (in ``all_names`` order)."""
    out: dict[str, list[str]] = {}
    for n in all_names:
        out.setdefault(group_key(n, packed, aliases), []).append(n)
    return out
