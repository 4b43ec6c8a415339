"""state_digest: exact identity of names, dtypes, shapes and bytes (FORMAT.md 1.3), computable in parallel."""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

import torch

from .dtypes import byte_view, check_tensor, name_of
from .kernels import impl


def _items(state) -> list[tuple[str, torch.Tensor]]:
    items = list(state.items()) if isinstance(state, Mapping) else list(state)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("sparsesync: duplicate tensor names in state")
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
    h = hashlib.blake2b(digest_size=32)
    h.update(struct.pack("<I", len(layout)))
    for name, dn, shape in sorted(layout, key=lambda x: x[0]):
        nb, db = name.encode("utf-8"), dn.encode()
        h.update(struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(db)) + db)
        h.update(struct.pack("<I", len(shape)) + b"".join(struct.pack("<q", s) for s in shape))
    return h.digest()[:16]
