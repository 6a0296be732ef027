"""The features folder that ``python -m utils.embed`` writes and ``python -m utils.probe`` reads:

    FEATS/features.npy     one row per image, float32 (float16 with --float16)
    FEATS/index.csv        path,label: each row's image, relative to the folder given, and its class folder
    FEATS/meta.json        what made the rows: entry, weights and their SHA-256, transform, backend, precision
    FEATS/unreadable.csv   path,error: the images that could not be read, when some could not

While a run is under way FEATS/parts/ holds each finished chunk of rows, written whole or not at all.
A run stopped at any moment continues from them; features.npy appears only once every chunk is in, and
meta.json says ``"complete": true`` only after it.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.images.files import find_images
from utils.replace import replacing
from utils.text import first

FORMAT = 1
RANDOM_WEIGHTS_SEED = 0  # under --no-pretrained, so that a probe can rebuild the backbone the rows came from
MAX_CHUNK = 1024  # rows per part: a stop loses at most this many images' work per process


def chunk_size(rows: int) -> int:
    """Rows per part: at least 64 parts where there are rows enough (work for up to 64 processes), at
    most MAX_CHUNK rows each."""
    return max(1, min(MAX_CHUNK, -(-rows // 64)))
# What must agree for a run to continue a folder, and the option that changes each.
IDENTITY = {"format": "the format", "entry": "--model", "weights": "--weights", "transform": "--img-size",
            "feature_size": "--model", "backend": "--backend", "dtype": "--dtype", "file_dtype": "--float16",
            "images": "the images", "chunk": "the chunk size"}


class FeaturesError(ValueError):
    """A features folder that cannot be written or read as asked; the message names it and the remedy."""


@dataclass(frozen=True)
class Row:
    file: Path  # where the image is read from
    path: str  # index.csv's path: relative to the folder given, or as given
    label: str  # the class folder of an ImageFolder layout, else ""


def find_rows(patterns: list[str]) -> tuple[list[Row], list[tuple[str, str]]]:
    """The images ``patterns`` name (files, folders, globs, as classify takes them), each once, and the
    patterns that name none. A folder whose images all sit in subfolders is an ImageFolder layout: each
    image's label is its first subfolder (hidden ones left out, as evaluation and fine-tuning do)."""
    rows, problems, seen = [], [], set()
    for pattern in patterns:
        files, trouble = find_images([pattern])
        problems += trouble
        root = Path(pattern)
        if root.is_dir():
            relative = [f.relative_to(root) for f in files]
            layout = bool(relative) and all(len(r.parts) > 1 for r in relative)
            found = [Row(f, r.as_posix(), r.parts[0] if layout else "") for f, r in zip(files, relative)
                     if not (layout and r.parts[0].startswith("."))]
        else:
            found = [Row(f, os.fspath(f), "") for f in files]
        for row in found:
            if row.file.resolve() not in seen:
                seen.add(row.file.resolve())
                rows.append(row)
    twice = [name for name, n in Counter(row.path for row in rows).items() if n > 1]
    if twice:
        raise FeaturesError(f"{len(twice)} index path(s) stand for two images ({first(twice)}): the folders given "
                            "hold the same relative paths; embed each folder into its own --output")
    return rows, problems


def images_identity(rows: list[Row]) -> dict:
    digest = hashlib.sha256("".join(f"{r.path}\t{r.label}\n" for r in rows).encode()).hexdigest()
    return {"count": len(rows), "sha256": digest}


class FeatureFolder:
    """``path`` as a features folder: prepared (and locked) by one process, its chunks written by any."""

    def __init__(self, path: Path, rows: int):
        self.path, self.parts, self.chunk, self._lock = path, path / "parts", chunk_size(rows), None

    def starts(self, rows: int) -> range:
        return range(0, rows, self.chunk)

    def prepare(self, meta: dict) -> dict:
        """Create the folder and hold its lock, or check that it was started with the same ``meta``; its
        meta.json as it stands (``"complete"`` once finished). Leftovers of a stopped run are removed."""
        if self.path.exists() and not self.path.is_dir():
            raise FeaturesError(f"--output {self.path} is a file: give a folder")
        if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / "meta.json").exists():
            raise FeaturesError(f"--output {self.path} holds other files and no meta.json: give a new or empty folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".lock", "a+")  # noqa: SIM115  (held until close)
        except OSError as e:
            raise FeaturesError(f"--output {self.path}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeaturesError(f"--output {self.path} is being written by another run: wait for it, or give "
                                "another folder") from None
        known = self.meta()
        if known is None:
            self.parts.mkdir(exist_ok=True)
            self._write_text("meta.json", json.dumps(meta, indent=1) + "\n")
            return meta
        differ = [IDENTITY[k] for k in IDENTITY if known.get(k) != meta.get(k)]
        if differ:
            raise FeaturesError(f"--output {self.path} holds features made with other "
                                f"{', '.join(dict.fromkeys(differ))} (see its meta.json): give another --output, "
                                "or delete it to start again")
        for leftover in [*self.parts.glob(".*.tmp"), *self.path.glob(".*.tmp")]:  # a killed run's
            leftover.unlink(missing_ok=True)
        if not known.get("complete"):
            self.parts.mkdir(exist_ok=True)
        return known

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def meta(self) -> dict | None:
        return read_meta(self.path)

    def pending(self, rows: int, feature_size: int, dtype: str) -> list[int]:
        """The first rows of the chunks not yet written whole; a damaged part is removed and counted missing."""
        missing = []
        for start in self.starts(rows):
            if not self._part_fits(start, min(self.chunk, rows - start), feature_size, dtype):
                (self.parts / f"{start:010d}.npz").unlink(missing_ok=True)
                missing.append(start)
        return missing

    def _part_fits(self, start: int, rows: int, feature_size: int, dtype: str) -> bool:
        """Whether the part is there with the arrays the run needs, read from their headers alone: a resumed
        run does not read every finished row again."""
        try:
            with zipfile.ZipFile(self.parts / f"{start:010d}.npz") as part:
                headers = {}
                for name in ("features", "errors"):
                    with part.open(f"{name}.npy") as f:
                        version = np.lib.format.read_magic(f)
                        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                            np.lib.format.read_array_header_2_0
                        headers[name] = read(f)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return False
        (shape, _, kind), (count, _, _) = headers["features"], headers["errors"]
        return shape == (rows, feature_size) and kind == np.dtype(dtype) and count == (rows,)

    def write_part(self, start: int, features: np.ndarray, errors: list[str]) -> None:
        """Rows ``start`` on: their features (zeros where an image could not be read) and errors ("" if none)."""
        target = self.parts / f"{start:010d}.npz"
        with (replacing(target, self.parts / f".{start:010d}.{os.getpid()}.tmp") as temporary,
              open(temporary, "wb") as f):
                np.savez(f, features=features, errors=np.array(errors, dtype=str))
                f.flush()
                os.fsync(f.fileno())

    def read_part(self, start: int, rows: int, feature_size: int, dtype: str) -> tuple[np.ndarray, list[str]] | None:
        try:
            with np.load(self.parts / f"{start:010d}.npz", allow_pickle=False) as part:
                features, errors = part["features"], part["errors"].tolist()
        except (OSError, ValueError, KeyError, EOFError):
            return None
        if features.shape != (rows, feature_size) or features.dtype != np.dtype(dtype) or len(errors) != rows:
            return None
        return features, errors

    def assemble(self, rows: list[Row], meta: dict) -> dict:
        """features.npy, index.csv and unreadable.csv from the parts, then meta.json marked complete and the
        parts removed: each file whole, meta.json last."""
        size, dtype = meta["feature_size"], meta["file_dtype"]
        failed = []  # the errors first (small), so that features.npy's size is known; then one part at a time
        for start in self.starts(len(rows)):
            with np.load(self.parts / f"{start:010d}.npz", allow_pickle=False) as part:
                failed += [(rows[start + i], e) for i, e in enumerate(part["errors"].tolist()) if e]
        count = len(rows) - len(failed)
        with replacing(self.path / "features.npy", self.path / f".features.npy.{os.getpid()}.tmp") as temporary:
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=(count, size))
            at = 0
            for start in self.starts(len(rows)):
                features, errors = self.read_part(start, min(self.chunk, len(rows) - start), size, dtype)
                ok = np.array([not e for e in errors], dtype=bool)
                out[at:at + ok.sum()] = features[ok]
                at += int(ok.sum())
            out.flush()
            del out
        unread = {r for r, _ in failed}
        good = [row for row in rows if row not in unread]
        self._write_csv("index.csv", ("path", "label"), [(r.path, r.label) for r in good])
        if failed:
            self._write_csv("unreadable.csv", ("path", "error"), [(r.path, e) for r, e in failed])
        else:
            (self.path / "unreadable.csv").unlink(missing_ok=True)
        meta = {**meta, "complete": True, "rows": count, "unreadable": len(failed)}
        self._write_text("meta.json", json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(self.parts, ignore_errors=True)
        return meta

    def _write_csv(self, name: str, header: tuple[str, ...], lines: list[tuple]) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(lines)
        self._write_text(name, text.getvalue())

    def _write_text(self, name: str, text: str) -> None:
        with replacing(self.path / name, self.path / f".{name}.{os.getpid()}.tmp") as temporary:
            temporary.write_text(text, encoding="utf-8")


def read_meta(path: Path) -> dict | None:
    """``path``/meta.json, or None where there is none."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FeaturesError(f"{path}/meta.json cannot be read ({e}): delete the folder to start again") from None
    if not isinstance(meta, dict):
        raise FeaturesError(f"{path}/meta.json is not a features folder's: delete the folder to start again")
    return meta


@dataclass
class Features:
    """A complete features folder, read: the rows (float32, in memory), their paths and labels, its meta."""
    path: Path
    meta: dict
    features: np.ndarray
    paths: list[str]
    labels: list[str]


def read(path: Path, what: str) -> Features:
    """The features folder ``path`` (``what`` names it in errors: "TRAIN_FEATS"), checked: complete, rows
    and index agreeing, every value finite."""
    def refuse(fault: str) -> FeaturesError:
        return FeaturesError(f"{what} {path}: {fault}")

    if not path.is_dir():
        raise refuse("no such folder: give the --output of python -m utils.embed")
    meta = read_meta(path)
    if meta is None or not meta.get("complete"):
        raise refuse("not a complete features folder (no meta.json saying complete): run python -m utils.embed "
                     "into it again to finish it")
    try:
        features = np.load(path / "features.npy", allow_pickle=False)  # in memory: the file stays untied
        with open(path / "index.csv", newline="", encoding="utf-8") as f:
            index = list(csv.reader(f))
    except (OSError, ValueError) as e:
        raise refuse(f"features.npy or index.csv cannot be read ({e}): embed again into a new folder") from None
    if features.ndim != 2 or features.shape != (meta.get("rows"), meta.get("feature_size")):
        raise refuse(f"features.npy holds {features.shape}, meta.json says ({meta.get('rows')}, "
                     f"{meta.get('feature_size')}): the file is damaged; embed again into a new folder")
    if not index or index[0] != ["path", "label"] or len(index) - 1 != len(features):
        raise refuse(f"index.csv does not list the {len(features)} rows: embed again into a new folder")
    if len(features) == 0:
        raise refuse("no rows: every image was unreadable (see its unreadable.csv)")
    rows = features.astype(np.float32, copy=False)
    if not np.isfinite(rows).all():
        bad = int((~np.isfinite(rows)).any(axis=1).sum())
        raise refuse(f"{bad} row(s) hold NaN or infinity: embed again (a --dtype without native support, or "
                     "damaged weights?)")
    return Features(path, meta, rows, [r[0] for r in index[1:]], [r[1] for r in index[1:]])
