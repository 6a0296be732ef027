"""INT8 on the CPU: the model's ONNX export quantized after training, from calibration images.

Weights become int8 per output channel and activations 8-bit per tensor, the form that VNNI's
instructions multiply fastest; the activations' ranges are read off calibration images run through
the model. OpenVINO's model is quantized by NNCF (grouped convolutions left in float, computed in
bfloat16 where the CPU has it), ONNX Runtime's by its own ``quantize_static`` (QDQ, min-max ranges).
Both start from the folded ONNX export that the float runtimes run (backends.py), and both take and
return float32.

How far INT8 departs from float32 is measured, not assumed: from 10 calibration images up, every
fifth is kept out of calibration and compared between the two (``Fidelity``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from utils.images.files import find_images
from utils.images.tensors import MIN_SIZE
from utils.inference import runtimes
from utils.inference.compare import relative_error
from utils.pickling import Portable

INT8 = "int8"  # dtype="int8" in optimize_for_inference: quantized to INT8, float32 in and out
MAX_IMAGES = 300  # NNCF's default subset: more images add minutes, not accuracy
HOLD_OUT = 5  # every fifth image measures fidelity instead of calibrating, from 2 * HOLD_OUT images up
MISSING = ("dtype='int8' needs calibration=: 50 to 300 images like those the model will see, as a folder, "
           "image paths or a preprocessed (N, 3, H, W) tensor")


@dataclass(frozen=True)
class Fidelity(metaclass=Portable):
    """INT8 against float32 on ``images`` images: kept out of calibration (``held_out``), or, with fewer
    than 10, the calibration images themselves."""
    images: int
    held_out: bool
    top1_agreement: float | None  # % of images whose top class is float32's; None for feature outputs
    max_error: float  # largest output difference, relative to the largest float32 output

    def __str__(self) -> str:
        agreement = "" if self.top1_agreement is None else f"top-1 agrees on {self.top1_agreement:.1f}%, "
        where = "held out of calibration" if self.held_out else "the calibration images themselves"
        return f"{agreement}largest relative error {self.max_error:.1e} ({self.images} images, {where})"


def calibration_images(calibration, model: nn.Module) -> Tensor:
    """``calibration`` as a float32 batch on the CPU: a preprocessed (N, 3, H, W) tensor as it is, or a
    folder, an image file or a list of them preprocessed by ``model.preprocess``. At most MAX_IMAGES,
    spread evenly over them."""
    if calibration is None:
        raise ValueError(MISSING)
    if isinstance(calibration, Tensor):
        if not calibration.is_floating_point() or calibration.dim() != 4 or calibration.shape[1] != 3:
            raise ValueError(f"calibration: expected preprocessed images, a float tensor (N, 3, H, W), got "
                             f"{calibration.dtype} of shape {tuple(calibration.shape)}")
        images = calibration.detach().to("cpu", torch.float32)
        images = images[_evenly(len(images))]
    elif isinstance(calibration, (bytes, bytearray)):
        raise TypeError(f"calibration: expected a folder, image paths or a preprocessed tensor, got "
                        f"{type(calibration).__name__}")
    else:
        names = [calibration] if isinstance(calibration, (str, os.PathLike)) else list(calibration)
        if not all(isinstance(n, (str, os.PathLike)) for n in names):
            raise TypeError("calibration: expected a folder, image paths or a preprocessed tensor, got "
                            + ", ".join(sorted({type(n).__name__ for n in names})))
        paths, problems = find_images([os.fspath(n) for n in names])
        if problems:
            raise ValueError(f"calibration: {problems[0][0]}: {problems[0][1]}")
        preprocess = getattr(model, "preprocess", None)
        if preprocess is None:
            raise ValueError("calibration: this model has no preprocess to read image files with: "
                             "pass a preprocessed (N, 3, H, W) tensor")
        if not paths:
            raise ValueError(MISSING.replace("needs", "got no images for"))
        images = torch.stack([preprocess(paths[i]) for i in _evenly(len(paths))])  # ImageError names a bad file
    if len(images) == 0:
        raise ValueError(MISSING.replace("needs", "got no images for"))
    if min(images.shape[2:]) < MIN_SIZE:
        raise ValueError(f"calibration: images of {images.shape[2]}x{images.shape[3]} pixels; the network takes "
                         f"{MIN_SIZE} and up: give images of the size the model will see")
    if not torch.isfinite(images).all():
        raise ValueError("calibration: the images hold NaN or infinite values, which have no INT8 range")
    return images


def _evenly(n: int) -> list[int]:
    return list(range(n)) if n <= MAX_IMAGES else [i * n // MAX_IMAGES for i in range(MAX_IMAGES)]


def split(images: Tensor) -> tuple[Tensor, Tensor | None]:
    """(calibration, held out): every HOLD_OUT-th image held out, from 2 * HOLD_OUT images up."""
    if len(images) < 2 * HOLD_OUT:
        return images, None
    held = torch.arange(len(images)) % HOLD_OUT == HOLD_OUT - 1
    return images[~held], images[held]


def digest(images: Tensor) -> str:
    return hashlib.blake2b(images.contiguous().numpy().tobytes() + str(tuple(images.shape)).encode(),
                           digest_size=16).hexdigest()


def quantize(onnx: bytes, backend: str, images: Tensor) -> bytes | tuple[bytes, bytes]:
    """``onnx`` quantized for ``backend`` with ranges from ``images``: OpenVINO's IR (XML, weights) for
    OpenVINO, QDQ ONNX bytes for ONNX Runtime."""
    runtimes.require(backend, int8=True)
    samples = [images[i:i + 1].numpy() for i in range(len(images))]
    if backend == "openvino":
        import nncf
        import openvino
        import openvino.passes

        nncf.set_log_level(logging.ERROR)
        model = runtimes.openvino_core().read_model(onnx)
        # Folded first: the ONNX reader leaves each convolution's bias as an addition of a reshape computed
        # at run time, which NNCF does not see as the convolution's bias and quantizes on its own, costing
        # a model fine-tuned on digits 13 points of top-1 (0.3 once folded).
        passes = openvino.passes.Manager()
        passes.register_pass(openvino.passes.ConstantFolding())
        passes.run_passes(model)
        # Grouped convolutions (ResNeXt's) stay in float: with 4-32 channels a group, their INT8 kernels gain
        # little, and keeping them made INT8 ResNeXt-50 about 10% faster and closer to float32.
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bar: stdout stays the command's output
            model = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples),
                                  ignored_scope=nncf.IgnoredScope(types=["GroupConvolution"], validate=False))
        return _ir(model)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(samples)

        def get_next(self):
            sample = next(self.samples, None)
            return None if sample is None else {"image": sample}

    with tempfile.TemporaryDirectory(prefix="int8-") as folder:
        source, target = os.path.join(folder, "float.onnx"), os.path.join(folder, "int8.onnx")
        with open(source, "wb") as f:
            f.write(onnx)
        # Unsigned activations with signed weights (U8S8): ONNX Runtime's fast VNNI kernels; its default,
        # signed activations, ran 3 times slower on an AVX-512 VNNI CPU.
        with _without_advice():
            quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        with open(target, "rb") as f:
            return f.read()


def _ir(model) -> tuple[bytes, bytes]:
    """An openvino.Model as IR bytes (XML, weights): what each runner compiles its own copy from, and what
    a pickled model carries."""
    import openvino

    with tempfile.TemporaryDirectory(prefix="int8-") as folder:
        xml = os.path.join(folder, "model.xml")
        openvino.save_model(model, xml, compress_to_fp16=False)
        with open(xml, "rb") as f, open(os.path.join(folder, "model.bin"), "rb") as weights:
            return f.read(), weights.read()


@contextlib.contextmanager
def _without_advice():
    """quantize_static advises, through the root logger, a pre-processing step that shape inference makes
    unnecessary for these models: a warning the user can do nothing about."""
    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def fidelity(expected: Tensor | list[Tensor], got: Tensor | list[Tensor], held_out: bool) -> Fidelity:
    """How far ``got`` (INT8) is from ``expected`` (float32), over the same images."""
    expected, got = ([o] if isinstance(o, Tensor) else list(o) for o in (expected, got))
    error = relative_error(got, expected)
    logits = len(expected) == 1 and expected[0].dim() == 2 and expected[0].shape[1] > 1
    agreement = (100 * float((got[0].argmax(1) == expected[0].argmax(1)).float().mean()) if logits else None)
    return Fidelity(len(expected[0]), held_out, agreement, error)
