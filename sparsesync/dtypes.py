"""Supported dtypes and the integer views used to compare and patch bit patterns."""
from __future__ import annotations

import torch

from .errors import InvalidType, LayoutMismatch

_NAMES = ["bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "int16", "int32",
          "int64", "uint8", "bool"]
SUPPORTED = {getattr(torch, n): n for n in _NAMES if hasattr(torch, n)}
BY_NAME = {n: d for d, n in SUPPORTED.items()}


def name_of(dtype: torch.dtype) -> str:
    """The dtype's name in the wire format (``torch.bfloat16`` -> ``"bfloat16"``); :class:`InvalidType` if
    unsupported."""
    try:
        return SUPPORTED[dtype]
    except (KeyError, TypeError):
        raise InvalidType(f"sparsesync: unsupported dtype {dtype}; supported: {', '.join(SUPPORTED.values())}") \
            from None


def width(dtype: torch.dtype) -> int:
    """Element width in bytes of a supported dtype."""
    name_of(dtype)
    return torch.empty(0, dtype=dtype).element_size()


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor's bytes (no copy)."""
    flat = t.reshape(-1) if t.numel() != 1 else t.as_strided((1,), (1,))  # 1 element: any strides are "contiguous"
    if t.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8)


def check_tensor(name: str, t) -> None:
    """:class:`InvalidType` unless ``t`` is a torch.Tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise InvalidType(f"sparsesync: state entry {name!r} is a {type(t).__name__}, not a torch.Tensor")
    name_of(t.dtype)


def describe(layout) -> str:
    return ", ".join(f"{n}:{d}{list(s)}" for n, d, s in layout[:5]) + (" ..." if len(layout) > 5 else "")


def compare_layouts(mine, theirs) -> None:
    """Raise LayoutMismatch naming the differences between two layouts [(name, dtype_name, shape), ...]."""
    a = {n: (d, tuple(s)) for n, d, s in mine}
    b = {n: (d, tuple(s)) for n, d, s in theirs}
    problems = []
    missing = sorted(set(b) - set(a))
    extra = sorted(set(a) - set(b))
    if missing:
        problems.append(f"missing here: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"not in the update's layout: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for n in sorted(set(a) & set(b)):
        if a[n] != b[n]:
            problems.append(f"{n}: here {a[n][0]}{list(a[n][1])}, update {b[n][0]}{list(b[n][1])}")
            if len(problems) > 8:
                break
    if problems:
        raise LayoutMismatch("tensor layout differs: " + "; ".join(problems))
