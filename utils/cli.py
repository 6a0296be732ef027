"""What the commands share: their options and argparse types, the device, and the model to run."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

from models import WEIGHTS, create_model, finetuned
from models.factory import weights_description
from models.registry import imagenet1k_classes, resize_size
from utils.images.preprocess import Preprocess
from utils.images.tensors import MIN_SIZE
from utils.inference.optimize import BACKENDS, DTYPE_NAMES, optimize_for_inference
from utils.system.distributed import give_up
from utils.system.hardware import check_native
from utils.weights import CheckpointError, download
from utils.weights.checkpoint import NO_FOLDER_WEIGHTS, folder_weights

DEFAULT_ENTRY = "resnet50_swsl"


class Parser(argparse.ArgumentParser):
    """argparse for the commands that run under torchrun: a bad option is said once, by the first
    process, and no process exits before it is out (utils/system/distributed.py)."""

    def error(self, message: str):
        sys.exit(give_up(2, f"{self.format_usage()}{self.prog}: error: {message}"))


def add_model_arguments(parser: argparse.ArgumentParser, batch_size: int, backend: str = "torch") -> None:
    """The options of the commands that run a model over images; ``backend``, the float default, is the
    command's to apply where --backend is left out (None)."""
    add_entry_arguments(parser)
    parser.add_argument("--batch-size", type=batch_size_value, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--workers", type=count, default=min(8, os.cpu_count() or 1),
                        help="processes decoding images; 0 decodes in the main process (default: the CPU count, "
                             "at most 8)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="float32",
                        help="precision to run the model in: bfloat16 is about twice as fast on CPUs and GPUs "
                             "that have it; int8 (CPU, with --calibration) faster still (default float32)")
    parser.add_argument("--calibration", nargs="+", metavar="IMAGES",
                        help="for --dtype int8: 50 to 300 images like those the model will see (folders, files or "
                             "glob patterns), which set the INT8 ranges")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="what runs the model: torch, onnxruntime or openvino (CPU, optional installs), or auto "
                             f"for the fastest of those installed, timed on the first batch (default: {backend}; for "
                             "int8, the faster INT8 runtime installed)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_entry_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --weights (or --no-pretrained) and --img-size, as every command that loads a model takes them."""
    parser.add_argument("--model", choices=list(WEIGHTS), metavar="ENTRY",
                        help=f"one of the twelve entries (default: the one a fine-tuned --weights file was made from, "
                             f"else {DEFAULT_ENTRY}): {', '.join(WEIGHTS)}")
    add_weights_arguments(parser)
    parser.add_argument("--img-size", type=img_size_value, metavar="N",
                        help="input size, for --weights that do not say theirs (a file saved by utils.finetune does; "
                             "default 224): resize to N / 0.875, centre-crop N")


def describe_weights(args: argparse.Namespace) -> dict | None:
    """What a fine-tuned --weights file says of itself (None for a plain state dict); --model defaults to its
    entry, else to resnet50_swsl."""
    description = weights_description(args.weights) if args.weights else None
    if args.model is None:
        args.model = description["entry"] if description else DEFAULT_ENTRY
    if description and args.img_size not in (None, description["input_size"][-1]):
        raise contradiction(f"--img-size {args.img_size}", args.weights, description)
    return description


def contradiction(option: str, weights: str, description: dict) -> ValueError:
    """The error of an ``option`` (``--img-size 64``) that disagrees with a fine-tuned --weights file."""
    return ValueError(f"{option} contradicts --weights {weights}, which holds {finetuned.summary(description)}: "
                      f"leave {option.split()[0]} out")


def input_config(cfg: dict, img_size: int | None) -> dict:
    """``cfg`` with the input ``img_size`` (and the published crop fraction), or as it is for None."""
    if img_size is None:
        return cfg
    resize = resize_size(img_size, cfg["crop_pct"])
    return {**cfg, "input_size": (3, img_size, img_size), "resize_size": resize}


NO_PRETRAINED = "random weights (--no-pretrained): the classes are meaningless"


def add_weights_arguments(parser: argparse.ArgumentParser, start: str = "load",
                          random: str = "random weights instead of the published ones: tries the command offline, "
                                        "before the weights are there (results are then meaningless)") -> None:
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=weights_source,
                         help=f"a checkpoint path or URL to {start} instead of the published weights")
    weights.add_argument("--no-pretrained", action="store_true", help=random)


# argparse types: a bad value ends the command with argparse's one-line error and exit status 2.

MAX_BATCH_SIZE = 4096


def positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def img_size_value(text: str) -> int:
    value = positive(text)
    if value < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_SIZE} pixels (the network reduces images 32 times), "
                                         f"got {value}")
    return value


def count(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def batch_size_value(text: str) -> int:
    value = positive(text)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH_SIZE}, got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def device_name(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N of a GPU that is there."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the commands run on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA device(s), "
                                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


def weights_source(text: str) -> str:
    """``--weights``: an http(s):// or file:// URL, or a checkpoint file or model folder that is there."""
    try:
        if download.is_url(text, what=text):
            return text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir() and folder_weights(path) is None:
        raise argparse.ArgumentTypeError(f"{text}: {NO_FOLDER_WEIGHTS}; give a checkpoint file or a model folder")
    if not (path.is_file() or path.is_dir()):
        raise argparse.ArgumentTypeError(f"{text}: not a regular file; give a checkpoint file")
    return text


def wordnet_ids() -> list[str]:
    """The ImageNet-1k WordNet ids in model-output order."""
    return [wnid for wnid, _ in imagenet1k_classes()]


def pick_device(name: str, backend: str | None = "torch", dtype: str = "float32") -> torch.device:
    """``--device``; "auto" is CUDA where there is one, except for the runtimes and INT8, which run on the CPU."""
    if name == "auto":
        cpu_only = backend in ("onnxruntime", "openvino") or dtype == "int8"
        return torch.device("cuda" if torch.cuda.is_available() and not cpu_only else "cpu")
    try:
        return torch.device(device_name(name))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--device {e}") from None


# What a command cannot run with: a bad value, weights or files that are missing or unusable, a runtime
# that is not installed. Each is one line, "error: ...", and exit status 2.
CANNOT_RUN = (ValueError, FileNotFoundError, ImportError, CheckpointError)


def error_line(error: Exception) -> str:
    return f"error: {in_command_terms(error)}"


def in_command_terms(error: Exception) -> str:
    """An error of the Python API as the commands say it: ``weights='x.pth'`` is ``--weights x.pth``."""
    message = re.sub(r"\bweights=(?:'([^']*)'|(<[^>]*>))", lambda m: f"--weights {m[1] or m[2]}", str(error))
    message = re.sub(r"num_classes=(\d+) \(--num-classes \d+ on the command line\)", r"--num-classes \1", message)
    message = message.replace("use backend=None for the faster one installed, 'openvino', 'onnxruntime' or 'auto'",
                              "leave --backend out for the faster one installed, or use --backend openvino, "
                              "onnxruntime or auto")
    return re.sub(r"backend='(\w+)'", r"--backend \1", message).replace("dtype='int8'", "--dtype int8")


def check_dtype(args: argparse.Namespace, device: torch.device) -> None:
    """``--dtype`` (and ``--calibration``), refused before any loading where ``device`` would only emulate
    it, or where INT8 has no calibration images."""
    check_native(DTYPE_NAMES[args.dtype], device, fallback="--dtype float32")
    if args.dtype == "int8" and not args.calibration:
        raise ValueError("--dtype int8 needs --calibration IMAGES: 50 to 300 images like those the model will see, "
                         "which set the INT8 ranges")
    if args.calibration and args.dtype != "int8":
        raise ValueError(f"--calibration is for --dtype int8, not {args.dtype}: leave it out")


def load_model(entry: str, weights: str | None, device: torch.device, num_classes: int | None = None,
               dtype: str = "float32", backend: str | None = None, pretrained: bool = True,
               img_size: int | None = None, calibration: list[str] | None = None) -> nn.Module:
    """The model on ``device``, optimised for inference by ``backend`` in ``dtype`` (INT8 calibrated on
    the ``calibration`` images); random weights without ``pretrained``; ``img_size`` for weights that do
    not say theirs."""
    model = eager_model(entry, weights, device, num_classes, pretrained, img_size)
    return optimize_for_inference(model, backend=backend, dtype=DTYPE_NAMES[dtype], calibration=calibration)


def eager_model(entry: str, weights: str | None, device: torch.device, num_classes: int | None = None,
                pretrained: bool = True, img_size: int | None = None) -> nn.Module:
    """The model as ``create_model`` gives it, on ``device``, with the input size ``img_size``."""
    model = create_model(entry, pretrained=pretrained, weights=weights, num_classes=num_classes, progress=True)
    set_input_size(model, img_size)
    return model.to(device)


def set_input_size(model: nn.Module, img_size: int | None) -> None:
    """Give ``model`` (its metadata and preprocessing) the input size ``img_size``; None keeps its own."""
    if img_size is not None:
        model.pretrained_cfg = input_config(model.pretrained_cfg, img_size)
        model.preprocess = Preprocess.from_config(model.pretrained_cfg)
