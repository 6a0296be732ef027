"""safetensors files: a JSON header, then the tensors' bytes; no pickle at all.

The header, and the string metadata in it, is read here without the safetensors package; the tensors
are loaded and saved with it, an optional install (``pip install safetensors``) that only these files
need. A file is read into memory rather than memory-mapped, so that the model never depends on it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from utils.weights import CheckpointError

HEADER_LIMIT = 100_000_000  # bytes: safetensors' own bound on a header


def looks_like(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes that starts with ``head`` is laid out as safetensors: a little-endian
    8-byte header length that fits in the file, then a JSON object."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= min(size - 8, HEADER_LIMIT) and head[8:9] == b"{"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of the file's header (``{}`` for none); ValueError where the header is not the
    JSON object it should be."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > HEADER_LIMIT:
            raise ValueError(f"a header of {length:,} bytes, more than safetensors allows")
        header = json.loads(f.read(length))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(metadata, (dict, type(None))):
        raise ValueError("a header that is not a JSON object of tensors")
    return {str(k): str(v) for k, v in (metadata or {}).items()}


def load(path: str | os.PathLike) -> dict[str, Tensor]:
    """The file's tensors, read into memory: the file is closed when this returns."""
    return _package(path).load(Path(path).read_bytes())


def save(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``tensors`` (contiguous copies where they are views) with the string ``metadata`` in the header."""
    _package(path).save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.fspath(path),
                             metadata=metadata)


def _package(path: str | os.PathLike):
    try:
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError(f"{path} is a safetensors file, which needs the safetensors package: "
                              "pip install safetensors") from e
    return safetensors.torch
