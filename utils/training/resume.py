"""A run's recipe, where its files go, and resuming it from its last.pth exactly where it stopped."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from models import WEIGHTS
from utils.training import FinetuneError
from utils.training.augment import CROP_FROM
from utils.training.run_folder import RunFolder, run_files
from utils.weights import CheckpointError
from utils.weights.checkpoint import check_format

# What makes the training recipe: a resumed run must not change these.
RECIPE = ("model", "weights", "no_pretrained", "epochs", "batch_size", "lr", "backbone_lr", "optimizer", "weight_decay",
          "label_smoothing", "warmup_epochs", "img_size", "augment", "crop_scale", "eval_crop_pct", "patience", "seed",
          "val", "val_fraction", "freeze_backbone", "dtype")


def resume(args: argparse.Namespace) -> dict:
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
