"""One process per device under torchrun (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or a single process
without it: the start that evaluation and fine-tuning share."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(device: torch.device) -> Context:
    """This process's place among torchrun's (one process without it), on ``device`` or, for CUDA under
    torchrun, its local GPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, device)
