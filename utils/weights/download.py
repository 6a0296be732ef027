"""Download a file in bounded time, with a lock that lets one process of many do it.

torch.hub's own download waits forever on a server that stops sending, or that trickles a byte at a
time, and several processes that miss the same file (DataLoader workers, torchrun ranks) would each
download it. Here a download fails when the server sends nothing for ``timeout`` seconds, or less
than the minimum rate over any window of ``timeout`` seconds; a body shorter than its
Content-Length is an error; and a per-file lock in the cache directory makes the others wait for
the first download.
"""
from __future__ import annotations

import collections
import contextlib
import http.client
import ipaddress
import math
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

URL_SCHEMES = ("http", "https", "file")  # what weights= and the mirror may name
TIMEOUT_ENV = "SEMI_SUPERVISED_DOWNLOAD_TIMEOUT"
MIN_RATE_ENV = "SEMI_SUPERVISED_DOWNLOAD_MIN_RATE"
DEFAULT_TIMEOUT = 60.0  # seconds
DEFAULT_MIN_RATE = 32.0  # kB/s, averaged over the timeout: the largest file (3.3 GB) then ends within a day
MAX_TIMEOUT = 86400.0  # the socket layer refuses much larger timeouts
CHUNK = 1 << 20


class DownloadError(OSError):
    """The download failed; the message says how."""


def is_url(name: str, what: str | None = None) -> bool:
    """Whether ``name`` is a URL (``scheme://...``) rather than a path. With ``what``, a URL that is not
    http(s):// or file:// is refused: a ValueError that names ``what``."""
    if "://" not in name:
        return False
    if what is not None and name.split("://", 1)[0] not in URL_SCHEMES:
        raise ValueError(f"{what}: only http://, https:// and file:// URLs are supported")
    return True


def _setting(name: str, default: float, allow_zero: bool, what: str) -> float:
    value = os.environ.get(name, "").strip()
    try:
        number = float(value) if value else default
    except ValueError:
        number = math.nan
    low_ok = number >= 0 if allow_zero else number > 0
    if not (low_ok and number <= MAX_TIMEOUT):  # also refuses nan and inf
        low = "0" if allow_zero else "above 0"
        raise ValueError(f"{name}={value!r}: expected {what} from {low} to {MAX_TIMEOUT:g}; unset it for the "
                         f"default, {default:g}")
    return number


def timeout() -> float:
    """Seconds a download may go without a byte, and the window over which its rate is judged."""
    return _setting(TIMEOUT_ENV, DEFAULT_TIMEOUT, False, "a number of seconds")


def min_rate() -> float:
    """The slowest average rate, in kB/s, that a download may keep over ``timeout()`` seconds (0: any)."""
    return _setting(MIN_RATE_ENV, DEFAULT_MIN_RATE, True, "a rate in kB/s")


def _opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener, which honours the proxy settings (http_proxy, no_proxy, ...), except for a mirror on
    this machine (localhost, 127.0.0.0/8, ::1): a proxy elsewhere cannot reach it, so it is fetched directly."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))


def download(url: str, destination: Path, *, progress: bool = True) -> None:
    """Write the body at ``url`` (http, https or file) to ``destination``, whole, or raise DownloadError."""
    seconds, rate = timeout(), min_rate()
    request = urllib.request.Request(url, headers={"User-Agent": "semi-supervised-hub"})
    try:
        with _opener(url).open(request, timeout=seconds) as response, open(destination, "wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            pace = _Pace(seconds, rate * 1000)
            read = getattr(response, "read1", response.read)  # read1: whatever has arrived, so the pace is seen
            with _progress_bar(total, progress) as update:
                while chunk := read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    update(len(chunk))
                    pace.check(received)
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


class _Pace:
    """Fails a download whose average rate over the last ``window`` seconds is under ``bytes_per_second``."""

    def __init__(self, window: float, bytes_per_second: float):
        self.window, self.floor = window, bytes_per_second
        self.start = time.monotonic()
        self.samples = collections.deque([(self.start, 0)])  # (time, bytes received by then)

    def check(self, received: int) -> None:
        now = time.monotonic()
        if now - self.samples[-1][0] >= self.window / 100:  # enough samples to slide, few enough to keep
            self.samples.append((now, received))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()  # keep one sample at least a window old
        then, before = self.samples[0]
        if self.floor and now - self.start >= self.window and (received - before) < self.floor * (now - then):
            seen = (received - before) / (now - then) / 1000
            raise DownloadError(f"the server sent {seen:.3g} kB/s over the last {now - then:.0f} s, under the "
                                f"minimum of {self.floor / 1000:g} kB/s (set {MIN_RATE_ENV} to accept slower "
                                f"downloads, or {TIMEOUT_ENV} to judge over a longer window)")


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
def exclusive(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` across processes; yields True once held. With
    ``wait=False`` it yields False at once if another process holds it. Where there is no ``fcntl``
    (Windows), nothing is locked: downloads are then only perhaps repeated, never corrupt."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    while True:
        f = open(path, "a")  # noqa: SIM115 (held across the yield below)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))  # released when the process dies
        except BlockingIOError:
            f.close()
            yield False
            return
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(f.fileno()), current):
            break
        f.close()  # the previous holder removed this lock file on release: lock the one there now
    try:
        yield True
    finally:
        # Removed while still held, so the cache keeps no lock files; a process waiting on the
        # removed file sees that above and locks afresh.
        path.unlink(missing_ok=True)
        f.close()


def held(path: Path) -> bool:
    """Whether another process holds the lock ``path`` now (is downloading); changes nothing."""
    try:
        import fcntl
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while someone holds it exclusively
    except BlockingIOError:
        return True
    except (ImportError, OSError):
        pass
    return False
