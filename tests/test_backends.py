"""optimize_for_inference(backend=...): ONNX Runtime, OpenVINO and "auto" keep the model's interface."""
import sys
import time

import pytest
import torch

from utils import optimize_for_inference
from utils.inference import backends, export, runtimes
from utils.system import hardware

from .test_optimize import relative_error, trained_like

PEERS = list(runtimes.NAMES)
SHAPES = [(1, 3, 224, 224), (3, 3, 33, 50)]  # batch 1 at the usual size; another batch, the smallest size


@pytest.fixture(scope="module")
def classifier():
    return trained_like("resnet18_ssl")


@pytest.fixture(scope="module")
def exports(monkeypatch_module):
    """Counts the real ONNX exports made while the tests of this module run."""
    calls = []
    real = export.onnx_program

    def counting(model, example=None):
        calls.append(type(model).__name__)
        return real(model, example)

    monkeypatch_module.setattr(export, "onnx_program", counting)
    return calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


@pytest.mark.parametrize("backend", PEERS)
def test_float32_outputs_equal_eager_at_any_batch_and_size(backend, classifier, exports):
    fast = optimize_for_inference(classifier, backend=backend)
    assert fast.backend == backend and not fast.training
    for shape in SHAPES:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = classifier(x)
        got = fast(x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert relative_error(got, expected) < 1e-4, (backend, shape)
    # Metadata travels, training is refused as for the torch backend.
    assert fast.pretrained_cfg is classifier.pretrained_cfg and fast.preprocess is classifier.preprocess
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


def test_the_export_is_made_once_per_model_and_weights(classifier, exports):
    for backend in (*PEERS, *PEERS, "auto"):
        optimize_for_inference(classifier, backend=backend)
    assert exports.count("ResNet") <= 1  # the first test of this module may have made it already
    model = trained_like("resnet18_swsl")
    optimize_for_inference(model, backend="onnxruntime")
    before = len(exports)
    optimize_for_inference(model, backend="openvino")
    assert len(exports) == before
    # Weights changed in place: exported afresh, and the outputs follow the new weights.
    with torch.no_grad():
        model.fc.bias += 1.0
    fast = optimize_for_inference(model, backend="openvino")
    assert len(exports) == before + 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fast(x), model(x)) < 1e-4


HEADLESS = {"pooled": {"num_classes": 0}, "maps": {"features_only": True, "out_indices": (0, 2, 4)}}


@pytest.fixture(scope="module", params=list(HEADLESS))
def headless(request):
    """A pooled-feature model and a backbone, each exported once for both runtimes."""
    return HEADLESS[request.param], trained_like("resnet18_ssl", **HEADLESS[request.param])


@pytest.mark.parametrize("backend", PEERS)
def test_pooled_features_and_feature_maps(backend, headless):
    kwargs, model = headless
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        expected = model(x)
    got = optimize_for_inference(model, backend=backend)(x)
    if kwargs.get("features_only"):
        assert isinstance(got, list) and [g.shape for g in got] == [e.shape for e in expected]
        assert all(g.dtype == torch.float32 and relative_error(g, e) < 1e-4 for g, e in zip(got, expected))
    else:
        assert got.shape == (2, 512) and relative_error(got, expected) < 1e-4


def test_auto_runs_each_shape_on_the_fastest_candidate(classifier):
    fast = optimize_for_inference(classifier, backend="auto")
    assert set(fast.candidates) == {"torch", *(b for b in PEERS if runtimes.installed(b))}
    assert fast.pretrained_cfg["entry"] == "resnet18_ssl"
    names = list(fast.candidates)
    for i, shape in enumerate(SHAPES):
        # Every candidate but one made 50 ms slower, a different one for each shape: that one must win.
        winner = names[i % len(names)]
        hooks = [fast.candidates[n].register_forward_pre_hook(lambda *_: time.sleep(0.05)) for n in names
                 if n != winner]
        x = torch.randn(shape)
        with torch.no_grad():
            expected = classifier(x)
        assert relative_error(fast(x), expected) < 1e-4
        for hook in hooks:
            hook.remove()
        assert fast.choices[(shape[0], *shape[2:])] == winner
        assert relative_error(fast(x), expected) < 1e-4  # the second call goes straight to the winner
    assert set(fast.choices) == {(1, 224, 224), (3, 33, 50)}


class Slowed(torch.nn.Module):
    def __init__(self, model, seconds):
        super().__init__()
        self.model, self.seconds = model, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.model(x)


def test_auto_picks_the_fastest_candidate_per_shape_and_keeps_the_choice(classifier):
    fast = optimize_for_inference(classifier)
    calls = []
    slow = Slowed(fast, 0.05)
    slow.register_forward_pre_hook(lambda *_: calls.append("slow"))
    auto = backends.AutoModel({"slow": slow, "fast": fast})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = classifier(x)
    assert relative_error(auto(x), expected) < 1e-4 and auto.choices == {(2, 64, 64): "fast"}
    raced = len(calls)
    assert 1 + 3 <= raced <= 1 + 8  # warm-up, then three to eight rounds
    for _ in range(3):
        assert relative_error(auto(x), expected) < 1e-4
    assert len(calls) == raced  # the slow candidate is not called again for this shape
    with pytest.raises(ValueError, match="add the batch dimension"):
        auto(x[0])  # a bad input gets the candidates' own error
    assert auto.choices == {(2, 64, 64): "fast"}


def test_auto_in_bfloat16_leaves_out_what_cannot_compute_it(classifier, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # on any CPU
    fast = optimize_for_inference(classifier, backend="auto", dtype=torch.bfloat16)
    assert "onnxruntime" not in fast.candidates and "torch" in fast.candidates
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fast(x), classifier(x)) < 3e-2


@pytest.mark.parametrize("kwargs, error, match", [
    ({"backend": "tensorrt"}, ValueError, "backend must be one of 'torch', 'onnxruntime', 'openvino', 'auto'"),
    ({"backend": "onnxruntime", "compile": True}, ValueError, "compile=True applies to backend='torch'"),
    ({"backend": "onnxruntime", "dtype": torch.float16}, ValueError, "no native float16|onnxruntime.*float32"),
])
def test_bad_arguments(classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        optimize_for_inference(classifier, **kwargs)


def test_a_model_converted_to_another_dtype_is_refused_not_changed(classifier):
    half = trained_like("resnet18_ssl").to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"exports the model from float32, but its weights are torch.bfloat16: "
                                         r"use model.float\(\)"):
        optimize_for_inference(half, backend="openvino")
    assert all(t.dtype == torch.bfloat16 for t in half.state_dict().values() if t.is_floating_point())


def test_onnxruntime_in_bfloat16_is_refused_before_exporting(classifier, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    with pytest.raises(ValueError, match="onnxruntime.* float32 or int8 on the CPU: use dtype=None, or backend='openv"):
        optimize_for_inference(classifier, backend="onnxruntime", dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", PEERS)
def test_a_missing_runtime_names_its_install(classifier, backend, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails, as where it is not installed
    with pytest.raises(ImportError, match=f"backend='{backend}' needs the {backend} package: pip install {backend}"):
        optimize_for_inference(classifier, backend=backend)
    fast = optimize_for_inference(classifier, backend="auto")
    assert backend not in fast.candidates


@pytest.mark.parametrize("backend", PEERS)
def test_bad_inputs_get_the_models_errors(classifier, backend):
    fast = optimize_for_inference(classifier, backend=backend)
    with pytest.raises(TypeError, match="float tensor .*got dtype torch.uint8.*model.preprocess"):
        fast(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="add the batch dimension"):
        fast(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        fast(torch.zeros(1, 3, 16, 64))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # any float dtype is taken, as by the torch backend
    with torch.no_grad():
        assert relative_error(fast(x), classifier(x.float())) < 1e-4


@pytest.mark.parametrize("backend", PEERS)
def test_outputs_belong_to_the_caller(classifier, backend):
    fast = optimize_for_inference(classifier, backend=backend)
    first = fast(torch.randn(2, 3, 64, 64))
    kept = first.clone()
    fast(torch.randn(2, 3, 64, 64))
    assert torch.equal(first, kept)


# ---- never silently wrong: fresh weights, independent copies, non-finite inputs, empty batches -----------

ALL = ["torch", *PEERS, "auto"]


@pytest.fixture(scope="module")
def feature_maps():
    return trained_like("resnet18_ssl", features_only=True)


def test_weights_changed_through_data_are_seen_by_every_backend():
    model = trained_like("resnet18_ssl")
    x = torch.randn(2, 3, 64, 64)
    for backend in ALL:
        optimize_for_inference(model, backend=backend)(x)  # exported (and kept) with the first weights
    model.fc.weight.data.mul_(0.5)  # no version counter moves
    model.layer4[1].conv2.weight.data[0] = 0.01
    with torch.no_grad():
        expected = model(x)
    for backend in ALL:
        assert relative_error(optimize_for_inference(model, backend=backend)(x), expected) < 1e-4, backend


def test_every_backend_returns_an_independent_copy():
    model = trained_like("resnet18_ssl")
    x = torch.randn(2, 3, 64, 64)
    fast = {backend: optimize_for_inference(model, backend=backend) for backend in ALL}
    before = {backend: f(x).clone() for backend, f in fast.items()}
    mine = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for f in fast.values():
        assert not any(t.untyped_storage().data_ptr() in mine for t in [*f.parameters(), *f.buffers()])
    model.train()  # one training step on the original
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    for backend, f in fast.items():
        assert torch.equal(f(x), before[backend]), backend


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_image_gets_nan_outputs_on_every_backend(backend, value, classifier, feature_maps):
    x = torch.randn(3, 3, 64, 64)
    x[1, :, 10:20, 10:20] = value
    out = optimize_for_inference(classifier, backend=backend)(x)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    with torch.no_grad():
        assert relative_error(out[[0, 2]], classifier(x[[0, 2]])) < 1e-4
    maps = optimize_for_inference(feature_maps, backend=backend)(x)
    assert all(m[1].isnan().all() and m[[0, 2]].isfinite().all() for m in maps)


@pytest.mark.parametrize("backend", ALL)
def test_an_empty_batch_gives_empty_outputs(backend, classifier, feature_maps):
    assert optimize_for_inference(classifier, backend=backend)(torch.zeros(0, 3, 64, 64)).shape == (0, 1000)
    maps = optimize_for_inference(feature_maps, backend=backend)(torch.zeros(0, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(0, 64, 16, 16), (0, 128, 8, 8), (0, 256, 4, 4), (0, 512, 2, 2)]
