"""Export a model to TorchScript, torch.export or ONNX, and check the file against the eager model.

The format follows the file's suffix: ``.pt`` (TorchScript, for C++ and torch.jit.load), ``.pt2``
(torch.export, for torch.export.load and AOTInductor) or ``.onnx`` (ONNX, for onnxruntime, TensorRT,
OpenVINO). Batch size, height and width stay free in the exported graph. Each file carries the model's
license and ``pretrained_cfg`` (classes, transform) as string metadata: ONNX ``metadata_props``, and the
extra files of TorchScript and torch.export (``torch.jit.load(path, _extra_files=...)``). ``onnx_program``
is also the export that the ONNX Runtime and OpenVINO backends run (utils/inference/backends.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from utils.images.samples import sample_photos
from utils.inference.compare import relative_error
from utils.replace import replacing

FORMATS = {".pt": "torchscript", ".pt2": "torch.export", ".onnx": "onnx"}
TOLERANCE = 1e-4  # largest output difference, relative to the largest output


class ExportError(RuntimeError):
    """An export failed, or the exported file does not reproduce the model."""


def metadata(model: nn.Module) -> dict[str, str]:
    """What an exported file carries of ``model.pretrained_cfg``: the license, entry and paper, and the whole
    of it as JSON, for the tools that read the file (class names, mean and std, input size)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    carried = {key: str(cfg[key]) for key in ("license", "entry", "paper") if cfg.get(key)}
    return {**carried, "pretrained_cfg": json.dumps(cfg, default=str)} if cfg else {}


def export(model: nn.Module, path: str | os.PathLike, verify: Callable[[Path], object] | None = None) -> Path:
    """Write ``model`` (in eval mode) to ``path`` in the format of its suffix, with its ``metadata``; see the
    module docstring. ``verify(written)``, if given, checks the written file before it takes ``path``'s
    place: where it raises, ``path`` stays as it was."""
    path = Path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise ValueError(f"{path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give a file name ending in {', '.join(FORMATS)}")
    model = model.eval()
    # Batch 2 and 64 pixels: the exporters specialise a dimension of 1, and a last stage of 1x1.
    example = torch.randn(2, 3, 64, 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside it and renamed: a failed export leaves whatever was at ``path`` as it was.
    with replacing(path, path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")) as partial, \
            torch.no_grad():
        carried = metadata(model)
        if kind == "torchscript":
            # Tracing records the ResNet's fixed sequence of operations; shapes stay symbolic.
            with _torchscript():
                torch.jit.save(torch.jit.trace(model, example, strict=False), partial, _extra_files=carried)
        elif kind == "torch.export":
            program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())
            torch.export.save(program, partial, extra_files=carried)
        else:
            _export_onnx(model, example, partial, carried)
        if verify is not None:
            try:
                verify(partial)
            except ExportError as e:  # named as the file it was to become
                kept = "was left as it was" if path.exists() else "was not written"
                raise ExportError(f"{str(e).replace(str(partial), str(path))}; {path} {kept}") from None
    return path


@contextlib.contextmanager
def _torchscript():
    # torch deprecates TorchScript in favour of torch.export (.pt2, offered too), but C++ LibTorch
    # and many deployments still load .pt files: asking for one is the user's choice, not news.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        yield


def _dynamic_shapes() -> dict:
    # Free wherever the graph allows: any batch, any height and width from 33 pixels.
    return {"x": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}


def _export_onnx(model: nn.Module, example: Tensor, path: Path, carried: dict[str, str]) -> None:
    program = onnx_program(model, example)
    program.model.metadata_props.update(carried)
    program.save(str(path), external_data=False)  # one file: every model here is under protobuf's 2 GiB


def onnx_program(model: nn.Module, example: Tensor | None = None):
    """``model`` (in eval mode) as an in-memory ONNX program with free batch size, height and width:
    ``.model_proto.SerializeToString()`` gives the bytes that onnxruntime and OpenVINO read."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from e
    backbone = getattr(model, "out_indices", None) is not None  # its outputs: the maps that feature_info lists
    outputs = [f["module"] for f in model.feature_info] if backbone else ["logits"]
    # The exporter warns on every call that torchvision's detection operators are not registered:
    # these models use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own exporter still uses a pytree API that torch deprecates: nothing for the user to do.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        return torch.onnx.export(model, (torch.randn(2, 3, 64, 64) if example is None else example,),
                                 dynamic_shapes=_dynamic_shapes(), input_names=["image"], output_names=outputs,
                                 verbose=False)


def load(path: str | os.PathLike):
    """A callable that runs the exported file: float32 NCHW tensor in, list of output tensors out."""
    path = Path(path)
    kind = FORMATS.get(path.suffix)
    if kind == "torchscript":
        with _torchscript():
            module = torch.jit.load(path)
        return lambda x: _as_list(module(x))
    if kind == "torch.export":
        module = torch.export.load(path).module()
        return lambda x: _as_list(module(x))
    if kind == "onnx":
        try:
            import onnxruntime
        except ImportError as e:
            raise ExportError("running an ONNX file needs onnxruntime: pip install onnxruntime") from e
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: [torch.from_numpy(y) for y in session.run(None, {name: x.detach().cpu().numpy()})]
    raise ValueError(f"{path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}")


def _as_list(out) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else list(out)


def check(model: nn.Module, path: str | os.PathLike, x: Tensor, tolerance: float = TOLERANCE) -> float:
    """Run ``x`` through the model and the exported file; return the largest difference relative to
    the largest output, and raise ExportError if it exceeds ``tolerance`` or the shapes differ."""
    with torch.no_grad():
        expected, got = _as_list(model.eval()(x)), load(path)(x)
    for what, outputs in (("the model's own", expected), ("the exported file's", got)):
        if not all(torch.isfinite(t).all() for t in outputs):
            raise ExportError(f"{path}: {what} outputs hold NaN or infinite values, so they cannot be compared: "
                              "check the weights")
    if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in expected]:
        raise ExportError(f"{path}: output shapes {[tuple(t.shape) for t in got]} differ from the model's "
                          f"{[tuple(t.shape) for t in expected]}")
    error = relative_error(got, expected)
    if error > tolerance:
        raise ExportError(f"{path}: outputs differ from the eager model's by {error:.2e} (relative), "
                          f"more than {tolerance:.0e}")
    return error


def sample_batch(model: nn.Module) -> Tensor:
    """The bundled sample photos, preprocessed for ``model``."""
    return torch.stack([model.preprocess(p) for p in sample_photos()])
