"""Fetch and load checkpoints.

Downloads land in the cache (utils/weights/cache.py), only whole, only if they look like a PyTorch
checkpoint and only after their SHA-256 prefix checks out; utils/weights/download.py bounds the time
and lets one process download for many. Local files (paths and ``file://`` URLs) are read where they
are, never copied into the cache.

Loading is always ``weights_only``; safetensors files (utils/weights/safetensors_file.py) hold no pickle
at all. Files in the cache, which are only ever replaced whole, are memory-mapped; a user's file is read
into memory, so that the model never depends on it afterwards.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import torch
from torch import Tensor, nn

from utils.replace import replacing
from utils.text import first
from utils.weights import CheckpointError, download, safetensors_file
from utils.weights.cache import (
    cache_dir,
    cache_name,
    check_hash,
    clear_command,
    hash_prefix,
    in_cache,
    lock_of,
    record,
    verify,
)

DESCRIPTION = "pretrained_cfg"  # beside the state dict in a fine-tuned file: what it holds (models.finetuned.KEY)
# The first bytes of the two formats torch.save writes: a zip archive, or (before 1.6, and the
# published files) a pickle that starts with torch's magic number.
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


# The weights file of a model folder (the Hugging Face Hub's and timm's layout), in order of preference.
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
NO_FOLDER_WEIGHTS = f"a folder without {' or '.join(FOLDER_WEIGHTS)}"


def folder_weights(directory: Path) -> Path | None:
    """The weights file of the model folder ``directory``, or None where it holds none."""
    return next((directory / name for name in FOLDER_WEIGHTS if (directory / name).is_file()), None)


def local_file(path: Path, *, expected_hash: str | None = None, origin: str | None = None) -> Path:
    """``path`` (a model folder's weights file for a folder), checked to be a regular file, and against
    ``expected_hash`` (default: the prefix its name carries)."""
    origin = origin or str(path)
    if not path.exists():
        raise FileNotFoundError(f"{origin}: no such file")
    if path.is_dir():
        path = folder_weights(path) or path
        if path.is_dir():
            raise FileNotFoundError(f"{origin} is {NO_FOLDER_WEIGHTS}: give a model folder (python -m utils.export "
                                    "DIR --format hf writes one) or a weights file")
    if not path.is_file():
        raise CheckpointError(f"{origin} is not a regular file: give the path of a checkpoint file")
    if expected := expected_hash or hash_prefix(path.name):
        verify(path, expected, origin)
    return path


def fetch(url: str, *, expected_hash: str | None = None, progress: bool = True, remedy: str = "") -> Path:
    """The local file of ``url``: a ``file://`` URL's own file, else the cached copy, downloaded and
    verified first if it is not in the cache yet.

    ``expected_hash`` defaults to the prefix the file name carries; with neither, nothing is checked.
    A download that fails, is not a PyTorch checkpoint or does not verify leaves nothing in the cache.
    Processes that miss the same file at once wait for the first one's download instead of repeating it.
    """
    parsed = urlsplit(url)
    name = os.path.basename(parsed.path)
    if not name:
        raise ValueError(f"the URL {url} does not end in a file name")
    expected_hash = expected_hash or hash_prefix(name)
    if parsed.scheme == "file":
        return local_file(Path(url2pathname(parsed.path)), expected_hash=expected_hash, origin=url)
    path = cache_dir() / cache_name(url, content_addressed=expected_hash is not None)
    if path.exists():  # no lock, no network: a cached file is complete, it was moved in whole
        if expected_hash:
            verify(path, expected_hash, url)
        return path
    _make_cache_dir()
    with download.exclusive(lock_of(path.name)):
        if path.exists():
            return path  # another process downloaded it while this one waited
        # Holding the lock, this process is the only one writing this name: partial files left
        # by a killed download are stale.
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
            stale.unlink(missing_ok=True)
        sys.stderr.write(f'Downloading: "{url}" to {path}\n')
        try:  # readers see the whole verified file or none
            with replacing(path, path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")) as partial:
                download.download(url, partial, progress=progress)
                check_format(partial, url, received=True)
                digest = check_hash(partial, expected_hash, url, cached=False) if expected_hash else None
        except OSError as e:
            raise CheckpointError(f"could not download {url}: {e}. Nothing was cached; try again when the network "
                                  f"is there{remedy}, or download the file yourself and pass weights=<its path>; "
                                  "to try the code without the weights, pass pretrained=False (--no-pretrained "
                                  "on the command line)") from e
        if digest:
            record(path, digest, url=url)  # under its final name: the next load does not hash it again
    return path


def _make_cache_dir() -> None:
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"cannot write to the checkpoint cache {directory} ({e.strerror or e}): set TORCH_HOME to a writable "
            "directory (the cache is $TORCH_HOME/hub/checkpoints), or pass weights=<the path of a file you "
            "downloaded>") from e


def check_format(path: Path, origin: str, received: bool = False) -> str:
    """The format of ``path``: "zip" or "legacy" (torch.save's two) or "safetensors"; CheckpointError if it
    starts like none of them."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(LEGACY_MAGIC):
        return "legacy"
    if safetensors_file.looks_like(head, path.stat().st_size):
        return "safetensors"
    what = file_kind(head, path.stat().st_size)
    hint = " (a login or error page in place of the file?). Nothing was cached; check the URL" if received else (
        f". Remove it with {clear_command(path)}" if in_cache(path) else
        ": give a file written by torch.save(model.state_dict(), ...) or a .safetensors file")
    raise CheckpointError(f"{origin} is not a PyTorch checkpoint: it holds {what}{hint}")


def file_kind(head: bytes, size: int) -> str:
    """What the bytes that start a file of ``size`` bytes look like, for an error message."""
    amount = f"{size / 1000:.1f} kB" if size >= 1000 else f"{size} bytes"
    text = head.lstrip().lower()
    if size == 0:
        return "nothing (an empty file)"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:512]:
        return f"an HTML page of {amount}"
    if text.startswith((b"{", b"[")):
        return f"JSON or text of {amount}"
    if head.startswith(b"\x80"):
        return f"a Python pickle of {amount} that torch.save did not write"
    if head.startswith(b"\x1f\x8b"):
        return f"gzip-compressed data of {amount}"
    try:
        head.decode("utf-8")
        return f"text of {amount}"
    except UnicodeDecodeError:
        return f"{amount} of data that is neither of torch.save's formats"


def load_checkpoint(path: Path, origin: str | None = None) -> tuple[dict[str, Tensor], object]:
    """The state dict in ``path``, legacy (pre-1.6) or zip format loaded with ``weights_only=True``, or
    safetensors, and what the file says of itself beside it under "pretrained_cfg" (a fine-tuned file's
    description, as JSON in a safetensors header; None if there is none), unchecked.

    Training checkpoints that keep the state dict under "state_dict" or "model", and keys saved with a
    DataParallel "module." prefix, are unwrapped. Tensors must be dense, real and finite.
    """
    origin = origin or str(path)
    cached = in_cache(path)
    kind = check_format(path, origin)
    loaded = path.stat()
    try:
        if kind == "safetensors":
            return _state_dict(safetensors_file.load(path), path, origin), read_description(path)
        # Only the cache's files are memory-mapped: they are replaced whole, never rewritten in place,
        # whereas a user may save over their own file while the model is alive.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=cached and kind == "zip")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            removed = cached and _discard(path, loaded)
            raise CheckpointError(
                f"refused to load {origin}: it holds Python objects other than tensors, which could run code "
                "when unpickled" + ("; it was removed from the cache" if removed else "")
                + ". Save and load only model.state_dict()") from e
        raise CheckpointError(_unreadable(path, origin, e)) from e
    except Exception as e:
        raise CheckpointError(_unreadable(path, origin, e)) from e
    description = obj.get(DESCRIPTION) if isinstance(obj, dict) else None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return _state_dict(obj, path, origin), description


def _state_dict(obj: object, path: Path, origin: str) -> dict[str, Tensor]:
    """``obj`` checked to be a state dict of dense, real, finite tensors, without a DataParallel prefix,
    its floating-point tensors in float32."""
    cached = in_cache(path)
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in obj.items())):
        raise CheckpointError(f"{origin} does not hold a state dict (a dict of tensors by parameter name): "
                              "save model.state_dict()")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    odd = [f"{k} ({v.layout if v.layout != torch.strided else v.dtype})" for k, v in obj.items()
           if v.layout != torch.strided or v.is_complex()]
    if odd:
        raise CheckpointError(f"{origin} holds tensors that are not dense real numbers: {_some(odd)}. "
                              "Save model.state_dict() of a model in float32")
    # sum() is a cheap first pass; isfinite() confirms, since a sum of large finite values may overflow.
    bad = [k for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v.sum())
           and not torch.isfinite(v).all()]
    if bad:
        remedy = (f"Remove it with {clear_command(path)} and load again" if cached
                  else "The file is damaged, or the training that wrote it diverged")
        raise CheckpointError(f"{origin} holds NaN or infinite values in {_some(bad)}. {remedy}")
    # Models are float32; a half-precision file is widened once here rather than on every forward. And the
    # same weights compute the same outputs whatever the file's layout: channels_last ones (as a model trained
    # in channels_last saves them) are laid out as the rest.
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in obj.items()}


def read_description(path: Path) -> object:
    """What a checkpoint says of itself under "pretrained_cfg" (None if nothing), in any format. Its
    tensors are not read (torch's go to the meta device), and loading proper reads them once; a
    safetensors header's JSON that does not parse is returned as the string it is, for the caller to refuse."""
    try:
        if check_format(path, str(path)) == "safetensors":
            text = safetensors_file.read_metadata(path).get(DESCRIPTION)
            return None if text is None else _json_or_text(text)
        obj = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001  (loading proper reports what is wrong with the file)
        return None
    return obj.get(DESCRIPTION) if isinstance(obj, dict) else None


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _some(names: list[str], n: int = 8) -> str:
    return f"{len(names)}: " * (len(names) > n) + ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _discard(path: Path, loaded: os.stat_result) -> bool:
    """Remove a cached file that must not be loaded, unless another process replaced it meanwhile."""
    try:
        with download.exclusive(lock_of(path.name)):
            if not os.path.samestat(path.stat(), loaded):
                return False
            path.unlink()
        return True
    except OSError:
        return False


def _unreadable(path: Path, origin: str, error: Exception) -> str:
    remedy = (f"The cached file is damaged: remove it with {clear_command(path)} and load again to download it "
              "afresh" if in_cache(path) else
              "Check that it is a complete file written by torch.save(model.state_dict(), ...)")
    return f"could not read the checkpoint {origin}: {type(error).__name__}: {str(error).rstrip('.')}. {remedy}"


def load_into(model: nn.Module, state_dict: dict[str, Tensor], *, origin: str, target: str,
              skip: tuple[str, ...] = ()) -> None:
    """Load ``state_dict`` (from ``origin``) into ``model`` (described as ``target``) strictly, assigning
    its tensors rather than copying them.

    Keys starting with a prefix in ``skip`` are left out on both sides (a head the caller replaces,
    stages a backbone does not keep). Anything else missing, unexpected or of the wrong shape or type
    is an error.
    """
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    # BatchNorm's step counter is not a weight, and frozen BatchNorm layers (norm_layer=...) have none.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skip)
                  and (k in expected or not k.endswith(".num_batches_tracked"))}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    common = expected.keys() & state_dict.keys()
    shapes = sorted(f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                    for k in common if state_dict[k].shape != expected[k].shape)
    types = sorted(f"{k}: {state_dict[k].dtype} in the file" for k in common
                   if state_dict[k].is_floating_point() != expected[k].is_floating_point())
    if missing or unexpected or shapes or types:
        problems = [f"{label} ({len(keys)}): {first(keys, 8)}"
                    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes", shapes), ("wrong types", types)) if keys]
        raise CheckpointError(f"{origin} does not fit {target}: " + "; ".join(problems) + _fit_remedy(
            missing, unexpected, shapes, types, state_dict))
    model.load_state_dict(state_dict, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and not n.startswith(skip)]
    if left:
        raise CheckpointError(f"{origin} left {first(left, 8)} uninitialised (not saved in a state dict)")


def _fit_remedy(missing, unexpected, shapes, types, state_dict) -> str:
    head_only = not (missing or unexpected or types) and all(s.startswith("fc.") for s in shapes)
    if head_only and "fc.weight" in state_dict:
        n = state_dict["fc.weight"].shape[0]
        return (f". Only the classifier differs: the file has a {n}-class head, so pass num_classes={n} "
                f"(--num-classes {n} on the command line)")
    return ". Use a checkpoint saved from the same architecture"
