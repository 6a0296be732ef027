"""One process per device under torchrun (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or a single process
without it, and how such processes stop together.

torchrun stops every process as soon as one exits, so no process may exit before the error has been
printed. The processes meet at fixed points: the start, and wherever one of them may fail alone. A
process that fails raises its error up to its command, which says it with ``give_up``: that joins the
meeting the others wait in (``check_together``). There the first process that failed prints its error,
once, and every process stops with its status: ``Stopped`` in those that found nothing wrong.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class Stopped(Exception):
    """Another process failed and said why: this one stops with ``code``, saying nothing."""

    def __init__(self, code: int):
        super().__init__(f"another process stopped with exit status {code}")
        self.code = code


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
    torchrun, its local GPU; ``Stopped`` where another process failed before the start."""
    world, rank = _world()
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        _meet(0)
    return Context(rank, world, device)


def check_together(failure: Exception | None = None) -> None:
    """A point every process reaches: raise ``failure`` (for the command to report with ``give_up``), or
    meet the others there and stop (``Stopped``) if one of them failed."""
    if failure is not None:
        raise failure
    if _world()[0] > 1:
        _meet(0)


def give_up(code: int, message: str) -> int:
    """Print ``message`` (an error) and return the exit status ``code``; under torchrun, at the meeting
    the other processes wait in, where only the first process that failed prints."""
    if _world()[0] == 1:
        print(message, file=sys.stderr)
        return code
    with contextlib.suppress(Stopped):
        _meet(code, message)
    return code


def _world() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def _meet(code: int, message: str = "") -> None:
    world, rank = _world()
    if not dist.is_initialized():  # default backends: gloo for the CPU tensors here, NCCL for CUDA's
        dist.init_process_group()
    codes = torch.zeros(world, dtype=torch.int64)
    codes[rank] = code
    dist.all_reduce(codes)  # every process's status
    failed = codes.nonzero().flatten().tolist()
    if not failed:
        return
    if rank == failed[0]:
        print(message, file=sys.stderr, flush=True)
    dist.all_reduce(torch.zeros(1))  # no process exits before that line is out
    raise Stopped(int(codes.max()))
