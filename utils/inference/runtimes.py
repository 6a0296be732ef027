"""The runtimes besides torch: the packages each needs, for float and for INT8, whether they are
installed here, and the pip install that brings them. Nothing is imported until it is asked about."""
from __future__ import annotations

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
