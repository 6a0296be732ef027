"""Fine-tuned files that lie about themselves: every field of the schema through wrong types and
out-of-range values, heads that contradict the description, and keys that are the loader's to set. Each
must be refused in one line, by torch.hub and by every command that takes --weights, before any work."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from PIL import Image

from models import finetuned
from models.registry import MEAN, STD
from utils import classify, evaluate, finetune
from utils import export as export_command

from .conftest import REPO
from .test_optimize import trained_like

CLASSES = ["cat", "dog", "owl"]


def good_description() -> dict:
    return finetuned.describe("resnet18_ssl", CLASSES, 64, 0.875, MEAN, STD,
                              {"recipe": {"epochs": 1}, "result": {"top1": 50.0}})


@functools.cache
def three_class_state() -> dict:
    return trained_like("resnet18_ssl", num_classes=3).state_dict()


def save(path, description, state_dict=None, legacy=False):
    state_dict = three_class_state() if state_dict is None else state_dict
    torch.save({"model": state_dict, finetuned.KEY: description}, path, _use_new_zipfile_serialization=not legacy)
    return path


# field -> values that must be refused, each with a word its one-line error must hold.
BAD = {
    "entry": [(["resnet18_ssl"], "entry"), (5, "entry"), ("resnet19_ssl", "entry"), (None, "entry")],
    "num_classes": [("3", "num_classes"), (3.0, "num_classes"), (True, "num_classes"), (0, "num_classes"),
                    (-1, "num_classes"), (10**9, "num_classes"), (2, "classes")],
    "classes": [("abc", "classes"), (["cat", "dog"], "classes"), (["cat", "dog", 3], "classes"),
                (["cat", "dog\nowl", "bee"], "class name"), ([" cat", "dog", "owl"], "class name"),
                (["cat", "cat", "owl"], "twice"), (["", "dog", "owl"], "class name"),
                (["cat", "dog", "o\x1bwl"], "class name"), (None, "classes")],
    "wnids": [(["x", "y", "z"], "wnids"), ("n01440764", "wnids")],
    "input_size": [((3, 1, 1), "input_size"), ((3, 10**6, 10**6), "input_size"), ((3, 64, 65), "input_size"),
                   ([3, 64], "input_size"), ("224", "input_size"), ((1, 64, 64), "input_size"),
                   ((3, 64.0, 64.0), "input_size"), (None, "input_size")],
    "crop_pct": [(0.0, "crop_pct"), (2.0, "crop_pct"), ("0.875", "crop_pct"), (1e-300, "crop_pct"),
                 (math.nan, "crop_pct"), (1, "crop_pct")],
    "resize_size": [(10**6, "resize_size"), (1, "resize_size"), ("73", "resize_size"), (True, "resize_size"),
                    (80, "disagrees"), (None, "resize_size")],
    "mean": [((1e308,) * 3, "mean"), ((math.nan,) * 3, "mean"), ([0.5, 0.5], "mean"), ("x", "mean"),
             ((5, 5, 5), "mean")],
    "std": [((1e-300,) * 3, "std"), ((0.0,) * 3, "std"), ((-1.0,) * 3, "std"), ((math.inf,) * 3, "std")],
    "interpolation": [("bicubic", "interpolation"), (3, "interpolation")],
    "finetuning": [("x", "finetuning"), ([1], "finetuning"), ({"result": "x"}, "finetuning")],
}
CASES = [pytest.param(field, value, word, id=f"{field}-{i}") for field, values in BAD.items()
         for i, (value, word) in enumerate(values)]


def test_every_field_of_the_schema_is_covered():
    assert set(BAD) == set(good_description())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted_images")
    for name in CLASSES:
        (root / name).mkdir()
        Image.new("RGB", (80, 70), (40, 90, 160)).save(root / name / "a.png")
    return root


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def refused_everywhere(path, word, images, capsys):
    """torch.hub, classify, evaluate and export each refuse ``path`` in one line that holds ``word``."""
    with pytest.raises(Exception) as error:  # noqa: B017  (the hub's own classes: its private package's)
        torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(path), verbose=False)
    assert type(error.value).__name__ in ("ValueError", "CheckpointError"), error.value
    assert word in str(error.value) and "\n" not in str(error.value), error.value
    capsys.readouterr()
    out = path.with_name("out")
    for main, args in ((classify.main, [str(images / "cat" / "a.png"), "--device", "cpu"]),
                       (evaluate.main, [str(images), "--device", "cpu"]),
                       (export_command.main, [str(out) + ".onnx"]),
                       (finetune.main, [str(images), "--val", str(images), "--output", str(out), "--model",
                                        "resnet18_ssl", "--epochs", "1", "--img-size", "64", "--batch-size", "2",
                                        "--workers", "0", "--device", "cpu"])):
        assert main([*args, "--weights", str(path)]) == 2, main
        line = one_line(capsys.readouterr().err)
        assert line.startswith("error: ") and word in line, line
    assert not path.with_name("out.onnx").exists() and not (out / "best.pth").exists()


@pytest.mark.parametrize("field, value, word", CASES)
def test_a_bad_field_is_refused_in_one_line_by_the_hub_and_every_command(tmp_path, images, capsys, field, value,
                                                                         word):
    description = {**good_description(), field: value}
    # The head alone: a field is refused before any weight is read, and 59 full files would fill 2.6 GB.
    head = {k: v for k, v in three_class_state().items() if k.startswith("fc.")}
    refused_everywhere(save(tmp_path / "crafted.pth", description, head), word, images, capsys)


@pytest.mark.parametrize("head", ["two rows", "none"])
def test_a_head_that_contradicts_the_description_is_refused(tmp_path, images, capsys, head):
    state = trained_like("resnet18_ssl", num_classes=2 if head == "two rows" else 3).state_dict()
    if head == "none":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    word = "a head of 2 rows, and its description names 3 classes" if head == "two rows" else "no head (fc)"
    refused_everywhere(save(tmp_path / "crafted.pth", good_description(), state), word, images, capsys)


def test_what_loading_establishes_is_the_loaders_whatever_the_file_says(tmp_path):
    claims = {"source": "https://example.com/official.pth", "license": "MIT", "head": "new", "pretrained": False,
              "url": "https://example.com", "params": 1, "unknown": "x"}
    path = save(tmp_path / "claims.pth", {**good_description(), **claims})
    cfg = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(path), verbose=False).pretrained_cfg
    assert (cfg["source"], cfg["head"], cfg["pretrained"]) == (str(path), "pretrained", True)
    assert cfg["license"] == "CC-BY-NC-4.0" and cfg["params"] == 11_689_512 and "unknown" not in cfg
    assert cfg["url"] != claims["url"] and cfg["classes"] == CLASSES and cfg["input_size"] == (3, 64, 64)


def test_a_users_own_loop_that_saves_pretrained_cfg_reloads_with_its_trained_head(tmp_path, images, capsys):
    model = torch.hub.load(str(REPO), "resnet18_ssl", source="local", pretrained=False, num_classes=3,
                           verbose=False)
    cfg = {**model.pretrained_cfg, "classes": CLASSES}  # the names filled in, as the user knows them
    path = tmp_path / "mine.pth"
    torch.save({"model": model.state_dict(), "pretrained_cfg": cfg}, path)
    loaded = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(path), verbose=False)
    assert (loaded.pretrained_cfg["head"], loaded.pretrained_cfg["pretrained"]) == ("pretrained", True)
    assert loaded.pretrained_cfg["source"] == str(path) and loaded.pretrained_cfg["classes"] == CLASSES
    assert evaluate.main([str(images), "--weights", str(path), "--device", "cpu", "--json"]) == 0


def test_a_fine_tuned_file_in_the_legacy_format_is_seen_by_the_commands(tmp_path, images, capsys):
    path = save(tmp_path / "legacy.pth", good_description(), legacy=True)
    assert evaluate.main([str(images), "--weights", str(path), "--device", "cpu", "--json"]) == 0
    assert '"images": 3' in capsys.readouterr().out
