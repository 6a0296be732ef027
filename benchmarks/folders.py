"""What the benchmark scripts share: labelled images written as the class folders the commands read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_split(images: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray], root: Path,
               size: int) -> list[Path]:
    """uint8 images (N, H, W) as ROOT/<split>/<label>/<i>.png, upscaled bilinear to ``size`` and RGB, for
    each split's indices; the split folders."""
    for split, chosen in splits.items():
        for i in chosen:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")
    return [root / split for split in splits]
