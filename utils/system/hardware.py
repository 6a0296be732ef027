"""What the processor can do fast: the low precisions it computes natively, and its name.

oneDNN reports bfloat16 as "supported" on any AVX-512 CPU, where it is emulated and runs at about
half the speed of float32. Whether a precision is fast is decided here by the instructions that make
it so, read from the CPU's flags; tests replace ``cpu_flags`` to take every branch on any machine.
"""
from __future__ import annotations

import functools
import os
import platform

import torch

# Instructions that compute the precision natively (x86: AVX-512 and AMX; Arm: the BF16 and FP16
# extensions), any one of which suffices.
NATIVE_INSTRUCTIONS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "fphp"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"),  # 8-bit dot products
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux lists them (x86 "flags", Arm "Features"); empty
    where /proc/cpuinfo is not there, so that nothing is assumed."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native(dtype: torch.dtype | str) -> bool:
    """True where the CPU computes ``dtype`` natively; float32 always. "int8": 8-bit dot products (VNNI)."""
    if dtype == torch.float32:
        return True
    return any(flag in cpu_flags() for flag in NATIVE_INSTRUCTIONS.get(dtype, ()))


def check_native(dtype: torch.dtype | str, device: torch.device, fallback: str = "dtype=None (float32)") -> None:
    """Raise ValueError for a precision ``device`` would only emulate, slower than float32; the
    message suggests ``fallback``. INT8 runs on any CPU (its runtimes have AVX2 and VNNI kernels;
    whether it is faster is measured: backend="auto"), and on no GPU here."""
    if dtype == torch.float32:
        return
    if dtype == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 runs on the CPU here (in OpenVINO or ONNX Runtime), not on {device}: "
                             f"put the model on the CPU, or use {fallback}")
        return
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError(f"{device} has no native bfloat16 (it needs an Ampere or newer GPU): "
                             f"use {fallback} or float16")
        return
    if device.type == "cpu":
        if not cpu_has_native(dtype):
            needs = " or ".join(NATIVE_INSTRUCTIONS[dtype][:2])
            raise ValueError(f"this CPU has no native {name} ({needs} instructions): {name} would run slower "
                             f"than float32 here; use {fallback}")
        return
    raise ValueError(f"{name} on {device} is untested here: use {fallback}")


def cpu_name() -> str:
    """The processor's model name, e.g. "AMD EPYC 9B45"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """Name, cores and the flags that decide the fast paths, for benchmark headers."""
    isa = [f for f in ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
                       "amx_bf16", "amx_fp16")
           if f in cpu_flags()]
    return f"{cpu_name()} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} cores"
