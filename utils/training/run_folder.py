"""The output folder of one fine-tuning run: one run at a time, never mixed with another, and nothing
left half-written.

A run holds ``OUT/.lock`` (an exclusive ``flock``) from its start to its end, so a second run into
the same folder is refused at once, and leftovers of a run that was killed can be removed safely.
Files are written beside their place under a name of their own and renamed over it.
"""
from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import uuid
from pathlib import Path

import torch

from utils.replace import Keep, replacing

RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "classes.txt", "curves.png")
LOCK = ".lock"
TMP_SUFFIX = ".tmp"
# What _write names its temporaries: ".<run file>.<12 hex digits>.tmp". Only these are a run's leftovers;
# any other file in the folder is the user's.
LEFTOVER = re.compile(rf"^\.({'|'.join(map(re.escape, RUN_FILES))})\.[0-9a-f]{{12}}{re.escape(TMP_SUFFIX)}$")


class RunFolderError(ValueError):
    """The output folder cannot take this run; the message names it and what to do."""


# What a run writes once an epoch has finished: a folder without them holds no run (one that stopped in
# its first epoch, or failed at its start, left at most classes.txt), and the next run may take it.
EPOCH_FILES = ("last.pth", "best.pth", "metrics.jsonl")


def run_files(folder: Path) -> list[str]:
    """The files of a run that finished an epoch that ``folder`` holds."""
    return [name for name in EPOCH_FILES if (folder / name).exists()]


def free_space(folder: Path) -> str:
    with contextlib.suppress(OSError):
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free"
    return "free space unknown"


class RunFolder:
    """``path``, created if missing and locked for this process until ``close``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock = open(path / LOCK, "a+")  # noqa: SIM115  (held until close)
        except OSError as e:
            raise RunFolderError(f"--output {path}: cannot write there ({e.strerror}): choose a folder you can "
                                 "write to") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RunFolderError(f"--output {path}: another run is writing there now: wait for it to end, or "
                                 "choose another --output") from None
        self._remove_leftovers()

    def close(self) -> None:
        self._lock.close()  # releases the lock

    def _remove_leftovers(self) -> None:
        """Temporary files of a run that was killed while saving: no live run can own them, as we hold the lock."""
        for leftover in self.path.iterdir():
            if LEFTOVER.match(leftover.name) and leftover.is_file():
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def check_space(self, need: int) -> None:
        """Refuse now, not after an epoch, a folder without room for ``need`` bytes."""
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return
        if free < need:
            raise RunFolderError(f"--output {self.path}: {free / 2**20:,.0f} MiB free, and the run's checkpoints "
                                 f"need about {need / 2**20:,.0f} MiB: free some space or choose another --output")

    def save(self, obj, name: str) -> None:
        """``torch.save`` to ``name`` atomically: a run killed while saving leaves the previous file whole."""
        self._write(name, lambda tmp: torch.save(obj, tmp))

    def write_text(self, name: str, text: str) -> None:
        self._write(name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_with(self, name: str, write) -> None:
        """``write(path)`` writes ``name``'s content to ``path``, which is then renamed over ``name``; a
        ``write`` that returns False wrote nothing, and ``name`` stays as it was."""
        self._write(name, write)

    def append(self, name: str, text: str) -> None:
        """Add ``text`` at the end of ``name``; what is there is never rewritten."""
        try:
            with open(self.path / name, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise self._failed(name, e) from None

    def _write(self, name: str, write) -> None:
        path = self.path / name
        try:
            with replacing(path, path.with_name(f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")) as tmp:
                if write(tmp) is False:
                    raise Keep
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise self._failed(name, e) from None

    def _failed(self, name: str, error: Exception) -> RunFolderError:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        return RunFolderError(f"could not save {self.path / name} ({reason}; {free_space(self.path)} in "
                              f"{self.path}); the previous {name}, if any, is as it was")
