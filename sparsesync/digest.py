"""state_digest: exact identity of names, dtypes, shapes and bytes (FORMAT.md 1.3), computable in parallel."""
from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from .dtypes import byte_view, check_tensor, name_of
from .errors import InvalidArgument, InvalidType
from .kernels import impl


def _items(state) -> list[tuple[str, torch.Tensor]]:
    try:
        items = list(state.items()) if isinstance(state, Mapping) else [tuple(kv) for kv in state]
    except TypeError:
        raise InvalidType(f"sparsesync: a state is a Mapping or an iterable of (name, tensor) pairs, got a "
                          f"{type(state).__name__}") from None
    if any(len(kv) != 2 or not isinstance(kv[0], str) for kv in items):
        raise InvalidType("sparsesync: a state's entries are (name, tensor) pairs with str names")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        dup = sorted(n for n, k in Counter(names).items() if k > 1)[:5]
        raise InvalidArgument(f"sparsesync: duplicate tensor names in state: {dup}")
    for n, t in items:
        check_tensor(n, t)
    return sorted(items, key=lambda kv: kv[0])


def _meta(h, name: str, t: torch.Tensor) -> None:
    nb = name.encode("utf-8")
    dn = name_of(t.dtype).encode()
    h.update(struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(dn)) + dn)
    h.update(struct.pack("<I", t.dim()) + b"".join(struct.pack("<q", s) for s in t.shape))


def tensor_hash(t: torch.Tensor) -> int:
    """tree64 of a tensor's bytes (a non-contiguous or non-CPU tensor is copied to contiguous CPU memory first)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return impl().tree64(byte_view(t.detach().contiguous()))


def state_digest(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hex digest identifying every tensor's name, dtype, shape and exact bytes. Independent of order and device."""
    h = hashlib.blake2b(digest_size=32)
    for name, t in _items(state):
        _meta(h, name, t)
        h.update(struct.pack("<QQ", t.numel() * t.element_size(), tensor_hash(t)))
    return h.hexdigest()


def layout_digest(layout) -> bytes:
    """16-byte digest of [(name, dtype_name, shape), ...] in sorted name order (FORMAT.md 1.3)."""
    try:
        entries = sorted(((str(n), str(d), tuple(int(x) for x in s)) for n, d, s in layout), key=lambda x: x[0])
    except (TypeError, ValueError):
        raise InvalidArgument(f"sparsesync: a layout is a list of (name, dtype name, shape), got {layout!r:.100}") \
            from None
    h = hashlib.blake2b(digest_size=32)
    h.update(struct.pack("<I", len(entries)))
    for name, dn, shape in entries:
        nb, db = name.encode("utf-8"), dn.encode()
        h.update(struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(db)) + db)
        h.update(struct.pack("<I", len(shape)) + b"".join(struct.pack("<q", s) for s in shape))
    return h.digest()[:16]
