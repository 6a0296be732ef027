"""The published checkpoints in the torch.hub cache: list them, re-hash them, remove them.

    python -m utils.cache list             # what is cached, with sizes
    python -m utils.cache verify [ENTRY]   # re-hash; exit status 1 if any file is bad
    python -m utils.cache clear [ENTRY]    # remove them (all twelve without ENTRY)
    python -m utils.cache clear FILE       # remove one file of the cache by name, as error messages suggest

The cache is ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``). Partial downloads
and lock files left by killed processes are listed and cleared too; those of a download still
running (its lock is held) are left alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import download
from .checkpoint import cache_dir, sha256

try:  # imported through hubconf.py's private package name
    from ..models import WEIGHTS
except ImportError:  # run from the repository root: python -m utils.cache
    from models import WEIGHTS


def cached(entries: list[str]) -> list[tuple[str, Path]]:
    """(entry, path) of the entries' files that are in the cache."""
    paths = [(e, cache_dir() / WEIGHTS[e].file_name) for e in entries]
    return [(e, path) for e, path in paths if path.is_file()]


def leftovers(names: list[str]) -> dict[str, list[Path]]:
    """Partial downloads and lock files of the named cache files, by name."""
    if not cache_dir().is_dir():
        return {}
    found = {n: sorted(p for p in cache_dir().glob(".*") if p.is_file() and p.name.startswith(f".{n}."))
             for n in names}
    return {n: paths for n, paths in found.items() if paths}


def downloading(name: str) -> bool:
    """Whether a live process holds the lock of the cache file ``name`` (is downloading it)."""
    return download.held(cache_dir() / f".{name}.lock")


def size(path: Path) -> str:
    try:
        return f"{path.stat().st_size / 2**20:,.1f} MiB"
    except FileNotFoundError:
        return "gone"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.cache", description=__doc__.split("\n\n")[0],
                                     epilog=f"entries: {', '.join(WEIGHTS)}")
    parser.add_argument("command", choices=["list", "verify", "clear"])
    parser.add_argument("entries", nargs="*", default=[], metavar="ENTRY",
                        help="entries to act on (default: all twelve); clear also takes a cached file's name")
    args = parser.parse_args(argv)
    files = [e for e in args.entries if e not in WEIGHTS]
    if files and (args.command != "clear" or any(not (cache_dir() / f).is_file() or "/" in f for f in files)):
        missing = ", ".join(f for f in files if args.command != "clear" or not (cache_dir() / f).is_file())
        parser.error(f"unknown entry {missing}; choose from {', '.join(WEIGHTS)}"
                     + (f", or name a file in {cache_dir()}" if args.command == "clear" else ""))
    entries = [e for e in args.entries if e in WEIGHTS] or ([] if files else list(WEIGHTS))
    found = cached(entries)
    names = [WEIGHTS[e].file_name for e in entries] + files

    if args.command == "list":
        print(f"{cache_dir()}: {len(found)} of {len(entries)} checkpoint(s)")
        for entry, path in found:
            print(f"  {entry:24} {path.name:56} {size(path):>12}")
        for name, paths in leftovers(names).items():
            label = "(downloading)" if downloading(name) else "(left over)"
            for path in paths:
                print(f"  {label:24} {path.name:56} {size(path):>12}")
        return 0

    if args.command == "verify":
        bad = []
        for entry, path in found:
            expected, actual = WEIGHTS[entry].hash_prefix, sha256(path)
            ok = actual.startswith(expected)
            note = "" if ok else f": its SHA-256 starts {actual[:8]}, not {expected}"
            print(f"  {'ok ' if ok else 'BAD'} {entry:24} {path.name}{note}")
            if not ok:
                bad.append(entry)
        if bad:
            print(f"{len(bad)} damaged checkpoint(s). Remove them with: python -m utils.cache clear "
                  f"{' '.join(bad)}; they are downloaded again at the next load.", file=sys.stderr)
            return 1
        print(f"{len(found)} checkpoint(s) verified" if found else f"no checkpoints cached in {cache_dir()}")
        return 0

    removed = 0
    for path in [path for _, path in found] + [cache_dir() / f for f in files]:
        path.unlink(missing_ok=True)
        removed += 1
        print(f"removed {path}")
    for name, paths in leftovers(names).items():
        lock = cache_dir() / f".{name}.lock"
        with download.exclusive(lock, wait=False) as held:
            if not held:
                print(f"left alone: {name} is being downloaded by another process")
                continue
            for path in paths:
                if path != lock:
                    path.unlink(missing_ok=True)
                print(f"removed {path}")
    print(f"{removed} checkpoint(s) removed from {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
