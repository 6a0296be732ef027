"""Any image input as an RGB PIL image: a file path, a PIL image, a NumPy array or a tensor.

Every input that is not a usable image raises ``ImageError``, with the file or the input named:
unreadable, truncated or empty files, files that are not images, decompression bombs, arrays of the
wrong shape. Photos are turned upright by their EXIF orientation; transparency is composited onto
white; 16-bit and CMYK images are converted to ordinary 8-bit RGB.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

# Images with more pixels than PIL's limit (Image.MAX_IMAGE_PIXELS, about 89 million) are refused
# before they are decoded; raise that limit to read larger images you trust.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageError(ValueError):
    """The input is not an image that can be used; the message names it and says why."""


def open_rgb(image) -> Image.Image:
    """``image`` (path, PIL image, HxWx3 uint8 array, or CHW uint8 or float tensor) as an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return read(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, "an array")
    raise ImageError(f"expected an image file path, PIL image, NumPy array or tensor, got {type(image).__name__}")


def read(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path``, upright and in RGB."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ImageError(f"{path}: not a regular file (a named pipe or a device?)")  # reading one could block
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                return to_rgb(ImageOps.exif_transpose(f))
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such file") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e}); if you trust the file, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS") from e
    except Exception as e:  # PIL raises many types for damaged files; the caller needs only one
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB: 16/32-bit and float converted to 8 bits, transparency composited onto white."""
    if image.mode.startswith(("I", "F")):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    image.load()
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as 8-bit "L" by a fixed rule, never by the image's own range:
    integers are 16-bit samples (divided by 257, so 65535 is 255), floats are in [0, 1]."""
    if image.mode == "F":
        return image.point(lambda v: v * 255 + 0.5).convert("L")  # convert() truncates and clips to 0..255
    width, height = image.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, (1 << 16) // max(1, width))  # a strip at a time: memory stays near the 8-bit image's
    for top in range(0, height, rows):
        strip = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.int64)
        np.clip(strip, 0, 65535, out=strip)  # I;16 is uint16 already; I may hold any int32
        out[top:top + rows] = (strip + 128) // 257  # v / 257, rounded
    return Image.fromarray(out)


def _from_array(array: np.ndarray, what: str) -> Image.Image:
    shape = array.shape
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))):
        raise ImageError(f"expected {what} of shape HxW or HxWx3 (or x1, x4) and dtype uint8, "
                         f"got shape {shape} and dtype {array.dtype}")
    if 0 in shape[:2]:
        raise ImageError(f"the image is empty: shape {shape}")
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))  # L, RGB or RGBA by its shape


def _from_tensor(tensor: torch.Tensor) -> Image.Image:
    """A CHW (or HW) tensor, uint8 or float in [0, 1], as an RGB image."""
    if tensor.ndim not in (2, 3) or (tensor.ndim == 3 and tensor.shape[0] not in (1, 3, 4)):
        raise ImageError(f"expected an image tensor of shape CxHxW with 1, 3 or 4 channels (or HxW), "
                         f"got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        if not torch.isfinite(tensor).all():
            raise ImageError("the image tensor holds NaN or infinite values")
        tensor = (tensor.clamp(0, 1) * 255).round().to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise ImageError(f"expected a uint8 or floating-point image tensor, got {tensor.dtype}")
    array = tensor.numpy() if tensor.ndim == 2 else tensor.permute(1, 2, 0).numpy()
    return _from_array(array, "a tensor")
