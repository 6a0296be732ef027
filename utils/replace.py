"""Files written whole or not at all: written under a temporary name beside the target, then renamed over
it, so that a reader, a crash or a failure in between never sees half a file, and what was there stays
until the new file is complete."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class Keep(Exception):  # noqa: N818  (not an error: a request)
    """Raised inside ``replacing``: there is nothing to write, and the file stays as it was."""


@contextlib.contextmanager
def replacing(path: Path, temporary: Path) -> Iterator[Path]:
    """Yields ``temporary`` to write; when the block ends without an error, it replaces ``path`` (an atomic
    rename). ``temporary`` never stays, whatever happens."""
    try:
        yield temporary
        os.replace(temporary, path)
    except Keep:
        pass
    finally:
        with contextlib.suppress(OSError):  # a folder that cannot be written: the block's error says so
            temporary.unlink(missing_ok=True)
