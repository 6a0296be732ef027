"""What a fine-tuned weights file says of itself, so that loading it needs no other argument.

``python -m utils.finetune`` saves ``{"model": state_dict, "pretrained_cfg": describe(...)}``: plain
tensors, strings, numbers, lists and dicts, which ``torch.load(weights_only=True)`` reads. The
description overrides the published entry's metadata: the head's size and class names, the input
size and evaluation transform the model was validated with, and the fine-tuning recipe and result.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from models.registry import INTERPOLATION, WEIGHTS, resize_size
from utils.text import first
from utils.weights.checkpoint import DESCRIPTION as KEY  # where checkpoint loading finds the description


def describe(entry: str, classes: Sequence[str], img_size: int, crop_pct: float, mean: Sequence[float],
             std: Sequence[float], finetuning: dict) -> dict:
    """The description of a model fine-tuned from ``entry`` on ``classes``, evaluated at ``img_size``
    after resizing the shorter side to ``resize_size(img_size, crop_pct)``."""
    return {"entry": entry, "num_classes": len(classes), "classes": list(classes), "wnids": None,
            "input_size": (3, img_size, img_size), "crop_pct": crop_pct, "resize_size": resize_size(img_size, crop_pct),
            "mean": tuple(mean), "std": tuple(std), "interpolation": INTERPOLATION, "finetuning": finetuning}


# Bounds on what a file may say: sizes the network takes (32 px and up) and preprocessing can hold in
# memory, and a normalisation that keeps every input finite.
MAX_CLASSES = 100_000
IMG_SIZES = (32, 2048)
MEANS = (0.0, 1.0)  # of pixel values in 0-1
STDS = (0.01, 10.0)


def check(description, origin: str) -> dict:
    """The schema's fields of ``description``, checked, if it is one that ``describe`` makes (a saved
    ``model.pretrained_cfg`` too), else a ValueError naming the file and the fault."""
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
    if not isinstance(d["entry"], str) or d["entry"] not in WEIGHTS:
        raise fault(f"entry {_short(d['entry'])}: not one of the twelve entries")
    n = d["num_classes"]
    if not _whole(n, 1, MAX_CLASSES):
        raise fault(f"num_classes {_short(n)}: not a whole number from 1 to {MAX_CLASSES:,}")
    classes = _class_names(d["classes"], n, fault)
    wnids = d.get("wnids")
    if wnids is not None and not (isinstance(wnids, (list, tuple)) and len(wnids) == n
                                  and all(isinstance(w, str) and WNID.fullmatch(w) for w in wnids)):
        raise fault(f"wnids is neither None nor a list of {n} WordNet ids")
    size = d["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[0] == 3 and size[1] == size[2]
            and _whole(size[1], *IMG_SIZES)):
        raise fault(f"input_size {_short(size)}: not (3, N, N) with N from {IMG_SIZES[0]} to {IMG_SIZES[1]}")
    crop = d["crop_pct"]
    if not (isinstance(crop, float) and 0.1 <= crop <= 1):
        raise fault(f"crop_pct {_short(crop)}: not a fraction from 0.1 to 1")
    if d["resize_size"] != resize_size(size[1], crop) or isinstance(d["resize_size"], bool):
        raise fault(f"resize_size {_short(d['resize_size'])} disagrees with input_size {size[1]} and crop_pct "
                    f"{crop}, which give {resize_size(size[1], crop)}")
    for key, (low, high) in (("mean", MEANS), ("std", STDS)):
        value = d[key]
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, float) and low <= v <= high for v in value)):
            raise fault(f"{key} {_short(value)}: not 3 numbers from {low} to {high}")
    if d.get("interpolation", INTERPOLATION) != INTERPOLATION:
        raise fault(f"interpolation {_short(d['interpolation'])}: only {INTERPOLATION!r} is supported")
    finetuning = d.get("finetuning", {})
    if not (isinstance(finetuning, dict) and isinstance(finetuning.get("result", {}), dict)):
        raise fault(f"finetuning {_short(finetuning)}: not a dict with a dict 'result'")
    # The schema's fields alone: where the weights came from, the head that loading found and the registry's
    # facts (license, URL, parameters) are the loader's, whatever else the file says.
    return {"entry": d["entry"], "num_classes": n, "classes": classes, "wnids": None if wnids is None else list(wnids),
            "input_size": tuple(size), "crop_pct": crop, "resize_size": d["resize_size"], "mean": tuple(d["mean"]),
            "std": tuple(d["std"]), "interpolation": INTERPOLATION, "finetuning": finetuning}


def of_model(cfg: dict) -> dict | None:
    """The description of a model that holds a fine-tuned file's head (``cfg`` is its ``pretrained_cfg``), as a
    file made from it must carry it; None for any other model (published weights, a new or no head)."""
    if "finetuning" not in cfg or cfg.get("head") != "pretrained":
        return None
    return check(cfg, f"the model of {cfg.get('source')}")


WNID = re.compile(r"n\d{8}")
# Names that print as one line and survive classes.txt: no control characters, no surrounding spaces.
CLASS_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _class_names(classes, n: int, fault) -> list[str]:
    if not (isinstance(classes, (list, tuple)) and len(classes) == n and all(isinstance(c, str) for c in classes)):
        raise fault(f"classes is not a list of {n} names")
    bad = [c for c in classes if not class_name_ok(c)]
    if bad:
        raise fault(f"class name {bad[0]!r}: empty, with control characters or surrounding spaces")
    if len(set(classes)) < n:
        raise fault(f"class name {next(c for c in classes if classes.count(c) > 1)!r} appears twice")
    return list(classes)


def class_name_ok(name: str) -> bool:
    """Whether ``name`` can name a class: one line, printable, without surrounding spaces."""
    return bool(CLASS_NAME.fullmatch(name)) and name == name.strip() and len(name) <= 1000


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def summary(description: dict) -> str:
    """``resnet18_ssl with a 10-class head (0, 1, 2, ...) at 32 px``: what the file holds, in a few words."""
    classes = description["classes"]
    return (f"a fine-tuned {description['entry']} with a {description['num_classes']}-class head "
            f"({first(classes, 3)}) "
            f"at {description['input_size'][-1]} px")
