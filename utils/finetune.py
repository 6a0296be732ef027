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
import math
import re
import shlex
import sys
from pathlib import Path

import torch.distributed as dist

from models import WEIGHTS
from utils.cli import (
    CANNOT_RUN,
    Parser,
    add_weights_arguments,
    batch_size_value,
    count,
    device_name,
    error_line,
    pick_device,
    positive,
)
from utils.images.decode import ImageError
from utils.images.tensors import MIN_SIZE
from utils.system.distributed import Stopped, give_up
from utils.training.augment import AUGMENTATIONS, CROP_FROM
from utils.training.data import SMALL_IMAGE
from utils.training.loop import AMP
from utils.training.resume import RECIPE
from utils.training.run import run

MAX_SEED = 2**32 - 1  # seeds the shuffling as seed * 1_000_003 + epoch, within torch's 64 bits


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m utils.finetune", description=__doc__.split("\n\n")[0],
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
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass instead of keeping them: "
                             "far less memory (larger batches) for about a third more time")
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
    if args.batch_size < 2 and not args.freeze_backbone:
        parser.error("--batch-size 1: training needs at least 2 images a batch, as BatchNorm normalises over the "
                     "batch; use --batch-size 2 or more (or --freeze-backbone, which keeps BatchNorm as it is)")
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


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        return run(args, pick_device(args.device))
    except Stopped as e:  # another process failed, and said why
        return e.code
    except ImageError as e:  # damage that the check before training cannot see, e.g. a truncated JPEG
        return give_up(1, f"error: {last_line(e)}; the run stops: remove or replace the image, then "
                          f"{resume_advice(args)}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {resume_advice(args)}", file=sys.stderr)
        return 130
    except CANNOT_RUN as e:  # FinetuneError is a ValueError
        return give_up(2, error_line(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_advice(args: argparse.Namespace) -> str:
    """How to go on from where the run stopped."""
    last = args.output / "last.pth" if args.output is not None else args.resume
    if last is not None and last.exists():
        return f"python -m utils.finetune {shlex.quote(str(args.train))} --resume {shlex.quote(str(last))} continues"
    return "no epoch had finished: start again"


def last_line(error: Exception) -> str:
    """The error itself: a DataLoader worker's error arrives with the worker's traceback in its message."""
    lines = str(error).strip().splitlines() or [""]
    return re.sub(r"^[\w.]*ImageError: ", "", lines[-1])


if __name__ == "__main__":
    sys.exit(main())
