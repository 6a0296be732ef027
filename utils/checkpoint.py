"""Fetch, verify and load checkpoints.

Downloads land in torch.hub's cache (``torch.hub.get_dir()/checkpoints``, so ``TORCH_HOME`` is
respected), only after their SHA-256 prefix checks out; utils/download.py adds the timeout and lets
one process download for many. Loading is always ``weights_only``, and assigns the checkpoint's
tensors to the model instead of copying them, so a model built on the meta device never holds its
weights twice.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import uuid
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from . import download

URL_SCHEMES = ("http", "https", "file")
# "name-0123abcd.pth": the hex digits are the start of the file's SHA-256 (torch.hub's convention).
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[^./-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be downloaded, verified or loaded; the message says what to do."""


def hash_prefix(name: str) -> str | None:
    """The SHA-256 prefix that a file name or URL carries, if any."""
    match = HASH_SUFFIX.search(urlparse(name).path if "://" in name else name)
    return match.group(1) if match else None


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str, origin: str) -> None:
    actual = sha256(path)
    if not actual.startswith(expected):
        raise CheckpointError(
            f"SHA-256 mismatch for {origin}: expected a hash starting {expected}, got {actual[:len(expected)]}. "
            "The file is corrupt or not the one its name promises: fetch it again from a source you trust, or, "
            f"if -{expected} in its name is not a hash, rename the file.")


def fetch(url: str, *, expected_hash: str | None = None, progress: bool = True, remedy: str = "") -> Path:
    """The cached copy of ``url``, downloaded and verified first if it is not in the cache yet.

    ``expected_hash`` defaults to the prefix the file name carries; with neither, nothing is checked.
    A download that fails or does not verify leaves nothing in the cache. Processes that miss the
    same file at once wait for the first one's download instead of repeating it.
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise ValueError(f"the URL {url} does not end in a file name")
    path = cache_dir() / name
    if path.exists():
        return path  # no lock, no network: a cached file is complete, it was moved in whole
    expected_hash = expected_hash or hash_prefix(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with download.exclusive(path.with_name(f".{name}.lock")):
        if path.exists():
            return path  # another process downloaded it while this one waited
        partial = path.with_name(f".{name}.{uuid.uuid4().hex}.partial")
        sys.stderr.write(f'Downloading: "{url}" to {path}\n')
        try:
            download.download(url, partial, progress=progress)
            if expected_hash:
                verify(partial, expected_hash, url)
            os.replace(partial, path)  # atomic: readers see the whole verified file or none
        except OSError as e:
            raise CheckpointError(f"could not download {url}: {e}. Nothing was cached; try again, check the URL and "
                                  f"your connection{remedy}, or download the file yourself and pass "
                                  "weights=<its path>.") from e
        finally:
            partial.unlink(missing_ok=True)
    return path


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """The state dict in ``path``, legacy (pre-1.6) or zip format, loaded with ``weights_only=True``.

    Training checkpoints that keep it under "state_dict" or "model", and keys saved with a DataParallel
    "module." prefix, are unwrapped.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    in_cache = path.parent == cache_dir()
    try:
        # A zip-format file can be memory-mapped: its tensors are then read lazily, never copied.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors, which could run code "
                "when unpickled. Save and load only model.state_dict().") from e
        raise CheckpointError(_unreadable(path, e, in_cache)) from e
    except Exception as e:
        raise CheckpointError(_unreadable(path, e, in_cache)) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors): save model.state_dict()")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    # Models are float32; a half-precision file is widened once here rather than on every forward.
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def _unreadable(path: Path, error: Exception, in_cache: bool) -> str:
    remedy = (f"The cached file is damaged: delete it (rm '{path}') and load again to download it afresh."
              if in_cache else "Check that it is a complete file written by torch.save(model.state_dict(), ...).")
    return f"could not read the checkpoint {path}: {type(error).__name__}: {error}. {remedy}"


def load_into(model: nn.Module, state_dict: dict[str, Tensor], *, origin: str, target: str,
              skip: tuple[str, ...] = ()) -> None:
    """Load ``state_dict`` (from ``origin``) into ``model`` (described as ``target``) strictly, assigning
    its tensors rather than copying them.

    Keys starting with a prefix in ``skip`` are left out on both sides (a head the caller replaces,
    stages a backbone does not keep). Anything else missing, unexpected or of the wrong shape is an error.
    """
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(skip)}
    # BatchNorm's step counter is not a weight, and frozen BatchNorm layers (norm_layer=...) have none.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skip)
                  and (k in expected or not k.endswith(".num_batches_tracked"))}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(expected[k])} in the model"
              for k in expected.keys() & state_dict.keys() if state_dict[k].shape != expected[k]]
    if missing or unexpected or shapes:
        problems = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes", sorted(shapes))) if keys]
        raise CheckpointError(f"{origin} does not fit {target}: " + "; ".join(problems)
                              + ". Use a checkpoint saved from the same architecture.")
    model.load_state_dict(state_dict, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and not n.startswith(skip)]
    if left:
        raise CheckpointError(f"{origin} left {', '.join(left[:8])} uninitialised (not saved in a state dict)")
