"""What INT8 costs in accuracy on a model fine-tuned on real images: float32 and INT8 top-1 of one run.

    python benchmarks/int8.py [--datasets digits mnist] [--epochs 10] [--img-size 48]

Each dataset (written as PNG class folders by benchmarks/finetune.py, 80/20 stratified split) is
fine-tuned with python -m utils.finetune from random weights (resnet18_ssl --no-pretrained: the
published weights cannot be fetched offline). Its best.pth is then scored by python -m utils.evaluate
--dtype int8 --calibration TRAIN, once per INT8 runtime: INT8 is calibrated on (at most 300 of) the
training images and scored on the validation images beside float32, in the same run. The speed side
is python -m utils.benchmark --dtype int8. Prints a Markdown table; CPU named in the header.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

from finetune import tool, write  # benchmarks/finetune.py, which also puts the repository on the path

from utils import evaluate
from utils.inference.runtimes import NAMES as RUNTIMES
from utils.system.hardware import describe_cpu


def score(val: Path, train: Path, weights: Path, backend: str) -> dict:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert evaluate.main([str(val), "--weights", str(weights), "--dtype", "int8", "--calibration", str(train),
                              "--backend", backend, "--device", "cpu", "--workers", "0", "--json"]) == 0
    return json.loads(output.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=["digits", "mnist"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "semi-supervised-benchmarks")
    args = parser.parse_args()
    print(f"{describe_cpu()}; resnet18_ssl from random weights, {args.epochs} epochs, {args.img_size} px\n")
    print("| dataset | runtime | float32 top-1 | int8 top-1 | difference | agreement on held-out calibration images |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.datasets:
        train, val = write(name, args.data, args.img_size)
        with tempfile.TemporaryDirectory() as out:
            tool(train, val, Path(out), args.epochs, args.batch_size, args.img_size)
            for backend in RUNTIMES:
                result = score(val, train, Path(out) / "best.pth", backend)
                fidelity = result["int8_fidelity"][backend]
                print(f"| {name} ({result['images']} images) | {backend} | {result['float32_top1']:.2f} | "
                      f"{result['top1']:.2f} | {result['top1'] - result['float32_top1']:+.2f} | "
                      f"{fidelity['top1_agreement']:.1f}% of {fidelity['images']} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
