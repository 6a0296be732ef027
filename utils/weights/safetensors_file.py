"""safetensors files: an 8-byte header length, a JSON header, then the tensors' bytes; no pickle at all.

Reading needs no package: the header is JSON, and each tensor is read from the file straight into its
own memory. The file is not memory-mapped, so that the model never depends on it, and its bytes are not
held a second time, as ``safetensors.torch.load(bytes)`` would hold them (benchmarks/load.py). Writing
uses the safetensors package, an optional install (``pip install safetensors``).
"""
from __future__ import annotations

import json
import os
import stat
import sys
import uuid
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from utils.weights import CheckpointError

HEADER_LIMIT = 100_000_000  # bytes: safetensors' own bound on a header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


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
        header, _ = _header(f)
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def load(path: str | os.PathLike) -> dict[str, Tensor]:
    """The file's tensors, each read into memory of its own; ValueError where the header does not describe
    the bytes that follow it."""
    if sys.byteorder != "little":  # the format's byte order
        return _package(path).load(Path(path).read_bytes())
    with open(path, "rb") as f:
        header, start = _header(f)
        size = os.fstat(f.fileno()).st_size
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        tensors, end = {}, 0
        for name, spec in entries:
            if spec.get("dtype") not in DTYPES:
                raise ValueError(f"tensor {name}: dtype {spec.get('dtype')!r} is none that a model holds")
            tensor = torch.empty(spec["shape"], dtype=DTYPES[spec["dtype"]])
            begin, stop = spec["data_offsets"]
            if begin != end or stop - begin != tensor.numel() * tensor.element_size() or start + stop > size:
                raise ValueError(f"tensor {name}: its data_offsets {spec['data_offsets']} do not fit its shape "
                                 "and the file (a damaged or cut-short file?)")
            f.seek(start + begin)
            if tensor.numel() and f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != stop - begin:
                raise ValueError(f"tensor {name}: the file ends inside it (cut short while it was read?)")
            tensors[name], end = tensor, stop
    return tensors


def _header(f: BinaryIO) -> tuple[dict, int]:
    """The header of the open file, and where the tensors' bytes start."""
    length = int.from_bytes(f.read(8), "little")
    if length > HEADER_LIMIT:
        raise ValueError(f"a header of {length:,} bytes, more than safetensors allows")
    header = json.loads(f.read(length))
    if not (isinstance(header, dict) and isinstance(header.get("__metadata__") or {}, dict)):
        raise ValueError("a header that is not a JSON object of tensors")
    return header, 8 + length


def save(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``tensors`` (contiguous copies where they are views) with the string ``metadata`` in the header, readable
    by whom the user's other new files are (the package writes them for their owner alone)."""
    _package(path).save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.fspath(path),
                             metadata=metadata)
    os.chmod(path, _new_file_mode(Path(path).parent))


def _new_file_mode(folder: Path) -> int:
    """The permissions a new file gets in ``folder``: 0o666 less the umask, found without changing it."""
    probe = folder / f".mode.{uuid.uuid4().hex}"
    descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
        probe.unlink()


def _package(path: str | os.PathLike):
    try:
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError(f"writing {path} as safetensors needs the safetensors package: "
                              "pip install safetensors") from e
    return safetensors.torch
