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

from models import WEIGHTS
from utils.weights import download
from utils.weights.cache import RECORDS, cache_dir, downloading, from_urls, leftovers, lock_of, sha256

PUBLISHED = {w.file_name: entry for entry, w in WEIGHTS.items()}


def cached(entries: list[str]) -> list[tuple[str, Path]]:
    """(entry, path) of the entries' files that are in the cache."""
    paths = [(e, cache_dir() / WEIGHTS[e].file_name) for e in entries]
    return [(e, path) for e, path in paths if path.is_file()]


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
    bad = [f for f in files if args.command != "clear" or "/" in f or f in ("", ".", "..")
           or not (cache_dir() / f).is_file()]
    if bad:
        parser.error(f"unknown entry {', '.join(map(repr, bad))}; choose from {', '.join(WEIGHTS)}"
                     + (f", or name a file in {cache_dir()} (its name alone, without a folder)"
                        if args.command == "clear" else ""))
    everything = not args.entries
    entries = [e for e in args.entries if e in WEIGHTS] or ([] if files else list(WEIGHTS))
    found = cached(entries)
    others = from_urls(set(PUBLISHED)) if everything else []
    names = None if everything else [WEIGHTS[e].file_name for e in entries] + files

    if args.command == "list":
        return list_cache(entries, found, others, names)
    if args.command == "verify":
        return verify_cache(found)
    return clear_cache(found, others + [cache_dir() / f for f in files], names, everything)


def list_cache(entries: list[str], found: list[tuple[str, Path]], others: list[Path], names: list[str] | None) -> int:
    print(f"{cache_dir()}: {len(found)} of {len(entries)} checkpoint(s)"
          + (f", and {len(others)} from other URLs" if others else ""))
    for entry, path in found:
        print(f"  {entry:24} {path.name:56} {size(path):>12}")
    for path in others:
        print(f"  {'(from a URL)':24} {path.name:56} {size(path):>12}")
    for name, paths in leftovers(names).items():
        label = "(downloading)" if downloading(name) else "(left over)"
        for path in paths:
            print(f"  {label:24} {path.name:56} {size(path):>12}")
    return 0


def verify_cache(found: list[tuple[str, Path]]) -> int:
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


def clear_cache(found: list[tuple[str, Path]], others: list[Path], names: list[str] | None, everything: bool) -> int:
    """Removes the entries' files, ``others`` (files from other URLs, files named), the leftovers of killed
    downloads (not those of a download still running) and, for ``everything``, the verification records."""
    removed, failed = 0, []

    def remove(path: Path) -> bool:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            failed.append(f"{path} ({e.strerror})")
            return False
        print(f"removed {path}")
        return True

    for path in [path for _, path in found] + others:
        removed += remove(path)
    for name, paths in leftovers(names).items():
        lock = lock_of(name)
        try:
            with download.exclusive(lock, wait=False) as held:  # no download can start meanwhile
                if not held:
                    print(f"left alone: {name} is being downloaded by another process")
                    continue
                for path in paths:
                    if path != lock:
                        remove(path)
                    else:
                        print(f"removed {path}")  # the lock goes when it is released
        except OSError as e:
            failed.append(f"{lock} ({e.strerror})")
    if everything and (cache_dir() / RECORDS).exists():
        remove(cache_dir() / RECORDS)
    print(f"{removed} checkpoint(s) removed from {cache_dir()}")
    if failed:
        print(f"error: could not remove {'; '.join(failed)}: the cache is not writable here; remove them as the "
              "user who can, or set TORCH_HOME to your own cache", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
