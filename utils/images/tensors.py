"""What the networks take: a float batch of RGB images (N, 3, H, W) of at least 32x32 pixels.

The models check their input with ``check_input`` before computing, and so do the optimised models of
utils/inference, so that a wrong input gets the same clear error from each.
"""
from __future__ import annotations

import torch
from torch import Tensor

MIN_SIZE = 32  # the network reduces images 32 times: smaller ones have nothing left to classify


def check_input(x: Tensor, weight: Tensor) -> None:
    """Raise a clear error for input the network cannot take: torch's own errors name neither the
    expected layout nor the remedy (and a CHW image without a batch dimension would not even fail)."""
    if torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
        return  # a trace records tensor operations only: these Python checks would not be in it anyway
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a tensor of images (N, 3, H, W), got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.dim() != 4:
        hint = ": add the batch dimension with x[None]" if x.dim() == 3 else ""
        raise ValueError(f"expected a batch of images of shape (N, 3, H, W), got shape {shape}{hint}")
    if shape[1] != 3:
        hint = "; channels last? use x.permute(0, 3, 1, 2)" if shape[3] == 3 else ""
        raise ValueError(f"expected 3 colour channels, (N, 3, H, W), got shape {shape}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"expected float input, got {x.dtype}: model.preprocess(image) scales and normalises images")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TypeError(f"the input is {x.dtype} on {x.device} but the model is {weight.dtype} on {weight.device}: "
                        f"use x.to({str(weight.device)!r}, {weight.dtype})")
    if min(shape[2:]) < MIN_SIZE:
        raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {shape[2]}x{shape[3]}: "
                         "resize them (model.preprocess makes 224x224)")
