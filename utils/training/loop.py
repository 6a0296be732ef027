"""One process's share of the training: the model to train, the optimizer and schedule,
an epoch of training and a validation pass (summed over the processes)."""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models import create_model
from utils.images.dataset import ImageFiles, batches
from utils.images.decode import ImageError
from utils.system.accuracy import hits
from utils.system.distributed import check_together
from utils.training import FinetuneError

AMP = {"bfloat16": torch.bfloat16, "float16": torch.float16}


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
    model.set_grad_checkpointing(args.grad_checkpointing)
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
    stream = iter(bar)
    for _ in range(len(loader)):
        failure = None
        try:
            _, images, labels, _ = next(stream)
        except ImageError as e:  # damage the check before training could not see, in this process's share
            failure = e
        check_together(failure)
        images = images.to(ctx.device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(images), labels)
        check_together(None if torch.isfinite(loss) else FinetuneError(
            f"the loss became {loss.item()} in epoch {epoch}: lower --lr"))
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
    loader = batches(ImageFiles.labelled(shard, preprocess), args.batch_size, args.workers, ctx.device)
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # top-1 hits, top-5 hits, loss, images
    bar = tqdm(loader, desc="validation", unit="batch", disable=not ctx.main or None, file=sys.stderr, leave=False)
    failure = None
    try:  # no collective inside: the processes' shares differ in length
        for _, images, labels, _ in bar:
            images = images.to(ctx.device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(ctx.device, non_blocking=True)
            logits = model(images).float()
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums += torch.cat([hits(logits, labels).to(sums), torch.stack([loss, torch.tensor(len(labels))]).to(sums)])
    except ImageError as e:
        failure = e
    check_together(failure)
    if ctx.world > 1:
        dist.all_reduce(sums)
    top1, top5, loss, n = sums.tolist()
    return 100 * top1 / n, (100 * top5 / n if num_classes >= 5 else None), loss / n


def group_lr(optimizer: torch.optim.Optimizer, part: str) -> float | None:
    return next((g["lr"] for g in optimizer.param_groups if g["name"] == part), None)
