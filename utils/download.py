"""Download a file with a timeout, and a lock that lets one process of many do it.

torch.hub's own download waits forever on a server that stops sending, and several processes
that miss the same file (DataLoader workers, torchrun ranks) would each download it. Here a stall
raises after ``timeout`` seconds without a byte, a body shorter than its Content-Length is an
error, and a per-file lock in the cache directory makes the others wait for the first download.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError, URLError

TIMEOUT_ENV = "SEMI_SUPERVISED_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds without a byte from the server
CHUNK = 1 << 20


class DownloadError(OSError):
    """The download failed; the message says how."""


def timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds above 0")
    return seconds


def download(url: str, destination: Path, *, progress: bool = True) -> None:
    """Write the body at ``url`` (http, https or file) to ``destination``, whole, or raise DownloadError."""
    seconds = timeout()
    request = urllib.request.Request(url, headers={"User-Agent": "semi-supervised-hub"})
    try:
        with urllib.request.urlopen(request, timeout=seconds) as response, open(destination, "wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with _progress_bar(total, progress) as update:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(f"the connection closed after {received:,} of {total:,} bytes")
    except HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}") from e
    except TimeoutError as e:
        raise DownloadError(f"no data for {seconds:g} s (set {TIMEOUT_ENV} to wait longer)") from e
    except URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise DownloadError(f"no answer for {seconds:g} s (set {TIMEOUT_ENV} to wait longer)") from e
        raise DownloadError(str(e.reason)) from e
    except (http.client.HTTPException, ConnectionError) as e:
        raise DownloadError(f"the connection failed: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _progress_bar(total: int | None, enabled: bool) -> Iterator:
    try:
        from tqdm import tqdm  # optional: loading through torch.hub needs only torch
    except ImportError:
        enabled = False
    if not enabled:
        yield lambda n: None
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr) as bar:
        yield bar.update


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` across processes. Where there is no ``fcntl``
    (Windows), nothing is locked: downloads are then only perhaps repeated, never corrupt."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        try:
            yield
        finally:
            # Removed while still held, so the cache keeps no lock files. A process already waiting
            # on it finds the finished download; one arriving later finds the file before it locks.
            path.unlink(missing_ok=True)
