"""Float32 ResNets on the CPU with oneDNN convolutions that do more per call.

Two costs of the plain module, measured on ResNet-50 (benchmarks/README.md, the CPU backends):

- oneDNN reorders every convolution's weights into its blocked layout on every call: at batch 1,
  about a fifth of the time. Here each weight is reordered once per input shape and kept, for the
  two most recent shapes; the layout oneDNN picks depends on the shape (batch 1 differs from
  larger batches), so one packing for all shapes would be slower than none.
- ReLU and the residual addition are separate passes over each activation. Here they run inside the
  convolution that produces it.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from utils.images.tensors import check_input
from utils.pickling import Portable

PACKED_SHAPES = 2  # input shapes whose packed weights are kept: each holds a copy of the weights
_mkldnn = torch.ops.mkldnn


STAGES = ("layer1", "layer2", "layer3", "layer4")


def can_fuse(model: nn.Module) -> bool:
    """True for a model of torchvision's ResNet layout that says it computes exactly that forward (this
    repository's ResNet: ``model.fusable()``), with every BatchNorm folded, float32 channels_last weights
    on the CPU, where oneDNN is available."""
    fusable = getattr(model, "fusable", None)
    if not (callable(fusable) and fusable()) or not torch.backends.mkldnn.is_available():
        return False
    blocks = _blocks(model)
    if not all(b.downsample is None or (isinstance(b.downsample, nn.Sequential) and len(b.downsample) == 2)
               for b in blocks):
        return False
    norms = [model.bn1] + [getattr(b, f"bn{i}") for b in blocks for i in (1, 2, 3) if hasattr(b, f"bn{i}")]
    norms += [b.downsample[1] for b in blocks if b.downsample is not None]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return (all(isinstance(n, nn.Identity) for n in norms)
            and all(c.weight.device.type == "cpu" and c.weight.dtype == torch.float32 and c.bias is not None
                    and c.padding_mode == "zeros" and not isinstance(c.padding, str) for c in convs))


class FusedResNet(nn.Module, metaclass=Portable):
    """``model`` (BatchNorm folded) computed with packed weights and fused ReLU and additions."""

    def __init__(self, model: nn.Module, fuse_pointwise: bool = True):
        super().__init__()
        self.model, self.fuse_pointwise = model, fuse_pointwise  # False only to measure what fusing gains
        self._packed: OrderedDict[tuple[int, ...], dict[nn.Conv2d, Tensor]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_packed": OrderedDict()}  # oneDNN's packings: made again where used

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        m = self.model
        check_input(x, m.conv1.weight)
        conv = functools.partial(_conv, packed=self._packed_for(tuple(x.shape)), fuse=self.fuse_pointwise)
        x = conv(m.conv1, x, "relu")
        wanted = getattr(m, "out_indices", None)  # a backbone's feature maps
        features = [x] if wanted and 0 in wanted else []
        x = m.maxpool(x)
        for i, name in enumerate(STAGES, 1):
            if not hasattr(m, name):
                break
            for block in getattr(m, name):
                x = _block(block, x, conv)
            if wanted and i in wanted:
                features.append(x)
        if wanted:
            return features
        return m.fc(torch.flatten(m.avgpool(x), 1))

    def _packed_for(self, shape: tuple[int, ...]) -> dict[nn.Conv2d, Tensor]:
        if shape in self._packed:
            self._packed.move_to_end(shape)
        else:
            while len(self._packed) >= PACKED_SHAPES:
                self._packed.popitem(last=False)
            self._packed[shape] = {}  # filled by the first call, as each convolution sees its input
        return self._packed[shape]


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for name in STAGES if hasattr(model, name) for block in getattr(model, name)]


def _block(block: nn.Module, x: Tensor, conv: Callable[..., Tensor]) -> Tensor:
    """A basic block (conv1, conv2) or a bottleneck (conv1, conv2, conv3), as torchvision computes them."""
    identity = x if block.downsample is None else conv(block.downsample[0], x)
    out = conv(block.conv1, x, "relu")
    if hasattr(block, "conv3"):  # a bottleneck
        out = conv(block.conv2, out, "relu")
    return conv(block.conv3 if hasattr(block, "conv3") else block.conv2, out, "relu", add=identity)


def _conv(conv: nn.Conv2d, x: Tensor, unary: str = "none", add: Tensor | None = None, *,
          packed: dict[nn.Conv2d, Tensor], fuse: bool) -> Tensor:
    """relu(conv(x) + add) in one oneDNN call, with the weight packed for this input shape."""
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    weight = packed.get(conv)
    if weight is None:
        weight = packed[conv] = _mkldnn._reorder_convolution_weight(conv.weight, *args, list(x.shape))
    if not fuse:
        out = _mkldnn._convolution_pointwise(x, weight, conv.bias, *args, "none", [], "")
        out = out if add is None else out.add_(add)
        return out if unary == "none" else out.relu_()
    if add is None:
        return _mkldnn._convolution_pointwise(x, weight, conv.bias, *args, unary, [], "")
    return _mkldnn._convolution_pointwise.binary(x, add, weight, conv.bias, *args, "add", 1.0, unary, [], "")
