"""BatchNorm folded into the convolution before it: the first step of every fast path."""
from __future__ import annotations

import copy
import itertools

from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which each BatchNorm that follows a convolution is folded into it.

    Pairs are found by this repository's layout: ``convK`` then ``bnK`` in one module, and a
    convolution followed by a norm layer in a Sequential (the downsampling branch). The folding uses
    the running statistics, as eval mode does. Other modules keep their tensors, shared with
    ``model``: the copy costs only the memory of the new convolution weights.
    """
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    folded = copy.deepcopy(model, shared)  # the modules are copied; their tensors are not
    folded.eval()
    for parent, conv_name, norm_name in list(_conv_norm_pairs(folded)):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                      norm.eps, norm.weight, norm.bias)
        setattr(parent, norm_name, nn.Identity())
    return folded


def _conv_norm_pairs(model: nn.Module):
    for parent in model.modules():
        children = dict(parent.named_children())
        for name, child in children.items():
            if isinstance(parent, nn.Sequential):
                before = str(int(name) - 1) if name.isdigit() and int(name) > 0 else None
            else:
                before = name.replace("bn", "conv", 1) if name.startswith("bn") else None
            if before in children and isinstance(children[before], nn.Conv2d) and _is_foldable(child):
                yield parent, before, name


def _is_foldable(module: nn.Module) -> bool:
    """BatchNorm2d in eval mode, or a frozen BatchNorm: a per-channel affine map known in advance."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return isinstance(module, nn.BatchNorm2d) and module.running_mean is not None
    return all(isinstance(getattr(module, name, None), Tensor)
               for name in ("running_mean", "running_var", "weight", "bias")) and hasattr(module, "eps")
