"""What each step of the torch backend gains on the CPU, float32, measured side by side in one run.

    python benchmarks/torch_cpu.py [--models resnet50_swsl resnext50_32x4d_swsl] [--batch-sizes 1 16]

Steps, each on top of the one before: BatchNorm folded and channels_last (the plain optimised
model), weights packed once per input shape, ReLU and residual addition fused into the convolutions
(the torch backend's default), then torch.compile with freezing instead. ONNX Runtime runs the same
model in the same rounds, as the reference. Medians of 7 rounds after 2 untimed ones, ms per batch.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from utils import optimize_for_inference  # noqa: E402
from utils.inference.fused import FusedResNet  # noqa: E402
from utils.inference.optimize import InferenceModel  # noqa: E402
from utils.system.timing import describe_machine, time_interleaved  # noqa: E402


def steps(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    fused = optimize_for_inference(model)  # the torch backend: packed weights, fused pointwise
    folded = fused.model.model  # BatchNorm folded, channels_last: the plain optimised model
    return {
        "eager": model,
        "folded + channels_last": InferenceModel(folded, torch.float32, torch.channels_last),
        "+ packed weights": InferenceModel(FusedResNet(folded, fuse_pointwise=False), torch.float32,
                                           torch.channels_last),
        "+ fused ReLU/add (backend='torch')": fused,
        "compile=True (inductor, freezing)": optimize_for_inference(model, compile=True),
        "onnxruntime": optimize_for_inference(model, backend="onnxruntime"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50_swsl", "resnext50_32x4d_swsl"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    args = parser.parse_args()
    print(f"{describe_machine(torch.device('cpu'))}; median ms per batch of 7 rounds\n")
    print("| model | batch | step | ms | vs the row above | vs onnxruntime |")
    print("|---|---:|---|---:|---:|---:|")
    for entry in args.models:
        torch.compiler.reset()
        model = create_model(entry, pretrained=False)
        variants = steps(model)
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, 3, 224, 224)
            with torch.inference_mode():
                times = time_interleaved({k: functools.partial(m, x) for k, m in variants.items()}, 2, 7,
                                         torch.device("cpu"))
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            previous = None
            for name, value in ms.items():
                gain = "" if previous is None or name == "onnxruntime" else f"{ms[previous] / value:.2f}x"
                print(f"| {entry} | {batch_size} | {name} | {value:.1f} | {gain} | {ms['onnxruntime'] / value:.2f}x |")
                previous = name


if __name__ == "__main__":
    main()
