"""The evaluation transform the published accuracies were measured with.

Step for step torchvision's ``Resize(256, bilinear)``, ``CenterCrop(224)``, ``ToTensor()`` and
``Normalize(mean, std)`` on a PIL image, without torchvision. Pillow and NumPy are imported on first
use, so loading a model needs nothing but torch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from utils.pickling import Portable

# Beyond this aspect ratio (a 1x5000 strip, say) resizing the whole image would allocate gigabytes:
# only the crop is resampled then, which can differ from resize-then-crop by one grey level.
MAX_ASPECT = 64


class Preprocess(metaclass=Portable):
    """Image -> normalised float tensor of shape (3, crop_size, crop_size).

    The image may be a file path, a PIL image, an HxWx3 uint8 NumPy array or a CHW uint8 or float
    (0-1) tensor; see ``utils.images.decode.open_rgb``. Inputs that are not usable images raise
    ``utils.images.decode.ImageError``.
    """

    def __init__(self, resize_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear"):
        if interpolation != "bilinear":
            raise ValueError(f"only bilinear interpolation is supported, got {interpolation!r}")
        self.resize_size, self.crop_size = resize_size, crop_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation
        self._mean = torch.tensor(self.mean).view(3, 1, 1)  # made once, not per image
        self._std = torch.tensor(self.std).view(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: dict) -> Preprocess:
        """The transform a model's ``pretrained_cfg`` describes."""
        return cls(cfg["resize_size"], cfg["input_size"][-1], cfg["mean"], cfg["std"], cfg["interpolation"])

    def __call__(self, image) -> Tensor:
        from PIL import Image

        from utils.images.decode import open_rgb

        image = open_rgb(image)
        # Resize the shorter side, keeping the aspect ratio as torchvision rounds it, then centre-crop.
        w, h = image.size
        new_long = int(self.resize_size * max(w, h) / min(w, h))
        size = (self.resize_size, new_long) if w <= h else (new_long, self.resize_size)
        top = int(round((size[1] - self.crop_size) / 2.0))
        left = int(round((size[0] - self.crop_size) / 2.0))
        crop = (left, top, left + self.crop_size, top + self.crop_size)
        if new_long > MAX_ASPECT * self.resize_size:
            sx, sy = w / size[0], h / size[1]
            image = image.resize((self.crop_size, self.crop_size), Image.BILINEAR,
                                 box=(crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy))
        else:
            if size != image.size:
                image = image.resize(size, Image.BILINEAR)
            image = image.crop(crop)

        return self.to_tensor(image)

    def to_tensor(self, image) -> Tensor:
        """An RGB PIL image of any size as a normalised float tensor (3, H, W), without resizing."""
        import numpy as np

        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        return x.sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return (f"Preprocess(resize_size={self.resize_size}, crop_size={self.crop_size}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")
