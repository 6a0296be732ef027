"""The checkpoint cache: where files go, which were verified, and what is there.

The cache is torch.hub's (``torch.hub.get_dir()/checkpoints``, so ``TORCH_HOME`` is respected). A
verified file's size, times and inode are recorded, so that it is hashed again, cheaply, only when it
changes. Partial downloads and locks of killed downloads are found by name; those of a download still
running (its lock is held) are told apart.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import torch

from utils.replace import replacing
from utils.weights import CheckpointError, download

# "name-0123abcd.pth": the hex digits are the start of the file's SHA-256 (torch.hub's convention).
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[^./-]+$")
CACHE_COMMAND = "python -m utils.cache"
NAME_LIMIT = 200  # bytes; ".<name>.<uuid>.partial" must stay within the usual 255
RECORDS = ".verified.json"  # in the cache directory: {path: {"stat": [...], "sha256": ...}}
URL_DIGEST = re.compile(r"\.[0-9a-f]{12}(\.[^./]{1,15})?$")  # cache_name's files from a URL
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:[^.]+\.partial|lock)$")  # a download's partial file and lock


def hash_prefix(name: str) -> str | None:
    """The SHA-256 prefix that a file name or URL carries, if any."""
    match = HASH_SUFFIX.search(urlsplit(name).path if download.is_url(name) else name)
    return match.group(1) if match else None


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def in_cache(path: Path) -> bool:
    return path.resolve().parent == cache_dir().resolve()


def clear_command(path: Path) -> str:
    """The command that removes a cached file, quoted for the shell."""
    return f"{CACHE_COMMAND} clear {shlex.quote(path.name)}"


def cache_name(url: str, content_addressed: bool) -> str:
    """The name of ``url``'s file in the cache. A file whose name carries its hash (the published
    ones; torch.hub's convention) keeps its name, and so is shared with torch.hub. Any other gets a
    digest of its URL, so that two URLs ending in the same name never share an entry."""
    name = os.path.basename(urlsplit(url).path)
    if content_addressed and len(name.encode()) <= NAME_LIMIT:
        return name
    stem, suffix = os.path.splitext(name)
    suffix = suffix if len(suffix) <= 16 else ""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    room = NAME_LIMIT - len(digest) - len(suffix.encode()) - 1
    stem = stem.encode()[:room].decode(errors="ignore")
    return f"{stem}.{digest}{suffix}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str, origin: str) -> None:
    """Check that ``path``'s SHA-256 starts with ``expected``; a file unchanged since it last
    verified (same size, times and inode) is not read again."""
    known = _read_records().get(str(path.resolve()))
    if known and known.get("stat") == _signature(path) and str(known.get("sha256", "")).startswith(expected):
        return
    record(path, check_hash(path, expected, origin, cached=in_cache(path)), url=(known or {}).get("url"))


def check_hash(path: Path, expected: str, origin: str, cached: bool) -> str:
    actual = sha256(path)
    if actual.startswith(expected):
        return actual
    if cached:
        raise CheckpointError(
            f"the cached checkpoint {path} does not match its SHA-256 prefix {expected} (it starts "
            f"{actual[:len(expected)]}): it was damaged or replaced after it was downloaded. Remove it with "
            f"{clear_command(path)} and load again to download it afresh")
    raise CheckpointError(
        f"SHA-256 mismatch for {origin}: expected a hash starting {expected}, got {actual[:len(expected)]}. "
        "The file is corrupt or not the one its name promises: fetch it again from a source you trust, or, "
        f"if -{expected} in its name is not a hash (file names ending in -HEX are checked against that hash "
        "prefix), rename the file")


def _signature(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def record(path: Path, digest: str, url: str | None = None) -> None:
    """Note that ``path`` has the SHA-256 ``digest``; ``url``: this repository downloaded it from there."""
    records = _read_records()
    records[str(path.resolve())] = {"stat": _signature(path), "sha256": digest, **({"url": url} if url else {})}
    _write_records(records)


def _read_records() -> dict:
    """The verification records; a damaged file or entry is left out (that file is hashed again), never fatal."""
    try:
        records = json.loads((cache_dir() / RECORDS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(records, dict):
        return {}
    return {k: v for k, v in records.items() if isinstance(v, dict) and isinstance(v.get("stat"), list)
            and isinstance(v.get("sha256"), str)}


def _write_records(records: dict) -> None:
    # Written whole and renamed into place. Two processes writing at once may lose one record:
    # that costs one more hash, never a wrong answer.
    records = {k: v for k, v in records.items() if os.path.exists(k)}
    with contextlib.suppress(OSError):  # a read-only cache: the file is hashed again next time
        cache_dir().mkdir(parents=True, exist_ok=True)
        with replacing(cache_dir() / RECORDS, cache_dir() / f"{RECORDS}.{uuid.uuid4().hex}.tmp") as tmp:
            tmp.write_text(json.dumps(records))


def from_urls(published: set[str]) -> list[Path]:
    """Checkpoints that this repository downloaded from other URLs (weights=URL), not the ``published`` file
    names: named with the URL's digest, or recorded as downloaded. Other files in torch.hub's shared cache
    are not ours, even where a load verified them, and are left alone."""
    if not cache_dir().is_dir():
        return []
    recorded = {Path(k).name for k, v in _read_records().items() if v.get("url")}
    return sorted(p for p in cache_dir().iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in published and (URL_DIGEST.search(p.name) or p.name in recorded))


def leftovers(names: list[str] | None) -> dict[str, list[Path]]:
    """Partial downloads and lock files by the cache file they belong to: of ``names``, or of any file."""
    if not cache_dir().is_dir():
        return {}
    found: dict[str, list[Path]] = {}
    for path in sorted(cache_dir().glob(".*")):
        match = LEFTOVER.match(path.name)
        if match and path.is_file() and (names is None or match["name"] in names):
            found.setdefault(match["name"], []).append(path)
    return found


def lock_of(name: str) -> Path:
    """The lock that a download of the cache file ``name`` holds."""
    return cache_dir() / f".{name}.lock"


def downloading(name: str) -> bool:
    """Whether a live process holds the lock of the cache file ``name`` (is downloading it)."""
    return download.held(lock_of(name))
