"""Measure inference speed: plain eager float32 against optimize_for_inference and its peers, in one run.

    python -m utils.benchmark [--models ENTRY ... | all] [--batch-sizes 1 16] [--dtype float32 bfloat16 int8]
                              [--compile] [--peers] [--no-channels-last] [--device cpu] [--json | --csv]
                              [--plot FILE.png]

For each model and batch size, the plain eager float32 model and each optimised variant run in turn,
round after round, so that the machine's ups and downs fall on all of them alike. ``--peers`` adds
ONNX Runtime and OpenVINO (those installed) running the model's ONNX export with as many threads as
torch, and ``backend="auto"``; ``--dtype int8`` adds their INT8 models beside them (and implies ``--peers``).
Each row gives the median time of a batch, its spread, images/s, the
achieved GFLOP/s (two FLOPs per multiply-accumulate in the registry), the dense matrix-multiply
ceiling measured in the same run, the speed relative to the plain eager float32 model and to the
fastest peer, and the largest difference of its outputs from eager float32's (relative to the
largest output). Weights are random: speed does not depend on them. Entries that share an
architecture (ssl and swsl) are timed once.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from dataclasses import asdict

import torch

from models import WEIGHTS, create_model
from utils.cli import (
    CANNOT_RUN,
    DTYPE_NAMES,
    batch_size_value,
    count,
    device_name,
    error_line,
    img_size_value,
    pick_device,
    positive,
)
from utils.inference import runtimes
from utils.inference.speed_table import Subject, markdown, measure, plot
from utils.system.hardware import cpu_has_native
from utils.system.timing import describe_machine


def parse_models(names: list[str]) -> list[str]:
    if names == ["all"]:
        return list(WEIGHTS)
    unknown = [n for n in names if n not in WEIGHTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown)}; "
                                         f"choose from all, {', '.join(WEIGHTS)}")
    return list(dict.fromkeys(names))


def pick_peers(device: torch.device) -> list[str]:
    if device.type != "cpu":
        raise ValueError(f"--peers: ONNX Runtime and OpenVINO are measured on the CPU here, not on {device}")
    peers = [p for p in runtimes.NAMES if runtimes.installed(p)]
    if not peers:
        raise ImportError("--peers needs onnxruntime or openvino: "
                          + " or ".join(map(runtimes.install, runtimes.NAMES)))
    return peers


def with_floats(dtypes: list[str]) -> list[str]:
    """INT8 is measured against the float runtimes: with --dtype int8 alone, float32 (and bfloat16 where
    the CPU computes it natively) beside it."""
    if dtypes != ["int8"]:
        return dtypes
    return ["float32", *(["bfloat16"] if cpu_has_native(torch.bfloat16) else []), "int8"]


def check_plot_path(parser: argparse.ArgumentParser, path: str) -> None:
    """Before the run, not after it: a bad --plot path would waste the whole measurement."""
    if os.path.splitext(path)[1].lower() not in (".png", ".svg", ".pdf"):
        parser.error(f"--plot {path}: the name must end in .png, .svg or .pdf")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"--plot {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        parser.error(f"--plot {path} is a folder: give a file name")
    try:  # can the plot be written there? Found out now, with an empty file that is removed again
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".plot-check."):
            pass
    except OSError as e:
        parser.error(f"--plot {path}: cannot write in {folder} ({e.strerror})")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.benchmark", description=__doc__.split("\n\n")[0],
                                     epilog=f"entries: {', '.join(WEIGHTS)}")
    parser.add_argument("--models", nargs="+", default=["resnet50_swsl"], metavar="ENTRY",
                        help="entries to measure, or all (default: resnet50_swsl)")
    parser.add_argument("--batch-sizes", nargs="+", type=batch_size_value, default=[1, 16], metavar="N",
                        help="default: 1 (latency) and 16 (throughput)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPE_NAMES), default=["float32"],
                        help="precisions of the optimised model (default float32); int8 (CPU) measures the INT8 "
                             "runtimes beside the float ones (--peers), calibrated on random inputs like those timed")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="optimised models in channels_last (default: yes)")
    parser.add_argument("--compile", action="store_true", help="also measure each optimised model torch.compiled")
    parser.add_argument("--peers", action="store_true",
                        help="also measure ONNX Runtime and OpenVINO (those installed) and backend='auto' (CPU)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--img-size", type=img_size_value, default=224, metavar="N",
                        help="height and width of the input (default 224), e.g. a fine-tuned model's")
    parser.add_argument("--warmup", type=count, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--repeats", type=positive, default=7, help="timed rounds (default 7)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per row")
    output.add_argument("--csv", action="store_true", help="CSV with a header line")
    parser.add_argument("--plot", metavar="FILE.png", help="draw measured top-1 against images/s")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="accepted as by the other commands: the benchmark always uses random weights, "
                             "as speed does not depend on them, and needs no download")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        entries = parse_models(args.models)
    except argparse.ArgumentTypeError as e:
        parser.error(f"--models: {e}")

    if args.plot:
        check_plot_path(parser, args.plot)

    try:
        device = pick_device(args.device, dtype="int8" if "int8" in args.dtype else "float32")
        dtypes = with_floats(args.dtype)
        peers = pick_peers(device) if args.peers or "int8" in dtypes else []
        subjects = [Subject(e, WEIGHTS[e].arch.name, WEIGHTS[e].measured[0]) for e in entries]
        rows = measure(subjects, lambda entry: create_model(entry, pretrained=False), args.batch_sizes, dtypes,
                       args.channels_last, args.compile, device, args.warmup, args.repeats, peers=peers,
                       img_size=args.img_size)
    except CANNOT_RUN as e:  # e.g. a device, precision or runtime this machine does not have
        print(error_line(e), file=sys.stderr)
        return 2
    machine = describe_machine(device)
    print_rows(args, rows, machine)
    if args.plot:
        plot(rows, args.plot, machine, args.img_size)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def print_rows(args: argparse.Namespace, rows: list, machine: str) -> None:
    """The measured rows as --json, --csv or a markdown table, each saying which machine measured them."""
    if args.json:
        for row in rows:
            print(json.dumps({**asdict(row), "device": machine}))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=[*asdict(rows[0]), "device"])
        writer.writeheader()
        writer.writerows({**asdict(row), "device": machine} for row in rows)
    else:
        print(f"{machine}; {args.img_size}x{args.img_size} images, median of {args.repeats} rounds\n\n{markdown(rows)}")


if __name__ == "__main__":
    sys.exit(main())
