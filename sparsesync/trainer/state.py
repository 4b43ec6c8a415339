"""A trainer's tensors in checkpoint coordinates: names as in the model's safetensors checkpoint, tied weights once,
full (unsharded) tensors, optionally cast to the dtype the inference engines hold.

Nothing here imports ``torch.distributed`` or ``transformers`` at import time: a DTensor can only exist once
``torch.distributed.tensor`` is loaded, so it is looked up in ``sys.modules``.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Union

import torch

from ..errors import InvalidArgument, InvalidType

log = logging.getLogger("sparsesync.trainer")

#: Prefixes that wrappers put into parameter names and that no checkpoint has: DDP (``module.``), ``torch.compile``
#: (``_orig_mod.``), FSDP1 (``_fsdp_wrapped_module.``) and activation checkpointing (``_checkpoint_wrapped_module.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

#: The floating-point dtypes a plain ``dtype=`` cast applies to (float8 and integer tensors are left as they are).
CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Rename = Union[Callable[[str], Union[str, None]], Mapping[str, Union[str, None]], None]
DtypeSpec = Union[torch.dtype, Callable[[str, torch.Tensor], Union[torch.dtype, None]], None]


def strip_prefixes(*prefixes: str) -> Callable[[str], str]:
    """A ``rename`` that removes wrapper prefixes from names (default: :data:`WRAPPER_PREFIXES`).

    Each prefix is removed, repeatedly and in any order, from the start of a name: ``module._orig_mod.lm_head.weight``
    becomes ``lm_head.weight``. A prefix that starts with ``_`` (a private wrapper attribute, never part of a
    checkpoint name, e.g. ``_checkpoint_wrapped_module.``) is also removed after any dot:
    ``model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight`` becomes ``model.layers.0.mlp.up_proj.weight``.

    >>> strip_prefixes()("module._orig_mod.model.norm.weight")
    'model.norm.weight'
    >>> strip_prefixes("model.")("model.layers.0.mlp.up_proj.weight")
    'layers.0.mlp.up_proj.weight'
    """
    prefixes = prefixes or WRAPPER_PREFIXES
    for p in prefixes:
        if not isinstance(p, str) or not p:
            raise InvalidArgument(f"strip_prefixes: a prefix is a non-empty str, got {p!r}")
    inner = tuple("." + p for p in prefixes if p.startswith("_"))

    def rename(name: str) -> str:
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if name.startswith(p) and len(name) > len(p):
                    name, changed = name[len(p):], True
            for p in inner:
                if p in name:
                    name, changed = name.replace(p, "."), True
        return name

    rename.__name__ = rename.__qualname__ = f"strip_prefixes{prefixes!r}"
    return rename


def is_sender(rank: int = 0) -> bool:
    """True in the process that should push: always without ``torch.distributed`` (or before it is initialised),
    otherwise only on global rank ``rank`` (default 0). With FSDP2 every rank must still call
    :meth:`SparsePusher.push` (or iterate :func:`iter_checkpoint_state`), because gathering a DTensor is a
    collective; the pusher does that and sends only from this rank."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        return True
    return dist.get_rank() == rank


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers, so that names carry no wrapper prefix."""
    for _ in range(8):
        kind = type(module).__name__
        if kind == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod
        elif kind == "DistributedDataParallel" and isinstance(getattr(module, "module", None), torch.nn.Module):
            module = module.module
        else:
            break
    return module


def _source_items(src) -> list[tuple[str, object]]:
    if isinstance(src, torch.nn.Module):
        # keep_vars: tied parameters come back as the same object on every rank (ties are decided identically on
        # every rank of a mesh, even where a rank's shard is empty); iterate() detaches
        return list(_unwrap(src).state_dict(keep_vars=True).items())
    if isinstance(src, Mapping):
        return list(src.items())
    if isinstance(src, (str, bytes, torch.Tensor)) or not hasattr(src, "__iter__"):
        raise InvalidType(f"checkpoint_state takes an nn.Module, a Mapping of name -> tensor or an iterable of "
                          f"(name, tensor) pairs, got a {type(src).__name__}")
    items = []
    for kv in src:
        if not isinstance(kv, (tuple, list)) or len(kv) != 2:
            raise InvalidType(f"checkpoint_state: entries are (name, tensor) pairs, got {type(kv).__name__}")
        items.append(tuple(kv))
    return items


def _renamer(rename: Rename, names: list[str]) -> Callable[[str], object]:
    if rename is None:
        return lambda n: n
    if isinstance(rename, Mapping):
        unknown = sorted(set(rename) - set(names))
        if unknown:
            raise InvalidArgument(f"rename names tensors the state does not have: {unknown[:5]}"
                                  f"{' ...' if len(unknown) > 5 else ''} (keys are the trainer's names, e.g. "
                                  f"{names[:2]})")
        table = dict(rename)
        return lambda n: table.get(n, n)
    if callable(rename):
        return rename
    raise InvalidType(f"rename is a callable name -> new name (or None to drop), a dict, or None; got a "
                      f"{type(rename).__name__}")


def _alias_keys(t: torch.Tensor) -> tuple:
    """Identities of a tensor: the object itself (tied parameters of a module are one object) and, when it has any,
    the memory it reads (for a DTensor: its local shard), which is what tied entries of a state dict share."""
    keys = [("object", id(t))]
    dt = _dtensor_type()
    local = t.to_local() if dt is not None and isinstance(t, dt) else t
    try:
        if local.numel() and local.device.type != "meta":
            keys.append((str(local.device), local.untyped_storage().data_ptr(), local.storage_offset(),
                         tuple(local.shape), tuple(local.stride()), local.dtype))
    except (RuntimeError, NotImplementedError):       # tensor subclasses without storage
        pass
    return tuple(keys)


def _cast_for(dtype: DtypeSpec) -> Callable[[str, torch.Tensor], torch.dtype | None]:
    if dtype is None:
        return lambda n, t: None
    if isinstance(dtype, torch.dtype):
        return lambda n, t: dtype if t.dtype in CASTABLE and t.dtype != dtype else None
    if callable(dtype):
        def cast(n, t):
            d = dtype(n, t)
            if d is not None and not isinstance(d, torch.dtype):
                raise InvalidType(f"dtype({n!r}, tensor) returned {d!r}, not a torch.dtype or None")
            return d if d != t.dtype else None
        return cast
    raise InvalidType(f"dtype is a torch.dtype, a callable (name, tensor) -> dtype or None, or None; got {dtype!r}")


class Plan:
    """Which trainer tensor goes out under which checkpoint name (made before anything is gathered, identically on
    every rank). ``entries``: [(checkpoint name, trainer name, tensor)]; ``tied``: {dropped trainer name: the
    checkpoint name it is sent as}; ``dropped``: trainer names that ``rename`` mapped to None; ``sharded``: True when
    any tensor is a DTensor (gathering is then a collective every rank must join)."""

    def __init__(self, src, rename: Rename = None, tied: str = "once", skip_extra_state: bool = True):
        if tied not in ("once", "all"):
            raise InvalidArgument(f"tied must be 'once' (send tensors that share memory once, under the first name) "
                                  f"or 'all' (every name), got {tied!r}")
        items = _source_items(src)
        names = [n for n, _ in items]
        for n in names:
            if not isinstance(n, str):
                raise InvalidType(f"tensor names must be str, got {n!r} ({type(n).__name__})")
        ren = _renamer(rename, names)
        dt = _dtensor_type()
        self.entries: list[tuple[str, str, torch.Tensor]] = []
        self.tied: dict[str, str] = {}
        self.dropped: list[str] = []
        self.sharded = False
        by_name: dict[str, tuple[str, object]] = {}
        by_key: dict[object, str] = {}
        for name, t in items:
            if skip_extra_state and name.endswith("_extra_state"):
                continue                              # Transformer Engine / custom module state, never a weight
            if not isinstance(t, torch.Tensor):
                raise InvalidType(f"state entry {name!r} is a {type(t).__name__}, not a torch.Tensor")
            new = ren(name)
            if new is None:
                self.dropped.append(name)
                continue
            if not isinstance(new, str) or not new:
                raise InvalidType(f"rename({name!r}) returned {new!r}; it must return a non-empty str, or None to "
                                  "drop the tensor")
            keys = _alias_keys(t)
            if new in by_name:
                first, first_keys = by_name[new]
                if set(keys) & set(first_keys):
                    self.tied[name] = new             # an alias renamed onto its own first name
                    continue
                raise InvalidArgument(f"rename maps two different tensors to {new!r}: {first!r} and {name!r}")
            alias = next((by_key[k] for k in keys if k in by_key), None)
            if tied == "once" and alias is not None:
                self.tied[name] = alias
                continue
            by_name[new] = (name, keys)
            for k in keys:
                by_key.setdefault(k, new)
            if dt is not None and isinstance(t, dt):
                self.sharded = True
            self.entries.append((new, name, t))
        if self.tied:
            log.debug("tied weights sent once: %s", ", ".join(f"{a} as {b}" for a, b in self.tied.items()))

    @property
    def names(self) -> list[str]:
        """The checkpoint names, in the order they are produced."""
        return [n for n, _, _ in self.entries]

    def iterate(self, dtype: DtypeSpec = None, device=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor) pairs, one gathered at a time (see :func:`iter_checkpoint_state`)."""
        cast = _cast_for(dtype)
        dt = _dtensor_type()
        for new, _, t in self.entries:
            t = t.detach()
            d = cast(new, t)
            if d is not None:
                t = t.to(d)                           # a DTensor casts its shard: half the bytes to gather for bf16
            if dt is not None and isinstance(t, dt):
                t = t.full_tensor()                   # collective: every rank of the mesh runs it, in this order
            if device is not None:
                t = t.to(device)
            yield new, t


def iter_checkpoint_state(model_or_state, *, rename: Rename = None, tied: str = "once", dtype: DtypeSpec = None,
                          device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Like :func:`checkpoint_state`, but yields (name, tensor) pairs lazily: a DTensor is gathered only when its
    pair is reached, so with ``device="cpu"`` at most one full tensor exists on the accelerator at a time. Every
    argument is checked (and every name decided) before the first pair is yielded. With DTensors, every rank of the
    mesh must iterate to the end, in the same order (each gather is a collective)."""
    plan = Plan(model_or_state, rename, tied)
    _cast_for(dtype)
    return plan.iterate(dtype, device)


def checkpoint_state(model_or_state, *, rename: Rename = None, tied: str = "once", dtype: DtypeSpec = None,
                     device=None) -> dict[str, torch.Tensor]:
    """The tensors to push, in checkpoint coordinates: ``{checkpoint name: full tensor}``.

    ``model_or_state``: an ``nn.Module`` (its ``state_dict()``, so non-persistent buffers such as rotary
    ``inv_freq`` are left out; DDP and ``torch.compile`` wrappers are unwrapped), a Mapping of name -> tensor, or an
    iterable of (name, tensor) pairs. Entries whose name ends in ``_extra_state`` (Transformer Engine) are skipped.

    ``rename`` maps the trainer's names to checkpoint names: a callable ``name -> new name`` (None drops the tensor)
    or a dict ``{trainer name: new name or None}`` (unlisted names are kept; a key the state lacks is an error).
    Default: identity. :func:`strip_prefixes` removes wrapper prefixes (``module.``, ``_orig_mod.``, ...). Two
    different tensors renamed to one name raise :class:`~sparsesync.errors.InvalidArgument` naming both.

    ``tied="once"`` (default): tensors that share memory (tied embeddings, ``lm_head.weight`` is
    ``model.embed_tokens.weight``) are sent once, under the first name in the module's order, as Hugging Face
    checkpoints with ``tie_word_embeddings`` store them. ``tied="all"`` keeps every name.

    ``dtype``: cast to this dtype (e.g. ``torch.bfloat16`` when the trainer keeps fp32 master weights and the
    engines hold bf16). Only fp16/bf16/fp32/fp64 tensors are cast; a callable ``(name, tensor) -> dtype or None``
    decides per tensor. A cast makes a copy (round to nearest even, exactly what ``.to(dtype)`` gives).

    ``device``: move every tensor there (e.g. ``"cpu"``; a copy when it moves).

    Without a cast, a move or sharding, the values are detached views of the live parameters: no copy. A DTensor
    (FSDP2) is gathered with ``full_tensor()``, a collective every rank must join (see :func:`iter_checkpoint_state`
    for gathering one tensor at a time).
    """
    return dict(iter_checkpoint_state(model_or_state, rename=rename, tied=tied, dtype=dtype, device=device))
