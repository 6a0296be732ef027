"""torch.hub's view of the repository: list, help and load, as a user's notebook meets them."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from models import WEIGHTS

from .conftest import REPO

ENTRIES = ["resnet18_ssl", "resnet50_ssl", "resnext50_32x4d_ssl", "resnext101_32x4d_ssl", "resnext101_32x8d_ssl",
           "resnext101_32x16d_ssl", "resnet18_swsl", "resnet50_swsl", "resnext50_32x4d_swsl",
           "resnext101_32x4d_swsl", "resnext101_32x8d_swsl", "resnext101_32x16d_swsl"]
GITHUB = "someone/semi-supervised-hub:main"


@pytest.fixture
def github_copy(torch_home):
    """The repository where torch.hub keeps what it downloaded from GitHub: <hub dir>/<owner>_<repo>_<ref>."""
    target = torch_home / "hub" / "someone_semi-supervised-hub_main"
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".pytest_cache"))
    return target


def test_registry_has_the_original_entry_names():
    assert list(WEIGHTS) == ENTRIES


def test_hub_list_is_exactly_the_twelve_entries(github_copy):
    assert sorted(torch.hub.list(GITHUB, trust_repo=True, skip_validation=True)) == sorted(ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES)
def test_hub_help_describes_the_entry_from_the_registry(github_copy, entry):
    text = torch.hub.help(GITHUB, entry, trust_repo=True, skip_validation=True)
    w = WEIGHTS[entry]
    assert text == w.docstring()
    for fact in (w.arch.title, f"({w.supervision})", f"{w.reported[0]:.1f}/{w.reported[1]:.1f} reported",
                 f"{w.measured[0]:.3f}/{w.measured[1]:.3f} measured", f"{w.arch.params:,} parameters",
                 f"{w.arch.gmacs:.3f} GMACs", "CC-BY-NC-4.0", "arXiv:1905.00546", "pretrained=True",
                 "progress=True", "weights=None", "num_classes=None", "features_only=False", "out_indices",
                 "SEMI_SUPERVISED_WEIGHTS_MIRROR"):
        assert fact in text, fact


def test_hub_load_from_the_github_cache(github_copy):
    model = torch.hub.load(GITHUB, "resnet50_swsl", trust_repo=True, skip_validation=True, pretrained=False)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.pretrained_cfg["entry"] == "resnet50_swsl"


def test_hub_load_local_with_weights(resnet18_checkpoint, server):
    url = server.serve(resnet18_checkpoint)
    model = torch.hub.load(str(REPO), "resnet18_swsl", source="local", weights=url, progress=False)
    reference = torch.hub.load(str(REPO), "resnet18_swsl", source="local", pretrained=False)
    reference.load_state_dict(torch.load(resnet18_checkpoint, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_metadata_preprocessing_and_class_names_travel_with_the_model():
    from PIL import Image

    model = torch.hub.load(str(REPO), "resnext101_32x8d_ssl", source="local", pretrained=False)
    cfg = model.pretrained_cfg
    w = WEIGHTS["resnext101_32x8d_ssl"]
    assert (cfg["url"], cfg["hash_prefix"], cfg["license"]) == (w.url, w.hash_prefix, "CC-BY-NC-4.0")
    assert cfg["metrics"]["imagenet1k_val"] == {"reported": {"top1": 81.7, "top5": 96.1},
                                                "measured": {"top1": 81.62, "top5": 96.036}}
    assert (cfg["params"], cfg["gmacs"]) == (88_791_336, 16.414)
    assert (cfg["mean"], cfg["std"]) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (cfg["input_size"], cfg["resize_size"], cfg["crop_pct"], cfg["interpolation"]) == \
           ((3, 224, 224), 256, 0.875, "bilinear")
    assert len(cfg["classes"]) == 1000 and cfg["classes"][0] == "tench" and cfg["wnids"][0] == "n01440764"
    assert cfg["wnids"] == sorted(cfg["wnids"])  # model-output order is the sorted WordNet ids
    x = model.preprocess(Image.new("RGB", (500, 375), (200, 30, 60)))
    assert x.shape == (3, 224, 224)
    # A flat colour stays flat through resizing and cropping: each pixel is the colour, normalised by
    # the model's own mean and std.
    colour = (torch.tensor([200, 30, 60]) / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    torch.testing.assert_close(x, colour[:, None, None].expand(3, 224, 224), rtol=0, atol=1e-6)
    logits = model(x[None])
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_loading_adds_one_private_package_and_nothing_heavy(resnet18_checkpoint):
    """Other hub repositories (and users) own top-level `models` and `utils`: loading ours takes neither.
    It needs nothing beyond torch (no Pillow, no torchvision) and none of utils/inference, and building on
    the meta device must not wake torch._dynamo (initialising meta tensors imports it: seconds of start-up
    for nothing)."""
    script = ("import sys, torch; before = {m.split('.')[0] for m in sys.modules}; "
              "torch.hub.load(sys.argv[1], 'resnet18_ssl', source='local', weights=sys.argv[2]); "
              "print(*sorted({m.split('.')[0] for m in sys.modules} - before - set(sys.stdlib_module_names)), "
              "'torch._dynamo' in sys.modules, any('.utils.inference' in m for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script, str(REPO), str(resnet18_checkpoint)], cwd="/",
                         capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 3 and out[0].startswith("_semi_supervised_hub_"), out
    assert out[1] == "False", "torch._dynamo was imported while loading"
    assert out[2] == "False", "the fast-inference code was imported while loading (optimize_for_inference imports it)"


def test_force_reload_picks_up_the_new_code(github_copy):
    first = torch.hub.load(GITHUB, "resnet18_ssl", trust_repo=True, skip_validation=True, pretrained=False)
    again = torch.hub.load(GITHUB, "resnet18_ssl", trust_repo=True, skip_validation=True, pretrained=False)
    assert type(again) is type(first)  # the same checkout is imported once

    # What force_reload=True does: the repository is written anew, here with a changed registry.
    registry = github_copy / "models" / "registry.py"
    registry.write_text(registry.read_text().replace('"ResNet-18"', '"ResNet-18 (new)"'))
    hubconf = github_copy / "hubconf.py"
    hubconf.write_text(hubconf.read_text())
    os.utime(hubconf, ns=(hubconf.stat().st_atime_ns, hubconf.stat().st_mtime_ns + 1_000_000))
    text = torch.hub.help(GITHUB, "resnet18_ssl", trust_repo=True, skip_validation=True)
    assert text.startswith("ResNet-18 (new),")
