"""Build the model for one of the twelve entries: architecture, weights and metadata."""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from models import finetuned
from models.registry import ARCHS, MIRROR_ENV, WEIGHTS, WeightSet
from models.resnet import BLOCKS, FEATURE_MODULES, ResNet, ResNetFeatures
from utils.images.preprocess import Preprocess
from utils.weights import CheckpointError, checkpoint, download

logger = logging.getLogger("semi_supervised_hub")

TORCHVISION_KWARGS = ("zero_init_residual", "groups", "width_per_group", "replace_stride_with_dilation",
                      "norm_layer")


def create_model(entry: str, *, pretrained: bool = True, progress: bool = True,
                 weights: str | os.PathLike | None = None, num_classes: int | None = None, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """The model of ``entry`` (e.g. "resnet50_swsl"); see ``torch.hub.help`` for the arguments."""
    if entry not in WEIGHTS:
        raise ValueError(f"unknown model {entry!r}; choose one of: {', '.join(WEIGHTS)}")
    weight_set = WEIGHTS[entry]
    arch_kwargs = _arch_kwargs(weight_set, kwargs)
    out_indices = _check_arguments(entry, pretrained, progress, weights, num_classes, features_only, out_indices)

    origin, description = None, None
    if pretrained:  # fetch first, so that a failed download costs no model construction
        path, origin = _checkpoint(weight_set, weights, progress)
        state_dict, description = checkpoint.load_checkpoint(path, origin)
        if description is not None:
            description = finetuned.check(description, origin)
            num_classes = _fit_description(entry, description, num_classes, features_only, origin)
    if num_classes is None:
        num_classes = 1000

    # Weights that the checkpoint overwrites are never initialised: on the meta device they are not
    # even allocated, and load_into then assigns the checkpoint's tensors in their place.
    with torch.device("meta") if pretrained else contextlib.nullcontext():
        if features_only:
            model = ResNetFeatures(**arch_kwargs, out_indices=out_indices)
        else:
            model = ResNet(**arch_kwargs, num_classes=num_classes)

    head = None if features_only or num_classes == 0 else "new"
    if pretrained:
        new_head = _plan_head(state_dict, description, num_classes, features_only, origin)
        head = None if head is None else "new" if new_head else "pretrained"
        skip = ("fc.",) if new_head or features_only else ()
        if features_only:
            skip += tuple(f"{stage}." for stage in FEATURE_MODULES[max(out_indices) + 1:])
        target = f"{entry} ({weight_set.arch.title})"
        try:
            checkpoint.load_into(model, state_dict, origin=origin, target=target, skip=skip)
        except CheckpointError as e:
            raise CheckpointError(_name_the_fit(str(e), entry, state_dict, origin, target)) from None
        del state_dict
        if new_head and num_classes:
            model.fc = nn.Linear(model.num_features, num_classes)
            logger.warning("%s: pretrained backbone with a new, randomly initialised %d-class head (fc); "
                           "train it before use", entry, num_classes)

    cfg = {**weight_set.config(), "pretrained": pretrained, "source": origin, "head": head}
    if description is not None:
        cfg.update(description, metrics={"finetuning_val": description.get("finetuning", {}).get("result", {})})
    if features_only or num_classes != cfg["num_classes"]:  # a head of its own: no ImageNet names on it
        cfg.update(num_classes=0 if features_only else num_classes, classes=None, wnids=None)
    model.pretrained_cfg = cfg
    model.preprocess = Preprocess.from_config(model.pretrained_cfg)
    return model.eval()


def _check_arguments(entry: str, pretrained, progress, weights, num_classes, features_only,
                     out_indices) -> tuple[int, ...] | None:
    """Refuse arguments that cannot work, before any download; the feature maps' indices, checked."""
    _check_flags(entry, pretrained=pretrained, progress=progress, features_only=features_only)
    _check_num_classes(num_classes, features_only)
    if weights is not None and not pretrained:
        raise ValueError(f"weights={weights!r} was given with pretrained=False: pass one or the other")
    if features_only:
        return _check_out_indices((1, 2, 3, 4) if out_indices is None else out_indices)
    if out_indices is not None:
        raise ValueError("out_indices applies only with features_only=True")
    return None


def _plan_head(state_dict: dict, description: dict | None, num_classes: int, features_only: bool,
               origin: str) -> bool:
    """Whether the model needs a new head: a head of the asked-for size in the checkpoint (a fine-tuned
    file's) is loaded, any other is replaced. A file whose head contradicts its description is refused,
    whichever part of it is asked for."""
    fc = state_dict.get("fc.weight")
    named = description and description["num_classes"]
    if named and (fc is None or fc.shape[0] != named):
        rows = "no head (fc)" if fc is None else f"a head of {fc.shape[0]} rows"
        raise CheckpointError(f"{origin} contradicts itself: it holds {rows}, and its description names "
                              f"{named} classes; save the model again with python -m utils.finetune")
    return not features_only and num_classes != 1000 and (fc is None or fc.shape[0] != num_classes)


def weights_description(weights: str | os.PathLike) -> dict | None:
    """What a fine-tuned ``weights`` file says of itself (see ``models.finetuned``), or None for a plain
    state dict; read without loading its tensors, so that the commands can default ``--model`` to it."""
    path, origin = _checkpoint(None, weights, progress=True)
    description = checkpoint.read_description(path)
    return None if description is None else finetuned.check(description, origin)


def _fit_description(entry: str, description: dict, num_classes: int | None, features_only: bool,
                     origin: str) -> int | None:
    """The head size to build for a fine-tuned file; ValueError where the arguments contradict it."""
    if description["entry"] != entry:
        raise ValueError(f"{origin} holds {finetuned.summary(description)}, not {entry}: load it with the entry "
                         f"{description['entry']} (--model {description['entry']})")
    if features_only or num_classes == 0:  # its backbone alone
        return num_classes
    if num_classes is not None and num_classes != description["num_classes"]:
        raise ValueError(f"{origin} holds {finetuned.summary(description)}; num_classes={num_classes} (--num-classes "
                         f"{num_classes} on the command line) contradicts it: leave it out")
    return description["num_classes"]


def _name_the_fit(message: str, entry: str, state_dict: dict, origin: str, target: str) -> str:
    """The error of a checkpoint that does not fit ``entry``, naming the entries it does fit."""
    fits = [name for name, w in WEIGHTS.items() if w.arch.name in _fitting_archs(state_dict)]
    if not fits or entry in fits:
        return message
    arch = WEIGHTS[fits[0]].arch.title
    return (f"{origin} does not fit {target}: it holds a {arch}; load it with {' or '.join(fits)} "
            f"(--model {fits[0]})")


def _fitting_archs(state_dict: dict) -> set[str]:
    """The architectures whose backbone has exactly the checkpoint's keys and shapes (built on the meta device)."""
    fc = state_dict.get("fc.weight")
    fits = set()
    for arch in ARCHS.values():
        with torch.device("meta"):
            model = ResNet(BLOCKS[arch.block], arch.layers, num_classes=0 if fc is None else fc.shape[0],
                           groups=arch.groups, width_per_group=arch.width_per_group)
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        given = {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        if expected == given:
            fits.add(arch.name)
    return fits


def entry(name: str) -> Callable[..., nn.Module]:
    """The torch.hub entry point of one weight set, documented from the registry."""
    def load(**kwargs) -> nn.Module:
        return create_model(name, **kwargs)

    load.__name__ = load.__qualname__ = name
    load.__doc__ = WEIGHTS[name].docstring()
    load.__signature__ = _ENTRY_SIGNATURE
    return load


_SIGNATURE = inspect.signature(create_model)
_ENTRY_SIGNATURE = _SIGNATURE.replace(parameters=list(_SIGNATURE.parameters.values())[1:])  # without `entry`


def published_url(weight_set: WeightSet) -> str:
    """The published file's URL, or its URL on the mirror that ``$SEMI_SUPERVISED_WEIGHTS_MIRROR`` names."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return weight_set.url
    if not download.is_url(base, what=f"{MIRROR_ENV}={base!r} (a URL, or a directory)"):
        base = Path(base).expanduser().resolve().as_uri()
    return base.rstrip("/") + "/" + weight_set.file_name


def weights_file(entry: str, weights: str | os.PathLike | None = None, progress: bool = True) -> tuple[Path, str]:
    """The local file that ``create_model(entry, weights=weights)`` loads, fetched and verified as it is, and
    where it came from: what a tool records to say which weights made its results."""
    return _checkpoint(WEIGHTS[entry], weights, progress)


def _checkpoint(weight_set: WeightSet | None, weights: str | os.PathLike | None, progress: bool) -> tuple[Path, str]:
    """The local path of the checkpoint to load (``weights``, else ``weight_set``'s), and where it came from."""
    if weights is None:
        url = published_url(weight_set)
        remedy = f"; set {MIRROR_ENV} to a mirror's base URL or directory"
        return checkpoint.fetch(url, expected_hash=weight_set.hash_prefix, progress=progress, remedy=remedy), url
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, a file path or a URL, got {type(weights).__name__}")
    weights = os.fspath(weights)
    if download.is_url(weights, what=f"weights={weights!r}"):
        return checkpoint.fetch(weights, progress=progress), weights
    path = Path(weights).expanduser()
    path = checkpoint.local_file(path, origin=f"weights={weights!r}")  # a model folder's file for a folder
    return path, str(path)


def _arch_kwargs(weight_set: WeightSet, kwargs: dict) -> dict:
    """ResNet's constructor arguments: the entry's architecture plus torchvision keywords that agree with it."""
    unknown = sorted(kwargs.keys() - set(TORCHVISION_KWARGS))
    if unknown:
        own = ", ".join(p for p in _ENTRY_SIGNATURE.parameters if p != "kwargs")
        raise TypeError(f"{weight_set.entry}() got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
                        f"{own} and torchvision ResNet's {', '.join(TORCHVISION_KWARGS)}")
    arch = weight_set.arch
    for key in ("groups", "width_per_group"):
        if key in kwargs and kwargs[key] != getattr(arch, key):
            raise ValueError(f"{weight_set.entry} is {arch.title}, with {key}={getattr(arch, key)}; got "
                             f"{key}={kwargs[key]!r}. Leave it unset, or pick the entry of the architecture you want.")
    return {**kwargs, "block": BLOCKS[arch.block], "layers": arch.layers, "groups": arch.groups,
            "width_per_group": arch.width_per_group}


def _check_flags(entry: str, **flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{entry}(): {name} must be True or False, got {value!r}")


def _check_num_classes(num_classes, features_only: bool) -> None:
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a whole number >= 0 (0 for pooled features), got {num_classes!r}")
    if features_only and num_classes != 1000:
        raise ValueError("features_only=True returns feature maps and has no classifier: leave num_classes unset")


def _check_out_indices(out_indices) -> tuple[int, ...]:
    indices = tuple(out_indices) if isinstance(out_indices, Sequence) and not isinstance(out_indices, str) else None
    if (not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices)
            or any(not 0 <= i < len(FEATURE_MODULES) for i in indices) or list(indices) != sorted(set(indices))):
        raise ValueError("out_indices must be increasing stage numbers from 0 (stem, stride 2) to 4 "
                         f"(layer4, stride 32), e.g. (1, 2, 3, 4); got {out_indices!r}")
    return indices
