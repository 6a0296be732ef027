"""The models in other tools' hands: torch.fx (torchvision's feature extraction is built on it), TorchScript,
timm's model methods, and gradient checkpointing."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from models import WEIGHTS, create_model
from models import resnet as resnet_module

from .test_optimize import trained_like

# torch deprecates TorchScript in favour of torch.export, which works too; scripting is what is tested here.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.* deprecated:DeprecationWarning")

X = torch.randn(2, 3, 64, 64)
KINDS = {  # what the entries return: a classifier, pooled features, feature maps
    "classifier": {},
    "pooled features": {"num_classes": 0},
    "feature maps": {"features_only": True},
    "some feature maps": {"features_only": True, "out_indices": (0, 2)},
}


def equal(a, b) -> bool:
    a, b = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (a, b))
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_fx_symbolic_trace_gives_eager_outputs_and_eager_keeps_its_input_checks(kind):
    model = trained_like("resnet50_swsl", **KINDS[kind])
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert equal(traced(X), model(X))
    # The traced graph holds the stages by their names, as torchvision's create_feature_extractor needs.
    targets = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert {"conv1", "layer1.0.conv1"} <= targets
    with pytest.raises(ValueError, match="add the batch dimension"):
        model(X[0])


@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_scripts_saves_and_loads_with_eager_outputs(kind):
    model = trained_like("resnet50_swsl", **KINDS[kind])
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = model(X)
        assert equal(scripted(X), expected) and equal(loaded(X), expected)
    with pytest.raises(ValueError, match="add the batch dimension"):  # eager calls keep their checks
        model(X[0])


def test_timm_forward_features_and_forward_head_compose_to_forward():
    model = trained_like("resnet50_swsl")
    with torch.no_grad():
        features = model.forward_features(X)
        assert features.shape == (2, 2048, 2, 2)
        assert torch.equal(model.forward_head(features), model(X))
        pooled = model.forward_head(features, pre_logits=True)
    headless = create_model("resnet50_swsl", pretrained=False, num_classes=0).eval()
    headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    with torch.no_grad():
        assert torch.equal(pooled, headless(X))  # the num_classes=0 model's output


def test_timm_reset_and_get_classifier_and_default_cfg():
    model = trained_like("resnet50_swsl")
    model.pretrained_cfg = {"entry": "resnet50_swsl", "num_classes": 1000, "classes": ["tench"] * 1000,
                            "wnids": ["n01440764"] * 1000, "head": "pretrained"}
    assert model.default_cfg is model.pretrained_cfg and model.get_classifier() is model.fc
    model.reset_classifier(10)
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.weight.shape == (10, 2048)
    assert model.get_classifier() is model.fc and model(X).shape == (2, 10)
    assert model.default_cfg is model.pretrained_cfg
    assert {k: model.pretrained_cfg[k] for k in ("num_classes", "classes", "wnids", "head")} == \
           {"num_classes": 10, "classes": None, "wnids": None, "head": "new"}
    model.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(model(X), model.forward_head(model.forward_features(X), pre_logits=True))
    assert model.pretrained_cfg["num_classes"] == 0 and model.pretrained_cfg["head"] is None
    for bad, error in ((-1, ValueError), (2.5, ValueError), (True, ValueError)):
        with pytest.raises(error, match="num_classes must be a whole number"):
            model.reset_classifier(bad)
    with pytest.raises(ValueError, match="pool by averaging"):
        model.reset_classifier(10, global_pool="max")
    with pytest.raises(ValueError, match="pool by averaging"):  # no pooling, but a classifier: timm refuses it too
        model.reset_classifier(10, global_pool="")
    model.reset_classifier(0, global_pool="")  # timm's: no pooling either, the head gives the map
    with torch.no_grad():
        assert torch.equal(model(X), model.forward_features(X))
    features = trained_like("resnet50_swsl", features_only=True)
    for method in ("forward_features", "forward_head", "forward_intermediates", "get_classifier", "reset_classifier",
                   "prune_intermediate_layers"):
        with pytest.raises(TypeError, match="a features_only model gives its feature maps from model"):
            getattr(features, method)(X) if method.startswith("forward") else getattr(features, method)()


def backbone_of(model, out_indices):
    """The features_only model of ``model``'s architecture, with its weights."""
    features = create_model(model.pretrained_cfg["entry"], pretrained=False, features_only=True,
                            out_indices=out_indices).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items() if k in features.state_dict()})
    return features


# timm's indices: None all five maps, n the last n, stage numbers (negative from the end).
@pytest.mark.parametrize("indices, stages", [(None, (0, 1, 2, 3, 4)), (2, (3, 4)), ([0, -1], (0, 4)), ((1, 3), (1, 3))])
def test_timm_forward_intermediates_are_the_features_only_maps_and_forward_features(indices, stages):
    model = trained_like("resnet50_swsl")
    expected = backbone_of(model, stages)
    with torch.no_grad():
        final, maps = model.forward_intermediates(X, indices)
        assert torch.equal(final, model.forward_features(X))
        assert equal(maps, expected(X))
        assert equal(model.forward_intermediates(X, indices, intermediates_only=True), maps)
        last, early = model.forward_intermediates(X, indices, stop_early=True)
        assert equal(early, maps) and torch.equal(last, maps[-1])  # stopped at the last stage asked for
        # norm=True changes nothing: there is no final norm
        assert equal(model.forward_intermediates(X, indices, norm=True)[1], maps)


@pytest.mark.parametrize("indices", [0, 6, [5], [-6], [], "12", [True], 2.0])
def test_timm_forward_intermediates_refuses_indices_that_name_no_stage(indices):
    model = trained_like("resnet18_ssl")
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(X, indices)
    with pytest.raises(ValueError, match="indices"):
        model.prune_intermediate_layers(indices)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(X, output_fmt="NHWC")


def test_timm_prune_intermediate_layers_drops_later_stages_and_the_head():
    model = trained_like("resnet50_swsl")
    model.pretrained_cfg = {"entry": "resnet50_swsl", "num_classes": 1000, "head": "pretrained"}
    expected = backbone_of(model, (1, 2))
    assert model.prune_intermediate_layers((1, 2)) == [1, 2]
    assert isinstance(model.layer3, torch.nn.Identity) and isinstance(model.layer4, torch.nn.Identity)
    assert not any(k.startswith(("layer3.", "layer4.", "fc.")) for k in model.state_dict())
    assert model.pretrained_cfg["num_classes"] == 0 and model.pretrained_cfg["head"] is None
    with torch.no_grad():
        maps = model.forward_intermediates(X, (1, 2), intermediates_only=True)
        assert equal(maps, expected(X))
        assert torch.equal(model(X), maps[-1])  # no pooling, no classifier: the last map kept
        fast = model.optimize_for_inference()  # the pruned network, not the fused full one
        assert torch.allclose(fast(X), maps[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("entry", ["resnet18_ssl", "resnext101_32x4d_swsl"])
@pytest.mark.parametrize("coarse", [True, False])
def test_timm_group_matcher_groups_parameters_in_network_order(entry, coarse):
    """Grouped as timm's group_with_matcher does (its documented rule): each name takes the first pattern
    that re.match-es it, as (pattern's place, *its groups as numbers); names that match none go last."""
    model = create_model(entry, pretrained=False)
    matcher = model.group_matcher(coarse=coarse)
    assert list(matcher) == ["stem", "blocks"]

    def ordinal(name):
        for place, pattern in enumerate(matcher.values()):
            found = re.match(pattern, name)
            if found:
                return (place, *map(float, found.groups()))
        return (float("inf"),)

    def owner(name):  # the stem, the stage or block, or the classifier that holds the parameter
        parts = name.split(".")
        if parts[0] in ("conv1", "bn1", "fc"):
            return {"fc": "fc"}.get(parts[0], "stem")
        return ".".join(parts[:1 if coarse else 2])

    groups = {}
    for name, _ in model.named_parameters():
        groups.setdefault(ordinal(name), set()).add(owner(name))
    layers = WEIGHTS[entry].arch.layers
    blocks = [f"layer{i}" for i in range(1, 5)] if coarse else [
        f"layer{i}.{b}" for i in range(1, 5) for b in range(layers[i - 1])]
    assert [groups[k] for k in sorted(groups)] == [{"stem"}, *[{b} for b in blocks], {"fc"}]


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 0}, {"replace_stride_with_dilation": [False, True, True]}])
def test_timm_feature_info_and_head_hidden_size_describe_every_model(kwargs):
    model = trained_like("resnext50_32x4d_ssl", **kwargs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        pooled = model.forward_head(final, pre_logits=True)
    assert [i["module"] for i in model.feature_info] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    described = [(i["num_chs"], i["reduction"]) for i in model.feature_info]
    assert described == [(m.shape[1], 64 // m.shape[2]) for m in maps]
    for info in model.feature_info:  # each names the module whose output it describes
        assert info["module"] in dict(model.named_modules())
    assert model.head_hidden_size == pooled.shape[1] == model.num_features == 2048
    features = trained_like("resnext50_32x4d_ssl", features_only=True, out_indices=(0, 3),
                            replace_stride_with_dilation=kwargs.get("replace_stride_with_dilation"))
    assert features.feature_info == [model.feature_info[0], model.feature_info[3]]


@pytest.fixture
def block_calls(monkeypatch):
    """How many times the blocks' forward runs: the real forward, counted."""
    calls = []
    for block in (resnet_module.BasicBlock, resnet_module.Bottleneck):
        real = block.forward
        monkeypatch.setattr(block, "forward", lambda self, x, real=real: calls.append(1) or real(self, x))
    return calls


@pytest.mark.parametrize("kind", ["classifier", "feature maps"])
def test_grad_checkpointing_recomputes_and_gives_the_same_gradients_and_statistics(kind, block_calls):
    torch.manual_seed(0)
    plain = create_model("resnet18_ssl", pretrained=False, **KINDS[kind]).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(4, 3, 64, 64)
    for model in (plain, checkpointed):
        out = model(x)
        sum(o.square().mean() for o in (out if isinstance(out, list) else [out])).backward()
    # 8 blocks: once each without checkpointing, again in the backward pass with it.
    assert len(block_calls) == 8 + 16
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # BatchNorm's running statistics are updated once a step, as without checkpointing.
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        assert torch.equal(b, c), name
    checkpointed.set_grad_checkpointing(False)
    block_calls.clear()
    checkpointed(x).sum().backward() if kind == "classifier" else checkpointed(x)[0].sum().backward()
    assert len(block_calls) == 8


def test_grad_checkpointing_stays_out_of_inference(block_calls):
    model = trained_like("resnet18_ssl")
    model.set_grad_checkpointing()
    with torch.no_grad():
        model(X)
    assert len(block_calls) == 8  # no gradients: nothing to recompute, the plain path


def test_grad_checkpointing_stays_out_of_scripting_and_tracing():
    model = trained_like("resnet18_ssl")
    model.set_grad_checkpointing()
    with torch.no_grad():
        expected = model(X)
        assert torch.equal(torch.fx.symbolic_trace(model)(X), expected)
    assert torch.equal(torch.jit.script(model)(X), expected)  # compiled without the checkpointing branch
