"""Accuracy counts: a model's top-1 and top-5 hits on labelled image files, on one process or summed over
torchrun's."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from utils.images.dataset import ImageFiles, batches
from utils.images.decode import ImageError
from utils.system.distributed import check_together


def hits(logits: Tensor, labels: Tensor) -> Tensor:
    """[top-1 hits, top-5 hits] of ``logits`` on ``labels`` (top-k with fewer than 5 classes): how evaluate
    and fine-tuning's validation both count, so that they give the same top-1 on the same images."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])


def count_correct(models: list[nn.Module], shard: list[tuple[Path, int]], preprocess, *, batch_size: int,
                  workers: int, device: torch.device, world: int = 1) -> tuple[list[list[int]], int, float]:
    """[top-1 hits, top-5 hits] of each model over this process's ``shard`` of (file, label) (each image
    decoded once for all of them), the number of images, summed over the ``world`` processes, and the
    slowest one's seconds. With no models, the images are only decoded and preprocessed (the input
    pipeline's speed). The first image that cannot be read raises ImageError."""
    rank = dist.get_rank() if world > 1 else 0
    # Not strict: a worker's exception would come back as a multi-line traceback; the error alone is enough.
    loader = batches(ImageFiles.labelled(shard, preprocess, strict=False), batch_size, workers, device)
    counts = torch.zeros(2 * len(models) + 1, dtype=torch.int64, device=device)  # (top-1, top-5 hits)s, images
    start = time.perf_counter()
    progress = tqdm(total=len(shard), unit="image", disable=rank != 0, file=sys.stderr,
                    desc=f"process 0 of {world}" if world > 1 else None)
    error = None
    with torch.inference_mode(), progress as bar:
        try:
            for indices, images, labels, errors in loader:
                if any(errors):
                    raise ImageError(next(e for e in errors if e))
                if models:  # (without, the decoding pipeline alone is measured)
                    labels = labels.to(device, non_blocking=True)
                    images = images.to(device, non_blocking=True)
                for i, model in enumerate(models):
                    counts[2 * i:2 * i + 2] += hits(model(images), labels)
                counts[-1] += len(indices)
                bar.update(len(indices))
        except ImageError as e:
            error = e
    check_together(error)  # every process learns whether one met an unreadable image, so none waits for its counts
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    counts = counts.tolist()
    return [counts[i:i + 2] for i in range(0, len(counts) - 1, 2)], counts[-1], elapsed.item()
