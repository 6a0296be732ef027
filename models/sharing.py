"""A model in the formats the ecosystem shares: a safetensors file, and the Hugging Face / timm model folder.

The safetensors file holds the state dict in torchvision's (and timm's) layout, and in its header the
license, the entry and, for a fine-tuned model, its description (``models.finetuned``) as JSON: loading
it back with ``weights=`` needs nothing else. The folder is what ``timm.create_model("local-dir:DIR")``
and the Hugging Face Hub take: ``config.json`` in timm's format, ``model.safetensors`` and a model card,
``README.md``. Each is loaded back before it takes the place of what was there: it must hold the model's
weights exactly, and give its outputs and classes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from models import finetuned
from models.factory import create_model
from models.registry import ARXIV, ORIGINAL_REPOSITORY, PAPER, SUPERVISION, WEIGHTS
from utils.inference.compare import relative_error
from utils.inference.export import TOLERANCE, ExportError, metadata, sample_batch
from utils.replace import replacing
from utils.weights import safetensors_file
from utils.weights.cache import hash_prefix, sha256
from utils.weights.checkpoint import FOLDER_WEIGHTS

WEIGHTS_NAME, CONFIG_NAME, CARD_NAME = FOLDER_WEIGHTS[0], "config.json", "README.md"
FOLDER_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s state dict and its metadata to the safetensors file ``path``, checked: loaded back
    with ``create_model(weights=...)``, it holds the same weights and gives the same outputs."""
    path = Path(path)
    _check_exportable(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, path.with_name(f".{path.name}.{os.getpid()}.partial.safetensors")) as partial:
        _write_weights(model, partial)
        _check_loads_back(model, partial, path)
        expected = hash_prefix(path.name)
        if expected and not sha256(partial).startswith(expected):
            # safetensors orders the header's metadata differently from one process to the next, so a file's
            # hash is known only once it is written
            plain = path.name.replace(f"-{expected}.", ".")
            raise ExportError(f"{path.name} carries a SHA-256 prefix, {expected}, that is not the file's: export to "
                              f"{plain}, then rename it to {Path(plain).stem}-<the first 8 hex digits of its sha256sum>"
                              f"{path.suffix}")
    return path


def save_folder(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face / timm model folder (see the module docstring), checked. The three
    files are made and checked in a folder beside it, then each replaces its namesake in ``directory``;
    other files there stay."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file: give the folder to write {', '.join(FOLDER_FILES)} into")
    _check_exportable(model)
    work = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        work.mkdir(parents=True)
        _write_weights(model, work / WEIGHTS_NAME)
        (work / CONFIG_NAME).write_text(json.dumps(timm_config(model), indent=2) + "\n", encoding="utf-8")
        (work / CARD_NAME).write_text(model_card(model), encoding="utf-8")
        _check_loads_back(model, work, directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in FOLDER_FILES:
            os.replace(work / name, directory / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return directory


def _check_exportable(model: nn.Module) -> None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or cfg.get("entry") not in WEIGHTS:
        raise ValueError("only a model of this repository (with its pretrained_cfg) can be saved with its metadata")
    if getattr(model, "out_indices", None) is not None:
        raise ValueError("a weights file holds the whole network: export it without --features-only "
                         "(features_only=False), and load it back with features_only=True")


def _write_weights(model: nn.Module, path: Path) -> None:
    description = finetuned.of_model(model.pretrained_cfg)
    carried = {k: v for k, v in metadata(model).items() if k != finetuned.KEY}
    if description is not None:  # what loading reads back, as a fine-tuned .pth file holds it
        carried[finetuned.KEY] = json.dumps(description)
    safetensors_file.save(model.state_dict(), path, {"format": "pt", **carried})


def _head_size(model: nn.Module) -> int:
    head = getattr(model, "fc", None)
    return head.out_features if isinstance(head, nn.Linear) else 0


def _check_loads_back(model: nn.Module, written: Path, final: Path) -> None:
    """``written`` loaded with ``create_model`` holds ``model``'s weights exactly and its classes, and gives its
    outputs on the sample photos (to float rounding: the model's own tensors may be laid out otherwise, e.g.
    channels_last); an ExportError naming ``final`` otherwise."""
    cfg = model.pretrained_cfg
    try:
        loaded = create_model(cfg["entry"], weights=written, num_classes=_head_size(model), progress=False)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"{final} does not load back: {e}") from None
    mine, theirs = model.state_dict(), loaded.state_dict()
    same_weights = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    batch = sample_batch(model)
    with torch.no_grad():
        error = relative_error(loaded(batch), model.eval()(batch))
    for fault, found in (("weights", not same_weights), ("outputs", not error <= TOLERANCE),
                         ("classes", loaded.pretrained_cfg["classes"] != cfg["classes"])):
        if found:
            raise ExportError(f"{final}: loaded back, it gives other {fault} than the model (a model changed in ways "
                              "its weights do not hold, e.g. dilation or pruned stages?); nothing was written")


def timm_config(model: nn.Module) -> dict:
    """``config.json`` in timm's format: the network by timm's name, the head, and the evaluation transform
    in ``pretrained_cfg``, with the class names as ``label_names``."""
    cfg = model.pretrained_cfg
    weight_set = WEIGHTS[cfg["entry"]]
    num_classes, size = _head_size(model), cfg["input_size"][-1]
    published = cfg.get("source") == weight_set.url and cfg.get("head") != "new"  # the published weights, as is
    tag = "finetuned" if finetuned.of_model(cfg) else weight_set.timm_name.split(".", 1)[1] if published else "custom"
    pretrained_cfg = {
        "tag": tag, "custom_load": False, "input_size": list(cfg["input_size"]), "fixed_input_size": False,
        "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"], "crop_mode": "center",
        "mean": list(cfg["mean"]), "std": list(cfg["std"]), "num_classes": num_classes,
        "pool_size": [math.ceil(size / 32)] * 2, "first_conv": "conv1", "classifier": "fc",
        "license": cfg["license"].lower(), "origin_url": ORIGINAL_REPOSITORY, "paper_ids": f"arXiv:{ARXIV}",
    }
    config = {"architecture": weight_set.arch.name, "num_classes": num_classes, "num_features": model.num_features,
              "global_pool": "avg"}
    classes, wnids = cfg.get("classes"), cfg.get("wnids")
    if classes and len(classes) == num_classes:  # ImageNet's: WordNet ids with their names, as timm keeps them
        config["label_names"] = list(wnids) if wnids else list(classes)
        if wnids:
            config["label_descriptions"] = dict(zip(wnids, classes))
    return {**config, "pretrained_cfg": pretrained_cfg}


def model_card(model: nn.Module) -> str:
    """The folder's ``README.md``: YAML front matter for the Hub, then what the model is and where its weights
    come from, the published weights' accuracy where they descend from them, and for a fine-tuned model its
    recipe and result."""
    cfg = model.pretrained_cfg
    weight_set = WEIGHTS[cfg["entry"]]
    description = finetuned.of_model(cfg)
    kind, how = SUPERVISION[weight_set.supervision]
    origin, published = _origin(cfg, weight_set, description)
    size = cfg["input_size"][-1]
    title = (f"{weight_set.entry} fine-tuned on {description['num_classes']} classes" if description
             else weight_set.timm_name)
    lines = [
        "---", "tags:", "- image-classification", "- timm", "library_name: timm", f"license: {cfg['license'].lower()}",
        "pipeline_tag: image-classification", "datasets:", "- imagenet-1k", "---",
        f"# Model card for {title}", "",
        f"{weight_set.arch.title}, {kind} ({weight_set.supervision}): {how}. From {PAPER}.", "",
        "## Model details",
        f"- **Architecture:** {weight_set.arch.title} (timm: `{weight_set.arch.name}`)",
        f"- **Parameters:** {sum(p.numel() for p in model.parameters()):,}",
        f"- **Input:** {size} x {size}, resized to {cfg['resize_size']} and centre-cropped, {cfg['interpolation']}, "
        f"mean {list(cfg['mean'])}, std {list(cfg['std'])}",
        f"- **Weights:** {origin}",
        f"- **License:** {cfg['license']}, for non-commercial use only",
    ]
    if published:
        lines += _accuracy(weight_set)
    if description:
        lines += _finetuning(description)
    return "\n".join(lines + USAGE_AND_CITATION) + "\n"


def _origin(cfg: dict, weight_set, description: dict | None) -> tuple[str, bool]:
    """Where the weights come from, and whether they descend from the published file."""
    published = f"{weight_set.url} (SHA-256 {weight_set.hash_prefix}...), from {ORIGINAL_REPOSITORY}"
    if not cfg.get("pretrained", True):
        return "random, untrained (exported with --no-pretrained): for trying tools, not for use", False
    if description:  # where the fine-tuning started, as its recipe says
        recipe = description["finetuning"].get("recipe", {})
        if recipe.get("no_pretrained"):
            return "fine-tuned from random weights (--no-pretrained)", False
        return f"fine-tuned from {recipe.get('weights') or published}", not recipe.get("weights")
    from_published = cfg.get("source") == weight_set.url
    origin = published if from_published else f"{cfg.get('source')}, in the {weight_set.entry} network"
    if cfg.get("head") == "new":  # a head put on after loading: its weights are not the file's
        origin += f", with a {cfg['num_classes']}-class head (fc) of its own"
    return origin, from_published


def _accuracy(weight_set) -> list[str]:
    (rep1, rep5), (mea1, mea5) = weight_set.reported, weight_set.measured
    table = ["", "## ImageNet-1k validation accuracy of the published weights (224 px, crop 0.875)",
             "| | top-1 | top-5 |", "|---|---:|---:|", f"| reported by the authors | {rep1:.1f} | {rep5:.1f} |",
             f"| measured independently | {mea1:.3f} | {mea5:.3f} |"]
    return table + (["", weight_set.note] if weight_set.note else [])


def _finetuning(description: dict) -> list[str]:
    tuning, n = description["finetuning"], description["num_classes"]
    recipe = {**tuning.get("recipe", {}), **({"train": tuning["train"]} if "train" in tuning else {})}
    classes = ", ".join(description["classes"][:20]) + ", ..." * (n > 20)
    return (["", "## Fine-tuning", f"- **Classes ({n}):** {classes}"]
            + [f"- **{name}:** {value}" for name, value in recipe.items() if value is not None]
            + [f"- **Result, {name}:** " + (f"{value:.2f}" if isinstance(value, float) else str(value))
               for name, value in tuning.get("result", {}).items()])


USAGE_AND_CITATION = [
    "", "## Usage", "```python", "import timm", "",
    'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # or "hf-hub:OWNER/NAME"',
    "config = timm.data.resolve_model_data_config(model)",
    "transform = timm.data.create_transform(**config, is_training=False)", "```", "",
    "## Citation", "```bibtex", "@misc{yalniz2019billionscale,",
    "  title  = {Billion-scale semi-supervised learning for image classification},",
    "  author = {I. Zeki Yalniz and Herv\\'e J\\'egou and Kan Chen and Manohar Paluri and Dhruv Mahajan},",
    f"  year   = {{2019}}, eprint = {{{ARXIV}}}, archivePrefix = {{arXiv}}", "}", "```"]
