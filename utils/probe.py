"""kNN and linear probes on frozen features, and the linear probe saved as a model file.

    python -m utils.probe TRAIN_FEATS --val VAL_FEATS --output OUT [--json]

TRAIN_FEATS and VAL_FEATS are folders that python -m utils.embed wrote from ImageFolder layouts, with
the same model, weights and transform and the same classes. kNN: cosine similarity on normalised
features, temperature-weighted votes (T = 0.07), for k = 1, 5, 10, 20, 50, 100. Linear: multinomial logistic
regression with scikit-learn's regularisation C, swept from 1e-3 to 1e3, picked on a held-out fifth of
the training rows (never on VAL_FEATS), then trained on them all. OUT/best.pth is the backbone with that
head, in the fine-tuned file format: torch.hub.load(..., weights="OUT/best.pth"), classify, evaluate and
export take it with nothing else. Exit status 2, with one line, for features that cannot be probed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from utils.cli import error_line
from utils.features.classifier import classifier_file
from utils.features.folder import Features, FeaturesError, read
from utils.features.knn import TEMPERATURE, knn_hits
from utils.features.linear import HELD_OUT, predict, probe
from utils.replace import replacing
from utils.weights import CheckpointError

SAME = {"entry": "model", "weights": "weights", "transform": "transform", "feature_size": "feature size"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path, metavar="TRAIN_FEATS", help="features of the training images")
    parser.add_argument("--val", type=Path, required=True, metavar="VAL_FEATS", help="features of the val images")
    parser.add_argument("--output", type=Path, required=True, metavar="OUT", help="folder for best.pth")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        train, val = read(args.train, "TRAIN_FEATS"), read(args.val, "VAL_FEATS")
        classes = check_pair(train, val)
        if args.output.exists() and not args.output.is_dir():
            raise FeaturesError(f"--output {args.output} is a file: give a folder")
        result, head = run(train, val, classes)
        finetuning = {"recipe": {"probe": "linear", "C": result["C"], "train": str(args.train)},
                      "train": str(args.train), "result": {"val_top1": result["linear_top1"]}}
        save(args.output / "best.pth", classifier_file(train.meta, classes, *head, finetuning, "TRAIN_FEATS"))
    except (FeaturesError, ValueError, FileNotFoundError, CheckpointError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else table(result, args.output))
    return 0


def check_pair(train: Features, val: Features) -> list[str]:
    """The classes, sorted; an error where the two folders cannot be probed together."""
    differ = [name for key, name in SAME.items() if train.meta.get(key) != val.meta.get(key)]
    if differ:
        raise FeaturesError(f"TRAIN_FEATS {train.path} and VAL_FEATS {val.path} were embedded with different "
                            f"{', '.join(differ)}: embed both the same way")
    for features, what in ((train, "TRAIN_FEATS"), (val, "VAL_FEATS")):
        if not all(features.labels):
            raise FeaturesError(f"{what} {features.path}: rows without a class: embed an ImageFolder layout "
                                "(one folder of images per class)")
    classes = sorted(set(train.labels))
    if set(val.labels) != set(classes):
        extra, missing = sorted(set(val.labels) - set(classes)), sorted(set(classes) - set(val.labels))
        raise FeaturesError(f"TRAIN_FEATS and VAL_FEATS have different classes (only in VAL_FEATS: {extra[:5]}, "
                            f"only in TRAIN_FEATS: {missing[:5]}): embed the same class folders")
    if len(classes) < 2:
        raise FeaturesError(f"TRAIN_FEATS {train.path}: one class ({classes[0]!r}); a probe needs two or more")
    return classes


def run(train: Features, val: Features, classes: list[str]) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """The figures, and the linear head (features, classes) with its bias."""
    index = {name: i for i, name in enumerate(classes)}
    x, y = torch.from_numpy(train.features), torch.tensor([index[c] for c in train.labels])
    vx, vy = torch.from_numpy(val.features), torch.tensor([index[c] for c in val.labels])
    start = time.perf_counter()
    knn = knn_hits(x, y, vx, vy, len(classes))
    knn_seconds = time.perf_counter() - start
    c, held_out, weight, bias = probe(x, y, len(classes))
    top = predict(vx, weight[None], bias[None])[0].topk(min(5, len(classes)), dim=1).indices == vy[:, None]
    percent = 100 / len(vy)
    result = {"model": train.meta["entry"], "train_rows": len(y), "val_rows": len(vy), "classes": len(classes),
              "knn": {str(k): {"top1": h[0] * percent, **({"top5": h[1] * percent} if len(classes) >= 5 else {})}
                      for k, h in knn.items()},
              "knn_temperature": TEMPERATURE, "held_out_fraction": HELD_OUT,
              "linear_held_out_top1": {f"{c:g}": v for c, v in held_out.items()}, "C": c,
              "linear_top5": top.any(dim=1).sum().item() * percent if len(classes) >= 5 else None,
              "seconds": {"knn": round(knn_seconds, 2), "linear": round(time.perf_counter() - start - knn_seconds, 2)}}
    best_k = max(knn, key=lambda k: (knn[k][0], -k))
    result.update(knn_k=best_k, knn_top1=knn[best_k][0] * percent, linear_top1=top[:, 0].sum().item() * percent)
    return result, (weight, bias)


def save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, path.with_name(f".{path.name}.tmp")) as temporary:
        torch.save(obj, temporary)


def table(result: dict, output: Path) -> str:
    has5 = result["linear_top5"] is not None
    lines = [f"{result['model']}: {result['train_rows']} training rows, {result['val_rows']} val rows, "
             f"{result['classes']} classes", "",
             "| probe | top-1 | top-5 |" if has5 else "| probe | top-1 |", "|---|---:|---:|" if has5 else "|---|---:|"]
    for k, figures in result["knn"].items():
        lines.append(f"| kNN, k={k} | {figures['top1']:.2f} |" + (f" {figures['top5']:.2f} |" if has5 else ""))
    lines.append(f"| linear, C={result['C']:g} | {result['linear_top1']:.2f} |"
                 + (f" {result['linear_top5']:.2f} |" if has5 else ""))
    lines += ["", f"linear probe saved as {output / 'best.pth'} (the C picked on a held-out fifth of TRAIN_FEATS)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
