"""Classify images with one of the twelve models.

    python -m utils.classify [PATH ...] [--model ENTRY] [--weights FILE_OR_URL] [--topk 5] [--json]
    python -m utils.classify [PATH ...] --weights OUT/best.pth   # fine-tuned: its entry, classes and size
    python -m utils.classify [PATH ...] --dtype int8 --calibration DIR   # INT8 on the CPU

PATHs are image files, directories (searched recursively) or glob patterns; with none, the bundled
sample photos are classified. A file that cannot be read is reported with its reason and the others
are still classified; the exit status is 1 if any failed, 2 if nothing could be run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from utils.cli import (
    CANNOT_RUN,
    NO_PRETRAINED,
    add_model_arguments,
    check_dtype,
    contradiction,
    describe_weights,
    error_line,
    load_model,
    pick_device,
    positive,
)
from utils.images.dataset import ImageFiles, batches
from utils.images.files import find_images
from utils.images.samples import sample_photos


def read_classes(path: Path) -> list[str]:
    """Class names, one per line, in the model's output order."""
    if path.exists() and not path.is_file():
        raise ValueError(f"--classes {path}: not a regular file")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise FileNotFoundError(f"--classes {path}: {e.strerror}") from e
    if len(names) < 2:
        raise ValueError(f"--classes {path}: expected one class name per line, at least two, found {len(names)}")
    return names


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, directories or glob patterns")
    parser.add_argument("--topk", type=positive, default=5, help="how many classes to show (default 5)")
    parser.add_argument("--classes", type=Path, metavar="FILE",
                        help="the class names, one per line, of --weights that do not carry theirs (a file "
                             "saved by python -m utils.finetune does)")
    add_model_arguments(parser, batch_size=16)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.classes is not None and args.no_pretrained:
        parser.error("--classes: a fine-tuned model's class names go with its --weights, not --no-pretrained")
    if args.classes is not None and args.weights is None:
        parser.error("--classes: give the fine-tuned model's --weights too")

    # Everything that can be checked is checked before the model loads (seconds, or a download).
    paths, problems = find_images(args.paths) if args.paths else (sample_photos(), [])
    for pattern, reason in problems:
        print(f"{pattern}: {reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({"path": pattern, "model": args.model, "error": f"{pattern}: {reason}"}))
    if not paths:
        return 1
    try:
        model, own, device = load_for(args)
    except CANNOT_RUN as e:
        print(error_line(e), file=sys.stderr)
        return 2
    if args.no_pretrained and not args.json:
        print(f"# {NO_PRETRAINED}")
    labels = (own, None) if own else (model.pretrained_cfg["classes"], model.pretrained_cfg["wnids"])
    failed = len(problems) + classify(args, model, paths, device, *labels)
    return 1 if failed else 0


def load_for(args: argparse.Namespace) -> tuple[nn.Module, list[str] | None, torch.device]:
    """The model that ``args`` ask for, the class names of --classes (None without), and the device."""
    own = read_classes(args.classes) if args.classes is not None else None
    device = pick_device(args.device, args.backend, args.dtype)
    check_dtype(args, device)
    description = describe_weights(args)
    if own and description and own != description["classes"]:
        raise contradiction(f"--classes {args.classes}", args.weights, description)
    model = load_model(args.model, args.weights, device, num_classes=len(own) if own and not description else None,
                       dtype=args.dtype, backend=args.backend, pretrained=not args.no_pretrained,
                       img_size=args.img_size, calibration=args.calibration)
    if own and model.pretrained_cfg["head"] != "pretrained":
        raise ValueError(f"--weights {args.weights} has no trained {len(own)}-class head for --classes "
                         f"{args.classes}: give the best.pth of the same fine-tuning run")
    return model, own, device


def classify(args: argparse.Namespace, model: nn.Module, paths: list[Path], device: torch.device,
             classes: list[str], wnids: list[str] | None) -> int:
    """Prints each image's top classes (or its error) as it goes; returns how many could not be read."""
    topk, failed = min(args.topk, len(classes)), 0
    dataset = ImageFiles(paths, model.preprocess, strict=False)
    progress = tqdm(total=len(paths), unit="image", disable=len(paths) <= args.batch_size, file=sys.stderr)
    with progress as bar, torch.inference_mode():
        for indices, images, _, errors in batches(dataset, args.batch_size, args.workers, device):
            top = model(images.to(device)).softmax(dim=1).topk(topk)
            for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
                if error:
                    failed += 1
                    print(error, file=sys.stderr)
                    if args.json:
                        bar.write(json.dumps({"path": str(paths[index]), "model": args.model, "error": error}),
                                  file=sys.stdout)
                else:
                    bar.write(row_text(args, paths[index], top.values[row].tolist(),
                                       [classes[i] for i in top.indices[row].tolist()],
                                       [wnids[i] for i in top.indices[row].tolist()] if wnids else None),
                              file=sys.stdout)
            bar.update(len(errors))
    return failed


def row_text(args: argparse.Namespace, path: Path, probabilities: list[float], labels: list[str],
             ids: list[str] | None) -> str:
    """One image's answer: a JSON object under --json, else its path and a line per class."""
    if args.json:
        row = {"path": str(path), "model": args.model, "labels": labels, "wnids": ids,
               "probabilities": [round(p, 6) for p in probabilities],
               "pretrained": False if args.no_pretrained else None}
        return json.dumps({k: v for k, v in row.items() if v is not None})
    return "\n".join([str(path)] + [f"  {p:7.2%}  {label}" + (f" ({ids[j]})" if ids else "")
                                    for j, (p, label) in enumerate(zip(probabilities, labels))])


if __name__ == "__main__":
    sys.exit(main())
