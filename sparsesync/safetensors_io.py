"""Minimal safetensors reader/writer (the format: u64 header length, JSON header, raw little-endian data).

Enough for ``sparsesync serve`` / ``push`` to load and save weights without another dependency.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidArgument

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 << 20


def load(path) -> dict[str, torch.Tensor]:
    """Read a safetensors file. A missing or unreadable file raises ``OSError`` (with ``filename`` set); a file that
    is not valid safetensors raises :class:`~sparsesync.errors.InvalidArgument` naming the path and the problem."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise InvalidArgument(f"{path} is not a safetensors file (only {len(data)} bytes)")
    (hlen,) = struct.unpack_from("<Q", data, 0)
    if hlen > MAX_HEADER or 8 + hlen > len(data):
        raise InvalidArgument(f"{path} is not a safetensors file (header length {hlen} does not fit a "
                              f"{len(data)}-byte file)")
    try:
        header = json.loads(data[8:8 + hlen])
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path} is not a safetensors file (its header is not a JSON object)")
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise InvalidArgument(f"{path}: tensor {name!r} has a malformed header entry")
        dt = _DTYPES.get(info.get("dtype"))
        if dt is None:
            raise InvalidArgument(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        try:
            a, b = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"{path}: tensor {name!r} has a malformed shape or data_offsets") from None
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{path}: tensor {name!r} has a negative dimension {list(shape)}")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dt).element_size()
        if not 0 <= a <= b <= len(data) - base or b - a != nbytes:
            raise InvalidArgument(f"{path}: tensor {name!r} has bad offsets")
        buf = np.frombuffer(data, dtype=np.uint8, count=b - a, offset=base + a).copy()
        out[name] = torch.from_numpy(buf).view(dt).reshape(shape) if nbytes else torch.empty(shape, dtype=dt)
    return out


def save(state: dict, path) -> None:
    """Write ``state`` as a safetensors file, atomically (a temporary file next to it, then a rename)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise InvalidArgument(f"tensor {name!r}: dtype {t.dtype} cannot be saved as safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
