"""The image files that command-line arguments name: files, folders (searched to any depth) and glob
patterns, found without following symbolic links to folders."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from utils.images.decode import IMAGE_SUFFIXES


def find_images(patterns: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files that ``patterns`` name, in order, and the patterns that name none, with why."""
    found, problems = [], []
    for pattern in patterns:
        path = Path(pattern)
        if not pattern.strip():  # Path("") is the current folder, which would be searched to any depth
            problems.append((repr(pattern), "an empty path (an unset shell variable?): name a file or folder"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found += files
            if not files:
                problems.append((pattern, "no image files in this directory"))
        elif path.is_file():
            found.append(path)  # any name: whether it is an image is for the decoder to say
        elif path.exists():
            problems.append((pattern, "not a regular file (a named pipe or a device?)"))
        elif glob.has_magic(pattern):
            files = glob_files(pattern)
            found += files
            if not files:
                problems.append((pattern, "no file matches this pattern"))
        else:
            problems.append((pattern, "no such file or directory"))
    return list(dict.fromkeys(found)), problems  # each file once, in first-named order


def class_dirs(root: Path) -> list[Path]:
    """The class folders of an ImageFolder layout, sorted: ``root``'s folders, less hidden ones
    (``.ipynb_checkpoints``, ``.git``), as evaluation and fine-tuning both read them."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def glob_files(pattern: str) -> list[Path]:
    """The files that ``pattern`` matches, as glob.glob(recursive=True) finds them (``**`` for any depth,
    names starting with a dot only where the pattern says so), in sorted order. The folders are walked
    once each, without following symbolic links to folders: glob follows them, and a link loop (a
    ``loop -> ..`` in each folder) makes its search grow exponentially."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root = os.path.join(*parts[:fixed]) if fixed else os.curdir
    regex = re.compile(_translate(parts[fixed:]))
    found = []
    for folder, _, names in os.walk(root, followlinks=False):
        rest = os.path.relpath(folder, root)
        for name in names:
            relative = name if rest == os.curdir else f"{rest}/{name}"
            if regex.fullmatch(relative.replace(os.sep, "/")):
                found.append(Path(folder, name))
    return sorted(found)


def _translate(segments: tuple[str, ...]) -> str:
    """A regular expression for the path segments of a glob pattern, below its fixed folder."""
    out = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            out.append(r"(?:(?!\.)[^/]+/)*" + (r"(?!\.)[^/]+" if last else ""))
        else:
            out.append(("" if segment.startswith(".") else r"(?!\.)") + _segment(segment) + ("" if last else "/"))
    return "".join(out)


def _segment(segment: str) -> str:
    """One name's pattern: * and ? within the name, [...] and [!...] sets, everything else literal."""
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        end = segment.find("]", i + 2 + (segment[i + 1:i + 2] == "!")) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end != -1:
            body = segment[i + 1:end]
            out.append("(?!/)[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)
