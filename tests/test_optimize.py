"""utils.optimize_for_inference: the same outputs as the eager model, faster layouts, the original untouched."""
import pickle
import platform

import pytest
import torch
from torch import nn

from models import ARCHS, WEIGHTS, ResNet, create_model
from models.resnet import BLOCKS
from utils import optimize_for_inference
from utils.inference import export
from utils.inference.fold import fold_batchnorm
from utils.inference.fused import FusedResNet
from utils.system import hardware

from .conftest import REPO, randomize_statistics

ONE_ENTRY_PER_ARCH = list({w.arch.name: name for name, w in reversed(WEIGHTS.items())}.values())[::-1]
# CPU flags of the three kinds of machine that CI lands on, for the hardware check's branches.
ZEN5 = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
CASCADE_LAKE = frozenset({"avx2", "avx512f", "avx512_vnni"})  # AVX-512 without bf16: oneDNN would emulate it
ZEN1 = frozenset({"avx2"})


def trained_like(entry, **kwargs):
    """A model with the entry's architecture and weights whose BatchNorm statistics are not 0/1, so
    that folding them wrongly shows in the outputs."""
    torch.manual_seed(0)
    model = create_model(entry, pretrained=False, **kwargs)
    randomize_statistics(model.state_dict())  # the model's own tensors
    return model.eval()


def relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


def photos(model):
    batch = export.sample_batch(model)
    assert len(batch) >= 2
    return batch


def test_every_architecture_in_float32_equals_eager():
    assert len(ONE_ENTRY_PER_ARCH) == len(ARCHS) == 6
    for entry in ONE_ENTRY_PER_ARCH:
        model = trained_like(entry)
        x = torch.randn(2, 3, 96, 128)
        with torch.no_grad():
            expected = model(x)
        fast = optimize_for_inference(model)
        got = fast(x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert relative_error(got, expected) < 1e-4, entry


@pytest.mark.parametrize("kwargs", [{"num_classes": 10}, {"num_classes": 0}, {"features_only": True},
                                    {"features_only": True, "out_indices": (0, 2)}])
def test_heads_and_backbones(kwargs):
    model = trained_like("resnet50_ssl", **kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    got = optimize_for_inference(model)(x)
    if kwargs.get("features_only"):
        assert isinstance(got, list) and len(got) == len(expected)
        assert all(g.dtype == torch.float32 and relative_error(g, e) < 1e-4 for g, e in zip(got, expected))
    else:
        assert got.shape == expected.shape and relative_error(got, expected) < 1e-4


def test_batchnorm_is_folded_into_channels_last_convolutions_and_the_original_is_untouched():
    model = trained_like("resnet50_ssl")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and all(c.bias is not None for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    assert not any(p.requires_grad for p in fast.parameters())
    # The original keeps its BatchNorms, its tensors, its layout and its mode.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 53
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.conv1.weight.is_contiguous() and model.conv1.bias is None and model.conv1.weight.requires_grad


def test_metadata_travels_and_training_is_refused():
    model = trained_like("resnet18_ssl")
    fast = optimize_for_inference(model)
    assert fast.pretrained_cfg is model.pretrained_cfg and fast.preprocess is model.preprocess
    assert fast.num_features == 512 and not fast.training
    fast.eval()
    with pytest.raises(RuntimeError, match="inference only.*fine-tune the original model"):
        fast.train()
    backbone = optimize_for_inference(trained_like("resnet18_ssl", features_only=True))
    assert [f["reduction"] for f in backbone.feature_info] == [4, 8, 16, 32]


def test_nchw_float32_layout_can_be_kept():
    model = trained_like("resnet18_ssl")
    fast = optimize_for_inference(model, channels_last=False)
    assert fast.model.layer1[0].conv1.weight.is_contiguous()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fast(x), model(x)) < 1e-4


def test_a_frozen_batchnorm_backbone_is_folded_too():
    class FrozenBatchNorm2d(nn.Module):  # as detection libraries define it: buffers, no parameters
        def __init__(self, n):
            super().__init__()
            for name, value in (("weight", 1.5), ("bias", 0.1), ("running_mean", 0.2), ("running_var", 0.8)):
                self.register_buffer(name, torch.full((n,), value) + 0.05 * torch.randn(n))
            self.eps = 1e-5

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]

    model = create_model("resnet18_ssl", pretrained=False, features_only=True, norm_layer=FrozenBatchNorm2d).eval()
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(relative_error(g, e) < 1e-4 for g, e in zip(fast(x), model(x)))


@pytest.mark.parametrize("entry", ["resnet18_swsl", "resnet50_swsl", "resnext50_32x4d_swsl"])
def test_bfloat16_keeps_the_top1_of_float32_on_the_sample_photos(entry, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ZEN5)  # runs (emulated, slower) on any CPU
    model = trained_like(entry)
    x = photos(model)
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model, dtype=torch.bfloat16)
    assert fast.model.fc.weight.dtype == torch.bfloat16
    got = fast(x)
    assert got.dtype == torch.float32
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # Measured: 0.3-0.5% here (bfloat16 has an 8-bit mantissa); 3% leaves room across CPUs.
    assert relative_error(got, expected) < 3e-2


@pytest.mark.parametrize("flags", [CASCADE_LAKE, ZEN1, frozenset()], ids=["avx512-no-bf16", "avx2", "unknown"])
def test_a_precision_the_cpu_would_emulate_is_refused(flags, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    model = trained_like("resnet18_ssl")
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        with pytest.raises(ValueError, match=f"this CPU has no native {name} .*use dtype=None"):
            optimize_for_inference(model, dtype=dtype)


@pytest.mark.parametrize("flags, native", [(ZEN5, {torch.bfloat16}), (frozenset({"amx_bf16", "amx_fp16"}),
                                            {torch.bfloat16, torch.float16}), (CASCADE_LAKE, set())])
def test_native_precisions_follow_the_instructions(flags, native, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert {d for d in (torch.bfloat16, torch.float16) if hardware.cpu_has_native(d)} == native
    assert hardware.cpu_has_native(torch.float32)


def test_the_cpu_flags_are_read_from_the_machine():
    flags = hardware.cpu_flags()
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in flags  # every x86-64 CPU has it
    assert hardware.cpu_name() and "cores" in hardware.describe_cpu()


def test_float16_runs_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_fp16"}))
    model = trained_like("resnet18_ssl")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(optimize_for_inference(model, dtype=torch.float16)(x), model(x)) < 3e-2


def test_compiled_equals_eager_and_compiles_again_where_it_is_unpickled():
    model = trained_like("resnet18_ssl")
    fast = pickle.loads(pickle.dumps(optimize_for_inference(model, compile=True)))  # compiled on its first call
    assert isinstance(fast.model, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert relative_error(fast(x), expected) < 1e-4
    assert fast.pretrained_cfg["entry"] == "resnet18_ssl"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dtype": torch.int16}, ValueError, "dtype must be None, torch.float32, torch.bfloat16, torch.float16 or .int8."),
    ({"dtype": "float32"}, ValueError, "dtype must be None, torch.float32, torch.bfloat16, torch.float16 or .int8."),
    ({"dtype": [torch.int8]}, ValueError, "dtype must be None"),
    ({"dtype": "bfloat16"}, ValueError, "dtype must be"),
    ({"channels_last": "yes"}, TypeError, "channels_last must be True or False"),
    ({"compile": 1}, TypeError, "compile must be True or False"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        optimize_for_inference(trained_like("resnet18_ssl"), **kwargs)


def test_bad_models_and_inputs():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got str"):
        optimize_for_inference("resnet18_ssl")
    with torch.device("meta"):
        meta = create_model("resnet18_ssl", pretrained=False)
    with pytest.raises(ValueError, match="meta device .*load them first"):
        optimize_for_inference(meta)
    fast = optimize_for_inference(trained_like("resnet18_ssl"))
    with pytest.raises(TypeError, match=r"float tensor .*got dtype torch.uint8.*model.preprocess"):
        fast(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"add the batch dimension with x\[None\]"):
        fast(torch.zeros(3, 64, 64))  # the model's own message, not a memory-format error


def test_fold_batchnorm_alone_shares_the_untouched_tensors():
    model = trained_like("resnet18_ssl")
    folded = fold_batchnorm(model)
    assert folded.fc.weight is model.fc.weight  # no copy of what folding does not change
    assert folded.conv1.weight is not model.conv1.weight and isinstance(folded.bn1, nn.Identity)


def test_the_method_on_a_hub_loaded_model():
    model = torch.hub.load(str(REPO), "resnet18_ssl", source="local", pretrained=False)
    fast = model.optimize_for_inference(channels_last=False)
    assert type(fast).__name__ == "InferenceModel" and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())


def test_float32_on_the_cpu_packs_weights_per_shape_and_fuses_relu_and_add():
    model = trained_like("resnext50_32x4d_ssl")
    fast = optimize_for_inference(model)
    assert isinstance(fast.model, FusedResNet)
    shapes = [(1, 3, 64, 64), (2, 3, 96, 64), (1, 3, 64, 64), (3, 3, 33, 40), (2, 3, 96, 64)]
    for shape in shapes:  # new shapes, repeated ones, and one that pushes out the oldest packing
        x = torch.randn(shape)
        with torch.no_grad():
            assert relative_error(fast(x), model(x)) < 1e-4, shape
    assert list(fast.model._packed) == [(3, 3, 33, 40), (2, 3, 96, 64)]  # bounded: two packings kept
    # Where fusing does not apply, the plain folded model runs.
    assert not isinstance(optimize_for_inference(model, channels_last=False).model, FusedResNet)
    group_norm = create_model("resnet18_ssl", pretrained=False, norm_layer=lambda c: nn.GroupNorm(8, c)).eval()
    assert not isinstance(optimize_for_inference(group_norm).model, FusedResNet)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(optimize_for_inference(group_norm)(x), group_norm(x)) < 1e-4


class Doubled(ResNet):
    """A subclass that computes something else than ResNet.forward."""

    def forward(self, x):
        return 2 * super().forward(x)


class LeakyBottleneck(BLOCKS["bottleneck"]):
    def forward(self, x):
        return nn.functional.leaky_relu(super().forward(x) - 0.5)


def test_only_a_model_that_computes_resnets_own_forward_is_fused():
    """The fused path reproduces ResNet.forward with this repository's blocks: a subclass with a forward of its
    own, or another block, runs as the folded model instead, and gives its own outputs."""
    arch = ARCHS["resnet50"]
    x = torch.randn(2, 3, 64, 64)
    for block in (BLOCKS["bottleneck"], LeakyBottleneck):
        for cls in (ResNet, Doubled):
            torch.manual_seed(0)
            model = randomize_statistics_of(cls(block, arch.layers, num_classes=10).eval())
            fast = optimize_for_inference(model)
            fused = cls is ResNet and block is BLOCKS["bottleneck"]
            assert model.fusable() is fused and isinstance(fast.model, FusedResNet) is fused, (cls, block)
            with torch.no_grad():
                assert relative_error(fast(x), model(x)) < 1e-4, (cls, block)


def randomize_statistics_of(model: nn.Module) -> nn.Module:
    model.load_state_dict(randomize_statistics(model.state_dict()))
    return model


def test_dilated_backbones_are_fused_too():
    model = trained_like("resnet50_ssl", features_only=True, replace_stride_with_dilation=[False, True, True])
    fast = optimize_for_inference(model)
    assert isinstance(fast.model, FusedResNet)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
    got = fast(x)
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert all(relative_error(g, e) < 1e-4 for g, e in zip(got, expected))
