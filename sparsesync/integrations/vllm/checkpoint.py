"""The checkpoint an engine loaded, as a host mirror in checkpoint (Hugging Face) coordinates (no vLLM needed)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ...errors import InvalidArgument
from ...safetensors_io import _DTYPES, load

INDEX = "model.safetensors.index.json"


def safetensors_files(path) -> list[Path]:
    """The safetensors files of a checkpoint: a file, or a directory (every shard named by
    ``model.safetensors.index.json`` when there is one, else every ``*.safetensors`` in it, sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InvalidArgument(f"checkpoint {str(p)!r} is neither a safetensors file nor a directory")
    idx = p / INDEX
    if idx.is_file():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
            files = sorted({str(f) for f in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"{idx}: malformed index ({exc})") from None
        out = [p / f for f in files]
        missing = [str(f) for f in out if not f.is_file()]
        if missing:
            raise InvalidArgument(f"{idx} names shards that do not exist: {missing}")
        return out
    out = sorted(p.glob("*.safetensors"))
    if not out:
        raise InvalidArgument(f"checkpoint directory {str(p)!r} holds no *.safetensors file")
    return out


def load_mirror(path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, name -> tensor (shards merged; a name in two shards is an error)."""
    mirror: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        part = load(f)
        dup = sorted(set(part) & set(mirror))
        if dup:
            raise InvalidArgument(f"checkpoint {str(path)!r}: tensors {dup[:5]} appear in more than one shard")
        mirror.update(part)
    if not mirror:
        raise InvalidArgument(f"checkpoint {str(path)!r} holds no tensors")
    return mirror


def read_layout(path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) from the safetensors headers only (no tensor data is read)."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for f in safetensors_files(path):
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise InvalidArgument(f"{f} is not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise InvalidArgument(f"{f}: safetensors header of {n} bytes")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            out[name] = (_DTYPES.get(info.get("dtype"), info.get("dtype")), tuple(info.get("shape", ())))
    return out


def model_directory(model: str, revision: str | None = None) -> str | None:
    """A local directory for vLLM's ``model`` argument: the path itself, or the Hugging Face cache snapshot of a
    repository id (never downloads). None when there is none."""
    if os.path.isdir(model) or os.path.isfile(model):
        return model
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, revision=revision, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.json"])
    except Exception:                 # noqa: BLE001 - not cached, no hub library, not a repo id
        return None
