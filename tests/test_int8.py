"""INT8 (optimize_for_inference(dtype="int8", calibration=...)): fidelity against float32 on a trained model,
the interface and metadata, the calibration cache, the errors, and "auto" never picking a slower INT8."""
from __future__ import annotations

import functools
import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from utils.images.decode import ImageError
from utils.inference import backends, export, quantize, runtimes
from utils.inference.optimize import optimize_for_inference
from utils.system import hardware

from .conftest import REPO
from .test_optimize import photos, trained_like

RUNTIMES = list(runtimes.NAMES)  # both are in requirements-dev.txt: a missing one fails, naming its install
SIZE = 36  # the smallest convenient input the network takes (33 pixels and up), to train in seconds


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's handwritten digits (8x8, 1797 images) as (N, 3, SIZE, SIZE) images and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = F.interpolate(torch.tensor(data.images, dtype=torch.float32)[:, None] / 16, size=SIZE, mode="bilinear")
    return (x.repeat(1, 3, 1, 1) - 0.5) / 0.5, torch.tensor(data.target)


@pytest.fixture(scope="module")
def digits_model(digits):
    """ResNet-18 trained for two epochs on 1000 digits (83% on the other 797): a model whose
    predictions mean something, with close calls among them, unlike random weights."""
    x, y = digits
    torch.manual_seed(0)
    model = create_model("resnet18_ssl", pretrained=False, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        for batch in torch.randperm(1000).split(32):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("backend", RUNTIMES)
def test_int8_agrees_with_float32_on_a_model_trained_on_digits(digits, digits_model, backend):
    x, y = digits
    test = slice(1000, None)
    calibration = x[:100]  # training images, as a user would calibrate
    fast = optimize_for_inference(digits_model, backend=backend, dtype="int8", calibration=calibration)
    with torch.no_grad():
        expected, got = digits_model(x[test]).argmax(1), fast(x[test]).argmax(1)
    accuracy = {name: 100 * float((p == y[test]).float().mean()) for name, p in (("float32", expected),
                                                                                   ("int8", got))}
    assert accuracy["float32"] > 75, accuracy  # the model learnt (chance is 10%): its predictions are worth keeping
    # INT8 rounds each activation to 1/255 of its calibrated range: a few near-ties among 797 images may
    # flip (0.2-0.7% measured), a wrong range or a lost scale flips a large share.
    agreement = 100 * float((got == expected).float().mean())
    print(f"{backend}: top-1 agreement {agreement:.2f}%, accuracy {accuracy}")
    assert agreement >= 97, (agreement, accuracy)
    assert abs(accuracy["int8"] - accuracy["float32"]) <= 2, accuracy
    # The reported fidelity is what the held-out calibration images (every fifth) give.
    held_out = calibration[quantize.HOLD_OUT - 1::quantize.HOLD_OUT]
    with torch.no_grad():
        direct = 100 * float((fast(held_out).argmax(1) == digits_model(held_out).argmax(1)).float().mean())
    fidelity = fast.int8_fidelity[backend]
    assert fidelity.held_out and fidelity.images == len(held_out) == 20
    assert fidelity.top1_agreement == pytest.approx(direct)
    assert 0 < fidelity.max_error < 0.5


@pytest.fixture(scope="module")
def calibration():
    model = trained_like("resnet18_ssl")
    # The photos at 64 px: quantizing costs seconds per image size, and 64 px exercises the same graph.
    batch = F.interpolate(photos(model), size=(64, 64), mode="bilinear", antialias=True)
    return torch.cat([batch, batch.flip(3), batch * 0.8, batch.flip(2), batch * 1.1])  # 10 images: 2 held out


@pytest.fixture(scope="module")
def classifier():
    """One model for the tests that only read it: its export and INT8 models are made once, and reused."""
    return trained_like("resnet18_ssl")


@pytest.mark.parametrize("backend", RUNTIMES)
def test_interface_and_metadata_are_the_models(classifier, calibration, backend):
    model = classifier
    fast = model.optimize_for_inference(backend=backend, dtype="int8", calibration=calibration)
    x = calibration[:3]
    with torch.no_grad():
        expected, got = model(x), fast(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (3, 1000)
    assert float((got - expected).abs().max() / expected.abs().max()) < 0.1
    for name in ("pretrained_cfg", "preprocess", "num_features"):
        assert getattr(fast, name) is getattr(model, name)
    assert isinstance(fast.int8_fidelity[backend], quantize.Fidelity)
    assert fast(x[:0]).shape == (0, 1000)
    bad = x.clone()
    bad[1, 0, 5, 5] = math.nan
    out = fast(bad)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()  # NaN stays NaN, in its own image only
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    with pytest.raises(TypeError, match="float tensor"):
        fast(x.to(torch.uint8))


@pytest.mark.parametrize("backend", RUNTIMES)
def test_feature_models_give_float32_maps(calibration, backend):
    model = trained_like("resnet18_ssl", features_only=True)
    fast = optimize_for_inference(model, backend=backend, dtype="int8", calibration=calibration)
    with torch.no_grad():
        expected, got = model(calibration[:2]), fast(calibration[:2])
    assert [g.shape for g in got] == [e.shape for e in expected] and all(g.dtype == torch.float32 for g in got)
    assert fast.feature_info is model.feature_info
    assert fast.int8_fidelity[backend].top1_agreement is None  # no classes to agree on: the error is reported


@pytest.fixture
def quantizations(monkeypatch):
    """Every quantization that runs, as (backend, number of images): the real one, counted."""
    calls = []
    real = quantize.quantize

    def counted(onnx, backend, images):
        calls.append((backend, len(images)))
        return real(onnx, backend, images)

    monkeypatch.setattr(quantize, "quantize", counted)
    return calls


@pytest.mark.parametrize("backend", RUNTIMES)
def test_calibration_runs_once_per_weights_and_images_and_follows_weight_changes(calibration, quantizations,
                                                                                 backend):
    model = trained_like("resnet18_ssl")
    x = calibration[:2]
    first = optimize_for_inference(model, backend=backend, dtype="int8", calibration=calibration)
    again = optimize_for_inference(model, backend=backend, dtype="int8", calibration=calibration.clone())
    assert quantizations == [(backend, 8)]  # the same weights and images: quantized once
    assert torch.equal(first(x), again(x))
    optimize_for_inference(model, backend=backend, dtype="int8", calibration=calibration[:9])
    assert len(quantizations) == 2  # other images: quantized again
    before = first(x)
    with torch.no_grad():
        model.fc.weight.mul_(-1)  # in place, as an optimizer step would
    fresh = optimize_for_inference(model, backend=backend, dtype="int8", calibration=calibration)
    assert len(quantizations) == 3
    with torch.no_grad():
        expected = model(x)
    assert float((fresh(x) - expected).abs().max() / expected.abs().max()) < 0.1  # the new weights
    assert torch.equal(first(x), before)  # the earlier copy is independent: still the old weights


def test_calibration_from_a_folder_and_from_paths_is_preprocessed_by_the_model(tmp_path):
    model = trained_like("resnet18_ssl")
    files = sorted(p for p in (REPO.parent / "shared" / "images").iterdir() if p.suffix in (".jpg", ".png"))
    assert len(files) == 3
    from_folder = quantize.calibration_images(files[0].parent, model)
    from_paths = quantize.calibration_images([str(f) for f in files], model)
    expected = torch.stack([model.preprocess(f) for f in sorted(files)])
    assert torch.equal(from_paths, expected) and torch.equal(from_folder, expected)
    many = torch.randn(quantize.MAX_IMAGES * 2 + 1, 3, 32, 32)
    assert len(quantize.calibration_images(many, model)) == quantize.MAX_IMAGES  # spread over all of them


@pytest.mark.parametrize("calibration, error, match", [
    (None, ValueError, r"dtype='int8' needs calibration=: 50 to 300 images"),
    (torch.zeros(0, 3, 64, 64), ValueError, "got no images"),
    (torch.zeros(4, 64, 64), ValueError, r"float tensor \(N, 3, H, W\), got torch.float32 of shape \(4, 64, 64\)"),
    (torch.zeros(4, 3, 64, 64, dtype=torch.uint8), ValueError, "got torch.uint8"),
    (torch.full((4, 3, 64, 64), math.inf), ValueError, "NaN or infinite values"),
    ([1, 2], TypeError, "expected a folder, image paths or a preprocessed tensor, got int"),
    (b"images", TypeError, "expected a folder, image paths or a preprocessed tensor, got bytes"),
    ([], ValueError, "got no images"),
    ("", ValueError, r"calibration: '': an empty path"),
    (torch.zeros(4, 3, 16, 16), ValueError, "images of 16x16 pixels; the network takes 32 and up"),
    (torch.zeros(4, 3, 64, 1), ValueError, "images of 64x1 pixels"),
])
def test_bad_calibration_is_refused_with_what_to_pass(calibration, error, match):
    with pytest.raises(error, match=match):
        optimize_for_inference(trained_like("resnet18_ssl"), dtype="int8", calibration=calibration)


def test_bad_calibration_files_are_named(tmp_path):
    model = trained_like("resnet18_ssl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"calibration: .*empty: no image files"):
        optimize_for_inference(model, dtype="int8", calibration=tmp_path / "empty")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg: not a readable image"):
        optimize_for_inference(model, dtype="int8", calibration=[tmp_path / "broken.jpg"])
    with pytest.raises(ValueError, match="no preprocess to read image files with: pass a preprocessed"):
        optimize_for_inference(torch.nn.Sequential(model), dtype="int8", calibration=tmp_path / "broken.jpg")


def test_other_bad_combinations_say_what_to_do(calibration):
    model = trained_like("resnet18_ssl")
    with pytest.raises(ValueError, match="calibration= is for dtype='int8'.*leave it out for float32"):
        optimize_for_inference(model, calibration=calibration)
    with pytest.raises(ValueError, match="'int8' runs in OpenVINO or ONNX Runtime: use backend=None"):
        optimize_for_inference(model, backend="torch", dtype="int8", calibration=calibration)
    with pytest.raises(ValueError, match="compile=True applies to backend='torch'.*not to INT8's runtimes"):
        optimize_for_inference(model, dtype="int8", calibration=calibration, compile=True)
    with pytest.raises(ValueError, match="int8 runs on the CPU here .*not on cuda"):
        hardware.check_native("int8", torch.device("cuda"))  # what a model on a GPU meets
    hardware.check_native("int8", torch.device("cpu"))  # any CPU: whether it is faster is measured


@pytest.mark.parametrize("missing, backend, match", [
    (["nncf"], "openvino", r"INT8 in openvino needs openvino and nncf: pip install openvino nncf"),
    (["onnxruntime"], "onnxruntime", r"INT8 in onnxruntime needs onnxruntime and onnx: pip install onnxruntime"),
    (["nncf", "onnxruntime"], None, r"needs ONNX Runtime or OpenVINO with NNCF: pip install onnxruntime onnx or "
                                    r"pip install openvino nncf"),
])
def test_a_missing_runtime_names_the_install(calibration, monkeypatch, missing, backend, match):
    for package in missing:
        monkeypatch.setitem(sys.modules, package, None)  # import then fails, as where it is not installed
    with pytest.raises(ImportError, match=match):
        optimize_for_inference(trained_like("resnet18_ssl"), backend=backend, dtype="int8", calibration=calibration)


def slowed(candidate, seconds):
    """``candidate`` (a runtime's model) made to take ``seconds`` longer per call."""
    runner = candidate.runner

    def slow(x):
        time.sleep(seconds)
        return runner(x)

    candidate.runner = slow
    return candidate


def test_auto_never_picks_a_slower_int8_and_picks_a_faster_one(classifier, calibration):
    auto = optimize_for_inference(classifier, backend="auto", dtype="int8", calibration=calibration)
    names = list(auto.candidates)
    int8 = [n for n in names if n.endswith(" int8")]
    assert sorted(int8) == sorted(f"{b} int8" for b in RUNTIMES)
    assert "torch" in names  # float32 competes, and bfloat16 where the CPU computes it natively
    assert ("torch bfloat16" in names) == hardware.cpu_has_native(torch.bfloat16)
    for name in int8:
        slowed(auto.candidates[name], 0.1)  # far slower than any float candidate at this size
    auto(calibration[:1, :, :48, :48])
    assert auto.choices[(1, 48, 48)] not in int8
    float_runtimes = [n for n in names if n not in int8]
    for name in float_runtimes:
        if hasattr(auto.candidates[name], "runner"):
            slowed(auto.candidates[name], 0.15)
        else:  # torch's: slowed by a hook of known cost
            auto.candidates[name].register_forward_pre_hook(lambda *_: time.sleep(0.15))
    auto(calibration[:1, :, :64, :64])
    assert auto.choices[(1, 64, 64)] in int8  # INT8 is now the faster: it is picked


def test_float_auto_has_no_int8_candidate(classifier):
    auto = optimize_for_inference(classifier, backend="auto")
    assert not any("int8" in name for name in auto.candidates)


def test_the_default_backend_for_int8_is_the_faster_int8_runtime(classifier, calibration):
    fast = optimize_for_inference(classifier, dtype="int8", calibration=calibration)
    assert sorted(fast.candidates) == sorted(f"{b} int8" for b in RUNTIMES)  # the INT8 runtimes only
    fast(calibration[:2])
    assert list(fast.choices.values())[0].endswith(" int8")


@pytest.fixture(scope="module")
def tiny():
    """A two-convolution network's ONNX and images for it: OpenVINO's INT8 path in a second, for the tests of
    what is asked of OpenVINO rather than of what a ResNet computes."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.second(F.relu(self.first(x)))

    torch.manual_seed(0)
    net, images = Tiny().eval(), torch.randn(8, 3, 16, 16)
    return export.onnx_program(net, images[:2]).model_proto.SerializeToString(), images


@pytest.mark.parametrize("flags, precision", [({"avx2", "avx512_vnni"}, "f32"),
                                              ({"avx512_vnni", "avx512_bf16"}, "bf16")])
def test_openvino_computes_int8s_float_layers_in_bfloat16_only_where_the_cpu_has_it(tiny, monkeypatch, flags,
                                                                                    precision):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    onnx, images = tiny
    run = backends.openvino_runner(quantize.quantize(onnx, "openvino", images), quantize.INT8, 1)
    # What the code asks of OpenVINO, on any CPU; what OpenVINO grants depends on the real one, except f32.
    assert run.config["INFERENCE_PRECISION_HINT"] == precision
    if precision == "f32":
        assert run.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"


def test_openvino_int8_quantizes_a_graph_whose_convolution_biases_are_constants(classifier, calibration):
    """NNCF corrects each convolution's bias for the shift that quantizing causes, and finds a bias only
    as a constant. The ONNX reader leaves it computed at run time unless the graph is folded first: a
    model fine-tuned on digits then lost 13 points of top-1 in INT8 (0.3 folded)."""
    import openvino

    onnx = backends._exported(classifier).onnx
    quantized = openvino.Core().read_model(*quantize.quantize(onnx, "openvino", calibration[:8]))
    convolutions = [op for op in quantized.get_ordered_ops() if op.get_type_name() == "Convolution"]
    assert len(convolutions) == 20  # ResNet-18: the stem, 16 in the blocks, 3 downsampling
    for convolution in convolutions:
        after = [target.get_node() for target in convolution.output(0).get_target_inputs()]
        assert [op.get_type_name() for op in after] == ["Add"], convolution.get_friendly_name()
        bias = [i.get_source_output().get_node() for i in after[0].inputs()]
        assert sorted(op.get_type_name() for op in bias if op is not convolution) == ["Constant"], bias


def test_every_openvino_model_is_read_and_compiled_by_one_core(tiny, monkeypatch):
    """A process that made an openvino.Core for each model crashed seconds later in unrelated code (a heap
    corrupted after two INT8 models had come and gone): the repository's code makes one Core, whatever
    NNCF makes for itself."""
    import openvino

    made = []

    class Counted(openvino.Core):
        def __init__(self, *args, **kwargs):
            made.append(sys._getframe(1).f_globals["__name__"])  # who asked for it
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(openvino, "Core", Counted)
    monkeypatch.setattr(runtimes, "openvino_core", functools.cache(runtimes.openvino_core.__wrapped__))
    onnx, images = tiny
    for dtype in (torch.float32, quantize.INT8, quantize.INT8):  # the float runner, and INT8 twice
        source = quantize.quantize(onnx, "openvino", images) if dtype == quantize.INT8 else onnx
        assert backends.openvino_runner(source, dtype, 1)(images[:2].numpy())[0].shape == (2, 4, 12, 12)
    assert [name for name in made if name.startswith(("utils", "models"))] == ["utils.inference.runtimes"], made
