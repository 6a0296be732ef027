"""The architecture is torchvision's ResNet: keys, shapes, counts and outputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import ARCHS, WEIGHTS, ResNet, create_model
from models.resnet import BLOCKS

from .conftest import random_state_dict


def build(arch, **kwargs):
    return ResNet(BLOCKS[arch.block], arch.layers, groups=arch.groups, width_per_group=arch.width_per_group,
                  **kwargs)


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS)
def test_parameters_gmacs_and_state_dict_size_match_the_registry(arch):
    with torch.device("meta"):
        model = build(arch)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == arch.params
    assert counter.get_total_flops() / 2e9 == pytest.approx(arch.gmacs, abs=5e-4)
    # torchvision's layout: 122 entries for ResNet-18, 320 for the 50-layer, 626 for the 101-layer nets.
    assert len(model.state_dict()) == {2: 122, 6: 320, 23: 626}[arch.layers[2]]


@pytest.mark.parametrize("arch, key, shape", [
    ("resnet18", "layer2.0.downsample.0.weight", (128, 64, 1, 1)),
    ("resnet50", "layer1.0.conv2.weight", (64, 64, 3, 3)),
    ("resnext50_32x4d", "layer1.0.conv2.weight", (128, 4, 3, 3)),
    ("resnext101_32x16d", "layer4.2.conv2.weight", (4096, 128, 3, 3)),
    ("resnext101_32x8d", "layer3.22.bn3.num_batches_tracked", ()),
    ("resnext101_32x4d", "fc.weight", (1000, 2048)),
])
def test_torchvision_key_names_and_shapes(arch, key, shape):
    with torch.device("meta"):
        assert tuple(build(ARCHS[arch]).state_dict()[key].shape) == shape


def reference_forward(state_dict, x, arch):
    """torchvision's ResNet forward, written out functionally from the state dict alone."""
    used = set()

    def p(name):
        used.add(name)
        return state_dict[name]

    def bn(x, name):
        return F.batch_norm(x, p(f"{name}.running_mean"), p(f"{name}.running_var"), p(f"{name}.weight"),
                            p(f"{name}.bias"), training=False, eps=1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, p("conv1.weight"), stride=2, padding=3), "bn1")), 3, 2, 1)
    for stage, blocks in enumerate(arch.layers, 1):
        for i in range(blocks):
            name, stride = f"layer{stage}.{i}", 2 if stage > 1 and i == 0 else 1
            if arch.block == "basic":
                out = F.relu(bn(F.conv2d(x, p(f"{name}.conv1.weight"), stride=stride, padding=1), f"{name}.bn1"))
                out = bn(F.conv2d(out, p(f"{name}.conv2.weight"), padding=1), f"{name}.bn2")
            else:
                out = F.relu(bn(F.conv2d(x, p(f"{name}.conv1.weight")), f"{name}.bn1"))
                out = F.relu(bn(F.conv2d(out, p(f"{name}.conv2.weight"), stride=stride, padding=1,
                                         groups=arch.groups), f"{name}.bn2"))
                out = bn(F.conv2d(out, p(f"{name}.conv3.weight")), f"{name}.bn3")
            if f"{name}.downsample.0.weight" in state_dict:
                x = bn(F.conv2d(x, p(f"{name}.downsample.0.weight"), stride=stride), f"{name}.downsample.1")
            x = F.relu(out + x)
    logits = F.linear(x.mean((2, 3)), p("fc.weight"), p("fc.bias"))
    assert used == {k for k in state_dict if not k.endswith("num_batches_tracked")}, "unused weights"
    return logits


@pytest.mark.parametrize("entry", ["resnet18_ssl", "resnet50_ssl", "resnext50_32x4d_swsl", "resnext101_32x4d_swsl"])
def test_forward_equals_torchvision_resnet_computed_from_the_state_dict(entry):
    state_dict = random_state_dict(entry)
    model = create_model(entry, pretrained=False)
    model.load_state_dict(state_dict, strict=True)
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        expected = reference_forward(state_dict, x, WEIGHTS[entry].arch)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("entry", WEIGHTS)
def test_every_entry_builds_untrained_and_classifies(entry):
    torch.manual_seed(0)
    model = create_model(entry, pretrained=False)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert not model.training
    assert model.pretrained_cfg["pretrained"] is False and model.pretrained_cfg["source"] is None


def test_torchvision_keywords_are_accepted():
    model = create_model("resnet50_ssl", pretrained=False, zero_init_residual=True, groups=1, width_per_group=64,
                         replace_stride_with_dilation=[False, True, True], norm_layer=nn.BatchNorm2d)
    assert all(block.bn3.weight.abs().sum() == 0 for layer in (model.layer1, model.layer4) for block in layer)
    # torchvision's rule: a dilated stage's first block keeps the previous dilation.
    assert model.layer4[0].conv2.stride == (1, 1) and model.layer4[0].conv2.dilation == (2, 2)
    assert model.layer4[1].conv2.dilation == (4, 4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert isinstance(create_model("resnet18_ssl", pretrained=False, norm_layer=nn.Identity).bn1, nn.Identity)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"groups": 8}, ValueError, "groups=32; got groups=8"),
    ({"width_per_group": 64}, ValueError, "width_per_group=4; got width_per_group=64"),
    ({"block": "basic"}, TypeError, "unexpected keyword argument.*block"),
    ({"layers": [3, 4, 6, 3]}, TypeError, "unexpected keyword argument.*layers"),
    ({"replace_stride_with_dilation": [True]}, ValueError, "3 booleans"),
])
def test_contradicting_or_unknown_keywords_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        create_model("resnext50_32x4d_swsl", pretrained=False, **kwargs)


def test_resnet18_refuses_dilation():
    with pytest.raises(ValueError, match="does not support dilation"):
        create_model("resnet18_swsl", pretrained=False, replace_stride_with_dilation=[False, False, True])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_classes": -1}, ValueError, "num_classes must be a whole number >= 0"),
    ({"num_classes": "10"}, ValueError, "num_classes"),
    ({"num_classes": True}, ValueError, "num_classes"),
    ({"pretrained": "yes"}, TypeError, "pretrained must be True or False"),
    ({"out_indices": (1, 2)}, ValueError, "only with features_only"),
    ({"features_only": True, "out_indices": (2, 1)}, ValueError, "increasing"),
    ({"features_only": True, "out_indices": (1, 5)}, ValueError, "from 0 .* to 4"),
    ({"features_only": True, "out_indices": ()}, ValueError, "out_indices"),
    ({"features_only": True, "num_classes": 10}, ValueError, "no classifier"),
    ({"weights": "x.pth"}, ValueError, "pretrained=False"),
])
def test_bad_arguments_give_clear_errors(kwargs, error, match):
    kwargs.setdefault("pretrained", False)
    with pytest.raises(error, match=match):
        create_model("resnet18_ssl", **kwargs)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet101_swsl'.*resnet18_ssl"):
        create_model("resnet101_swsl")


@pytest.mark.parametrize("num_classes, width", [(0, 2048), (10, 10)])
def test_num_classes_untrained(num_classes, width):
    model = create_model("resnet50_swsl", pretrained=False, num_classes=num_classes)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, width)


def test_features_only_strides_channels_and_dilation():
    model = create_model("resnext50_32x4d_ssl", pretrained=False, features_only=True)
    features = model(torch.randn(1, 3, 224, 224))
    assert [f.shape[1:] for f in features] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [(256, 4), (512, 8), (1024, 16), (2048, 32)]
    assert not hasattr(model, "fc") and not hasattr(model, "avgpool")

    model = create_model("resnet50_ssl", pretrained=False, features_only=True, out_indices=(0, 2, 3),
                         replace_stride_with_dilation=[False, True, True])
    features = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1:] for f in features] == [(64, 32, 32), (512, 8, 8), (1024, 8, 8)]
    assert [i["reduction"] for i in model.feature_info] == [2, 8, 8]
    assert not hasattr(model, "layer4")
