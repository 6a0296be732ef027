"""Timing side by side: functions called round-robin, so that the machine's ups and downs fall on all of
them alike; the dense matrix-multiply ceiling of the same run; the machine."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from utils.system.hardware import describe_cpu

MATMUL_SIZE = {True: 2048, False: 8192}  # on CPU, on GPU
ALLOCATOR_SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")  # shown with the results: they change them


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(functions: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     device: torch.device, progress: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin: one call of each per round."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(warmup + repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
            progress()
    return times


def matmul_functions(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """A dense n x n x n matrix multiply two ways: torch.mm (BLAS) and the same GEMM as a 1x1
    convolution in channels_last (oneDNN on CPU, cuDNN on GPU). Each library has its own kernels, and
    on some CPUs one is much faster than the other: the ceiling is the faster of the two."""
    n = MATMUL_SIZE[device.type == "cpu"]
    if dtype == "int8":  # the integer GEMM that INT8 convolutions reduce to (VNNI where the CPU has it)
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
        return {"mm": lambda: torch._int_mm(a, b)}
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    # rows = batch x height x width = n, reduction = in-channels = n, columns = out-channels = n
    image = a.reshape(n // 64, 8, 8, n).permute(0, 3, 1, 2)  # a, seen as a channels_last image batch
    kernel = b.reshape(n, n, 1, 1)
    return {"mm": lambda: torch.mm(a, b), "conv": lambda: F.conv2d(image, kernel)}


def gemm_gflops(device: torch.device, seconds: float) -> float:
    return 2 * MATMUL_SIZE[device.type == "cpu"] ** 3 / seconds / 1e9


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    # The allocator matters on CPU: see benchmarks/README.md.
    allocator = "".join(f", {name}={os.environ[name]}" for name in ALLOCATOR_SETTINGS if name in os.environ)
    return f"{describe_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}{allocator}"
