"""A whole fine-tuning run: the data checked and split, the model trained epoch by epoch on one process
or many, and best.pth, last.pth, metrics.jsonl and curves.png written as it goes."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from models import finetuned
from utils.images.dataset import ImageFiles
from utils.images.preprocess import Preprocess
from utils.system.distributed import Context, start
from utils.system.hardware import check_native
from utils.text import first
from utils.training import FinetuneError
from utils.training.augment import AUGMENTATIONS, Augment
from utils.training.data import auto_workers, check_readable, class_folders, split
from utils.training.loop import (
    AMP,
    build_model,
    group_lr,
    make_optimizer,
    make_schedule,
    train_epoch,
    validate,
)
from utils.training.plot import plot_to
from utils.training.resume import RECIPE, checkpoint_bytes, complete_recipe, output_folder, recover_metrics, resume
from utils.training.run_folder import RunFolder, run_files


def run(args: argparse.Namespace, device: torch.device) -> int:
    """Fine-tune as the command line ``args`` of ``python -m utils.finetune`` say, on ``device`` (a GPU of
    its own for each process under torchrun); 0 when done. FinetuneError and the errors of loading say
    what is wrong with the data, the options or the run to resume."""
    state = resume(args) if args.resume else None
    args.output = output_folder(args)
    complete_recipe(args)
    classes, samples = class_folders(args.train, "TRAIN_DIR")
    if len(classes) < 2:
        raise FinetuneError(f"TRAIN_DIR {args.train} has a single class folder ({classes[0]}): a classifier needs "
                            "at least two classes")
    if state is not None and state["classes"] != classes:
        raise FinetuneError(f"--resume {args.resume} was trained on the classes {first(state['classes'])}, "
                            f"TRAIN_DIR has {first(classes)}: resume with the same TRAIN_DIR")
    if args.val is not None:
        val_classes, val = class_folders(args.val, "--val")
        if val_classes != classes:
            raise FinetuneError(f"--val {args.val} has the classes {first(val_classes)}, TRAIN_DIR has "
                                f"{first(classes)}: give both the same class folders")
        train = samples
    else:
        train, val = split(samples, args.val_fraction, args.seed)
    ctx = start(device)
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


@dataclass
class Training:
    """What a run trains with, made once: the model (``net`` is it under DistributedDataParallel), the
    optimizer, schedule and loss scaler, the precision, the data and the description it will be saved with."""
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    loss_fn: nn.Module
    dataset: ImageFiles
    val_transform: Preprocess
    description: dict
    recipe: dict


@dataclass
class Progress:
    """Where a run stands: the next epoch, the best validation top-1 and its epoch, each epoch's record."""
    first: int = 1
    best: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)


def train_and_save(args, state, classes, train, val, ctx: Context, steps: int, folder: RunFolder | None) -> int:
    areas = check_readable(train + val)
    if args.workers is None:
        args.workers = auto_workers(areas)
    run = set_up(args, classes, train, ctx, steps)
    progress = Progress() if state is None else restore(run, state)
    if folder is not None:
        folder.write_text("classes.txt", "".join(f"{c}\n" for c in classes))
        if state is not None:
            recover_metrics(folder, progress.history, progress.first - 1)
        announce(args, classes, len(train), len(val), ctx)
    last = min(args.epochs, args.stop_after or args.epochs)
    title = f"{args.model} on {args.train} ({len(classes)} classes, {args.img_size} px)"
    began = time.perf_counter()
    for epoch in range(progress.first, last + 1):
        run.dataset.epoch = epoch
        start_time = time.perf_counter()
        train_loss, seen = train_epoch(run.net, epoch_loader(run.dataset, args, ctx, epoch), run.optimizer,
                                       run.schedule, run.loss_fn, run.scaler, run.amp, ctx, epoch, args)
        train_seconds = time.perf_counter() - start_time
        top1, top5, val_loss = validate(run.model, val, run.val_transform, args, ctx, len(classes))
        now = time.perf_counter()
        if folder is None:
            continue
        elapsed = now - began
        record = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                  "val_top1": round(top1, 4), **({"val_top5": round(top5, 4)} if top5 is not None else {}),
                  "lr": group_lr(run.optimizer, "head"), "backbone_lr": group_lr(run.optimizer, "backbone"),
                  "images_per_second": round(seen / train_seconds, 2), "epoch_seconds": round(now - start_time, 3),
                  "elapsed_seconds": round(elapsed, 3), "processes": ctx.world}
        save_epoch(folder, run, progress, record, (top1, top5), args, classes, ctx)
        plot_to(folder, progress.history, title)
        stop = args.patience is not None and epoch - progress.best_epoch >= args.patience
        eta = 0 if stop else elapsed / (epoch - progress.first + 1) * (last - epoch)
        report_epoch(args, record, (train_loss, val_loss, top1, top5), (now - start_time, elapsed, eta))
        if stop:
            print(f"no better validation top-1 for {args.patience} epochs (--patience): stopping early; the best "
                  f"was epoch {progress.best_epoch}", file=sys.stderr if args.json else sys.stdout, flush=True)
            break
    if folder is not None and not args.json:
        report_best(args, progress)
    return 0


def set_up(args, classes: list[str], train, ctx: Context, steps: int) -> Training:
    """The model, its optimizer, schedule and scaler, the precision and the data of a run, as it starts."""
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
    optimizer = make_optimizer(args, model)
    return Training(
        model=model, net=nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model,
        optimizer=optimizer, schedule=make_schedule(optimizer, round(args.warmup_epochs * steps), args.epochs * steps),
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp == torch.float16), amp=amp,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
        dataset=ImageFiles.labelled(train, Augment(args.augment, val_transform, args.crop_scale or 1.0),
                                    seed=args.seed),
        val_transform=val_transform, description=description, recipe=recipe)


def restore(run: Training, state: dict) -> Progress:
    """A resumed run's weights, optimizer, schedule and scaler as last.pth holds them, and where it stood."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.scaler.load_state_dict(state["scaler"])
    run.description["finetuning"]["result"] = state.get("result", {})
    return Progress(state["epoch"] + 1, state["best_top1"], state.get("best_epoch", state["epoch"]),
                    list(state.get("history", [])))


def epoch_loader(dataset: ImageFiles, args, ctx: Context, epoch: int) -> DataLoader:
    """The epoch's batches. The order follows from --seed and the epoch, each image's augmentation from them
    and its index: a resumed run repeats them exactly, with any --workers."""
    sampler = (torch.utils.data.DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=True, seed=args.seed,
                                                   drop_last=True) if ctx.world > 1 else None)
    if sampler is not None:
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True,
                      num_workers=args.workers, pin_memory=ctx.device.type == "cuda",
                      generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))


def save_epoch(folder: RunFolder, run: Training, progress: Progress, record: dict,
               accuracy: tuple[float, float | None], args, classes: list[str], ctx: Context) -> None:
    """best.pth if the epoch is the best yet (by its unrounded top-1), then last.pth and the epoch's line of
    metrics.jsonl."""
    epoch, (top1, top5) = record["epoch"], accuracy
    progress.history.append(record)
    if top1 > progress.best:
        progress.best, progress.best_epoch = top1, epoch
        run.description["finetuning"]["result"] = {"epoch": epoch, "val_top1": top1,
                                                   **({"val_top5": top5} if top5 is not None else {})}
        folder.save({"model": run.model.state_dict(), finetuned.KEY: run.description}, "best.pth")
    folder.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "schedule": run.schedule.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
                 "best_top1": progress.best, "best_epoch": progress.best_epoch,
                 "result": run.description["finetuning"]["result"], "classes": classes, "entry": args.model,
                 "recipe": run.recipe, "processes": ctx.world, "history": progress.history,
                 finetuned.KEY: run.description}, "last.pth")
    folder.append("metrics.jsonl", json.dumps(record) + "\n")


def report_epoch(args, record: dict, measured: tuple[float, float, float, float | None],
                 times: tuple[float, float, float]) -> None:
    """The epoch's line (its record under --json): ``measured`` is (train loss, val loss, top-1, top-5)
    unrounded, ``times`` the epoch's, elapsed and ETA seconds."""
    if args.json:
        print(json.dumps(record), flush=True)
        return
    (train_loss, val_loss, top1, top5), (seconds, elapsed, eta) = measured, times
    top5_text = f", top-5 {top5:.1f}%" if top5 is not None else ""
    print(f"epoch {record['epoch']}/{args.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val top-1 "
          f"{top1:.1f}%{top5_text}, lr {record['lr']:.2e}, {record['images_per_second']:.1f} images/s, "
          f"{duration(seconds)} (elapsed {duration(elapsed)}, ETA {duration(eta)})", flush=True)


def report_best(args, progress: Progress) -> None:
    best_file = args.output / "best.pth"
    where = (f"{best_file} (torch.hub.load(..., {args.model!r}, weights={str(best_file)!r}) or --weights "
             f"{best_file} for the other commands)" if best_file.exists() else
             f"no file holds it, as {best_file} is gone; {args.output / 'last.pth'} holds epoch "
             f"{progress.history[-1]['epoch']}")
    print(f"best val top-1 {progress.best:.1f}% (epoch {progress.best_epoch}): {where}")


def announce(args: argparse.Namespace, classes: list[str], n_train: int, n_val: int, ctx: Context) -> None:
    """The run's first lines: where it starts from and how it trains (stderr under --json)."""
    start_from = ("random weights (--no-pretrained)" if args.no_pretrained else
                  f"--weights {args.weights}" if args.weights else "the published weights")
    resumed = f", resumed from {args.resume}" if args.resume else ""
    crop = f" of {args.crop_scale:g}-1 of the area" if args.augment == "crop" else ""
    lines = [f"{args.model} from {start_from}{resumed}: {n_train} training and {n_val} validation images of "
             f"{len(classes)} classes at {args.img_size} px; augmentation {args.augment} "
             f"({AUGMENTATIONS[args.augment]}{crop}), evaluation crop {args.eval_crop_pct:g}; head lr {args.lr:g}, "
             f"backbone lr {args.backbone_lr:g}; {args.workers} worker(s), {ctx.world} process(es) on {ctx.device}"
             + ("; gradient checkpointing" if args.grad_checkpointing else "")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        lines.append("note: curves.png will not be drawn: matplotlib is not installed (pip install matplotlib)")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout, flush=True)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
