"""python -m utils.finetune: learns generated classes, resumes exactly, runs under torchrun, explains bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from utils import finetune
from utils.preprocess import Preprocess

from .conftest import REPO, random_state_dict, save_legacy

CLASSES = ["blue sky", "grass", "rosé"]  # any names: spaces, accents
COLOURS = [(40, 70, 200), (50, 170, 40), (210, 60, 80)]
RECIPE = ["--model", "resnet18_ssl", "--epochs", "3", "--batch-size", "8", "--img-size", "64", "--workers", "0",
          "--device", "cpu", "--seed", "0"]


def make_images(root, per_class, seed, size=(72, 56)):
    """Photos of a colour, with noise and a random darker square: a ResNet-18 tells them apart in a few epochs."""
    rng = np.random.default_rng(seed)
    for name, colour in zip(CLASSES, COLOURS):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = np.clip(np.array(colour) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255)
            x, y = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
            image[y:y + 20, x:x + 20] *= 0.5
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_images(root / "train", 24, seed=1), make_images(root / "val", 8, seed=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A generated legacy-format "pretrained" ResNet-18, passed with --weights."""
    return save_legacy(random_state_dict("resnet18_ssl"), tmp_path_factory.mktemp("weights"), "pretrained")


def finetune_main(*args):
    return finetune.main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(data, pretrained, tmp_path_factory):
    train, val = data
    out = tmp_path_factory.mktemp("run") / "out"
    assert finetune_main(train, "--output", out, "--val", val, "--weights", pretrained, *RECIPE) == 0
    return out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_finetuning_learns_the_classes_and_writes_everything(trained):
    rows = metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all({"train_loss", "val_top1", "lr", "images_per_second"} <= r.keys() and "val_top5" not in r for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert max(r["val_top1"] for r in rows) >= 90
    assert (trained / "classes.txt").read_text(encoding="utf-8").splitlines() == CLASSES
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = torch.load(trained / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and last["classes"] == CLASSES and last["recipe"]["lr"] == 0.01
    assert not list(trained.glob(".*.tmp"))


def test_best_pth_loads_through_torch_hub_and_an_independent_evaluation_agrees(trained, data):
    model = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(trained / "best.pth"),
                           num_classes=3)
    assert model.pretrained_cfg["head"] == "pretrained"
    cfg = model.pretrained_cfg
    preprocess = Preprocess(round(64 / cfg["crop_pct"]), 64, cfg["mean"], cfg["std"])
    _, val = data
    correct = total = 0
    with torch.no_grad():
        for label, name in enumerate(CLASSES):
            images = sorted((val / name).iterdir())
            predicted = model(torch.stack([preprocess(p) for p in images])).argmax(1)
            correct += int((predicted == label).sum())
            total += len(images)
    assert 100 * correct / total == pytest.approx(max(r["val_top1"] for r in metrics(trained)))


def test_resume_continues_exactly(trained, data, pretrained, tmp_path):
    train, val = data
    out = tmp_path / "out"
    first = [train, "--output", out, "--val", val, "--weights", pretrained, *RECIPE, "--stop-after", "1"]
    assert finetune_main(*first) == 0
    assert [r["epoch"] for r in metrics(out)] == [1]
    assert finetune_main(train, "--output", out, "--resume", out / "last.pth", "--workers", "0", "--device", "cpu") == 0
    once, resumed = (torch.load(d / "last.pth", weights_only=True)["model"] for d in (trained, out))
    assert all(torch.allclose(once[k].float(), resumed[k].float(), rtol=1e-5, atol=1e-6) for k in once)
    assert [r["val_top1"] for r in metrics(out)] == [r["val_top1"] for r in metrics(trained)]


def test_a_held_out_split_is_the_same_for_the_same_seed(data):
    train, _ = data
    _, samples = finetune.class_folders(train, "TRAIN_DIR")
    first, again, other = (finetune.split(samples, 0.25, seed) for seed in (0, 0, 1))
    assert first == again and first != other
    held = first[1]
    assert len(held) == 3 * 6 and not set(held) & set(first[0]) and len(first[0]) + len(held) == len(samples)


def test_last_pth_is_written_atomically(tmp_path):
    path = tmp_path / "last.pth"
    finetune.save_atomically({"epoch": 1}, path)
    with pytest.raises(Exception):  # noqa: B017  (what pickling a lambda raises varies)
        finetune.save_atomically({"epoch": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_two_processes_under_torchrun(data, pretrained, tmp_path):
    train, val = data
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = [a if a != "8" else "4" for a in RECIPE]  # 4 per process: the same 8 images per step
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "-m", "utils.finetune", str(train), "--output", str(out), "--val", str(val),
                             "--weights", str(pretrained), *recipe, "--json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["processes"] == 2 for r in rows)
    assert max(r["val_top1"] for r in rows) >= 90
    assert [json.loads(line)["epoch"] for line in result.stdout.splitlines()] == [1, 2, 3]  # rank 0 prints once


def test_a_failing_process_takes_the_others_down(data, pretrained, tmp_path):
    train, val = data
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "-m", "utils.finetune", str(train), "--output", str(tmp_path / "out"),
                             "--val", str(val), "--weights", str(tmp_path / "missing.pth"), *RECIPE],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "missing.pth" in result.stderr and "no such file" in result.stderr


def bad_layouts(tmp_path, pretrained):
    """(name, arguments, expected message) for each input that must be refused."""
    empty = tmp_path / "empty"
    empty.mkdir()
    single = make_images(tmp_path / "single", 4, seed=0)
    for name in CLASSES[1:]:
        for f in (single / name).iterdir():
            f.unlink()
        (single / name).rmdir()
    hollow = make_images(tmp_path / "hollow", 4, seed=0)
    for f in (hollow / "grass").iterdir():
        f.unlink()
    few = make_images(tmp_path / "few", 2, seed=0)
    broken = make_images(tmp_path / "broken", 6, seed=0)
    (broken / "grass" / "0.png").write_bytes(b"not a png at all")
    (broken / "rosé" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return [
        ("missing", [tmp_path / "nowhere"], "TRAIN_DIR .*nowhere does not exist"),
        ("empty", [empty], "has no class folders: lay the images out as"),
        ("single", [single], "a single class folder \\(blue sky\\): a classifier needs at least two classes"),
        ("hollow", [hollow], "1 class folder\\(s\\) have no images \\(grass\\); add images"),
        ("few", [few, "--val-fraction", "0.5"], "3 training images, fewer than one batch .*lower --batch-size"),
        ("unreadable", [broken], "2 unreadable image\\(s\\), the run stops: .*grass/0.png.*rosé/1.png"),
    ]


def test_bad_input_is_explained(tmp_path, pretrained, capsys):
    for name, args, message in bad_layouts(tmp_path, pretrained):
        status = finetune_main(*args, "--output", tmp_path / f"out-{name}", "--weights", pretrained, *RECIPE)
        err = capsys.readouterr().err
        assert status == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), (name, err)


def test_an_image_that_fails_only_when_decoded_stops_the_run_with_one_line(data, pretrained, tmp_path):
    train = make_images(tmp_path / "train", 8, seed=4)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "whole.jpg", quality=90)
    whole = (tmp_path / "whole.jpg").read_bytes()
    (train / "grass" / "cut.jpg").write_bytes(whole[:len(whole) // 2])  # its header is fine
    # As a user runs it: a fresh process, whose DataLoader workers are forked from it.
    result = subprocess.run([sys.executable, "-m", "utils.finetune", str(train), "--output", str(tmp_path / "out"),
                             "--val", str(data[1]), "--weights", str(pretrained), *RECIPE, "--workers", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "cut.jpg: not a readable image" in errors[0] and "the run stops: remove or replace the image" in errors[0]
    assert "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr


def test_resume_with_other_classes_or_model_is_refused(trained, data, pretrained, tmp_path, capsys):
    train, _ = data
    before = (trained / "last.pth").read_bytes()
    assert finetune_main(train, "--output", trained, "--weights", pretrained, *RECIPE) == 2  # a new run over it
    assert "already holds a run: --resume" in capsys.readouterr().err and (trained / "last.pth").read_bytes() == before
    assert finetune_main(train, "--output", trained / "last.pth", *RECIPE) == 2
    assert "is a file: give a folder" in capsys.readouterr().err
    other = make_images(tmp_path / "other", 6, seed=3)
    (other / "grass").rename(other / "moss")
    status = finetune_main(other, "--output", tmp_path / "o", "--resume", trained / "last.pth", "--device", "cpu")
    assert status == 2 and "was trained on the classes" in capsys.readouterr().err
    status = finetune_main(train, "--output", tmp_path / "o", "--resume", trained / "last.pth",
                           "--model", "resnet50_ssl")
    assert status == 2 and "--model resnet50_ssl differs from the run being resumed (resnet18_ssl)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--workers", "-1"], "--workers: must be 0 or more"),
    (["--val-fraction", "1.5"], "--val-fraction: must be between 0 and 1"),
    (["--lr", "nan"], "--lr: must be a finite number >= 0"),
    (["--img-size", "24"], "--img-size 24 is below the network's minimum of 32 pixels"),
    (["--model", "resnet19_ssl"], "invalid choice: 'resnet19_ssl'"),
])
def test_bad_options_exit_2_with_a_one_line_error(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        finetune_main(tmp_path, "--output", tmp_path / "out", *args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_classify_and_evaluate_use_the_fine_tuned_model_and_its_class_names(trained, data, capsys):
    from utils import classify, evaluate

    _, val = data
    weights, classes = str(trained / "best.pth"), str(trained / "classes.txt")
    common = ["--model", "resnet18_ssl", "--weights", weights, "--workers", "0", "--device", "cpu", "--json"]
    assert classify.main([str(val / "grass"), "--classes", classes, "--topk", "3", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 8 and all(sorted(r["labels"]) == sorted(CLASSES) and "wnids" not in r for r in rows)
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in rows)
    assert evaluate.main([str(val), "--num-classes", "3", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 24 and "top5" not in result or result["top5"] == 100.0
    with pytest.raises(SystemExit):
        classify.main([str(val), "--classes", classes])  # the class names without the weights they belong to
    assert "--classes: give the fine-tuned model's --weights too" in capsys.readouterr().err


def test_a_linear_probe_on_a_held_out_split_leaves_the_backbone_as_it_was(data, pretrained, tmp_path):
    train, _ = data
    out = tmp_path / "out"
    recipe = [a if a != "3" else "1" for a in RECIPE]  # one epoch
    assert finetune_main(train, "--output", out, "--weights", pretrained, "--freeze-backbone",
                         "--val-fraction", "0.25", *recipe) == 0
    before = torch.load(pretrained, weights_only=True)
    after = torch.load(out / "best.pth", weights_only=True)
    backbone = [k for k in after if not k.startswith("fc.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # BatchNorm statistics too
    assert after["fc.weight"].shape == (3, 512)
    assert [r["epoch"] for r in metrics(out)] == [1]


def test_no_pretrained_trains_from_random_weights_offline(data, tmp_path, monkeypatch):
    from .test_reliability import refused_url
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", refused_url())  # the published files cannot be fetched
    train, val = data
    recipe = [*RECIPE]
    recipe[recipe.index("--epochs") + 1] = "1"
    assert finetune_main(train, "--output", tmp_path / "out", "--val", val, "--no-pretrained", *recipe) == 0
    saved = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    assert saved["recipe"]["no_pretrained"] is True and (tmp_path / "out" / "best.pth").is_file()
