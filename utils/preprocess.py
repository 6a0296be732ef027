"""The evaluation transform the published accuracies were measured with.

Step for step torchvision's ``Resize(256, bilinear)``, ``CenterCrop(224)``, ``ToTensor()`` and
``Normalize(mean, std)`` on a PIL image, without torchvision. Pillow is imported on first use, so
loading a model needs nothing but torch.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor


class Preprocess:
    """Image (PIL image or file path) -> normalised float tensor of shape (3, crop_size, crop_size)."""

    def __init__(self, resize_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear"):
        if interpolation != "bilinear":
            raise ValueError(f"only bilinear interpolation is supported, got {interpolation!r}")
        self.resize_size, self.crop_size = resize_size, crop_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation

    @classmethod
    def from_config(cls, cfg: dict) -> Preprocess:
        """The transform a model's ``pretrained_cfg`` describes."""
        return cls(cfg["resize_size"], cfg["input_size"][-1], cfg["mean"], cfg["std"], cfg["interpolation"])

    def __call__(self, image) -> Tensor:
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as f:
                image = f.convert("RGB")
        elif not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a file path, got {type(image).__name__}")
        elif image.mode != "RGB":
            image = image.convert("RGB")

        # Resize the shorter side, keeping the aspect ratio as torchvision rounds it.
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.resize_size * long / short)
        size = (self.resize_size, new_long) if w <= h else (new_long, self.resize_size)
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
        w, h = image.size
        top, left = int(round((h - self.crop_size) / 2.0)), int(round((w - self.crop_size) / 2.0))
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))

        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = pixels.view(self.crop_size, self.crop_size, 3).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return (f"Preprocess(resize_size={self.resize_size}, crop_size={self.crop_size}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")
