"""python -m utils.embed and python -m utils.probe against what a user would write or pick instead.

    python benchmarks/features.py [--speed-images 3600] [--epochs 10] [--only speed|probes] [--root DIR]

speed   embed (its defaults: backend "auto", decoding in DataLoader workers) against a plain loop (a
        DataLoader with the same workers and batch size, the eager model under inference_mode) on the
        same images: images/s of each, and the rows' largest relative difference. ResNet-50 at 224 px,
        random weights (the published ones cannot be fetched offline), scikit-learn's digits upscaled
        (repeated: a job long enough for "auto" to repay its set-up, which embed decides on its second batch).
probes  a backbone python -m utils.finetune trains on the digits 0-4 (ResNet-18 from random weights,
        its defaults: 32 px PNGs seen at 224 px), then on the digits 5-9 (80/20 split, other images and
        classes): embed + probe against scikit-learn's LogisticRegression at the probe's C and
        KNeighborsClassifier (cosine) at the best of the probe's k, on the same features; and against
        python -m utils.finetune --freeze-backbone from the same backbone: top-1 and seconds.
Every command runs in this process (no start-up counted for any). Prints Markdown; CPU in the header.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import subprocess
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
from utils import embed, finetune, probe  # noqa: E402
from utils.features import knn  # noqa: E402
from utils.images.dataset import ImageFiles, batches  # noqa: E402


def write_digits(root: Path, digits: range, size: int, limit: int | None = None) -> tuple[Path, Path]:
    """scikit-learn's digits of ``digits`` as ROOT/{train,val}/<digit>/<i>.png (80/20 stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    keep = np.flatnonzero(np.isin(d.target, list(digits)))[:limit]
    images, labels = np.round(d.images[keep] * (255 / 16)).astype(np.uint8), d.target[keep]
    train, val = train_test_split(np.arange(len(keep)), test_size=0.2, stratify=labels, random_state=0)
    return tuple(save_split(images, labels, {"train": train, "val": val}, root, size))


def repeated_digits(root: Path, count: int) -> Path:
    """``count`` PNGs of scikit-learn's digits (64 px), the 1,797 of them over again as needed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    for i in range(count):
        folder = root / str(d.target[i % len(images)])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).convert("RGB").resize((64, 64), Image.BILINEAR).save(
            folder / f"{i}.png")
    return root


def quiet(command, args: list[str]) -> tuple[int, str, float]:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = command(args)
    return code, out.getvalue(), time.perf_counter() - start


def plain_loop(folder: Path, batch_size: int, workers: int) -> tuple[np.ndarray, float]:
    """What a user would write: a DataLoader and the eager model under inference_mode."""
    torch.manual_seed(0)  # the random weights embed --no-pretrained uses
    model = create_model("resnet50_swsl", pretrained=False, num_classes=0)
    files = sorted(folder.rglob("*.png"))
    start = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for _, images, _, _ in batches(ImageFiles(files, model.preprocess), batch_size, workers, torch.device("cpu")):
            rows.append(model(images).numpy())
    return np.concatenate(rows), time.perf_counter() - start


def speed(root: Path, count: int) -> None:
    folder = repeated_digits(root / "speed", count)
    for done in ("feats-speed",):
        shutil.rmtree(root / done, ignore_errors=True)
    plain, plain_seconds = plain_loop(folder, 32, 2)
    code, out, _ = quiet(embed.main, [str(folder), "--output", str(root / "feats-speed"), "--no-pretrained",
                                      "--model", "resnet50_swsl", "--batch-size", "32", "--workers", "2", "--json",
                                      "--device", "cpu"])
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    rows = np.load(root / "feats-speed" / "features.npy")
    meta = json.loads((root / "feats-speed" / "meta.json").read_text())
    error = float(np.abs(rows - plain).max() / np.abs(plain).max())
    print(f"\n### Embedding {len(plain)} images, ResNet-50 at 224 px, batch 32, 2 workers\n")
    print("| run | images/s | against the plain loop |\n|---|---:|---:|")
    print(f"| plain loop: DataLoader + eager under inference_mode | {len(plain) / plain_seconds:.1f} | 1.00x |")
    print(f"| `python -m utils.embed` (backend auto: {meta['runtime']['backend_choices']}) | "
          f"{result['images_per_second']:.1f} | {result['images_per_second'] * plain_seconds / len(plain):.2f}x |")
    print(f"\nlargest relative difference of the rows: {error:.1e}")


def probes(root: Path, epochs: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    source = write_digits(root / "source", range(5), 32)
    train, val = write_digits(root / "target", range(5, 10), 32)
    common = ["--model", "resnet18_ssl", "--device", "cpu"]
    backbone = root / "bb" / "best.pth"
    if not backbone.exists():  # kept in --root between runs: it takes minutes
        code, _, seconds = quiet(finetune.main, [str(source[0]), "--val", str(source[1]), "--output",
                                                 str(root / "bb"), "--no-pretrained", "--epochs", str(epochs), *common])
        assert code == 0
    print("\n### Probes on the digits 5-9, from a backbone trained on the digits 0-4\n")

    steps = {}
    for split, folder in (("train", train), ("val", val)):
        shutil.rmtree(root / f"feats-{split}", ignore_errors=True)
        code, _, steps[f"embed {split}"] = quiet(embed.main, [str(folder), "--output", str(root / f"feats-{split}"),
                                                              "--weights", str(backbone), *common])
        assert code == 0
    code, out, steps["probe"] = quiet(probe.main, [str(root / "feats-train"), "--val", str(root / "feats-val"),
                                                   "--output", str(root / "probe"), "--json"])
    assert code == 0
    ours_seconds = sum(steps.values())
    ours = json.loads(out.strip().splitlines()[-1])

    x, vx = (np.load(root / f"feats-{s}" / "features.npy").astype(np.float64) for s in ("train", "val"))
    y, vy = (np.array([r.split(",")[1] for r in (root / f"feats-{s}" / "index.csv").read_text().split()[1:]])
             for s in ("train", "val"))
    sk_linear = 100 * LogisticRegression(C=ours["C"], max_iter=10_000).fit(x, y).score(vx, vy)
    sk_knn = {k: 100 * KNeighborsClassifier(k, metric="cosine").fit(x, y).score(vx, vy)
              for k in knn.KS if k <= len(y)}
    best_k = max(sk_knn, key=sk_knn.get)

    shutil.rmtree(root / "frozen", ignore_errors=True)
    code, _, frozen_seconds = quiet(finetune.main, [str(train), "--val", str(val), "--output", str(root / "frozen"),
                                                    "--weights", str(backbone), "--freeze-backbone", "--lr", "0.1",
                                                    "--epochs", str(epochs), "--json", *common])
    assert code == 0
    frozen = max(json.loads(line)["val_top1"] for line in (root / "frozen" / "metrics.jsonl").read_text().split("\n")
                 if line)
    print("| run | top-1 | seconds |\n|---|---:|---:|")
    print(f"| **probe, linear** (C={ours['C']:g}, picked on held-out training rows) | "
          f"**{ours['linear_top1']:.2f}** | |")
    print(f"| scikit-learn LogisticRegression, the same C | {sk_linear:.2f} | |")
    print(f"| **probe, kNN** (best k={ours['knn_k']}, weighted votes) | **{ours['knn_top1']:.2f}** | |")
    print(f"| scikit-learn KNeighborsClassifier, cosine, best k={best_k} | {sk_knn[best_k]:.2f} | |")
    print(f"| **embed (train and val) + probe** | {ours['linear_top1']:.2f} | **{ours_seconds:.1f}** |")
    print(f"| `python -m utils.finetune --freeze-backbone --lr 0.1`, {epochs} epochs (best epoch) | {frozen:.2f} | "
          f"{frozen_seconds:.1f} |")
    print(f"\nembed + probe took {ours_seconds / frozen_seconds:.3f} of the frozen fine-tune's time ("
          + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()) + f"; within the probe: {ours['seconds']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed-images", type=int, default=3600)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", choices=["speed", "probes"])
    parser.add_argument("--root", type=Path, help="a folder to work in and keep (default: a temporary one)")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in cpu.splitlines() if line.startswith("Flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(f"# {model}, {torch.get_num_threads()} threads, {' '.join(isa)}; torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if args.only in (None, "speed"):
            speed(root, args.speed_images)
        if args.only in (None, "probes"):
            probes(root, args.epochs)


if __name__ == "__main__":
    main()
