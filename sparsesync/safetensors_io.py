"""Minimal safetensors reader/writer (the format: u64 header length, JSON header, raw little-endian data).

Enough for ``sparsesync serve`` / ``push`` to load and save weights without another dependency.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 << 20


def load(path) -> dict[str, torch.Tensor]:
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (hlen,) = struct.unpack_from("<Q", data, 0)
    if hlen > MAX_HEADER or 8 + hlen > len(data):
        raise ValueError(f"{path}: header length {hlen} invalid")
    header = json.loads(data[8:8 + hlen])
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(info.get("dtype"))
        if dt is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        a, b = info["data_offsets"]
        shape = tuple(info["shape"])
        nbytes = math.prod(shape) * torch.empty(0, dtype=dt).element_size()
        if not 0 <= a <= b <= len(data) - base or b - a != nbytes:
            raise ValueError(f"{path}: tensor {name!r} has bad offsets")
        buf = np.frombuffer(data, dtype=np.uint8, count=b - a, offset=base + a).copy()
        out[name] = torch.from_numpy(buf).view(dt).reshape(shape) if nbytes else torch.empty(shape, dtype=dt)
    return out


def save(state: dict, path) -> None:
    header, offset, blobs = {}, 0, []
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for b in blobs:
            f.write(b)
