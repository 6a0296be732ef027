"""The training images: class folders, the validation split, and a check that every image opens."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from tqdm import tqdm

from models.finetuned import class_name_ok
from utils.images.decode import IMAGE_SUFFIXES
from utils.images.files import class_dirs
from utils.text import first
from utils.training import FinetuneError

# Images this small (median pixels) decode faster in the main process than through worker processes.
SMALL_IMAGE = 128 * 128


def class_folders(root: Path, what: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """The sorted class names under ``root`` and every (image, class index); a progress bar after a second."""
    if not root.exists():
        raise FinetuneError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise FinetuneError(f"{what} {root} is not a directory: give a folder with one subfolder of images per class")
    folders = class_dirs(root)
    if not folders:
        raise FinetuneError(f"{what} {root} has no class folders: lay the images out as {root}/<class name>/<image>")
    bad = [d.name for d in folders if not class_name_ok(d.name)]
    if bad:  # its name would break classes.txt and the commands' output lines
        raise FinetuneError(f"{what} {root}: the class folder {bad[0]!r} has control characters or surrounding "
                            "spaces in its name: rename it")
    samples, empty = [], []
    for label, folder in enumerate(tqdm(folders, desc=f"scanning {root}", unit="class", delay=1, file=sys.stderr,
                                        leave=False)):
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        samples += [(p, label) for p in images]
        if not images:
            empty.append(folder.name)
    if empty:
        raise FinetuneError(f"{what} {root}: {len(empty)} class folder(s) have no images "
                            f"({first(empty)}); "
                            f"add images ({', '.join(IMAGE_SUFFIXES)}) or remove the folder(s)")
    return [d.name for d in folders], samples


def split(samples: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of each class (at least one image), the same images for the same seed."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        mine = by_class[label]
        rng.shuffle(mine)
        n = max(1, round(len(mine) * fraction))
        if n >= len(mine):
            raise FinetuneError(f"class {mine[0][0].parent.name!r} has {len(mine)} image(s): too few to hold out "
                                f"--val-fraction {fraction} for validation; add images or pass --val VAL_DIR")
        val += mine[:n]
        train += mine[n:]
    return sorted(train), sorted(val)


def check_readable(samples: list[tuple[Path, int]]) -> list[int]:
    """Open every image's header before training, so that a bad file stops the run now, not hours in;
    the images' pixel counts."""
    from PIL import Image

    bad, areas = [], []
    for path, _ in tqdm(samples, desc="checking the images", unit="image", delay=1, file=sys.stderr, leave=False):
        try:
            with Image.open(path) as f:
                areas.append(f.width * f.height)
                f.verify()
        except Exception as e:  # noqa: BLE001  (PIL raises many types for damaged files)
            bad.append(f"{path} ({type(e).__name__})")
    if bad:
        raise FinetuneError(f"{len(bad)} unreadable image(s), the run stops: {first(bad, sep='; ')}. "
                            "Remove or replace them and run again")
    return areas


def auto_workers(areas: list[int]) -> int:
    """Small images decode faster in the main process than through worker processes."""
    return 0 if sorted(areas)[len(areas) // 2] <= SMALL_IMAGE else min(8, os.cpu_count() or 1)
