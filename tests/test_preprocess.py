"""model.preprocess is the evaluation recipe: resize 256 (bilinear), centre-crop 224, normalise."""
import pytest
import torch
from PIL import Image

from models import create_model
from utils.images import ImageError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference(image: Image.Image) -> torch.Tensor:
    """The recipe computed another way: resize with PIL, then crop and normalise as tensor slicing."""
    w, h = image.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    resized = image.convert("RGB").resize(size, Image.BILINEAR)
    x = torch.tensor(list(resized.tobytes()), dtype=torch.float32).view(size[1], size[0], 3).permute(2, 0, 1)
    top, left = round((size[1] - 224) / 2), round((size[0] - 224) / 2)
    x = x[:, top:top + 224, left:left + 224] / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def photo(size, mode="RGB"):
    torch.manual_seed(sum(size))
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8)
    return Image.frombytes("RGB", size, bytes(pixels.flatten().tolist())).convert(mode)


@pytest.fixture(scope="module")
def preprocess():
    return create_model("resnet18_ssl", pretrained=False).preprocess


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (224, 300), (1000, 257), (97, 61)])
def test_equals_the_recipe(preprocess, size):
    torch.testing.assert_close(preprocess(photo(size)), reference(photo(size)), rtol=1e-6, atol=1e-6)


def test_file_path_and_grey_image(preprocess, tmp_path):
    image = photo((320, 240), "L")
    image.save(tmp_path / "grey.png")
    x = preprocess(tmp_path / "grey.png")
    torch.testing.assert_close(x, reference(image), rtol=1e-6, atol=1e-6)
    assert x.shape == (3, 224, 224)


def test_unsupported_input(preprocess):
    with pytest.raises(ImageError, match="expected an image file path, PIL image, NumPy array or tensor, got list"):
        preprocess([1, 2, 3])
