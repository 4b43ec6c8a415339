"""Learn once how checkpoint tensors land in an engine's runtime parameters; afterwards apply them by direct copies.

An inference engine applies an update by calling the model's own ``load_weights`` with (name, tensor) pairs in
checkpoint coordinates. Its loaders fuse (``q/k/v_proj`` -> rows of ``qkv_proj``; ``gate/up_proj`` ->
``gate_up_proj``; MoE experts -> slices of ``w13_weight[e]`` / ``w2_weight[e]``), shard by tensor-parallel rank
(``narrow``) and skip tied tensors. That is Python per tensor and slow on big MoE models, while for most tensors
what it does is a handful of strided copies. :class:`RuntimeMap` finds those copies by driving the loader itself::

    rmap = RuntimeMap.learn(model, mirror, load=lambda pairs: model.load_weights(pairs))
    ...
    rest = rmap.apply(mirror, changed_names)       # direct copies for the mapped tensors
    load([(n, mirror[n]) for n in rest])           # the loader for the others

**How it learns.** For every checkpoint name it calls ``load([(name, probe)])`` once, where ``probe`` is a private
copy of ``mirror[name]`` (same strides), inside a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees
every aten op. A tensor *derives from the probe* when its storage is the probe's (views share it) or is the output
of a same-dtype ``_to_copy``/``clone`` of the *whole*, contiguous probe (``.to(device)``: an alias with the probe's
geometry). Only these ops may touch probe-derived tensors: pure view ops (``view``, ``slice``/``narrow``,
``select``, ``t``, ``transpose``, ``permute``, ``unsqueeze``, ``squeeze``, ``split``, ``unbind``, ``as_strided``,
``alias``, ``detach``, reshape-as-view) and ``copy_`` from such a view into a view of one of ``model``'s parameter
or buffer storages of the same dtype and the same shape (no broadcasting), with a source and a destination that
have no internal overlap. Everything else that reads or writes a probe-derived tensor (arithmetic, dtype casts,
``expand``, ``view(dtype)``, ``index_select``, ``cat``, ``clone`` of a part, ``item``, a copy into a temporary, ...)
sends the name to :attr:`unmapped` with the op's name; so does any other write into a model storage during that
name's load (``fill_``, ``mul_``, a copy from a non-probe tensor, e.g. data that went through ``.numpy()``), a load
that replaced a parameter's tensor (``param.data = ...``, a new Parameter: repacking; then every name whose copies
went into that parameter is unmapped too), copies of two names (mapped or not) whose destinations share an element,
and a name that writes one destination element twice. Destinations are compared exactly, element by element, when
their byte ranges intersect (up to ``exact_limit`` elements per intersecting group; beyond that, intersection of the
ranges is refused). Finally :meth:`verify` runs over every mapped name (the loader has just loaded exactly those
values, so the runtime must equal the mirror through the map); a name that fails is unmapped with
"map did not reproduce the loader". A name whose load did nothing at all (a tied ``lm_head`` the loader skips) is
mapped with no copies.

**Cost.** Learning calls the loader once per checkpoint tensor (the time of one full load through ``load_weights``,
plus dispatch-mode overhead per op and a per-call check of every parameter's identity: O(names x parameters) cheap
Python) and holds one extra copy of one tensor at a time. The map holds per :class:`Copy` a few ints (two storage
offsets and the sizes and strides of both views, i.e. 2 + 4*ndim ints) and a reference to the live parameter; it is
O(tensors), never O(elements): :attr:`RuntimeMap.nbytes_of_map` measures it (as Python objects, about 1 KB per
checkpoint tensor with its name, layout and one 2-d Copy: ~20 MB for a model of 18k tensors). :meth:`apply` does one
``torch.as_strided`` pair and one ``copy_`` per Copy (host -> device when the parameters are on a GPU), whole
tensors (not only their changed elements), under ``torch.no_grad()``; parameters created as inference tensors need
the caller to be in ``torch.inference_mode()``, as for the loader.

**Limits.** Only what goes through aten is seen: a loader that reads the probe through a raw pointer (a custom
kernel launched on ``data_ptr()``) and writes parameters the same way would look like a loader that ignored the
tensor; such loaders must not be mapped. Post-load processing the engine runs *after* ``load_weights`` (vLLM's
``process_weights_after_loading`` repacking, quantization) is not part of ``load``; if parameters are repacked
after loading, a map learned on the loaded layout does not describe the runtime and must not be used (learning with
a ``load`` that includes the repacking makes every affected name unmapped). The map is tied to the parameter
tensors it saw: :meth:`apply` refuses when a parameter's storage, or a mirror tensor's layout, changed since.
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import InvalidArgument

__all__ = ["Copy", "RuntimeMap"]

_aten = torch.ops.aten

# Ops whose output is a view of their input with the same dtype (one-to-one unless the geometry overlaps, which
# is checked at the copy). expand / view(dtype) / unfold / diagonal are deliberately absent.
_VIEW_OPS = {
    _aten.view.default, _aten._unsafe_view.default, _aten._reshape_alias.default, _aten.reshape.default,
    _aten.slice.Tensor, _aten.narrow.default, _aten.select.int, _aten.t.default, _aten.transpose.int,
    _aten.permute.default, _aten.unsqueeze.default, _aten.squeeze.default, _aten.squeeze.dim, _aten.squeeze.dims,
    _aten.as_strided.default, _aten.alias.default, _aten.detach.default, _aten.split.Tensor,
    _aten.split_with_sizes.default, _aten.unbind.int, _aten.chunk.default, _aten.unflatten.int,
    _aten.flatten.using_ints, _aten.view_as.default,
}
# Ops that only read metadata.
_META_OPS = {
    _aten.sym_size.int, _aten.sym_stride.int, _aten.sym_numel.default, _aten.sym_storage_offset.default,
    _aten.is_contiguous.default, _aten.is_contiguous.memory_format, _aten.dim.default, _aten.size.int,
    _aten.stride.int, _aten.numel.default,
}
# Ops that make a new tensor holding a copy of their input (followed only for the whole, contiguous probe).
_COPY_OUT_OPS = {_aten._to_copy.default, _aten.clone.default}
_COPY_INTO_OPS = {_aten.copy_.default}

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's storage: (device, storage address)."""
    return (t.device, t.untyped_storage().data_ptr())


def _no_internal_overlap(sizes, strides) -> bool:
    """True when no two indices of the view reach the same element (conservative: sorted-stride test)."""
    dims = sorted((st, sz) for sz, st in zip(sizes, strides) if sz != 1)
    if any(sz == 0 for sz in sizes):
        return True
    reach = 1  # elements spanned by the dims seen so far
    for st, sz in dims:
        if st < reach:
            return False
        reach = st * (sz - 1) + reach
    return True


def _span(off: int, sizes, strides) -> tuple[int, int]:
    """[lo, hi] element range of a view (non-negative strides only)."""
    if any(s == 0 for s in sizes):
        return off, off - 1
    hi = off + sum((sz - 1) * st for sz, st in zip(sizes, strides))
    return off, hi


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.dtype != torch.bool else t.view(torch.uint8)


@dataclass(frozen=True, eq=False)
class Copy:
    """One direct copy: ``as_strided(param.data, dst) .copy_( as_strided(mirror[name], src) )``.

    ``param_name``: the destination's qualified name in ``model.named_parameters()`` / ``named_buffers()``;
    ``param``: the live tensor (Parameter or buffer); ``dst``: (storage_offset, sizes, strides) into that parameter's
    storage (absolute offset, as ``torch.as_strided`` takes it); ``src``: (storage_offset relative to the checkpoint
    tensor's own storage offset, sizes, strides) into the checkpoint tensor's storage.
    """
    param_name: str
    param: torch.Tensor = field(repr=False)
    dst: tuple
    src: tuple

    def nbytes(self) -> int:
        n = sys.getsizeof(self) + sys.getsizeof(self.dst) + sys.getsizeof(self.src)
        for off, sizes, strides in (self.dst, self.src):
            n += sys.getsizeof(off) + sys.getsizeof(sizes) + sys.getsizeof(strides)
            n += sum(sys.getsizeof(v) for v in sizes) + sum(sys.getsizeof(v) for v in strides)
        return n


class _Refused(Exception):
    pass


class _Recorder(TorchDispatchMode):
    """Watches one loader call for one probe; collects copies, model writes and the first refusal."""

    def __init__(self, probe: torch.Tensor, storages: dict):
        super().__init__()
        self.probe = probe
        self.storages = storages            # storage key -> (param_name, live tensor)
        # derived storage key -> shift: a derived tensor t views probe element (t.storage_offset() - shift) in the
        # probe's own coordinates (probe storage offset 0)
        self.derived = {_key(probe): probe.storage_offset()}
        self.keep = []                      # aliases kept alive so that their addresses cannot be reused
        self.copies: list[Copy] = []
        self.writes: list[tuple] = []       # (storage key, param_name, off, sizes, strides) of every model write
        self.reason: str | None = None

    def refuse(self, why: str) -> None:
        if self.reason is None:
            self.reason = why

    def _is_derived(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0 and _key(t) in self.derived

    def _whole_contiguous(self, t: torch.Tensor) -> bool:
        return (t.dtype == self.probe.dtype and tuple(t.shape) == tuple(self.probe.shape) and t.is_contiguous()
                and self.probe.is_contiguous() and t.storage_offset() - self.derived[_key(t)] == 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._observe(func, args, kwargs, out)
        except Exception as exc:  # noqa: BLE001 - never let bookkeeping break the loader; refuse instead
            self.refuse(f"{func} could not be analysed ({type(exc).__name__}: {exc})")
        return out

    def _observe(self, func, args, kwargs, out) -> None:
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        reads_probe = any(self._is_derived(t) for t in tensors)
        # every tensor argument the op may write
        written = []
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = args[i] if i < len(args) else kwargs.get(a.name)
                for t in tree_flatten(v)[0]:
                    if isinstance(t, torch.Tensor):
                        written.append(t)
        for t in written:
            if self._is_derived(t):
                self.refuse(f"{func} writes into the checkpoint tensor")
            if t.untyped_storage().nbytes() > 0 and _key(t) in self.storages:
                pname = self.storages[_key(t)][0]
                self.writes.append((_key(t), pname, t.storage_offset(), tuple(t.shape), tuple(t.stride())))
        if func in _META_OPS or not reads_probe:
            if func not in _META_OPS:
                for t in written:
                    if t.untyped_storage().nbytes() > 0 and _key(t) in self.storages:
                        self.refuse(f"{func} writes model tensor {self.storages[_key(t)][0]!r} from something "
                                    f"other than the checkpoint tensor")
            return
        if func in _VIEW_OPS:
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            for o in outs:
                if not self._is_derived(o) or o.dtype != self.probe.dtype:
                    self.refuse(f"{func} did not return a view of the checkpoint tensor")
            return
        if func in _COPY_OUT_OPS:
            src = args[0]
            if not (isinstance(out, torch.Tensor) and out.dtype == self.probe.dtype and self._is_derived(src)
                    and self._whole_contiguous(src) and out.is_contiguous()
                    and tuple(out.shape) == tuple(src.shape)):
                odt = getattr(out, "dtype", None)
                if odt != src.dtype:
                    self.refuse(f"{func} casts the checkpoint tensor {src.dtype} -> {odt}")
                else:
                    self.refuse(f"{func} makes a new tensor from a part or a non-contiguous view of the checkpoint "
                                f"tensor (sizes {tuple(src.shape)}, strides {tuple(src.stride())}); its element "
                                f"order is not followed")
                return
            if out.untyped_storage().nbytes() > 0:
                self.derived[_key(out)] = out.storage_offset()
                self.keep.append(out)
            return
        if func in _COPY_INTO_OPS:
            dst, src = args[0], args[1]
            if not self._is_derived(src):
                self.refuse(f"{func} reads the checkpoint tensor in an unexpected role")
                return
            if _key(dst) not in self.storages:
                self.refuse(f"{func} copies the checkpoint tensor into a tensor that is not a parameter or "
                            f"buffer of the model")
                return
            pname, ptensor = self.storages[_key(dst)]
            if dst.dtype != src.dtype or ptensor.dtype != dst.dtype:
                self.refuse(f"{func} casts {src.dtype} -> {dst.dtype} into {pname!r}")
                return
            if tuple(dst.shape) != tuple(src.shape):
                self.refuse(f"{func} broadcasts {tuple(src.shape)} -> {tuple(dst.shape)} into {pname!r}")
                return
            if any(s < 0 for s in dst.stride()) or any(s < 0 for s in src.stride()):
                self.refuse(f"{func} uses negative strides into {pname!r}")
                return
            if not _no_internal_overlap(src.shape, src.stride()):
                self.refuse(f"{func} source is a many-to-one view of the checkpoint tensor "
                            f"(sizes {tuple(src.shape)}, strides {tuple(src.stride())})")
                return
            if not _no_internal_overlap(dst.shape, dst.stride()):
                self.refuse(f"{func} destination in {pname!r} overlaps itself "
                            f"(sizes {tuple(dst.shape)}, strides {tuple(dst.stride())})")
                return
            shift = self.derived[_key(src)]
            self.copies.append(Copy(pname, ptensor,
                                    (dst.storage_offset(), tuple(dst.shape), tuple(dst.stride())),
                                    (src.storage_offset() - shift, tuple(src.shape), tuple(src.stride()))))
            return
        self.refuse(f"{func} reads the checkpoint tensor")


def _param_state(modules: list) -> list:
    """Identity of every parameter, buffer and child module (cheap: no module-tree walk; ``modules`` is the
    model's module list, taken once). A replaced child module shows up under its own name."""
    state = []
    for mname, mod in modules:
        for k, v in mod._modules.items():
            state.append((f"{mname}.{k}" if mname else k, "module", id(v)))
        for k, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            qual = f"{mname}.{k}" if mname else k
            if t is None:
                state.append((qual, None, None, None))
                continue
            d = t.data
            state.append((qual, id(t), d.device, d.untyped_storage().data_ptr(), d.dtype,
                          tuple(d.shape), tuple(d.stride()), d.storage_offset()))
    return state


def _changed(before: list, after: list) -> list[str]:
    """Qualified names (parameters, buffers, child modules) that differ between two states."""
    def keyed(state):
        return {x[0]: x for x in state}
    a, b = keyed(before), keyed(after)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _under(param_name: str, changed: str) -> bool:
    return param_name == changed or param_name.startswith(changed + ".")


def _storages(model: torch.nn.Module) -> dict:
    out = {}
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        d = t.data
        if d.untyped_storage().nbytes() > 0:
            out.setdefault(_key(d), (pname, t))
    return out


class RuntimeMap:
    """How each checkpoint tensor lands in ``model``'s runtime parameters, learned by watching its loader.

    ``mapped``: name -> list of :class:`Copy` (possibly empty: the loader ignored the tensor, e.g. a tied
    ``lm_head``); ``unmapped``: name -> why it must go through the loader (the reason names the op).
    """

    def __init__(self, mapped: dict, unmapped: dict, layout: dict):
        self.mapped: dict[str, list[Copy]] = mapped
        self.unmapped: dict[str, str] = unmapped
        self._layout = layout        # name -> (dtype, shape, stride) of the mirror tensor the map was learned on
        self._storage = {}           # param_name -> (device, storage address) seen when learning
        self._model = None           # weakref to the model learned on: its tensors must still be the ones recorded
        for copies in mapped.values():
            for c in copies:
                self._storage[c.param_name] = _key(c.param.data)

    # ------------------------------------------------------------------ learning
    @classmethod
    def learn(cls, model: torch.nn.Module, mirror: dict, load: Callable[[list], Any],
              names: Iterable[str] | None = None, *, exact_limit: int = 1 << 24) -> RuntimeMap:
        """Learn the map by calling ``load([(name, probe)])`` once per name (default: every mirror tensor).

        ``load`` must do what the engine does to apply tensors (e.g. ``model.load_weights``); it is called with a
        private copy of ``mirror[name]``, so the mirror is never written. Afterwards the runtime holds the mirror's
        values for every name learned. ``exact_limit``: the largest span (elements) of intersecting destination
        ranges that is checked element by element for overlap.
        """
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgument(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(mirror, dict):
            raise InvalidArgument(f"mirror must be a dict of name -> tensor, got {type(mirror).__name__}")
        names = list(mirror) if names is None else list(dict.fromkeys(names))
        for n in names:
            if n not in mirror:
                raise InvalidArgument(f"name {n!r} is not in the mirror")
            if not isinstance(mirror[n], torch.Tensor):
                raise InvalidArgument(f"mirror[{n!r}] is a {type(mirror[n]).__name__}, not a tensor")
        mapped: dict[str, list[Copy]] = {}
        unmapped: dict[str, str] = {}
        layout: dict[str, tuple] = {}
        writes: dict[str, list] = {}
        replaced: dict[str, str] = {}       # param_name -> the name whose load replaced it
        storages = _storages(model)
        modules = list(model.named_modules(remove_duplicate=False))
        state = _param_state(modules)
        for n in names:
            m = mirror[n]
            layout[n] = (m.dtype, tuple(m.shape), tuple(m.stride()))
            probe = m.detach().clone()        # the loader never sees (nor can write) the mirror itself
            rec = _Recorder(probe, storages)
            if tuple(probe.stride()) != tuple(m.stride()):
                rec.refuse(f"mirror tensor has non-dense strides {tuple(m.stride())}: left to the loader")
            elif m.numel() == 0:
                rec.refuse("empty tensor: left to the loader")
            with torch.no_grad(), rec:
                load([(n, probe)])
            new_state = _param_state(modules)
            if new_state != state:
                changed = _changed(state, new_state)
                modules = list(model.named_modules(remove_duplicate=False))
                new_state = _param_state(modules)
                for p in changed:
                    replaced.setdefault(p, n)
                rec.refuse(f"loading it replaced or repacked model tensor(s) {changed[:4]} (param.data = ... or a "
                           f"new Parameter); nothing mapped into them can be trusted")
                storages, state = _storages(model), new_state
            writes[n] = rec.writes
            del rec.keep[:]
            if rec.reason is not None:
                unmapped[n] = rec.reason
            else:
                mapped[n] = rec.copies
        # names whose copies went into a parameter that was replaced later
        for n in list(mapped):
            hit = [(c.param_name, p) for c in mapped[n] for p in replaced if _under(c.param_name, p)]
            if hit:
                unmapped[n] = (f"model tensor {hit[0][0]!r} was replaced while learning {replaced[hit[0][1]]!r}; "
                               f"the copies recorded into it are stale")
                del mapped[n]
        cls._refuse_overlaps(mapped, unmapped, writes, exact_limit)
        rmap = cls(mapped, unmapped, layout)
        rmap._model = weakref.ref(model)
        for n in rmap.verify(mirror, list(mapped)):
            rmap.unmapped[n] = "map did not reproduce the loader (verify found different runtime bytes)"
            del rmap.mapped[n]
        # keep the dict order of the names given
        rmap.mapped = {n: rmap.mapped[n] for n in names if n in rmap.mapped}
        rmap.unmapped = {n: rmap.unmapped[n] for n in names if n in rmap.unmapped}
        return rmap

    @staticmethod
    def _refuse_overlaps(mapped: dict, unmapped: dict, writes: dict, exact_limit: int) -> None:
        """Unmap names whose destinations share an element with another name's writes, or that write one
        element twice."""
        # every recorded model write, per storage: (lo, hi, name, off, sizes, strides)
        per_storage: dict = {}
        for n, ws in writes.items():
            for key, pname, off, sizes, strides in ws:
                lo, hi = _span(off, sizes, strides)
                if hi < lo:
                    continue
                per_storage.setdefault(key, []).append((lo, hi, n, off, sizes, strides, pname))
        bad: dict[str, str] = {}
        for key, items in per_storage.items():
            items.sort(key=lambda x: (x[0], x[1]))
            # sweep into groups of intersecting ranges
            groups, cur, cur_hi = [], [], None
            for it in items:
                if cur and it[0] <= cur_hi:
                    cur.append(it)
                    cur_hi = max(cur_hi, it[1])
                else:
                    if cur:
                        groups.append(cur)
                    cur, cur_hi = [it], it[1]
            if cur:
                groups.append(cur)
            for g in groups:
                if len(g) < 2:
                    continue
                lo = g[0][0]
                hi = max(it[1] for it in g)
                names_in = sorted({it[2] for it in g})
                pname = g[0][6]
                if hi - lo + 1 > exact_limit:
                    for n in names_in:
                        bad.setdefault(n, f"its destination range in {pname!r} intersects that of "
                                          f"{[x for x in names_in if x != n][:3] or [n]} over {hi - lo + 1} "
                                          f"elements (too large to prove disjoint)")
                    continue
                owner = torch.full((hi - lo + 1,), -1, dtype=torch.int32)
                ids = {n: i for i, n in enumerate(names_in)}
                for _, _, n, off, sizes, strides, _ in g:
                    if not _no_internal_overlap(sizes, strides):
                        bad.setdefault(n, f"a write into {pname!r} overlaps itself")
                        continue
                    v = torch.as_strided(owner, sizes, strides, off - lo)
                    prev = torch.unique(v)
                    prev = prev[prev >= 0].tolist()
                    for p in prev:
                        other = names_in[p]
                        if other == n:
                            bad.setdefault(n, f"it writes elements of {pname!r} twice "
                                              f"(destination storage offset {off}, sizes {sizes})")
                        else:
                            bad.setdefault(n, f"its destination in {pname!r} overlaps that of {other!r}")
                            bad.setdefault(other, f"its destination in {pname!r} overlaps that of {n!r}")
                    v.fill_(ids[n])
        for n, why in bad.items():
            if n in mapped:
                del mapped[n]
                unmapped[n] = why

    # ------------------------------------------------------------------ use
    def _check(self, mirror: dict, names: list) -> None:
        live = None
        if self._model is not None:
            model = self._model()
            if model is None:
                raise InvalidArgument("the model this map was learned on no longer exists; learn again")
            live = dict(model.named_parameters(remove_duplicate=False))
            live.update(model.named_buffers(remove_duplicate=False))
        for n in names:
            if n not in mirror:
                raise InvalidArgument(f"name {n!r} is not in the mirror")
            if n in self.mapped:
                m = mirror[n]
                got = (m.dtype, tuple(m.shape), tuple(m.stride()))
                if got != self._layout[n]:
                    raise InvalidArgument(f"mirror[{n!r}] has layout {got}, the map was learned on "
                                          f"{self._layout[n]}; learn again")
                for c in self.mapped[n]:
                    if live is not None and live.get(c.param_name) is not c.param:
                        raise InvalidArgument(f"model tensor {c.param_name!r} is no longer the object the map was "
                                              f"learned on (a new Parameter or buffer); learn again")
                    if _key(c.param.data) != self._storage[c.param_name]:
                        raise InvalidArgument(f"model tensor {c.param_name!r} was replaced since the map was "
                                              f"learned; learn again")

    @staticmethod
    def _views(c: Copy, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        doff, dsz, dst = c.dst
        soff, ssz, sst = c.src
        return (torch.as_strided(c.param.data, dsz, dst, doff),
                torch.as_strided(m, ssz, sst, m.storage_offset() + soff))

    def apply(self, mirror: dict, names: Iterable[str]) -> list[str]:
        """Copy the mapped tensors among ``names`` from ``mirror`` straight into the runtime parameters; return the
        other names (in the order given), which still need the loader. Everything is checked before anything is
        copied."""
        names = list(names)
        self._check(mirror, names)
        rest = []
        with torch.no_grad():
            for n in names:
                copies = self.mapped.get(n)
                if copies is None:
                    rest.append(n)
                    continue
                m = mirror[n]
                for c in copies:
                    d, s = self._views(c, m)
                    d.copy_(s)
        return rest

    def verify(self, mirror: dict, names: Iterable[str] | None = None) -> list[str]:
        """Names (among the mapped ``names``, default all mapped) whose runtime bytes differ from the mirror through
        the map, compared bitwise as integers; ``[]`` means consistent."""
        names = list(self.mapped) if names is None else [n for n in names if n in self.mapped]
        self._check(mirror, names)
        bad = []
        with torch.no_grad():
            for n in names:
                m = mirror[n]
                for c in self.mapped[n]:
                    d, s = self._views(c, m)
                    if not torch.equal(_int_view(d), _int_view(s.to(d.device))):
                        bad.append(n)
                        break
        return bad

    @property
    def nbytes_of_map(self) -> int:
        """Bytes of Python objects the map holds (Copy records and their ints, name keys, dict slots); not the
        parameters it refers to. O(tensors)."""
        n = sys.getsizeof(self.mapped) + sys.getsizeof(self.unmapped) + sys.getsizeof(self._layout)
        for name, copies in self.mapped.items():
            n += sys.getsizeof(name) + sys.getsizeof(copies) + sum(c.nbytes() for c in copies)
        for name, why in self.unmapped.items():
            n += sys.getsizeof(name) + sys.getsizeof(why)
        for lay in self._layout.values():
            n += sys.getsizeof(lay) + sys.getsizeof(lay[1]) + sys.getsizeof(lay[2])
        return n

    def summary(self) -> str:
        ncopies = sum(len(c) for c in self.mapped.values())
        return (f"RuntimeMap: {len(self.mapped)} mapped tensors ({ncopies} copies), {len(self.unmapped)} through "
                f"the loader; map holds {self.nbytes_of_map} bytes")
