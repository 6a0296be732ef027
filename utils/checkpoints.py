"""The published checkpoints in the torch.hub cache: list them, re-hash them, remove them.

    python -m utils.checkpoints list             # what is cached, with sizes
    python -m utils.checkpoints verify [ENTRY]   # re-hash; exit status 1 if any file is bad
    python -m utils.checkpoints clear [ENTRY]    # remove them (all twelve without ENTRY)

The cache is ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``). Left-over
partial downloads and lock files of these checkpoints are listed and cleared too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import cache_dir, sha256

try:  # imported through hubconf.py's private package name
    from ..models import WEIGHTS
except ImportError:  # run from the repository root: python -m utils.checkpoints
    from models import WEIGHTS


def cached(entries: list[str]) -> list[tuple[str, Path]]:
    """(entry, path) of the entries' files that are in the cache."""
    paths = [(e, cache_dir() / WEIGHTS[e].file_name) for e in entries]
    return [(e, path) for e, path in paths if path.is_file()]


def leftovers(entries: list[str]) -> list[Path]:
    """Partial downloads and lock files of the entries' files."""
    names = {WEIGHTS[e].file_name for e in entries}
    if not cache_dir().is_dir():
        return []
    return sorted(p for p in cache_dir().glob(".*") if p.is_file() and any(p.name.startswith(f".{n}.") for n in names))


def size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.checkpoints", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["list", "verify", "clear"])
    parser.add_argument("entries", nargs="*", metavar="ENTRY", help="entries to act on (default: all twelve)")
    args = parser.parse_args(argv)
    unknown = [e for e in args.entries if e not in WEIGHTS]
    if unknown:
        parser.error(f"unknown entry {', '.join(unknown)}; choose from {', '.join(WEIGHTS)}")
    entries = args.entries or list(WEIGHTS)
    files = cached(entries)

    if args.command == "list":
        print(f"{cache_dir()}: {len(files)} of {len(entries)} checkpoint(s)")
        for entry, path in files:
            print(f"  {entry:24} {path.name:56} {size(path):>12}")
        for path in leftovers(entries):
            print(f"  {'(left over)':24} {path.name:56} {size(path):>12}")
        return 0

    if args.command == "verify":
        bad = []
        for entry, path in files:
            expected, actual = WEIGHTS[entry].hash_prefix, sha256(path)
            ok = actual.startswith(expected)
            found = "" if ok else f": its SHA-256 starts {actual[:8]}, not {expected}"
            print(f"  {'ok ' if ok else 'BAD'} {entry:24} {path.name}{found}")
            if not ok:
                bad.append(entry)
        if bad:
            print(f"{len(bad)} damaged checkpoint(s). Remove them with: python -m utils.checkpoints clear "
                  f"{' '.join(bad)}; they are downloaded again at the next load.", file=sys.stderr)
            return 1
        print(f"{len(files)} checkpoint(s) verified" if files else f"no checkpoints cached in {cache_dir()}")
        return 0

    removed = [path for _, path in files] + leftovers(entries)
    for path in removed:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    print(f"{len(files)} checkpoint(s) removed from {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
