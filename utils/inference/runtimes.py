"""The runtimes besides torch: the packages each needs, for float and for INT8, whether they are
installed here, and the pip install that brings them. Nothing is imported until it is asked about."""
from __future__ import annotations

import functools
import importlib

# runtime -> (the packages it needs for float, for INT8: NNCF quantizes OpenVINO's, onnx ONNX Runtime's)
PACKAGES = {"onnxruntime": (("onnxruntime",), ("onnxruntime", "onnx")),
            "openvino": (("openvino",), ("openvino", "nncf"))}
NAMES = tuple(PACKAGES)


def packages(runtime: str, int8: bool = False) -> tuple[str, ...]:
    return PACKAGES[runtime][int8]


def install(runtime: str, int8: bool = False) -> str:
    return "pip install " + " ".join(packages(runtime, int8))


def installed(runtime: str, int8: bool = False) -> bool:
    for package in packages(runtime, int8):
        try:
            importlib.import_module(package)
        except ImportError:
            return False
    return True


def require(runtime: str, int8: bool = False) -> None:
    """ImportError naming the ``pip install`` where ``runtime`` (for INT8: and its quantizer) is missing."""
    if installed(runtime, int8):
        return
    if int8:
        raise ImportError(f"INT8 in {runtime} needs {' and '.join(packages(runtime, int8))}: {install(runtime, int8)}")
    raise ImportError(f"backend={runtime!r} needs the {runtime} package: {install(runtime)}")


@functools.cache
def openvino_core():
    """The process's one openvino.Core, which reads and compiles every OpenVINO model here: with a Core per
    model, the process crashed once two INT8 models had come and gone (a corrupted heap, met seconds later
    in unrelated code)."""
    import openvino

    return openvino.Core()
