"""python -m utils.finetune: learns generated classes, resumes exactly, runs under torchrun, explains bad input."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_model
from models import resnet as models_resnet
from utils import finetune
from utils.images.dataset import ImageFiles
from utils.images.preprocess import Preprocess
from utils.training import augment, loop, plot, resume, run
from utils.training import data as training_data
from utils.training.run_folder import RunFolder, RunFolderError
from utils.weights import CheckpointError

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
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert finetune_main(train, "--output", out, "--val", val, "--weights", pretrained, *RECIPE) == 0
    (out.parent / "stdout.txt").write_text(printed.getvalue())
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


def test_grad_checkpointing_trains_the_same_weights(trained, data, pretrained, tmp_path, monkeypatch):
    """--grad-checkpointing turns it on in the model that trains, and changes what is kept in memory, not
    what is computed: the run ends with the weights of the run without it, bit for bit."""
    train, val = data
    turned_on = []
    real = models_resnet.ResNet.set_grad_checkpointing
    monkeypatch.setattr(models_resnet.ResNet, "set_grad_checkpointing",
                        lambda self, enable=True: turned_on.append(enable) or real(self, enable))
    out = tmp_path / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert finetune_main(train, "--output", out, "--val", val, "--weights", pretrained, *RECIPE,
                             "--grad-checkpointing") == 0
    assert turned_on == [True] and "; gradient checkpointing" in printed.getvalue().splitlines()[0]
    once, checkpointed = (torch.load(d / "last.pth", weights_only=True)["model"] for d in (trained, out))
    assert all(torch.equal(once[k], checkpointed[k]) for k in once)


def test_best_pth_loads_through_torch_hub_with_no_other_argument_and_an_independent_evaluation_agrees(trained, data):
    model = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(trained / "best.pth"))
    cfg = model.pretrained_cfg
    assert cfg["head"] == "pretrained" and model.fc.out_features == 3
    assert cfg["num_classes"] == 3 and cfg["classes"] == CLASSES and cfg["wnids"] is None
    assert cfg["input_size"] == (3, 64, 64) and cfg["finetuning"]["recipe"]["augment"] == "flip"
    # Below 128 px the recipe validates on the whole image: the shorter side resized to 64, the centre 64 square.
    reference = Preprocess(64, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    _, val = data
    correct = total = 0
    with torch.no_grad():
        for label, name in enumerate(CLASSES):
            images = sorted((val / name).iterdir())
            assert all(torch.equal(model.preprocess(p), reference(p)) for p in images)
            predicted = model(torch.stack([reference(p) for p in images])).argmax(1)
            correct += int((predicted == label).sum())
            total += len(images)
    assert 100 * correct / total == pytest.approx(max(r["val_top1"] for r in metrics(trained)))
    assert cfg["metrics"]["finetuning_val"]["val_top1"] == pytest.approx(max(r["val_top1"] for r in metrics(trained)))


def test_validation_measured_the_model_exactly_as_it_is_loaded_afterwards(trained, data):
    """The best epoch's validation loss, a continuous measure, recomputed through torch.hub with the
    transform the file carries: any other transform in validation would show."""
    model = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(trained / "best.pth"))
    _, val = data
    images, labels = zip(*[(model.preprocess(p), label) for label, name in enumerate(CLASSES)
                           for p in sorted((val / name).iterdir())])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(torch.stack(images)), torch.tensor(labels)).item()
    best = model.pretrained_cfg["finetuning"]["result"]["epoch"]
    assert loss == pytest.approx(metrics(trained)[best - 1]["val_loss"], rel=1e-4)


def test_the_saved_files_describe_themselves_in_what_weights_only_loads(trained):
    for name in ("best.pth", "last.pth"):
        saved = torch.load(trained / name, weights_only=True)
        description = saved["pretrained_cfg"]
        assert description["entry"] == "resnet18_ssl" and description["classes"] == CLASSES
        assert description["input_size"] == (3, 64, 64) and description["crop_pct"] == 1.0
        assert description["resize_size"] == 64 and description["finetuning"]["recipe"]["img_size"] == 64


def test_a_contradicting_entry_or_head_size_is_one_error_naming_what_the_file_holds(trained):
    weights = str(trained / "best.pth")
    with pytest.raises(ValueError, match="holds a fine-tuned resnet18_ssl with a 3-class head .* not resnet50_ssl"):
        torch.hub.load(str(REPO), "resnet50_ssl", source="local", weights=weights)
    with pytest.raises(ValueError, match="3-class head .*; num_classes=5 .*contradicts it: leave it out"):
        torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=weights, num_classes=5)
    features = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=weights, num_classes=0)
    assert features(torch.randn(1, 3, 64, 64)).shape == (1, 512) and features.pretrained_cfg["classes"] is None


def test_resume_continues_exactly_with_other_workers(trained, data, pretrained, tmp_path):
    """Two epochs' worth of decoding in 2 worker processes, then the rest in the main one: the same weights,
    metrics and best epoch, bit for bit, as the uninterrupted run with --workers 0."""
    train, val = data
    out = tmp_path / "out"
    first = [train, "--output", out, "--val", val, "--weights", pretrained, *RECIPE, "--workers", "2",
             "--stop-after", "2"]
    # In a process of its own, as a user runs it: its DataLoader workers are forked from that process, not
    # from the test's (forking a process that later loads OpenVINO can crash its next fork).
    # Its torch threads as many as this one's: the order of a sum, and so its last bit, follows them.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-m", "utils.finetune", *map(str, first)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    assert finetune_main(train, "--resume", out / "last.pth", "--workers", "0", "--device", "cpu") == 0
    once, resumed = (torch.load(d / "last.pth", weights_only=True) for d in (trained, out))
    # The best epoch comes before the resumed one, which does not beat it (the data reach 100%): a resumed
    # run that forgot it would take epoch 3 as the best.
    assert once["best_epoch"] <= 2 and metrics(trained)[2]["val_top1"] <= once["best_top1"]
    assert all(torch.equal(once["model"][k], resumed["model"][k]) for k in once["model"])
    assert (once["best_epoch"], once["best_top1"]) == (resumed["best_epoch"], resumed["best_top1"])
    best_once, best_resumed = (torch.load(d / "best.pth", weights_only=True)["model"] for d in (trained, out))
    assert all(torch.equal(best_once[k], best_resumed[k]) for k in best_once)
    fields = ("epoch", "train_loss", "val_loss", "val_top1", "lr")
    assert [[r[f] for f in fields] for r in metrics(out)] == [[r[f] for f in fields] for r in metrics(trained)]


def test_each_samples_augmentation_depends_on_the_seed_the_epoch_and_its_index_alone(data):
    train, _ = data
    _, samples = training_data.class_folders(train, "TRAIN_DIR")
    evaluation = Preprocess(64, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dataset = ImageFiles.labelled(samples, augment.Augment("crop", evaluation, 0.08), seed=3)
    dataset.epoch = 2
    forward = [dataset[i][1] for i in (5, 6, 7)]
    torch.manual_seed(123)  # the global generator, which each DataLoader worker seeds its own way, plays no part
    assert all(torch.equal(x, dataset[i][1]) for x, i in zip(forward, (5, 6, 7)))
    dataset.epoch = 3
    assert not torch.equal(forward[0], dataset[5][1])


def test_a_derived_learning_rate_resumes_without_being_given_again(data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "out"
    recipe = [*RECIPE]
    recipe[recipe.index("--epochs") + 1] = "2"
    assert finetune_main(train, "--output", out, "--val", val, "--no-pretrained", *recipe, "--lr", "0.05",
                         "--stop-after", "1") == 0
    # --epochs 2 as saved is accepted; --epochs 10, the default value but given, is refused like any other.
    assert finetune_main(train, "--resume", out / "last.pth", "--epochs", "10") == 2
    assert "--epochs 10 differs from the run being resumed (2)" in capsys.readouterr().err
    assert finetune_main(train, "--resume", out / "last.pth", "--epochs", "2") == 0
    assert torch.load(out / "last.pth", weights_only=True)["recipe"]["backbone_lr"] == 0.05


def test_a_held_out_split_is_the_same_for_the_same_seed(data):
    train, _ = data
    _, samples = training_data.class_folders(train, "TRAIN_DIR")
    first, again, other = (training_data.split(samples, 0.25, seed) for seed in (0, 0, 1))
    assert first == again and first != other
    held = first[1]
    assert len(held) == 3 * 6 and not set(held) & set(first[0]) and len(first[0]) + len(held) == len(samples)


def test_files_are_written_atomically_under_names_of_their_own(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.save({"epoch": 1}, "last.pth")
    with pytest.raises(Exception):  # noqa: B017  (what pickling a lambda raises varies)
        folder.save({"epoch": 2, "bad": lambda: None}, "last.pth")
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True) == {"epoch": 1}
    (tmp_path / "run" / "best.pth").mkdir()  # something in the way: the write succeeds, the rename fails
    (tmp_path / "run" / "best.pth" / "x").touch()
    with pytest.raises(RunFolderError, match=r"could not save .*best.pth \(.*; [\d,]+ MiB free in .*\); the previous"):
        folder.save({"epoch": 2}, "best.pth")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "best.pth", "last.pth"]
    folder.close()


def test_two_processes_under_torchrun(data, pretrained, tmp_path, capsys):
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
    # On one process the steps would see other batches: resuming there is refused, saying why.
    assert finetune_main(train, "--resume", out / "last.pth", "--device", "cpu") == 2
    assert "the run was trained on 2 process(es), and this is 1: resume it on as many" in capsys.readouterr().err


def test_a_failing_process_takes_the_others_down(data, tmp_path):
    """A JPEG cut short passes the check before training (its header is whole) and fails in whichever
    process's share it falls: that one says so, once, and the other stops at the same step, silently, instead
    of failing inside a collective with Gloo's traceback."""
    train, val = data
    damaged = tmp_path / "train"
    shutil.copytree(train, damaged)
    jpeg = damaged / CLASSES[0] / "cut.jpg"
    Image.open(next((train / CLASSES[0]).iterdir())).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "utils.finetune", str(damaged), "--output", str(tmp_path / "out"),
                             "--val", str(val), "--no-pretrained", *RECIPE],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0  # torchrun's own status
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {jpeg}: not a readable image"), result.stderr[-3000:]
    assert "Connection closed by peer" not in result.stderr and "[rank" not in result.stderr, result.stderr[-3000:]


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
    err = capsys.readouterr().err
    assert re.search(r"already holds a run \(last.pth, .*\): --resume .*last.pth continues it", err), err
    assert (trained / "last.pth").read_bytes() == before
    assert finetune_main(train, "--output", trained / "last.pth", *RECIPE) == 2
    assert "is a file: give a folder" in capsys.readouterr().err
    other = make_images(tmp_path / "other", 6, seed=3)
    (other / "grass").rename(other / "moss")
    status = finetune_main(other, "--resume", trained / "last.pth", "--device", "cpu")
    assert status == 2 and "was trained on the classes" in capsys.readouterr().err
    status = finetune_main(train, "--resume", trained / "last.pth", "--model", "resnet50_ssl")
    assert status == 2 and "--model resnet50_ssl differs from the run being resumed (resnet18_ssl)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--workers", "-1"], "--workers: must be 0 or more"),
    (["--val-fraction", "1.5"], "--val-fraction: must be between 0 and 1"),
    (["--lr", "nan"], "--lr: must be a finite number >= 0"),
    (["--img-size", "24"], "--img-size 24 is below the network's minimum of 32 pixels"),
    (["--model", "resnet19_ssl"], "invalid choice: 'resnet19_ssl'"),
    (["--label-smoothing", "2"], "--label-smoothing: must be at least 0 and below 1, got 2.0"),
    (["--seed", "99999999999999999999"], "--seed: must be at most 4294967295"),
    (["--seed", "-1"], "--seed: must be 0 or more"),
    (["--crop-scale", "0"], "--crop-scale: must be above 0 and at most 1"),
    (["--eval-crop-pct", "1.5"], "--eval-crop-pct: must be above 0 and at most 1"),
    (["--augment", "flip", "--crop-scale", "0.5"], "--crop-scale applies to --augment crop, not --augment flip"),
    (["--augment", "mixup"], "invalid choice: 'mixup'"),
    (["--patience", "0"], "--patience: must be at least 1"),
])
def test_bad_options_exit_2_with_a_one_line_error(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        finetune_main(tmp_path, "--output", tmp_path / "out", *args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_classify_and_evaluate_need_only_the_weights_and_evaluate_gives_the_reported_top1(trained, data, capsys):
    from utils import classify, evaluate

    _, val = data
    common = ["--weights", str(trained / "best.pth"), "--workers", "0", "--device", "cpu", "--json"]
    assert classify.main([str(val / "grass"), "--topk", "3", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 8 and all(sorted(r["labels"]) == sorted(CLASSES) and "wnids" not in r for r in rows)
    assert all(r["model"] == "resnet18_ssl" and abs(sum(r["probabilities"]) - 1) < 1e-4 for r in rows)
    assert sum(r["labels"][0] == "grass" for r in rows) >= 6
    assert evaluate.main([str(val), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 24 and result["model"] == "resnet18_ssl" and "top5" not in result
    assert result["top1"] == pytest.approx(max(r["val_top1"] for r in metrics(trained)))


@pytest.mark.parametrize("command, args, message", [
    ("classify", ["--model", "resnet50_ssl"], "holds a fine-tuned resnet18_ssl .*not resnet50_ssl: load it with the "
                                              "entry resnet18_ssl \\(--model resnet18_ssl\\)"),
    ("evaluate", ["--num-classes", "5"], "--num-classes 5 contradicts --weights .*3-class head"),
    ("classify", ["--img-size", "96"], "--img-size 96 contradicts --weights .* at 64 px: leave --img-size out"),
    ("classify", ["--classes", "CLASSES"], "--classes .* contradicts --weights"),
    ("export", ["--num-classes", "2"], "3-class head .*; --num-classes 2 contradicts it: leave it out"),
])
def test_options_that_contradict_a_fine_tuned_file_are_one_line_errors(command, args, message, trained, data, tmp_path,
                                                                        capsys):
    from utils import classify, evaluate, export

    (tmp_path / "CLASSES").write_text("a\nb\nc\n")
    args = [str(tmp_path / a) if a == "CLASSES" else a for a in args]
    _, val = data
    main, first = {"classify": (classify.main, [str(val / "grass")]), "evaluate": (evaluate.main, [str(val)]),
                   "export": (export.main, [str(tmp_path / "m.onnx")])}[command]
    device = ["--device", "cpu"] if command != "export" else []
    assert main([*first, "--weights", str(trained / "best.pth"), *args, *device]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_a_plain_state_dict_still_loads_with_its_size_given_and_a_new_head_has_no_imagenet_names(trained, tmp_path):
    from utils.cli import load_model

    bare = tmp_path / "bare.pth"
    torch.save(torch.load(trained / "best.pth", weights_only=True)["model"], bare)
    model = load_model("resnet18_ssl", str(bare), torch.device("cpu"), num_classes=3, img_size=64)
    cfg = model.pretrained_cfg
    assert cfg["head"] == "pretrained" and cfg["num_classes"] == 3 and cfg["classes"] is None and cfg["wnids"] is None
    assert cfg["input_size"] == (3, 64, 64) and model.preprocess.crop_size == 64 and model.preprocess.resize_size == 73
    new = create_model("resnet18_ssl", weights=str(bare), num_classes=7)
    assert new.pretrained_cfg["head"] == "new" and new.pretrained_cfg["classes"] is None
    with pytest.raises(CheckpointError, match="it holds a ResNet-18; load it with resnet18_ssl or resnet18_swsl"):
        create_model("resnet50_swsl", weights=str(bare), num_classes=3)


def test_a_damaged_description_is_named(trained, tmp_path):
    state = torch.load(trained / "best.pth", weights_only=True)
    for damage, message in [({"entry": "resnet19"}, "entry 'resnet19': not one of the twelve entries"),
                            ({"classes": ["a"]}, "classes is not a list of 3 names"),
                            ({"input_size": (3, 64, 32)}, "input_size")]:
        torch.save({**state, "pretrained_cfg": {**state["pretrained_cfg"], **damage}}, tmp_path / "x.pth")
        with pytest.raises(ValueError, match=f"its pretrained_cfg is damaged \\({re.escape(message)}"):
            create_model("resnet18_ssl", weights=str(tmp_path / "x.pth"))


def test_a_linear_probe_on_a_held_out_split_leaves_the_backbone_as_it_was(data, pretrained, tmp_path):
    train, _ = data
    out = tmp_path / "out"
    recipe = [a if a != "3" else "1" for a in RECIPE]  # one epoch
    assert finetune_main(train, "--output", out, "--weights", pretrained, "--freeze-backbone",
                         "--val-fraction", "0.25", *recipe) == 0
    before = torch.load(pretrained, weights_only=True)
    after = torch.load(out / "best.pth", weights_only=True)["model"]
    backbone = [k for k in after if not k.startswith("fc.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # BatchNorm statistics too
    assert after["fc.weight"].shape == (3, 512)
    assert [r["epoch"] for r in metrics(out)] == [1]


def test_no_pretrained_trains_from_random_weights_offline(data, tmp_path, monkeypatch, capsys):
    from .test_reliability import refused_url
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", refused_url())  # the published files cannot be fetched
    train, val = data
    recipe = [*RECIPE]
    recipe[recipe.index("--epochs") + 1] = "1"
    assert finetune_main(train, "--output", tmp_path / "out", "--val", val, "--no-pretrained", *recipe) == 0
    saved = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    assert saved["recipe"]["no_pretrained"] is True and (tmp_path / "out" / "best.pth").is_file()
    # A random backbone learns at the head's rate, and the run says where it starts.
    assert saved["recipe"]["backbone_lr"] == saved["recipe"]["lr"] == 0.01
    assert "resnet18_ssl from random weights (--no-pretrained)" in capsys.readouterr().out


def test_the_recipe_fits_the_start_and_the_image_size_and_is_recorded(trained):
    def resolved(*argv):
        _, args = finetune.parse_args(["x", "--output", "y", *argv])
        resume.complete_recipe(args)
        return args.backbone_lr, args.augment, args.crop_scale, args.eval_crop_pct

    assert resolved() == (0.001, "crop", 0.08, 0.875)  # pretrained, 224 px: timm's crops, the published crop
    assert resolved("--no-pretrained", "--img-size", "32") == (0.01, "flip", None, 1.0)
    assert resolved("--img-size", "127") == (0.001, "flip", None, 1.0)
    assert resolved("--img-size", "128", "--lr", "0.1") == (0.01, "crop", 0.08, 0.875)
    assert resolved("--augment", "crop", "--crop-scale", "0.5", "--img-size", "32") == (0.001, "crop", 0.5, 0.875)
    assert resolved("--augment", "none", "--eval-crop-pct", "0.9", "--backbone-lr", "0.2") == (0.2, "none", None, 0.9)
    recipe = torch.load(trained / "last.pth", weights_only=True)["recipe"]
    assert {k: recipe[k] for k in ("backbone_lr", "augment", "crop_scale", "eval_crop_pct", "patience")} == {
        "backbone_lr": 0.001, "augment": "flip", "crop_scale": None, "eval_crop_pct": 1.0, "patience": None}


def test_each_augmentation_is_what_it_says(data):
    train, _ = data
    path = sorted((train / "grass").iterdir())[0]
    evaluation = Preprocess(64, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.manual_seed(0)
    assert torch.equal(augment.Augment("none", evaluation, 1.0)(path), evaluation(path))
    flips = [augment.Augment("flip", evaluation, 1.0)(path) for _ in range(20)]
    assert all(torch.equal(x, evaluation(path)) or torch.equal(x, evaluation(path).flip(-1)) for x in flips)
    assert 0 < sum(torch.equal(x, evaluation(path)) for x in flips) < 20
    crop = augment.Augment("crop", evaluation, 0.08)
    boxes = [crop.box(72, 56) for _ in range(200)]
    areas = [(r - left) * (b - t) / (72 * 56) for left, t, r, b in boxes]
    assert min(areas) >= 0.07 and max(areas) <= 1 and min(areas) < 0.3
    assert min((r - left) * (b - t) / (72 * 56) for left, t, r, b in
               (augment.Augment("crop", evaluation, 0.5).box(72, 56) for _ in range(200))) >= 0.49
    assert crop(path).shape == (3, 64, 64)


def test_small_images_are_decoded_in_the_main_process_by_default(trained):
    assert training_data.auto_workers([72 * 56] * 10) == 0 and training_data.auto_workers([128 * 128] * 3) == 0
    assert training_data.auto_workers([500 * 375] * 3) == min(8, os.cpu_count() or 1)
    assert "; 0 worker(s)" in (trained.parent / "stdout.txt").read_text()  # the 72x56 photos, --workers not given


def test_each_epoch_says_its_time_the_elapsed_time_and_the_eta(trained):
    printed = (trained.parent / "stdout.txt").read_text()
    times = r"\d+ (s|min \d\d s) \(elapsed \d+ (s|min \d\d s), ETA \d+ (s|min \d\d s)\)$"
    lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3 and all(re.search(times, line) for line in lines), lines
    assert lines[-1].endswith("ETA 0 s)") and "val loss" in lines[0]
    rows = metrics(trained)
    assert all(r["epoch_seconds"] > 0 and r["val_loss"] > 0 for r in rows)
    assert [r["elapsed_seconds"] for r in rows] == sorted(r["elapsed_seconds"] for r in rows)
    assert run.duration(42.4) == "42 s" and run.duration(185) == "3 min 05 s"
    assert run.duration(7620) == "2 h 07 min"


def test_patience_stops_a_run_that_no_longer_improves(data, pretrained, tmp_path, capsys):
    train, val = data
    # A probe whose head does not move (lr 0) never improves after epoch 1: --patience 1 stops after epoch 2.
    recipe = [*RECIPE]
    recipe[recipe.index("--epochs") + 1] = "5"
    assert finetune_main(train, "--output", tmp_path / "out", "--val", val, "--weights", pretrained, *recipe,
                         "--freeze-backbone", "--lr", "0", "--patience", "1") == 0
    assert [r["epoch"] for r in metrics(tmp_path / "out")] == [1, 2]
    assert "no better validation top-1 for 1 epochs (--patience): stopping early" in capsys.readouterr().out


def test_the_curves_show_what_a_reader_needs(trained):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator

    rows = metrics(trained)
    fig = plot.figure(rows, "resnet18_ssl on train (3 classes, 64 px)")
    loss, top1, lr = fig.axes
    assert fig._suptitle.get_text() == "resnet18_ssl on train (3 classes, 64 px)"
    assert [line.get_label() for line in loss.get_lines()] == ["training (label-smoothed)", "validation"]
    assert list(loss.get_lines()[1].get_ydata()) == [r["val_loss"] for r in rows]
    assert top1.get_ylim() == (0, 100)
    best = max(rows, key=lambda r: r["val_top1"])["epoch"]
    assert any(list(line.get_xdata()) == [best, best] and "best" in line.get_label() for line in top1.get_lines())
    assert [line.get_label() for line in lr.get_lines()] == ["head", "backbone"]
    assert all(axis.get_legend() is not None for axis in fig.axes)
    assert isinstance(lr.xaxis.get_major_locator(), MaxNLocator) and lr.xaxis.get_major_locator()._integer
    assert loss.yaxis.get_major_formatter().get_useOffset() is False
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_run_says_at_once_that_there_will_be_no_curves(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    seen = []
    for module in (training_data, loop):  # scanning and checking the images; training and validation
        monkeypatch.setattr(module, "tqdm", lambda *a, **k: seen.append(k) or __import__("tqdm").tqdm(*a, **k))
    train, val = data
    recipe = [*RECIPE]
    recipe[recipe.index("--epochs") + 1] = "1"
    assert finetune_main(train, "--output", tmp_path / "out", "--val", val, "--no-pretrained", *recipe) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1] == ("note: curves.png will not be drawn: matplotlib is not installed "
                                   "(pip install matplotlib)")
    assert not (tmp_path / "out" / "curves.png").exists()
    # Scanning and checking show a bar once they take a second; training and validation on the first process.
    train_dir = str(train)
    assert [k["desc"] for k in seen] == [f"scanning {train_dir}", f"scanning {val}", "checking the images",
                                         "epoch 1/1", "validation"]
    assert [k.get("delay") for k in seen[:3]] == [1, 1, 1] and all(k["disable"] is None for k in seen[3:])


def test_the_help_does_not_call_training_from_random_weights_meaningless(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "meaningless" not in text and "train from random weights instead of the published ones" in text


# ---- one run per folder; errors before the work --------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_is_refused_at_once(data, tmp_path, capsys):
    train, val = data
    busy = RunFolder(tmp_path / "out")  # what a live run holds
    try:
        assert finetune_main(train, "--output", tmp_path / "out", "--val", val, "--no-pretrained", *RECIPE) == 2
    finally:
        busy.close()
    assert "another run is writing there now: wait for it to end" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock"]


def test_a_folder_holding_any_run_file_is_never_reused_and_resume_stays_in_its_own_folder(trained, data, tmp_path,
                                                                                           capsys):
    train, val = data
    kept = tmp_path / "kept"  # last.pth deleted to save space: best.pth and metrics.jsonl remain
    kept.mkdir()
    for name in ("best.pth", "metrics.jsonl"):
        (kept / name).write_bytes((trained / name).read_bytes())
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    assert finetune_main(train, "--output", kept, "--val", val, "--no-pretrained", *RECIPE) == 2
    assert "already holds a run (best.pth, metrics.jsonl): choose another --output" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    other = tmp_path / "other"
    assert finetune_main(train, "--output", other, "--resume", trained / "last.pth") == 2
    assert f"continues in its own folder, {trained}; leave --output out" in capsys.readouterr().err
    assert not other.exists()


@pytest.mark.parametrize("where", ["train", "val"])
def test_an_output_inside_the_data_is_refused(where, data, tmp_path, capsys):
    train, val = data
    inside = {"train": train / "grass" / "run", "val": val / "run"}[where]
    assert finetune_main(train, "--output", inside, "--val", val, "--no-pretrained", *RECIPE) == 2
    assert "is inside the images" in capsys.readouterr().err and not inside.exists()


def first_of_two_epochs(data, tmp_path):
    """The folder of a two-epoch run stopped after its first (--stop-after 1), to resume."""
    train, val = data
    out = tmp_path / "out"
    recipe = [*RECIPE]
    recipe[recipe.index("--epochs") + 1] = "2"
    assert finetune_main(train, "--output", out, "--val", val, "--no-pretrained", *recipe, "--stop-after", "1") == 0
    return out


def test_a_damaged_metrics_line_is_named_and_the_run_recovers_from_last_pth(data, tmp_path, capsys):
    train, _ = data
    out = first_of_two_epochs(data, tmp_path)
    (out / "metrics.jsonl").write_text('{"epo')  # epoch 1's line lost, and a line cut short
    (out / ".last.pth.0123456789ab.tmp").write_bytes(b"x" * 1000)  # what a save killed by SIGKILL leaves
    mine = [".draft.tmp", ".last.pth.notes.tmp", ".curves.png.0123456789ab.tmp.bak"]  # the user's, not the run's
    for name in mine:
        (out / name).write_text("the user's")
    capsys.readouterr()
    assert finetune_main(train, "--resume", out / "last.pth") == 0
    assert f"warning: {out / 'metrics.jsonl'}, line 1, is damaged" in capsys.readouterr().err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"epo' and [json.loads(line)["epoch"] for line in lines[1:]] == [1, 2]
    assert sorted(p.name for p in out.glob(".*tmp*")) == sorted(mine)  # the run's leftover alone is gone
    assert all((out / name).read_text() == "the user's" for name in mine)


def test_errors_before_the_work_are_one_line(data, tmp_path, capsys, monkeypatch):
    train, val = data
    (tmp_path / "a file").write_text("x")
    assert finetune_main(train, "--output", tmp_path / "a file" / "out", "--val", val, "--no-pretrained", *RECIPE) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot write there (Not a directory): choose a folder you can write" in err
    # Too little room for the checkpoints: refused before the model is built, not after an epoch.
    from utils.training import run_folder
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 * 2**20})())
    monkeypatch.setattr(run, "build_model", lambda *a: pytest.fail("the model was built"))
    assert finetune_main(train, "--output", tmp_path / "out", "--val", val, "--no-pretrained", *RECIPE) == 2
    assert re.search(r"10 MiB free, and the run's checkpoints need about 2\d\d MiB", capsys.readouterr().err)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert finetune_main(train, "--resume", tmp_path / "notes.txt") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "it holds text of 17 bytes: give the last.pth of a run" in err


def test_a_full_disk_during_a_save_is_one_line_naming_the_folder_and_the_free_space(tmp_path):
    # A file-size limit makes the write fail as a full disk does, partway through.
    code = f"""
import resource, signal, sys, torch
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from utils.training.run_folder import RunFolder
folder = RunFolder(Path({str(tmp_path / 'out')!r}))
folder.save({{"w": torch.zeros(10)}}, "last.pth")
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
folder.save({{"w": torch.zeros(1_000_000)}}, "last.pth")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert re.search(r"RunFolderError: could not save .*out/last.pth \(.*; [\d,]+ MiB free in .*out\); the previous "
                     r"last.pth, if any, is as it was$", message), done.stderr
    assert torch.load(tmp_path / "out" / "last.pth", weights_only=True)["w"].shape == (10,)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "last.pth"]


def test_ctrl_c_prints_the_command_that_resumes_and_exits_130(data, tmp_path):
    import signal
    import time

    train, val = data
    out = tmp_path / "out"
    recipe = [*RECIPE]
    recipe[recipe.index("--epochs") + 1] = "50"
    process = subprocess.Popen([sys.executable, "-m", "utils.finetune", str(train), "--output", str(out), "--val",
                                str(val), "--no-pretrained", *recipe], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # the first epoch is saved: then interrupt
            if line.startswith("epoch 1/50"):
                break
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"interrupted: python -m utils.finetune {train} --resume "
                                            f"{out / 'last.pth'} continues")


def test_splitting_reads_the_samples_once_however_many_classes():
    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    samples = Counted((f"/d/{c}/{i}.png", c) for c in range(300) for i in range(4))
    train, val = training_data.split(samples, 0.25, seed=0)
    assert Counted.passes == 1 and len(val) == 300 and len(train) == 900


def test_a_run_that_stopped_in_its_first_epoch_leaves_the_folder_to_the_same_command(data, tmp_path, capsys,
                                                                                  monkeypatch):
    train, val = data
    out = tmp_path / "out"
    command = [train, "--output", out, "--val", val, "--no-pretrained", *RECIPE]
    real = run.train_epoch

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train_epoch", interrupted)  # Ctrl-C during epoch 1
    assert finetune_main(*command) == 130
    assert "no epoch had finished: start again" in capsys.readouterr().err and (out / "classes.txt").exists()
    monkeypatch.setattr(run, "train_epoch", real)
    assert finetune_main(*command) == 0  # the same command: classes.txt alone is no run
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]


def test_batch_size_1_is_refused_before_the_work_naming_the_option(data, tmp_path, capsys, monkeypatch):
    train, val = data
    recipe = [*RECIPE]
    recipe[recipe.index("--batch-size") + 1] = "1"
    monkeypatch.setattr(run, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as exit_:
        finetune_main(train, "--output", tmp_path / "out", "--val", val, "--no-pretrained", *recipe)
    assert exit_.value.code == 2 and "--batch-size 1: training needs at least 2 images a batch" in \
        capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a\nb", " grass", "grass ", "tab\there"])
def test_class_folders_whose_names_would_break_the_outputs_are_refused(data, tmp_path, capsys, name):
    train, val = data
    odd = tmp_path / "train"
    shutil.copytree(train, odd)
    (odd / CLASSES[0]).rename(odd / name)
    assert finetune_main(odd, "--output", tmp_path / "out", "--no-pretrained", *RECIPE) == 2
    err = capsys.readouterr().err
    assert f"the class folder {name!r} has control characters or surrounding spaces" in err, err


def test_resuming_after_best_pth_was_removed_says_no_file_holds_the_best_epoch(data, tmp_path, capsys):
    train, _ = data
    out = first_of_two_epochs(data, tmp_path)
    (out / "best.pth").unlink()
    state = torch.load(out / "last.pth", weights_only=True)
    torch.save({**state, "best_top1": 101.0}, out / "last.pth")  # so that epoch 2 cannot beat epoch 1
    capsys.readouterr()
    assert finetune_main(train, "--resume", out / "last.pth") == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.endswith(f"(epoch 1): no file holds it, as {out / 'best.pth'} is gone; {out / 'last.pth'} "
                              "holds epoch 2"), last_line
    assert not (out / "best.pth").exists()
