"""Image input: every kind of input and PIL mode, malformed files, and the exact evaluation recipe."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from models import create_model
from utils.images.decode import ImageError, open_rgb, read

from .conftest import REPO

SAMPLES = Path(__file__).resolve().parents[1] / "utils" / "samples"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def reference(image: Image.Image) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize, written out in NumPy."""
    w, h = image.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    pixels = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32)
    top, left = int(round((size[1] - 224) / 2.0)), int(round((size[0] - 224) / 2.0))
    crop = pixels[top:top + 224, left:left + 224].transpose(2, 0, 1) / np.float32(255)
    return (crop - MEAN[:, None, None].astype(np.float32)) / STD[:, None, None].astype(np.float32)


def noise(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def preprocess():
    return create_model("resnet18_ssl", pretrained=False).preprocess


@pytest.mark.parametrize("name", ["chelsea.png", "rocket.jpg"])
def test_real_photos_equal_the_recipe(preprocess, name):
    image = Image.open(SAMPLES / name)
    np.testing.assert_allclose(preprocess(SAMPLES / name).numpy(), reference(image), rtol=0, atol=1e-6)
    np.testing.assert_allclose(preprocess(image).numpy(), reference(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (224, 224), (255, 257), (333, 500), (500, 333), (4000, 63), (63, 4000),
                                  (500, 375), (375, 500), (256, 256), (224, 300), (1000, 257), (97, 61)])
def test_synthetic_sizes_equal_the_recipe(preprocess, size):
    image = noise(*size)
    np.testing.assert_allclose(preprocess(image).numpy(), reference(image), rtol=0, atol=1e-6)


def test_grey_image_file(preprocess, tmp_path):
    image = noise(320, 240).convert("L")
    image.save(tmp_path / "grey.png")
    x = preprocess(tmp_path / "grey.png")
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(x.numpy(), reference(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 200), (200, 1)])  # beyond MAX_ASPECT: only the crop is resampled
def test_extreme_strips_stay_within_one_grey_level_without_the_huge_resize(preprocess, size):
    from utils.images.preprocess import MAX_ASPECT
    assert max(size) / min(size) > MAX_ASPECT
    image = noise(*size)
    x = preprocess(image)
    assert x.shape == (3, 224, 224)
    one_level = 1 / 255 / STD.min() + 1e-6
    np.testing.assert_allclose(x.numpy(), reference(image), rtol=0, atol=one_level)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK", "1", "P", "YCbCr"])
def test_opaque_modes_become_rgb_as_pil_converts_them(preprocess, mode):
    image = noise(300, 200).convert(mode)
    np.testing.assert_allclose(preprocess(image).numpy(), reference(image.convert("RGB")), rtol=0, atol=1e-6)


def test_transparency_is_composited_onto_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgb = open_rgb(rgba)
    assert rgb.getpixel((0, 0)) == (10, 20, 30) and rgb.getpixel((3, 3)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (127, 127, 127)
    assert open_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_palette_png_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    path = save(image, tmp_path / "palette.png", transparency=0)
    rgb = read(path)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((5, 5)) == (200, 10, 10)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    grey = np.asarray(read(path))[:, :, 0]
    np.testing.assert_array_equal(grey, np.rint(values / 257).astype(np.uint8))  # 65535 -> 255, as 8 bits


def test_16_bit_grey_follows_a_fixed_rule_not_the_images_own_range(tmp_path):
    flat = np.full((40, 40), 200 * 257, np.uint16)  # grey 200 in 16 bits
    spiked = flat.copy()
    spiked[0, 0] = 65535
    dim = np.full((40, 40), 200, np.uint16)  # a nearly black 16-bit image stays nearly black
    grey = [np.asarray(read(save(Image.fromarray(a), tmp_path / f"{i}.png")))[5, 5] for i, a in
            enumerate((flat, spiked, dim))]
    assert [tuple(g) for g in grey] == [(200, 200, 200), (200, 200, 200), (1, 1, 1)]


PEAK_OF_TO_RGB = """
import sys
from PIL import Image
from utils.images.decode import to_rgb

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

image = Image.open(sys.argv[1])
image.load()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far forgotten: what follows is the conversion's own
start = peak_kib()
rgb = to_rgb(image)
print(peak_kib() - start)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's per-process peak reset")
def test_16_bit_conversion_needs_little_more_memory_than_the_8_bit_image(tmp_path):
    """The process's own peak memory (PIL's C allocations included, which tracemalloc cannot see) while a
    12-megapixel 16-bit PNG becomes 8-bit RGB: the 8-bit grey and RGB images (5 bytes a pixel, as PIL
    keeps RGB in 4) and little more (5.2 measured). Converting it whole, through 32-bit floats, took 8."""
    height, width = 3000, 4000
    values = ((np.arange(height)[:, None] * 7 + np.arange(width)[None, :] * 13) % 65536).astype(np.uint16)
    path = save(Image.fromarray(values), tmp_path / "big.png")
    done = subprocess.run([sys.executable, "-c", PEAK_OF_TO_RGB, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    per_pixel = int(done.stdout) * 1024 / (height * width)
    assert per_pixel < 6.5, f"{per_pixel:.1f} bytes a pixel"


def test_cmyk_jpeg(tmp_path):
    path = save(noise(64, 48).convert("CMYK"), tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    rgb = read(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(Image.open(path).convert("RGB")))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    path = save(noise(80, 40), tmp_path / "sideways.jpg", exif=exif, quality=95)
    upright = read(path)
    assert upright.size == (40, 80)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(ImageOps.exif_transpose(Image.open(path))))


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    noise(200, 150).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("empty.jpg", b"", "not a readable image"),
    ("truncated.jpg", jpeg_bytes()[:2000], "not a readable image"),
    ("text.jpg", b"this is not a picture\n", "not a readable image"),
])
def test_malformed_files_raise_image_error_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"{path}: {reason}"):
        read(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nowhere.png: no such file"):
        open_rgb(tmp_path / "nowhere.png")


@pytest.mark.parametrize("pixels", [12_000, 40_000])  # over PIL's limit, and over twice it
def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch, pixels):
    path = save(Image.new("L", (pixels // 100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageError, match="bomb.png: refused as a possible decompression bomb.*MAX_IMAGE_PIXELS"):
        read(path)


def test_arrays_and_tensors_give_the_same_result_as_the_image(preprocess):
    image = noise(320, 240)
    array = np.array(image)
    expected = preprocess(image)
    for same in (array, torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array).permute(2, 0, 1) / 255.0):
        torch.testing.assert_close(preprocess(same), expected, rtol=0, atol=1e-6)
    grey = np.asarray(image.convert("L"))
    torch.testing.assert_close(preprocess(grey), preprocess(image.convert("L")), rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 3), np.float32), "dtype uint8"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (torch.zeros(5, 3, 4), "1, 3 or 4 channels"),
    (torch.zeros(3, 4, 4, dtype=torch.int32), "uint8 or floating-point"),
    (torch.full((3, 4, 4), float("nan")), "NaN"),
    (torch.zeros(2, 3, 4, 4), "shape"),
    ({"not": "an image"}, "got dict"),
    ([1, 2, 3], "expected an image file path, PIL image, NumPy array or tensor, got list"),
])
def test_unusable_inputs(bad, match):
    with pytest.raises(ImageError, match=match):
        open_rgb(bad)
