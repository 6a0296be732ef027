"""Fine-tune a pretrained model on your own images, on one process or many with torchrun.

    python -m utils.finetune TRAIN_DIR --output OUT [--model ENTRY] [--val VAL_DIR] [--epochs 10]
    torchrun --nproc_per_node 4 -m utils.finetune TRAIN_DIR --output OUT ...

TRAIN_DIR holds one folder of images per class, with any names: class i is the i-th folder in
sorted order. Without --val, a --val-fraction of each class (chosen by --seed) is held out for
validation. The recipe: the pretrained backbone with a new head, SGD with Nesterov momentum (or
AdamW) with a lower learning rate for the backbone, a linear warmup then cosine decay, label
smoothing, random resized crops and flips for training and the model's own evaluation transform at
--img-size for validation, channels_last, mixed precision on GPUs.

OUT receives best.pth (the best validation epoch's state dict, for torch.hub.load(...,
weights="OUT/best.pth", num_classes=K)), last.pth (everything --resume needs), classes.txt,
metrics.jsonl (one JSON object per epoch) and curves.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import CheckpointError
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

try:  # imported through hubconf.py's private package name
    from ..models import create_model
    from ..models.resnet import MIN_SIZE
except ImportError:  # run from the repository root: python -m utils.finetune
    from models import create_model
    from models.resnet import MIN_SIZE

# What makes the training recipe: a resumed run must not change these.
RECIPE = ("model", "weights", "no_pretrained", "epochs", "batch_size", "lr", "backbone_lr", "optimizer", "weight_decay",
          "label_smoothing", "warmup_epochs", "img_size", "seed", "val", "val_fraction", "freeze_backbone", "dtype")
AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class FinetuneError(ValueError):
    """A problem with the data, the options or the run to resume; the message says what to do."""


# ---- data ------------------------------------------------------------------------------------------------

def class_folders(root: Path, what: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """The sorted class names under ``root`` and every (image, class index)."""
    if not root.exists():
        raise FinetuneError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise FinetuneError(f"{what} {root} is not a directory: give a folder with one subfolder of images per class")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise FinetuneError(f"{what} {root} has no class folders: lay the images out as {root}/<class name>/<image>")
    samples, empty = [], []
    for label, folder in enumerate(folders):
        images = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
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
    train, val = [], []
    for label in sorted({label for _, label in samples}):
        mine = [s for s in samples if s[1] == label]
        rng.shuffle(mine)
        n = max(1, round(len(mine) * fraction))
        if n >= len(mine):
            raise FinetuneError(f"class {mine[0][0].parent.name!r} has {len(mine)} image(s): too few to hold out "
                                f"--val-fraction {fraction} for validation; add images or pass --val VAL_DIR")
        val += mine[:n]
        train += mine[n:]
    return sorted(train), sorted(val)


def check_readable(samples: list[tuple[Path, int]]) -> None:
    """Open every image's header before training, so that a bad file stops the run now, not hours in."""
    from PIL import Image

    bad = []
    for path, _ in samples:
        try:
            with Image.open(path) as f:
                f.verify()
        except Exception as e:  # noqa: BLE001  (PIL raises many types for damaged files)
            bad.append(f"{path} ({type(e).__name__})")
    if bad:
        raise FinetuneError(f"{len(bad)} unreadable image(s), the run stops: {'; '.join(bad[:5])}"
                            f"{'; ...' if len(bad) > 5 else ''}. Remove or replace them and run again")


class RandomResizedCropFlip:
    """Training augmentation: a random crop of 8-100% of the area and 3/4-4/3 aspect, resized to
    ``size``, flipped left-right half the time, normalised. Random numbers come from torch, so that
    DataLoader's per-worker seeds make them reproducible."""

    def __init__(self, size: int, mean, std, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.log_ratio = size, scale, (math.log(ratio[0]), math.log(ratio[1]))
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item())
            aspect = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * torch.rand(()).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()).item())
                top = int(torch.randint(0, height - h + 1, ()).item())
                return left, top, left + w, top + h
        side = min(width, height)  # the centre square, as torchvision falls back
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2

    def __call__(self, path: Path) -> Tensor:
        import numpy as np
        from PIL import Image

        image = read(path)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=self.box(*image.size))
        if torch.rand(()).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        return x.sub_(self.mean).div_(self.std)


class Images(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(path), label


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
    model = create_model(args.model, pretrained=not args.no_pretrained, weights=args.weights, num_classes=num_classes)
    if model.pretrained_cfg["head"] != "new":
        model.fc.reset_parameters()  # a file with a head of this size: start the head afresh all the same
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
def validate(model, samples, preprocess, args, ctx, num_classes: int) -> tuple[float, float | None]:
    """Top-1 and top-5 (None with fewer than 5 classes) in percent; each process takes every
    WORLD_SIZE-th image and the counts are summed."""
    model.eval()
    shard = samples[ctx.rank::ctx.world]
    loader = DataLoader(Images(shard, preprocess), batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=ctx.device.type == "cuda")
    counts = torch.zeros(3, dtype=torch.int64, device=ctx.device)
    k = min(5, num_classes)
    for images, labels in loader:
        images = images.to(ctx.device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        top = model(images).topk(k, dim=1).indices
        hits = top == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=ctx.device)])
    if ctx.world > 1:
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return 100 * top1 / n, (100 * top5 / n if num_classes >= 5 else None)


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    return next(g["lr"] for g in optimizer.param_groups if g["name"] == "head")


def save_atomically(obj, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename: a run killed while saving leaves the
    previous file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot(metrics: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=100)
    loss_axis.plot(epochs, [m["train_loss"] for m in metrics], "o-", color="tab:red", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss", color="tab:red")
    top1_axis = loss_axis.twinx()
    top1_axis.plot(epochs, [m["val_top1"] for m in metrics], "s-", color="tab:blue", label="val top-1")
    top1_axis.set_ylabel("validation top-1 (%)", color="tab:blue")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def last_line(error: Exception) -> str:
    """The error itself: a DataLoader worker's error arrives with the worker's traceback in its message."""
    lines = str(error).strip().splitlines() or [""]
    return re.sub(r"^[\w.]*ImageError: ", "", lines[-1])


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m utils.finetune", description=__doc__.split("\n\n")[0],
                                     epilog="The entries: " + ", ".join(WEIGHTS))
    parser.add_argument("train", type=Path, metavar="TRAIN_DIR", help="one folder of images per class")
    parser.add_argument("--output", type=Path, required=True, metavar="OUT", help="where the results go")
    parser.add_argument("--model", default="resnet50_swsl", choices=list(WEIGHTS), metavar="ENTRY",
                        help="the pretrained model to start from (default resnet50_swsl; the twelve entries are "
                             "listed below)")
    add_weights_arguments(parser, start="start from")
    parser.add_argument("--val", type=Path, metavar="VAL_DIR", help="validation images, the same class folders")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="without --val, the share of each class held out (default 0.1)")
    parser.add_argument("--epochs", type=positive, default=10, help="default 10")
    parser.add_argument("--stop-after", type=positive, metavar="EPOCH",
                        help="end this run after EPOCH (of --epochs), e.g. for a time-limited job; "
                             "--resume OUT/last.pth continues")
    parser.add_argument("--batch-size", type=batch_size_value, default=32, help="per process (default 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the new head (default 0.01)")
    parser.add_argument("--backbone-lr", type=float, help="learning rate of the pretrained backbone "
                                                          "(default: --lr / 10)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="default sgd (Nesterov)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="default 1e-4")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="default 0.1")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="default 1")
    parser.add_argument("--img-size", type=positive, default=224, help="training and validation size (default 224)")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the head only (a linear probe)")
    parser.add_argument("--workers", type=count, default=min(8, os.cpu_count() or 1),
                        help="processes decoding images, per process (default: the CPU count, at most 8)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "float32", *AMP], default="auto",
                        help="mixed precision: auto is bfloat16 (else float16) on a GPU, float32 on a CPU")
    parser.add_argument("--resume", type=Path, metavar="OUT/last.pth", help="continue the run saved there")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--json", action="store_true", help="print each epoch's metrics as JSON")
    args = parser.parse_args(argv)
    if args.img_size < MIN_SIZE:
        parser.error(f"--img-size {args.img_size} is below the network's minimum of {MIN_SIZE} pixels "
                     "(it reduces images 32 times)")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction: must be between 0 and 1, got {args.val_fraction}")
    for name in ("lr", "backbone_lr", "weight_decay", "label_smoothing", "warmup_epochs"):
        value = getattr(args, name)
        if value is not None and (value < 0 or not math.isfinite(value)):
            parser.error(f"--{name.replace('_', '-')}: must be a finite number >= 0, got {value}")
    if args.backbone_lr is None:
        args.backbone_lr = args.lr / 10
    return parser, args


def resume(parser, args: argparse.Namespace) -> dict:
    """The saved run, with its recipe checked against the command line and put into ``args``."""
    if not args.resume.is_file():
        raise FinetuneError(f"--resume {args.resume}: no such file")
    try:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise FinetuneError(f"--resume {args.resume}: not a run saved by utils.finetune ({e})") from e
    if not isinstance(state, dict) or "recipe" not in state:
        raise FinetuneError(f"--resume {args.resume}: not a last.pth saved by utils.finetune")
    for name, saved in state["recipe"].items():
        given = getattr(args, name)
        given = str(given) if isinstance(given, Path) else given
        default = parser.get_default(name)
        if given != saved and given != default and not (name == "backbone_lr" and given == args.lr / 10):
            raise FinetuneError(f"--resume: --{name.replace('_', '-')} {given} differs from the run being resumed "
                                f"({saved}); leave it out to continue that run")
        setattr(args, name, Path(saved) if name == "val" and saved is not None else saved)
    return state


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.output.exists() and not args.output.is_dir():
        raise FinetuneError(f"--output {args.output} is a file: give a folder (it is created if missing)")
    if not args.resume and (args.output / "last.pth").exists():
        raise FinetuneError(f"--output {args.output} already holds a run: --resume {args.output / 'last.pth'} "
                            "continues it; choose another --output for a new one")
    state = resume(parser, args) if args.resume else None
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
    steps = len(train) // ctx.world // args.batch_size  # per epoch: each process drops its last partial batch
    if steps == 0:
        raise FinetuneError(f"TRAIN_DIR has {len(train)} training images, fewer than one batch ({args.batch_size} "
                            f"x {ctx.world} process(es)): lower --batch-size")
    check_readable(train + val)
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
    train_transform = RandomResizedCropFlip(args.img_size, cfg["mean"], cfg["std"])
    val_transform = Preprocess(round(args.img_size / cfg["crop_pct"]), args.img_size, cfg["mean"], cfg["std"])
    optimizer = make_optimizer(args, model)
    schedule = make_schedule(optimizer, round(args.warmup_epochs * steps), args.epochs * steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp == torch.float16)
    net = nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model

    first, best, metrics = 1, -1.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        first, best = state["epoch"] + 1, state["best_top1"]
    args.output.mkdir(parents=True, exist_ok=True)
    metrics_path = args.output / "metrics.jsonl"
    if ctx.main:
        (args.output / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
        if metrics_path.exists() and state is not None:  # drop epochs after the one resumed from
            metrics = [m for m in map(json.loads, metrics_path.read_text().splitlines()) if m["epoch"] < first]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))

    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    dataset = Images(train, train_transform)
    last = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(first, last + 1):
        # Every epoch's randomness follows from --seed and the epoch alone, so a resumed run repeats it exactly.
        torch.manual_seed(args.seed * 1_000_003 + epoch)
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
        seconds = time.perf_counter() - start_time
        top1, top5 = validate(model, val, val_transform, args, ctx, len(classes))
        if not ctx.main:
            continue
        record = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_top1": round(top1, 4),
                  **({"val_top5": round(top5, 4)} if top5 is not None else {}),
                  "lr": head_lr(optimizer), "images_per_second": round(seen / seconds, 2),
                  "processes": ctx.world}
        if top1 > best:
            best = top1
            save_atomically(model.state_dict(), args.output / "best.pth")
        save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "best_top1": best, "classes": classes, "entry": args.model,
                         "recipe": {name: str(v) if isinstance(v, Path) else v
                                    for name, v in ((n, getattr(args, n)) for n in RECIPE)},
                         "rng": {"torch": torch.get_rng_state()}}, args.output / "last.pth")
        metrics.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        plot(metrics, args.output / "curves.png")
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            top5_text = f", top-5 {top5:.1f}%" if top5 is not None else ""
            print(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f}, val top-1 {top1:.1f}%{top5_text}, "
                  f"lr {record['lr']:.2e}, {record['images_per_second']:.1f} images/s", flush=True)
    if ctx.main and not args.json:
        print(f"best val top-1 {best:.1f}%: {args.output / 'best.pth'} "
              f"(torch.hub.load(..., weights={str(args.output / 'best.pth')!r}, num_classes={len(classes)}))")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        return run(args, parser)
    except ImageError as e:  # damage that the check before training cannot see, e.g. a truncated JPEG
        print(f"error: {last_line(e)}; the run stops: remove or replace the image, then --resume "
              f"{args.output / 'last.pth'} (if an epoch has finished) or start again", file=sys.stderr)
        return 1
    except (FinetuneError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {in_command_terms(e)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
