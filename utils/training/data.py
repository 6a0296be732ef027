"""The training images: class folders, the validation split, a check that every image opens, and the
Dataset that gives each sample its own random numbers."""
from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
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


class Images(Dataset):
    """(image, label) pairs. With a ``seed``, the transform gets a generator seeded by (seed, epoch,
    index): each sample's augmentation is the same whichever process or DataLoader worker makes it."""

    def __init__(self, samples: list[tuple[Path, int]], transform, seed: int | None = None):
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        if self.seed is None:
            return self.transform(path), label
        key = hashlib.blake2b(f"{self.seed} {self.epoch} {index}".encode(), digest_size=7).digest()
        return self.transform(path, torch.Generator().manual_seed(int.from_bytes(key, "little"))), label
