"""Image files as a torch Dataset: the one every command batches images with (classify, evaluate,
fine-tuning's training and validation)."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from utils.images.decode import ImageError


class ImageFiles(Dataset):
    """Image files as (index, transformed tensor, label, error); the label is -1 without ``labels``.

    With ``strict=False`` a file that cannot be read gives a zero tensor and its error message, so that one
    bad file does not stop the others. With a ``seed``, the transform also gets a generator seeded by
    (seed, epoch, index): each sample's augmentation is the same whichever process or worker makes it."""

    def __init__(self, paths: Sequence[Path], transform: Callable[..., Tensor], labels: Sequence[int] | None = None,
                 *, strict: bool = True, seed: int | None = None):
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(labels)} labels")
        self.paths, self.transform, self.strict, self.seed, self.epoch = list(paths), transform, strict, seed, 0
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)

    @classmethod
    def labelled(cls, samples: Sequence[tuple[Path, int]], transform, **options) -> ImageFiles:
        """From (file, label) pairs, as the class-folder scans give them."""
        return cls([path for path, _ in samples], transform, [label for _, label in samples], **options)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor, int, str]:
        label = self.labels[index]
        try:
            return index, self._transform(index), label, ""
        except ImageError as e:
            if self.strict:
                raise
            size = self.transform.crop_size
            return index, torch.zeros(3, size, size), label, str(e)

    def _transform(self, index: int) -> Tensor:
        if self.seed is None:
            return self.transform(self.paths[index])
        key = hashlib.blake2b(f"{self.seed} {self.epoch} {index}".encode(), digest_size=7).digest()
        return self.transform(self.paths[index], torch.Generator().manual_seed(int.from_bytes(key, "little")))


def batches(dataset: Dataset, batch_size: int, workers: int, device: torch.device, **options) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda", **options)
