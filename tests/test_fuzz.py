"""Fuzzing the image input: whatever comes in, the result is an RGB image or an ImageError, nothing else.

Bounded: a fixed number of examples each, no deadline per example, no example database on disk.
"""
import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from models.registry import WEIGHTS
from utils.images.decode import ImageError, open_rgb
from utils.images.preprocess import Preprocess

from .test_images import SAMPLES

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
PREPROCESS = Preprocess.from_config(WEIGHTS["resnet50_swsl"].config())


def small_file_of_each_format() -> list[bytes]:
    image = Image.open(SAMPLES / "chelsea.png").convert("RGB").resize((48, 32))
    files = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files.append(buffer.getvalue())
    return files


FILES = small_file_of_each_format()


def outcome(image) -> str:
    """Open and preprocess ``image``: "ok" with a well-formed result, "refused" with an ImageError;
    any other exception fails the test."""
    try:
        rgb = open_rgb(image)
    except ImageError:
        return "refused"
    assert rgb.mode == "RGB" and min(rgb.size) >= 1
    x = PREPROCESS(rgb)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()
    return "ok"


@pytest.mark.filterwarnings("ignore::UserWarning")  # damaged on purpose: PIL warns of the tags it skips
@FUZZ
@given(original=st.sampled_from(FILES), data=st.data())
def test_damaged_image_files(tmp_path_factory, original, data):
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        position = data.draw(st.integers(0, len(damaged) - 1), label="position")
        damaged[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(damaged)), label="truncate at")
    path = tmp_path_factory.mktemp("fuzz") / "damaged.img"
    path.write_bytes(bytes(damaged[:cut]))
    outcome(path)


@FUZZ
@given(content=st.binary(max_size=2048))
def test_arbitrary_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "bytes.jpg"
    path.write_bytes(content)
    outcome(path)


SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
DTYPES = st.sampled_from([np.uint8, np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64,
                          np.bool_, np.complex64])


@FUZZ
@given(array=hnp.arrays(DTYPES, SHAPES))
def test_arrays_of_any_shape_and_dtype(array):
    outcome(array)


@FUZZ
@given(array=hnp.arrays(DTYPES, SHAPES), channels_first=st.booleans())
def test_tensors_of_any_shape_and_dtype(array, channels_first):
    tensor = torch.from_numpy(array.astype(np.float32) if array.dtype == np.float16 else array)
    outcome(tensor.movedim(-1, 0) if channels_first and tensor.dim() else tensor)


@FUZZ
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20), st.lists(st.integers()),
                       st.binary(max_size=20), st.dictionaries(st.text(max_size=3), st.integers())))
def test_other_python_values(tmp_path_factory, value):
    if isinstance(value, str):  # a string is a path: keep it inside an empty directory
        value = str(tmp_path_factory.mktemp("fuzz") / (value.replace("/", "_").replace("\0", "_") or "empty"))
    assert outcome(value) == "refused"
