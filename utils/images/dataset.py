"""Image files as a torch Dataset, for the commands that classify or evaluate them in batches."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from utils.images.decode import ImageError


class ImageFiles(Dataset):
    """Image files as (index, preprocessed tensor, error). With ``strict=False`` a file that cannot be
    read gives a zero tensor and its error message, so that one bad file does not stop the others."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[..., Tensor], strict: bool = True):
        self.paths, self.preprocess, self.strict = list(paths), preprocess, strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor, str]:
        try:
            return index, self.preprocess(self.paths[index]), ""
        except ImageError as e:
            if self.strict:
                raise
            size = self.preprocess.crop_size
            return index, torch.zeros(3, size, size), str(e)


def batches(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
