"""The training augmentation: random resized crops and flips, flips alone, or none."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from utils.images.decode import read
from utils.images.preprocess import Preprocess

AUGMENTATIONS = {"crop": "random resized crops and flips", "flip": "the evaluation transform and flips",
                 "none": "the evaluation transform alone"}
# Below this size a random crop loses what small images show: flips alone do better (benchmarks/finetune.py).
CROP_FROM = 128


class Augment:
    """Training images: with "crop", a random crop of ``scale`` (a share of the area, 3/4-4/3 aspect),
    resized to the evaluation size and flipped left-right half the time; with "flip", the evaluation
    transform and flips; with "none", the evaluation transform. The random numbers come from the
    generator the caller passes: ``Images`` makes one per sample, so nothing depends on --workers."""

    def __init__(self, policy: str, preprocess: Preprocess, scale: float, ratio=(3 / 4, 4 / 3)):
        self.policy, self.preprocess, self.size = policy, preprocess, preprocess.crop_size
        self.scale, self.log_ratio = (scale, 1.0), (math.log(ratio[0]), math.log(ratio[1]))

    def box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=generator))
            aspect = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0])
                              * torch.rand((), generator=generator))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                return left, top, left + w, top + h
        side = min(width, height)  # the centre square, as torchvision falls back
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2

    def __call__(self, path: Path, generator: torch.Generator | None = None) -> Tensor:
        from PIL import Image

        if self.policy != "crop":
            x = self.preprocess(path)
            return x.flip(-1) if self.policy == "flip" and torch.rand((), generator=generator) < 0.5 else x
        image = read(path)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=self.box(*image.size, generator))
        if torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self.preprocess.to_tensor(image)
