"""What a fine-tuned weights file says of itself, so that loading it needs no other argument.

``python -m utils.finetune`` saves ``{"model": state_dict, "pretrained_cfg": describe(...)}``: plain
tensors, strings, numbers, lists and dicts, which ``torch.load(weights_only=True)`` reads. The
description overrides the published entry's metadata: the head's size and class names, the input
size and evaluation transform the model was validated with, and the fine-tuning recipe and result.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from models.registry import INTERPOLATION, WEIGHTS, resize_size
from utils.weights.checkpoint import DESCRIPTION as KEY  # where checkpoint loading finds the description


def describe(entry: str, classes: Sequence[str], img_size: int, crop_pct: float, mean: Sequence[float],
             std: Sequence[float], finetuning: dict) -> dict:
    """The description of a model fine-tuned from ``entry`` on ``classes``, evaluated at ``img_size``
    after resizing the shorter side to ``resize_size(img_size, crop_pct)``."""
    return {"entry": entry, "num_classes": len(classes), "classes": list(classes), "wnids": None,
            "input_size": (3, img_size, img_size), "crop_pct": crop_pct, "resize_size": resize_size(img_size, crop_pct),
            "mean": tuple(mean), "std": tuple(std), "interpolation": INTERPOLATION, "finetuning": finetuning}


def check(description, origin: str) -> dict:
    """``description`` if it is one that ``describe`` makes, else a ValueError naming the file and the fault."""
    def fault(what: str) -> ValueError:
        return ValueError(f"{origin}: its {KEY} is damaged ({what}); save the model again with python -m "
                          "utils.finetune, or save model.state_dict() alone")

    if not isinstance(description, dict):
        raise fault(f"a {type(description).__name__}, not a dict")
    missing = sorted({"entry", "num_classes", "classes", "input_size", "crop_pct", "resize_size", "mean", "std"}
                     - description.keys())
    if missing:
        raise fault(f"no {', '.join(missing)}")
    d = description
    if d["entry"] not in WEIGHTS:
        raise fault(f"unknown entry {d['entry']!r}")
    n = d["num_classes"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise fault(f"num_classes {n!r}")
    if not (isinstance(d["classes"], (list, tuple)) and len(d["classes"]) == n
            and all(isinstance(c, str) for c in d["classes"])):
        raise fault(f"classes is not a list of {n} names")
    size = d["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[0] == 3 and size[1] == size[2]
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise fault(f"input_size {size!r}")
    if not (isinstance(d["crop_pct"], float) and 0 < d["crop_pct"] <= 1):
        raise fault(f"crop_pct {d['crop_pct']!r}")
    if not (isinstance(d["resize_size"], int) and d["resize_size"] >= size[1]):
        raise fault(f"resize_size {d['resize_size']!r}")
    for key in ("mean", "std"):
        value = d[key]
        numbers = isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, float) and math.isfinite(v) for v in value)
        if not numbers or (key == "std" and min(value) <= 0):
            raise fault(f"{key} {value!r}")
    if d.get("interpolation", INTERPOLATION) != INTERPOLATION:
        raise fault(f"interpolation {d['interpolation']!r}")
    return {**d, "input_size": tuple(size), "mean": tuple(d["mean"]), "std": tuple(d["std"]),
            "classes": list(d["classes"]), "wnids": None, "interpolation": INTERPOLATION}


def summary(description: dict) -> str:
    """``resnet18_ssl with a 10-class head (0, 1, 2, ...) at 32 px``: what the file holds, in a few words."""
    classes = description["classes"]
    shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    return (f"a fine-tuned {description['entry']} with a {description['num_classes']}-class head ({shown}) "
            f"at {description['input_size'][-1]} px")
