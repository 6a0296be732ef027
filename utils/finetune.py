"""Fine-tune a pretrained model on your own images, on one process or many with torchrun.

    python -m utils.finetune TRAIN_DIR --output OUT [--model ENTRY] [--val VAL_DIR] [--epochs 10]
    torchrun --nproc_per_node 4 -m utils.finetune TRAIN_DIR --output OUT ...

TRAIN_DIR holds one folder of images per class, with any names: class i is the i-th folder in
sorted order. Without --val, a --val-fraction of each class (chosen by --seed) is held out for
validation. The recipe: the backbone with a new head, SGD with Nesterov momentum (or AdamW), the
backbone at a tenth of the head's learning rate when it is pretrained and at the same rate from
random weights, a linear warmup then cosine decay, label smoothing, augmentation that fits the image
size (random resized crops and flips from 128 px up, flips alone below), and for validation the
evaluation transform that the saved model carries; channels_last, mixed precision on GPUs.

OUT receives best.pth (the best validation epoch's weights with what they are: entry, class names,
input size and transform, recipe; torch.hub.load(..., weights="OUT/best.pth") and the other
commands need nothing else), last.pth (the same, and everything --resume needs), classes.txt,
metrics.jsonl (one JSON object per epoch) and curves.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import CheckpointError, check_format
from .hardware import check_native
from .images import IMAGE_SUFFIXES, ImageError, read
from .inference import (
    WEIGHTS,
    add_weights_arguments,
    batch_size_value,
    count,
    device_name,
    in_command_terms,
    pick_device,
    positive,
)
from .preprocess import Preprocess
from .run_folder import TMP_SUFFIX, RunFolder, run_files

try:  # imported through hubconf.py's private package name
    from ..models import create_model, finetuned
    from ..models.resnet import MIN_SIZE
except ImportError:  # run from the repository root: python -m utils.finetune
    from models import create_model, finetuned
    from models.resnet import MIN_SIZE

# What makes the training recipe: a resumed run must not change these.
RECIPE = ("model", "weights", "no_pretrained", "epochs", "batch_size", "lr", "backbone_lr", "optimizer", "weight_decay",
          "label_smoothing", "warmup_epochs", "img_size", "augment", "crop_scale", "eval_crop_pct", "patience", "seed",
          "val", "val_fraction", "freeze_backbone", "dtype")
AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16}
AUGMENTATIONS = {"crop": "random resized crops and flips", "flip": "the evaluation transform and flips",
                 "none": "the evaluation transform alone"}
# Below this size a random crop loses what small images show: flips alone do better (benchmarks/finetune.py).
CROP_FROM = 128
# Images this small (median pixels) decode faster in the main process than through worker processes.
SMALL_IMAGE = 128 * 128
MAX_SEED = 2**32 - 1  # seeds the shuffling as seed * 1_000_003 + epoch, within torch's 64 bits


class FinetuneError(ValueError):
    """A problem with the data, the options or the run to resume; the message says what to do."""


# ---- data ------------------------------------------------------------------------------------------------

def class_folders(root: Path, what: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """The sorted class names under ``root`` and every (image, class index); a progress bar after a second."""
    if not root.exists():
        raise FinetuneError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise FinetuneError(f"{what} {root} is not a directory: give a folder with one subfolder of images per class")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise FinetuneError(f"{what} {root} has no class folders: lay the images out as {root}/<class name>/<image>")
    samples, empty = [], []
    for label, folder in enumerate(tqdm(folders, desc=f"scanning {root}", unit="class", delay=1, file=sys.stderr,
                                        leave=False)):
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        samples += [(p, label) for p in images]
        if not images:
            empty.append(folder.name)
    if empty:
        raise FinetuneError(f"{what} {root}: {len(empty)} class folder(s) have no images "
                            f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); "
                            f"add images ({', '.join(IMAGE_SUFFIXES)}) or remove the folder(s)")
    return [d.name for d in folders], samples


def split(samples: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of each class (at least one image), the same images for the same seed."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        mine = by_class[label]
        rng.shuffle(mine)
        n = max(1, round(len(mine) * fraction))
        if n >= len(mine):
            raise FinetuneError(f"class {mine[0][0].parent.name!r} has {len(mine)} image(s): too few to hold out "
                                f"--val-fraction {fraction} for validation; add images or pass --val VAL_DIR")
        val += mine[:n]
        train += mine[n:]
    return sorted(train), sorted(val)


def check_readable(samples: list[tuple[Path, int]]) -> list[int]:
    """Open every image's header before training, so that a bad file stops the run now, not hours in;
    the images' pixel counts."""
    from PIL import Image

    bad, areas = [], []
    for path, _ in tqdm(samples, desc="checking the images", unit="image", delay=1, file=sys.stderr, leave=False):
        try:
            with Image.open(path) as f:
                areas.append(f.width * f.height)
                f.verify()
        except Exception as e:  # noqa: BLE001  (PIL raises many types for damaged files)
            bad.append(f"{path} ({type(e).__name__})")
    if bad:
        raise FinetuneError(f"{len(bad)} unreadable image(s), the run stops: {'; '.join(bad[:5])}"
                            f"{'; ...' if len(bad) > 5 else ''}. Remove or replace them and run again")
    return areas


class Augment:
    """Training images: with "crop", a random crop of ``scale`` (a share of the area, 3/4-4/3 aspect),
    resized to the evaluation size and flipped left-right half the time; with "flip", the evaluation
    transform and flips; with "none", the evaluation transform. The random numbers come from the
    generator the caller passes: ``Images`` makes one per sample, so nothing depends on --workers."""

    def __init__(self, policy: str, preprocess: Preprocess, scale: float, ratio=(3 / 4, 4 / 3)):
        self.policy, self.preprocess, self.size = policy, preprocess, preprocess.crop_size
        self.scale, self.log_ratio = (scale, 1.0), (math.log(ratio[0]), math.log(ratio[1]))

    def box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=generator))
            aspect = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0])
                              * torch.rand((), generator=generator))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                return left, top, left + w, top + h
        side = min(width, height)  # the centre square, as torchvision falls back
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2

    def __call__(self, path: Path, generator: torch.Generator | None = None) -> Tensor:
        from PIL import Image

        if self.policy != "crop":
            x = self.preprocess(path)
            return x.flip(-1) if self.policy == "flip" and torch.rand((), generator=generator) < 0.5 else x
        image = read(path)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=self.box(*image.size, generator))
        if torch.rand((), generator=generator) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self.preprocess.to_tensor(image)


class Images(Dataset):
    """(image, label) pairs. With a ``seed``, the transform gets a generator seeded by (seed, epoch,
    index): each sample's augmentation is the same whichever process or DataLoader worker makes it."""

    def __init__(self, samples: list[tuple[Path, int]], transform, seed: int | None = None):
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        if self.seed is None:
            return self.transform(path), label
        key = hashlib.blake2b(f"{self.seed} {self.epoch} {index}".encode(), digest_size=7).digest()
        return self.transform(path, torch.Generator().manual_seed(int.from_bytes(key, "little"))), label


# ---- the run -----------------------------------------------------------------------------------------------

@dataclass
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(device_name: str) -> Context:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, device)


def build_model(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    """The backbone to start from with a new head of ``num_classes``, initialised from --seed."""
    if args.no_pretrained:
        model = create_model(args.model, pretrained=False, num_classes=num_classes)
    else:  # the backbone alone, also from a file with a head of its own (a fine-tuned one)
        model = create_model(args.model, weights=args.weights, num_classes=0)
        model.fc = nn.Linear(model.num_features, num_classes)
    if args.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return model.to(device, memory_format=torch.channels_last).train()


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """The head at --lr, the backbone at --backbone-lr; no weight decay on biases and norm weights."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if name.startswith("fc.") else "backbone"
        decay = p.dim() > 1
        groups.setdefault((part, decay), []).append(p)
    params = [{"params": ps, "lr": args.lr if part == "head" else args.backbone_lr, "name": part,
               "weight_decay": args.weight_decay if decay else 0.0} for (part, decay), ps in groups.items()]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params)
    return torch.optim.SGD(params, momentum=0.9, nesterov=True)


def make_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 1% to the full rate, then cosine decay to zero, step by step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(model, loader, optimizer, schedule, loss_fn, scaler, amp, ctx, epoch, args) -> tuple[float, int]:
    model.train()
    if args.freeze_backbone:  # a linear probe: the backbone's BatchNorm statistics stay as pretrained
        model.apply(lambda m: m.eval() if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, images
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=not ctx.main or None, file=sys.stderr,
               leave=False)
    for images, labels in bar:
        images = images.to(ctx.device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(images), labels)
        if not torch.isfinite(loss):
            raise FinetuneError(f"the loss became {loss.item()} in epoch {epoch}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        total += torch.tensor([loss.item() * len(labels), len(labels)], dtype=torch.float64, device=ctx.device)
        bar.set_postfix_str(f"loss {loss.item():.3f}")
    if ctx.world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item(), int(total[1].item())


@torch.no_grad()
def validate(model, samples, preprocess, args, ctx, num_classes: int) -> tuple[float, float | None, float]:
    """Top-1 and top-5 (None with fewer than 5 classes) in percent, and the mean cross-entropy; each
    process takes every WORLD_SIZE-th image and the sums are added up."""
    model.eval()
    shard = samples[ctx.rank::ctx.world]
    loader = DataLoader(Images(shard, preprocess), batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=ctx.device.type == "cuda")
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # top-1 hits, top-5 hits, loss, images
    k = min(5, num_classes)
    bar = tqdm(loader, desc="validation", unit="batch", disable=not ctx.main or None, file=sys.stderr, leave=False)
    for images, labels in bar:
        images = images.to(ctx.device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        logits = model(images).float()
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), loss, torch.tensor(len(labels))]).to(sums)
    if ctx.world > 1:
        dist.all_reduce(sums)
    top1, top5, loss, n = sums.tolist()
    return 100 * top1 / n, (100 * top5 / n if num_classes >= 5 else None), loss / n


def group_lr(optimizer: torch.optim.Optimizer, part: str) -> float | None:
    return next((g["lr"] for g in optimizer.param_groups if g["name"] == part), None)


def plot(metrics: list[dict], path: Path, title: str) -> bool:
    """Draw curves.png (False where matplotlib is not installed)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(metrics, title)
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def figure(metrics: list[dict], title: str):
    """Losses, validation accuracy (0-100%) with the best epoch marked, and the learning rates, by epoch."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    best = max(metrics, key=lambda m: m["val_top1"])
    fig, (loss, top1, lr) = plt.subplots(3, 1, sharex=True, figsize=(7, 7.5), dpi=100,
                                         gridspec_kw={"height_ratios": [3, 3, 2]})
    fig.suptitle(title)
    loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", color="tab:red", label="training (label-smoothed)")
    loss.plot(epochs, [m["val_loss"] for m in metrics], "s-", color="tab:purple", label="validation")
    loss.set_ylabel("cross-entropy loss")
    loss.set_ylim(bottom=0)
    loss.ticklabel_format(axis="y", style="plain", useOffset=False)
    top1.plot(epochs, [m["val_top1"] for m in metrics], "s-", color="tab:blue", label="validation top-1")
    if all("val_top5" in m for m in metrics):
        top1.plot(epochs, [m["val_top5"] for m in metrics], "^--", color="tab:cyan", label="validation top-5")
    top1.axvline(best["epoch"], color="tab:green", linestyle=":", label=f"best: epoch {best['epoch']}, "
                                                                           f"{best['val_top1']:.1f}%")
    top1.set_ylabel("accuracy (%)")
    top1.set_ylim(0, 100)
    lr.plot(epochs, [m["lr"] for m in metrics], "o-", color="tab:gray", label="head")
    if any(m.get("backbone_lr") is not None for m in metrics):
        lr.plot(epochs, [m.get("backbone_lr") for m in metrics], "o--", color="tab:olive", label="backbone")
    lr.set_ylabel("learning rate\n(at epoch end)")
    lr.set_ylim(bottom=0)
    lr.set_xlabel("epoch")
    lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (loss, top1, lr):
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def last_line(error: Exception) -> str:
    """The error itself: a DataLoader worker's error arrives with the worker's traceback in its message."""
    lines = str(error).strip().splitlines() or [""]
    return re.sub(r"^[\w.]*ImageError: ", "", lines[-1])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.finetune", description=__doc__.split("\n\n")[0],
                                     epilog="The entries: " + ", ".join(WEIGHTS))
    parser.add_argument("train", type=Path, metavar="TRAIN_DIR", help="one folder of images per class")
    parser.add_argument("--output", type=Path, metavar="OUT",
                        help="a new folder for the run's files (with --resume: the resumed run's folder, the default)")
    parser.add_argument("--model", default="resnet50_swsl", choices=list(WEIGHTS), metavar="ENTRY",
                        help="the pretrained model to start from (default resnet50_swsl; the twelve entries are "
                             "listed below)")
    add_weights_arguments(parser, start="start from",
                          random="train from random weights instead of the published ones (nothing is downloaded)")
    parser.add_argument("--val", type=Path, metavar="VAL_DIR", help="validation images, the same class folders")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="without --val, the share of each class held out (default 0.1)")
    parser.add_argument("--epochs", type=positive, default=10, help="default 10")
    parser.add_argument("--stop-after", type=positive, metavar="EPOCH",
                        help="end this run after EPOCH (of --epochs), e.g. for a time-limited job; "
                             "--resume OUT/last.pth continues")
    parser.add_argument("--patience", type=positive, metavar="N",
                        help="stop early after N epochs without a better validation top-1 (default: never)")
    parser.add_argument("--batch-size", type=batch_size_value, default=32, help="per process (default 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the new head (default 0.01)")
    parser.add_argument("--backbone-lr", type=float, help="learning rate of the backbone (default: --lr / 10 for a "
                                                          "pretrained one, --lr with --no-pretrained)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="default sgd (Nesterov)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="default 1e-4")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="default 0.1")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="default 1")
    parser.add_argument("--img-size", type=positive, default=224, help="training and validation size (default 224)")
    parser.add_argument("--augment", choices=list(AUGMENTATIONS),
                        help="training augmentation: " + "; ".join(f"{k}: {v}" for k, v in AUGMENTATIONS.items())
                             + f" (default: crop from --img-size {CROP_FROM} up, flip below)")
    parser.add_argument("--crop-scale", type=float, metavar="MIN",
                        help="with --augment crop, the smallest crop as a share of the image's area (default 0.08)")
    parser.add_argument("--eval-crop-pct", type=float, metavar="F",
                        help="validation and the saved model's transform: resize the shorter side to --img-size / F, "
                             "then take the centre --img-size square (default: 0.875 with --augment crop, else 1)")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the head only (a linear probe)")
    parser.add_argument("--workers", type=count,
                        help="processes decoding images, per process (default: 0 for images of at most "
                             f"{int(math.sqrt(SMALL_IMAGE))}x{int(math.sqrt(SMALL_IMAGE))} pixels, which decode "
                             "faster in the main process; else the CPU count, at most 8)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "float32", *AMP], default="auto",
                        help="mixed precision: auto is bfloat16 (else float16) on a GPU, float32 on a CPU")
    parser.add_argument("--resume", type=Path, metavar="OUT/last.pth",
                        help="continue the run saved there, in its folder")
    parser.add_argument("--seed", type=count, default=0, help=f"0 to {MAX_SEED} (default 0)")
    parser.add_argument("--json", action="store_true", help="print each epoch's metrics as JSON")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = make_parser()
    args = parser.parse_args(argv)
    # Which recipe options were given, whatever their value: on --resume only those can disagree. argparse
    # leaves alone an attribute that the namespace already has, unless the option is given.
    unset = object()
    given = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(RECIPE, unset)))
    args.given = {name for name in RECIPE if getattr(given, name) is not unset}
    if args.output is None and args.resume is None:
        parser.error("the following arguments are required: --output (or --resume OUT/last.pth)")
    if args.seed > MAX_SEED:
        parser.error(f"--seed: must be at most {MAX_SEED}, got {args.seed}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing: must be at least 0 and below 1, got {args.label_smoothing}")
    if args.img_size < MIN_SIZE:
        parser.error(f"--img-size {args.img_size} is below the network's minimum of {MIN_SIZE} pixels "
                     "(it reduces images 32 times)")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction: must be between 0 and 1, got {args.val_fraction}")
    for name in ("crop_scale", "eval_crop_pct"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            parser.error(f"--{name.replace('_', '-')}: must be above 0 and at most 1, got {value}")
    if args.crop_scale is not None and args.augment not in (None, "crop"):
        parser.error(f"--crop-scale applies to --augment crop, not --augment {args.augment}")
    for name in ("lr", "backbone_lr", "weight_decay", "label_smoothing", "warmup_epochs"):
        value = getattr(args, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            parser.error(f"--{name.replace('_', '-')}: must be a finite number >= 0, got {value}")
    return parser, args


def complete_recipe(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on the start and the image size (after --resume took the saved ones)."""
    if args.backbone_lr is None:  # a pretrained backbone changes slowly; a random one learns with the head
        args.backbone_lr = args.lr if args.no_pretrained else args.lr / 10
    if args.augment is None:
        args.augment = "crop" if args.img_size >= CROP_FROM else "flip"
    if args.augment == "crop" and args.crop_scale is None:
        args.crop_scale = 0.08
    if args.eval_crop_pct is None:
        args.eval_crop_pct = 0.875 if args.augment == "crop" else 1.0


def resume(parser, args: argparse.Namespace) -> dict:
    """The saved run, with its recipe checked against the command line and put into ``args``."""
    if not args.resume.is_file():
        raise FinetuneError(f"--resume {args.resume}: no such file")
    try:
        check_format(args.resume, f"--resume {args.resume}")
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise FinetuneError(f"{str(e).split(': give a file')[0]}: give the last.pth of a run") from None
    except Exception as e:  # noqa: BLE001  (the first line says what; torch's advice that follows does not apply)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"--resume {args.resume}: not a last.pth saved by utils.finetune ({first})") from None
    if not isinstance(state, dict) or "recipe" not in state:
        raise FinetuneError(f"--resume {args.resume}: not a last.pth saved by utils.finetune")
    for name, saved in state["recipe"].items():
        given = getattr(args, name)
        given = str(given) if isinstance(given, Path) else given
        # Values were saved as resolved (--backbone-lr from --lr, ...): only one given here can disagree.
        if name in args.given and given != saved:
            raise FinetuneError(f"--resume: --{name.replace('_', '-')} {given} differs from the run being resumed "
                                f"({saved}); leave it out to continue that run")
        setattr(args, name, Path(saved) if name == "val" and saved is not None else saved)
    return state


def auto_workers(areas: list[int]) -> int:
    """Small images decode faster in the main process than through worker processes."""
    return 0 if sorted(areas)[len(areas) // 2] <= SMALL_IMAGE else min(8, os.cpu_count() or 1)


def output_folder(args: argparse.Namespace) -> Path:
    """Where the run's files go: a folder that holds no other run, outside the data; with --resume, the
    resumed run's own folder."""
    if args.resume is not None:
        own = args.resume.parent
        if args.output is not None and args.output.resolve() != own.resolve():
            raise FinetuneError(f"--resume {args.resume} continues in its own folder, {own}; leave --output out "
                                "(to keep the run as it is, copy that folder first and resume the copy)")
        return own
    out = args.output
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--output {out} is a file: give a folder (it is created if missing)")
    held = run_files(out) if out.is_dir() else []
    if held:
        remedy = f"--resume {out / 'last.pth'} continues it; " if "last.pth" in held else ""
        raise FinetuneError(f"--output {out} already holds a run ({', '.join(held)}): {remedy}choose another "
                            "--output for a new one")
    for data in filter(None, (args.train, args.val)):
        if out.resolve().is_relative_to(data.resolve()):
            raise FinetuneError(f"--output {out} is inside the images {data}: its files would be read as images; "
                                "choose a folder outside it")
    return out


def recover_metrics(folder: RunFolder, history: list[dict], resumed: int) -> None:
    """metrics.jsonl after --resume: lines are only ever appended. A damaged line is named and left; epochs that
    last.pth (the source of truth) has and the file lacks are appended."""
    path = folder.path / "metrics.jsonl"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    seen = set()
    for number, line in enumerate(text.splitlines(), 1):
        try:
            seen.add(json.loads(line)["epoch"])
        except (ValueError, TypeError, KeyError):
            print(f"warning: {path}, line {number}, is damaged ({line[:40]!r}); it is left as it is, and the "
                  f"epochs up to {resumed} come from last.pth", file=sys.stderr)
    missing = "".join(json.dumps(m) + "\n" for m in history if m["epoch"] not in seen)
    cut = text and not text.endswith("\n")  # a line cut short: the next one starts on a line of its own
    if missing or cut:
        folder.append("metrics.jsonl", "\n" * cut + missing)


def checkpoint_bytes(args: argparse.Namespace) -> int:
    """Room the run's files need at their peak: best.pth, last.pth (weights and optimizer state), and a
    new last.pth being written beside it."""
    weights = WEIGHTS[args.model].arch.params * 4
    last = weights * (2 if args.optimizer == "sgd" else 3)
    return weights + 2 * last


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    state = resume(parser, args) if args.resume else None
    args.output = output_folder(args)
    complete_recipe(args)
    classes, samples = class_folders(args.train, "TRAIN_DIR")
    if len(classes) < 2:
        raise FinetuneError(f"TRAIN_DIR {args.train} has a single class folder ({classes[0]}): a classifier needs "
                            "at least two classes")
    if state is not None and state["classes"] != classes:
        raise FinetuneError(f"--resume {args.resume} was trained on the classes {state['classes'][:5]}..., "
                            f"TRAIN_DIR has {classes[:5]}...: resume with the same TRAIN_DIR")
    if args.val is not None:
        val_classes, val = class_folders(args.val, "--val")
        if val_classes != classes:
            raise FinetuneError(f"--val {args.val} has the classes {val_classes[:5]}..., TRAIN_DIR has "
                                f"{classes[:5]}...: give both the same class folders")
        train = samples
    else:
        train, val = split(samples, args.val_fraction, args.seed)
    ctx = start(args.device)
    if state is not None and state.get("processes", 1) != ctx.world:
        raise FinetuneError(f"--resume {args.resume}: the run was trained on {state.get('processes', 1)} process(es), "
                            f"and this is {ctx.world}: resume it on as many (torchrun --nproc_per_node "
                            f"{state.get('processes', 1)}), since the batches each step sees depend on it")
    steps = len(train) // ctx.world // args.batch_size  # per epoch: each process drops its last partial batch
    if steps == 0:
        raise FinetuneError(f"TRAIN_DIR has {len(train)} training images, fewer than one batch ({args.batch_size} "
                            f"x {ctx.world} process(es)): lower --batch-size")
    folder = RunFolder(args.output) if ctx.main else None  # only the first process writes
    try:
        if folder is not None:
            if state is None and run_files(folder.path):  # another run finished there since output_folder looked
                raise FinetuneError(f"--output {args.output} already holds a run ({', '.join(run_files(folder.path))})"
                                    ": choose another --output for a new one")
            folder.check_space(checkpoint_bytes(args))
        return train_and_save(args, state, classes, train, val, ctx, steps, folder)
    finally:
        if folder is not None:
            folder.close()


def train_and_save(args, state, classes, train, val, ctx: Context, steps: int, folder: RunFolder | None) -> int:
    areas = check_readable(train + val)
    if args.workers is None:
        args.workers = auto_workers(areas)
    amp = None
    if args.dtype == "auto":
        if ctx.device.type == "cuda":
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    elif args.dtype != "float32":
        amp = AMP[args.dtype]
        check_native(amp, ctx.device, fallback="--dtype float32")

    torch.manual_seed(args.seed)  # the new head's initial weights
    model = build_model(args, len(classes), ctx.device)
    cfg = model.pretrained_cfg
    recipe = {name: str(v) if isinstance(v, Path) else v for name, v in ((n, getattr(args, n)) for n in RECIPE)}
    description = finetuned.describe(args.model, classes, args.img_size, args.eval_crop_pct, cfg["mean"], cfg["std"],
                                     {"recipe": recipe, "train": str(args.train), "result": {}})
    val_transform = Preprocess.from_config(description)  # exactly the transform the saved model carries
    train_transform = Augment(args.augment, val_transform, args.crop_scale or 1.0)
    optimizer = make_optimizer(args, model)
    schedule = make_schedule(optimizer, round(args.warmup_epochs * steps), args.epochs * steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp == torch.float16)
    net = nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model

    first, best, best_epoch, history = 1, -1.0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        first, best, best_epoch = state["epoch"] + 1, state["best_top1"], state.get("best_epoch", state["epoch"])
        description["finetuning"]["result"] = state.get("result", {})
        history = list(state.get("history", []))
    if folder is not None:
        folder.write_text("classes.txt", "".join(f"{c}\n" for c in classes))
        if state is not None:
            recover_metrics(folder, history, first - 1)
        announce(args, classes, len(train), len(val), ctx)

    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    dataset = Images(train, train_transform, seed=args.seed)
    last = min(args.epochs, args.stop_after or args.epochs)
    title = f"{args.model} on {args.train} ({len(classes)} classes, {args.img_size} px)"
    began = time.perf_counter()
    for epoch in range(first, last + 1):
        # The order follows from --seed and the epoch, each image's augmentation from them and its index: a
        # resumed run repeats them exactly, with any --workers.
        dataset.epoch = epoch
        sampler = (torch.utils.data.DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=True, seed=args.seed,
                                                       drop_last=True) if ctx.world > 1 else None)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                            shuffle=sampler is None, drop_last=True, num_workers=args.workers,
                            pin_memory=ctx.device.type == "cuda",
                            generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
        start_time = time.perf_counter()
        train_loss, seen = train_epoch(net, loader, optimizer, schedule, loss_fn, scaler, amp, ctx, epoch, args)
        train_seconds = time.perf_counter() - start_time
        top1, top5, val_loss = validate(model, val, val_transform, args, ctx, len(classes))
        now = time.perf_counter()
        if folder is None:
            continue
        elapsed = now - began
        record = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                  "val_top1": round(top1, 4), **({"val_top5": round(top5, 4)} if top5 is not None else {}),
                  "lr": group_lr(optimizer, "head"), "backbone_lr": group_lr(optimizer, "backbone"),
                  "images_per_second": round(seen / train_seconds, 2), "epoch_seconds": round(now - start_time, 3),
                  "elapsed_seconds": round(elapsed, 3), "processes": ctx.world}
        history.append(record)
        if top1 > best:
            best, best_epoch = top1, epoch
            description["finetuning"]["result"] = {"epoch": epoch, "val_top1": top1,
                                                   **({"val_top5": top5} if top5 is not None else {})}
            folder.save({"model": model.state_dict(), finetuned.KEY: description}, "best.pth")
        folder.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "best_top1": best, "best_epoch": best_epoch, "result": description["finetuning"]["result"],
                     "classes": classes, "entry": args.model, "recipe": recipe, "processes": ctx.world,
                     "history": history, finetuned.KEY: description}, "last.pth")
        folder.append("metrics.jsonl", json.dumps(record) + "\n")
        plot_to(folder, history, title)
        stop = args.patience is not None and epoch - best_epoch >= args.patience
        eta = 0 if stop else elapsed / (epoch - first + 1) * (last - epoch)
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            top5_text = f", top-5 {top5:.1f}%" if top5 is not None else ""
            print(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val top-1 "
                  f"{top1:.1f}%{top5_text}, lr {record['lr']:.2e}, {record['images_per_second']:.1f} images/s, "
                  f"{duration(now - start_time)} (elapsed {duration(elapsed)}, ETA {duration(eta)})", flush=True)
        if stop:
            print(f"no better validation top-1 for {args.patience} epochs (--patience): stopping early; the best "
                  f"was epoch {best_epoch}", file=sys.stderr if args.json else sys.stdout, flush=True)
            break
    if folder is not None and not args.json:
        best_file = args.output / "best.pth"
        where = (f"{best_file} (torch.hub.load(..., {args.model!r}, weights={str(best_file)!r}) or --weights "
                 f"{best_file} for the other commands)" if best_file.exists() else
                 f"{args.resume} (no best.pth was written in this folder)")  # best epoch before the folder's run
        print(f"best val top-1 {best:.1f}% (epoch {best_epoch}): {where}")
    return 0


def plot_to(folder: RunFolder, history: list[dict], title: str) -> None:
    """curves.png, written like the other files: beside its place, then renamed."""
    tmp = folder.path / f".curves.png.{os.getpid()}{TMP_SUFFIX}"
    try:
        if plot(history, tmp, title):
            os.replace(tmp, folder.path / "curves.png")
    except OSError as e:
        print(f"warning: curves.png could not be written ({e.strerror}); the run goes on", file=sys.stderr)
    finally:
        tmp.unlink(missing_ok=True)


def announce(args: argparse.Namespace, classes: list[str], n_train: int, n_val: int, ctx: Context) -> None:
    """The run's first lines: where it starts from and how it trains (stderr under --json)."""
    start_from = ("random weights (--no-pretrained)" if args.no_pretrained else
                  f"--weights {args.weights}" if args.weights else "the published weights")
    resumed = f", resumed from {args.resume}" if args.resume else ""
    crop = f" of {args.crop_scale:g}-1 of the area" if args.augment == "crop" else ""
    lines = [f"{args.model} from {start_from}{resumed}: {n_train} training and {n_val} validation images of "
             f"{len(classes)} classes at {args.img_size} px; augmentation {args.augment} "
             f"({AUGMENTATIONS[args.augment]}{crop}), evaluation crop {args.eval_crop_pct:g}; head lr {args.lr:g}, "
             f"backbone lr {args.backbone_lr:g}; {args.workers} worker(s), {ctx.world} process(es) on {ctx.device}"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        lines.append("note: curves.png will not be drawn: matplotlib is not installed (pip install matplotlib)")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        return run(args, parser)
    except ImageError as e:  # damage that the check before training cannot see, e.g. a truncated JPEG
        print(f"error: {last_line(e)}; the run stops: remove or replace the image, then {resume_advice(args)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {resume_advice(args)}", file=sys.stderr)
        return 130
    except (FinetuneError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {in_command_terms(e)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_advice(args: argparse.Namespace) -> str:
    """How to go on from where the run stopped."""
    last = args.output / "last.pth" if args.output is not None else args.resume
    if last is not None and last.exists():
        return f"python -m utils.finetune {shlex.quote(str(args.train))} --resume {shlex.quote(str(last))} continues"
    return "no epoch had finished: start again"


if __name__ == "__main__":
    sys.exit(main())
