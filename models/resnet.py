"""ResNet and ResNeXt, module for module the layout of torchvision's ``ResNet``.

State-dict keys, shapes, initialisation and the order of operations are torchvision's, so the
published checkpoints load with ``strict=True`` and give the same outputs, and the constructor
takes torchvision's keyword arguments. Nothing here imports torchvision.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from utils.images.tensors import check_input
from utils.pickling import Portable

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module, metaclass=Portable):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer: NormLayer | None = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        if dilation > 1:
            raise ValueError("BasicBlock (ResNet-18) does not support dilation: "
                             "leave replace_stride_with_dilation unset")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module, metaclass=Portable):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer: NormLayer | None = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module, metaclass=Portable):
    """torchvision's ResNet: ``ResNet(block, layers, num_classes=1000, zero_init_residual=False,
    groups=1, width_per_group=64, replace_stride_with_dilation=None, norm_layer=None)``.

    ``num_classes=0`` replaces the classifier with ``nn.Identity``: the model returns pooled features.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Sequence[bool] | None = None, norm_layer: NormLayer | None = None):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        dilate = list(replace_stride_with_dilation or (False, False, False))
        if len(dilate) != 3:
            raise ValueError("replace_stride_with_dilation should be None or 3 booleans (layer2, layer3, layer4), "
                             f"got {replace_stride_with_dilation!r}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.global_pool = "avg"  # timm's name of the pooling; "" after reset_classifier(0, "")
        self.num_features = self.head_hidden_size = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.feature_info = _feature_info(block, dilate)

        # On the meta device there is nothing to initialise (and the init functions would import
        # torch._dynamo there, a second and a half): the checkpoint's tensors are assigned instead.
        if not self.conv1.weight.is_meta:
            self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # Each residual branch starts as zero, so each block starts as the identity.
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                         dilation=self.dilation, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def optimize_for_inference(self, *, backend: str | None = None, dtype: torch.dtype | str | None = None,
                               channels_last: bool = True, compile: bool = False, calibration=None) -> nn.Module:
        """An inference-only copy that runs faster: BatchNorm folded, channels_last, optionally bf16/fp16 and
        compiled, or run by ONNX Runtime or OpenVINO, or ``backend="auto"`` for the fastest of them here, or
        ``dtype="int8"`` with ``calibration`` images; float32 in, float32 out. The same as
        ``utils.optimize_for_inference(model, ...)``, at hand for models loaded with torch.hub."""
        from utils.inference.optimize import optimize_for_inference  # on first use: loading needs only torch

        return optimize_for_inference(self, backend=backend, dtype=dtype, channels_last=channels_last,
                                      compile=compile, calibration=calibration)

    def fusable(self) -> bool:
        """Whether this model computes exactly ``ResNet.forward`` (or ``ResNetFeatures.forward``) with this
        file's blocks, which the fused CPU path of ``optimize_for_inference`` reproduces; a subclass, another
        block, a pruned stage or a head without pooling computes something else."""
        stages = [getattr(self, name) for name in FEATURE_MODULES[1:] if hasattr(self, name)]
        return (type(self) in (ResNet, ResNetFeatures) and self.global_pool == "avg"
                and all(isinstance(s, nn.Sequential) and all(type(b) in BLOCKS.values() for b in s) for s in stages))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, before pooling (timm's ``forward_features``)."""
        if not torch.jit.is_scripting():  # TorchScript compiles neither the input check nor checkpointing
            check_input(x, self.conv1.weight)
            if self.grad_checkpointing and torch.is_grad_enabled():
                return self._stage_maps(x, (4,))[0]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooling and the classifier on ``forward_features``' map; with ``pre_logits``, the pooled features
        (timm's ``forward_head``)."""
        if self.global_pool:
            x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """A new, randomly initialised ``num_classes``-class head, or none (pooled features) for 0, as timm's
        ``reset_classifier``; ``pretrained_cfg`` says so. ``global_pool=""`` with 0 drops the pooling too:
        the head then returns the last feature map."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a whole number >= 0 (0: no head), got {num_classes!r}")
        if global_pool not in ("avg", "") or (num_classes and not global_pool):
            raise ValueError("these models pool by averaging: global_pool='avg', or '' (no pooling) with "
                             f"num_classes=0; got global_pool={global_pool!r} with num_classes={num_classes}")
        weight = self.conv1.weight
        self.fc = (nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
                   if num_classes else nn.Identity())
        self.global_pool = global_pool
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1)) if global_pool else nn.Identity()
        if hasattr(self, "pretrained_cfg"):
            self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes, "classes": None,
                                   "wnids": None, "head": "new" if num_classes else None}

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``forward_intermediates``: the feature maps of the stages that ``indices`` picks (0 the stem,
        1-4 ``layer1``-``layer4``; None all five, n the last n, negative numbers from the end), in stage
        order; unless ``intermediates_only``, the last map first (``forward_features``' map, or with
        ``stop_early`` that of the last stage picked). ``norm`` changes nothing: a ResNet has no final norm."""
        if output_fmt != "NCHW":
            raise ValueError(f"these models give NCHW feature maps: output_fmt='NCHW', got {output_fmt!r}")
        take = feature_take_indices(indices)
        check_input(x, self.conv1.weight)
        end = max(take) if stop_early or intermediates_only else len(FEATURE_MODULES) - 1
        keep = tuple(sorted(set(take) | {end}))
        maps = self._stage_maps(x, keep)
        intermediates = [m for i, m in zip(keep, maps) if i in take]
        return intermediates if intermediates_only else (maps[-1], intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's ``prune_intermediate_layers``: the stages past the last one ``indices`` picks become
        ``nn.Identity``, and with ``prune_head`` the pooling and classifier go (``reset_classifier(0, "")``);
        returns the stage numbers picked. ``prune_norm`` changes nothing: a ResNet has no final norm."""
        take = feature_take_indices(indices)
        for name in FEATURE_MODULES[max(take) + 1:]:
            setattr(self, name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's ``group_matcher``: regular expressions that group parameter names, in network order, for
        layer-wise learning-rate decay and freezing by stage: the stem, then each stage (``coarse``) or each
        block, numbered by the expression's groups; the classifier matches none (timm puts it last)."""
        return {"stem": r"^(?:conv1|bn1|maxpool)", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    @property
    def default_cfg(self) -> dict:
        """timm's older name of ``pretrained_cfg``: the same object."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    __jit_unused_properties__ = ["default_cfg"]  # for TorchScript: metadata, not computation

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input in training and recompute its activations in the backward pass
        (the stem's too): far less memory for about a third more time; timm's ``set_grad_checkpointing``."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.unused
    def _stage_maps(self, x: Tensor, keep: tuple[int, ...]) -> list[Tensor]:
        """The maps of the stages in ``keep`` (0 the stem, 1-4 ``layer1``-``layer4``), no stage past the last
        of them run; in training with gradient checkpointing on, the stem and every block are checkpointed."""
        run = _checkpoint if self.grad_checkpointing and torch.is_grad_enabled() else _call
        x = run(self._stem, self.bn1, x)
        kept = [x] if 0 in keep else []
        x = self.maxpool(x)
        for i in range(1, max(keep) + 1):
            stage = getattr(self, FEATURE_MODULES[i])
            for block in stage if isinstance(stage, nn.Sequential) else [stage]:  # a pruned stage: nn.Identity
                x = run(block, block, x)
            if i in keep:
                kept.append(x)
        return kept

    def _stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def _call(function: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> Tensor:
    return function(x)


def _checkpoint(function: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> Tensor:
    """``function(x)`` with its activations recomputed in the backward pass. The BatchNorm layers of
    ``module`` normalise the recomputation with the batch's statistics, as the first pass did, without
    updating their running statistics a second time."""
    from torch.utils.checkpoint import checkpoint  # on first use: loading a model does not need it

    return checkpoint(function, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_statistics_left_alone(module)))


@contextlib.contextmanager
def _running_statistics_left_alone(module: nn.Module):
    """The recomputation runs as the first pass did, updates included, and the BatchNorm buffers are then
    put back as the first pass left them."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    kept = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, k in zip(buffers, kept):
                b.copy_(k)


FEATURE_MODULES = ("relu", "layer1", "layer2", "layer3", "layer4")  # whose outputs are out_indices 0..4: strides 2-32


def _feature_info(block: type[BasicBlock] | type[Bottleneck], dilate: Sequence[bool]) -> list[dict]:
    """timm's ``feature_info``: the module, channels and stride of each stage's map (the stem, layer1-4)."""
    channels = [64] + [64 * 2**i * block.expansion for i in range(4)]
    reductions = [2, 4]  # the stem, then layer1 after the max-pool
    for dilated in dilate:
        reductions.append(reductions[-1] * (1 if dilated else 2))
    return [{"module": m, "num_chs": c, "reduction": r} for m, c, r in zip(FEATURE_MODULES, channels, reductions)]


def feature_take_indices(indices: int | Sequence[int] | None) -> list[int]:
    """timm's meaning of ``indices`` over the five stages: None all, n the last n, else the stage numbers
    given, negative ones counted from the end; ValueError for anything else."""
    n = len(FEATURE_MODULES)
    if indices is None:
        return list(range(n))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: the last n stages, with n from 1 to {n}")
        return list(range(n - indices, n))
    if (not isinstance(indices, Sequence) or isinstance(indices, str) or not indices
            or any(isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n for i in indices)):
        raise ValueError(f"indices must be None, a count of last stages, or stage numbers from 0 (stem) to {n - 1} "
                         f"(layer4), or negative from the end; got {indices!r}")
    return [i % n for i in indices]


class ResNetFeatures(ResNet):
    """A ResNet backbone that returns feature maps instead of logits, for detection and segmentation.

    ``out_indices`` picks from the stem (0, stride 2) and ``layer1`` ... ``layer4`` (1-4, strides 4, 8, 16,
    32), as timm's ``features_only`` does. Stages past the last one asked for, the pooling and the
    classifier are dropped, and the remaining state-dict keys are those of the full ResNet.
    ``feature_info`` lists the module, channels and stride of each returned map.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 out_indices: Sequence[int] = (1, 2, 3, 4), **kwargs):
        super().__init__(block, layers, num_classes=0, **kwargs)
        self.out_indices = tuple(out_indices)
        self.feature_info = [self.feature_info[i] for i in self.out_indices]
        for name in FEATURE_MODULES[max(self.out_indices) + 1:]:
            delattr(self, name)
        del self.avgpool, self.fc

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        if not torch.jit.is_scripting():
            check_input(x, self.conv1.weight)
            if self.grad_checkpointing and torch.is_grad_enabled():
                return self._stage_maps(x, self.out_indices)
        x = self.relu(self.bn1(self.conv1(x)))
        features: list[Tensor] = [x] if 0 in self.out_indices else []
        x = self.maxpool(x)
        # Stage by stage, not looked up by name, so that TorchScript can compile it; the stages past the
        # last one asked for are not there.
        if hasattr(self, "layer1"):
            x = self.layer1(x)
            if 1 in self.out_indices:
                features.append(x)
        if hasattr(self, "layer2"):
            x = self.layer2(x)
            if 2 in self.out_indices:
                features.append(x)
        if hasattr(self, "layer3"):
            x = self.layer3(x)
            if 3 in self.out_indices:
                features.append(x)
        if hasattr(self, "layer4"):
            x = self.layer4(x)
            if 4 in self.out_indices:
                features.append(x)
        return features

    def _no_head(self, *args, **kwargs):
        raise TypeError("a features_only model gives its feature maps from model(x), and has no head: "
                        "forward_features, forward_head, forward_intermediates and the classifier and pruning "
                        "methods belong to features_only=False")

    forward_features = forward_head = get_classifier = reset_classifier = _no_head
    forward_intermediates = prune_intermediate_layers = _no_head
