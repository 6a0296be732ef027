"""A linear probe as a model file: the backbone the features came from plus the probe's head, saved in
the fine-tuned file format, so that the hub entries, the commands and export take it as they take a
file from python -m utils.finetune."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models import create_model, finetuned
from models.factory import weights_file
from utils.features.folder import RANDOM_WEIGHTS_SEED, FeaturesError
from utils.weights.cache import sha256


def backbone(meta: dict, what: str) -> nn.Module:
    """The backbone that made the rows ``meta`` describes: the same weights, their SHA-256 checked again,
    or the same random ones."""
    weights = meta["weights"]
    if not weights["pretrained"]:
        torch.manual_seed(weights.get("seed", RANDOM_WEIGHTS_SEED))
        return create_model(meta["entry"], pretrained=False, num_classes=0)
    source = meta.get("weights_source")  # None: the published weights
    path, _ = weights_file(meta["entry"], source, progress=True)
    digest = sha256(path)
    if digest != weights["sha256"]:
        raise FeaturesError(f"{what}: the weights it was embedded with ({source or 'the published ones'}) have "
                            f"changed since (SHA-256 {weights['sha256'][:12]}..., now {digest[:12]}...): embed again")
    return create_model(meta["entry"], weights=source, num_classes=0)


def classifier_file(meta: dict, classes: list[str], weight: Tensor, bias: Tensor, finetuning: dict,
                    what: str) -> dict:
    """What ``torch.save`` writes: the backbone of ``meta`` with the head ``weight`` (features, classes) and
    ``bias``, described by the transform the features were made with and ``finetuning``."""
    model = backbone(meta, what)
    state = model.state_dict()
    state["fc.weight"] = weight.T.float().contiguous()
    state["fc.bias"] = bias.float().contiguous()
    t = meta["transform"]
    description = finetuned.describe(meta["entry"], classes, t["input_size"][-1], t["crop_pct"], t["mean"], t["std"],
                                     finetuning)
    return {"model": state, finetuned.KEY: description}
