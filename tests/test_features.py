"""python -m utils.embed and python -m utils.probe: rows equal to the eager model's, a folder that survives
kills and many processes, refusals that name the fault, and probes checked against scikit-learn."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_model
from utils.cli import set_input_size
from utils.embed import main as embed_main
from utils.features import embedding, knn, linear
from utils.features import folder as features_folder
from utils.probe import main as probe_main

from .conftest import REPO, random_state_dict, save_legacy

CLASSES = ("cat", "dog", "fox")
COMMON = ("--model", "resnet18_ssl", "--img-size", "64", "--workers", "0", "--device", "cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """train/ and val/ in the ImageFolder layout: noise tinted by class, of varied sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 5)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.normal(70 + 60 * c, 60, (40 + 3 * i, 50, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_legacy(random_state_dict("resnet18_ssl"), tmp_path_factory.mktemp("weights"), "r18")


def embed(source, output, weights, *extra) -> int:
    return embed_main([str(source), "--output", str(output), "--weights", str(weights), *COMMON, *map(str, extra)])


def rows(output) -> tuple[np.ndarray, list[list[str]], dict]:
    with open(output / "index.csv", newline="") as f:
        index = list(csv.reader(f))
    meta = json.loads((output / "meta.json").read_text())
    return np.load(output / "features.npy", mmap_mode="r"), index, meta


def eager_rows(weights, files) -> np.ndarray:
    model = create_model("resnet18_ssl", weights=weights, num_classes=0)
    set_input_size(model, 64)
    with torch.inference_mode():
        return np.stack([model(model.preprocess(f)[None])[0].numpy() for f in files])


def relative_error(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_embed_writes_the_eager_models_rows_with_their_paths_labels_and_what_made_them(images, weights, tmp_path):
    out = tmp_path / "feats"
    assert embed(images / "train", out, weights) == 0
    features, index, meta = rows(out)
    expected = sorted(f"{c}/{i}.png" for c in CLASSES for i in range(10))
    assert index[0] == ["path", "label"] and [r[0] for r in index[1:]] == expected
    assert [r[1] for r in index[1:]] == [p.split("/")[0] for p in expected]
    assert features.dtype == np.float32 and features.shape == (30, 512)
    assert relative_error(features, eager_rows(weights, [images / "train" / p for p in expected])) < 1e-4
    assert meta["entry"] == "resnet18_ssl" and meta["complete"] and meta["rows"] == 30
    assert meta["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["weights_source"] == os.path.abspath(weights)
    assert meta["transform"]["input_size"] == [3, 64, 64] and meta["transform"]["crop_pct"] == 0.875
    assert (meta["feature_size"], meta["backend"], meta["dtype"], meta["file_dtype"]) == (512, "auto", "float32",
                                                                                           "float32")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "features.npy", "index.csv", "meta.json"]


@pytest.mark.parametrize("pays_after", [0.0, float("inf")])
def test_auto_races_the_runtimes_only_where_the_work_left_repays_it(images, weights, tmp_path, monkeypatch,
                                                                    pays_after):
    monkeypatch.setattr(embedding, "AUTO_PAYS_AFTER", pays_after)
    out = tmp_path / "feats"
    assert embed(images / "val", out, weights, "--batch-size", "4") == 0  # 15 images: 4 batches, the last of 3
    features, index, meta = rows(out)
    assert relative_error(features, eager_rows(weights, [images / "val" / p for p, _ in index[1:]])) < 1e-4
    choices = meta["runtime"]["backend_choices"]
    if pays_after:
        assert choices == {"all": "torch"}
    else:  # one race, from the third batch on; the last, short batch was padded to its shape, not raced again
        assert list(choices) == ["4x64x64"] and choices["4x64x64"] in ("torch", "onnxruntime", "openvino")


def test_files_and_globs_keep_their_path_and_a_folder_with_loose_images_has_no_labels(images, weights, tmp_path):
    loose = tmp_path / "loose"
    shutil.copytree(images / "val" / "cat", loose)
    shutil.copy(images / "val" / "dog" / "0.png", loose / "sub.png")
    (loose / "deeper").mkdir()
    shutil.copy(images / "val" / "fox" / "0.png", loose / "deeper" / "x.png")
    single = images / "val" / "dog" / "1.png"
    assert embed(loose, tmp_path / "a", weights) == 0
    assert embed_main([str(single), f"{images}/val/fox/[01].png", "--output", str(tmp_path / "b"), "--weights",
                       str(weights), *COMMON]) == 0
    _, index, _ = rows(tmp_path / "a")
    assert all(label == "" for _, label in index[1:]) and ["deeper/x.png", ""] in index
    _, index, _ = rows(tmp_path / "b")
    assert index[1:] == [[str(single), ""], [f"{images}/val/fox/0.png", ""], [f"{images}/val/fox/1.png", ""]]


def test_float16_halves_the_file(images, weights, tmp_path):
    assert embed(images / "val", tmp_path / "32", weights) == 0
    assert embed(images / "val", tmp_path / "16", weights, "--float16") == 0
    full, _, _ = rows(tmp_path / "32")
    half, _, meta = rows(tmp_path / "16")
    assert half.dtype == np.float16 and meta["file_dtype"] == "float16"
    assert relative_error(half, full) < 1e-3
    sizes = [(tmp_path / d / "features.npy").stat().st_size for d in ("16", "32")]
    assert sizes[0] - 128 == (sizes[1] - 128) // 2


@pytest.fixture(scope="module")
def feats(images, weights, tmp_path_factory):
    """train/ and val/ embedded once, on the torch backend."""
    root = tmp_path_factory.mktemp("feats")
    for split in ("train", "val"):
        assert embed(images / split, root / split, weights, "--backend", "torch") == 0
    return root


# A run killed (SIGKILL) at three moments: just after a part is written, halfway through writing one,
# and after features.npy is written but before meta.json says complete.
KILL = {
    "after_a_part": ("write_part", "original(self, *a)\n    calls.append(1)\n    if len(calls) == 2: die()"),
    "inside_a_part": ("write_part", "calls.append(1)\n    if len(calls) == 2:\n        np.savez = lambda f, **k: "
                      "(f.write(b'PK\\x03\\x04half'), f.flush(), die())\n    original(self, *a)"),
    "while_assembling": ("_write_csv", "die()"),
}
KILLER = """
import os, signal, sys
import numpy as np
from utils.features.folder import FeatureFolder
from utils.embed import main
calls = []
def die():
    os.kill(os.getpid(), signal.SIGKILL)
original = FeatureFolder.{name}
def patched(self, *a):
    {body}
FeatureFolder.{name} = patched
main(sys.argv[1:])
"""


@pytest.mark.parametrize("moment", KILL)
def test_a_run_killed_at_any_moment_is_never_taken_as_done_and_continues_with_only_what_is_missing(
        images, weights, feats, tmp_path, capsys, moment):
    whole, out = feats / "train", tmp_path / "out"  # the uninterrupted run
    args = [str(images / "train"), "--weights", str(weights), *COMMON, "--backend", "torch", "--batch-size", "4"]
    name, body = KILL[moment]
    killed = subprocess.run([sys.executable, "-c", KILLER.format(name=name, body=body), *args, "--output", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    with pytest.raises(features_folder.FeaturesError, match="not a complete features folder"):
        features_folder.read(out, "FEATS")
    chunk = features_folder.chunk_size(30)
    done = len(list((out / "parts").glob("*.npz")))  # whole parts only: a half-written one is a .tmp
    assert done == {"after_a_part": 2, "inside_a_part": 1, "while_assembling": 30 // chunk}[moment]
    written = []
    original = features_folder.FeatureFolder.write_part
    features_folder.FeatureFolder.write_part = lambda self, start, *a: (written.append(start),
                                                                        original(self, start, *a))[1]
    try:
        assert embed_main([*args, "--output", str(out)]) == 0
    finally:
        features_folder.FeatureFolder.write_part = original
    assert len(written) == 30 // chunk - done  # only the missing chunks were embedded again
    (a, index_a, _), (b, index_b, meta_b) = rows(whole), rows(out)
    assert index_a == index_b and relative_error(b, np.asarray(a)) < 1e-5
    assert meta_b["complete"] and not (out / "parts").exists() and not list(out.glob(".*.tmp"))
    # Once complete, a run into the folder embeds nothing and says so.
    features_folder.FeatureFolder.write_part = lambda *a: pytest.fail("a complete folder was embedded again")
    try:
        assert embed_main([*args, "--output", str(out), "--json"]) == 0
    finally:
        features_folder.FeatureFolder.write_part = original
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_complete"] is True


def test_a_damaged_part_is_embedded_again_not_taken_as_done(images, weights, feats, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [str(images / "train"), "--output", str(out), "--weights", str(weights), *COMMON, "--backend", "torch"]

    def stop(*_):
        raise KeyboardInterrupt  # the run stops once every part is written, before the folder is assembled

    with monkeypatch.context() as patch:
        patch.setattr(features_folder.FeatureFolder, "assemble", stop)
        with pytest.raises(KeyboardInterrupt):
            embed_main(args)
    parts = sorted((out / "parts").glob("*.npz"))
    parts[1].write_bytes(parts[1].read_bytes()[:200])  # as a failing disk would leave it, under its final name
    written = []
    original = features_folder.FeatureFolder.write_part
    monkeypatch.setattr(features_folder.FeatureFolder, "write_part",
                        lambda self, start, *a: (written.append(start), original(self, start, *a))[1])
    assert embed_main(args) == 0
    assert written == [int(parts[1].stem)]
    (a, index_a, _), (b, index_b, _) = rows(feats / "train"), rows(out)
    assert index_a == index_b and relative_error(b, np.asarray(a)) < 1e-5


@pytest.mark.parametrize("change", ["--img-size", "--weights", "--float16", "--backend", "images", "--model"])
def test_a_run_into_a_folder_made_another_way_is_refused_and_the_folder_left_as_it_was(
        images, weights, feats, tmp_path, capsys, change):
    out = tmp_path / "feats"
    shutil.copytree(feats / "val", out)  # made with --backend torch
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = save_legacy(random_state_dict("resnet18_ssl", seed=1), tmp_path, "other")
    extra = {"--img-size": ["--img-size", "96"], "--weights": ["--weights", other], "--float16": ["--float16"],
             "--backend": ["--backend", "auto"], "images": [], "--model": ["--model", "resnet18_swsl"]}[change]
    source = images / "train" if change == "images" else images / "val"
    capsys.readouterr()
    args = [str(source), "--output", str(out), "--weights", str(weights), *COMMON, "--backend", "torch"]
    assert embed_main([*args, *map(str, extra)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    named = {"--img-size": "--img-size", "--weights": "--weights", "--float16": "--float16", "--backend": "--backend",
             "images": "the images", "--model": "--model"}[change]
    assert error.startswith(f"error: --output {out} holds features made with other") and named in error, error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_output_folder_holding_other_files_is_refused_and_kept(images, weights, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert embed(images / "val", out, weights) == 2
    assert "holds other files and no meta.json" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_unreadable_images_are_listed_given_no_row_and_the_run_exits_1(images, weights, tmp_path, capsys):
    source = tmp_path / "val"
    shutil.copytree(images / "val", source)
    (source / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert embed(source, tmp_path / "feats", weights) == 1
    assert "1 image(s) could not be read and have no row (dog/broken.png)" in capsys.readouterr().err
    features, index, meta = rows(tmp_path / "feats")
    assert "dog/broken.png" not in [r[0] for r in index] and len(features) == len(index) - 1 == 15
    with open(tmp_path / "feats" / "unreadable.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["path", "dog/broken.png"]
    assert relative_error(features, eager_rows(weights, [source / r[0] for r in index[1:]])) < 1e-4
    assert meta["unreadable"] == 1


def test_two_processes_under_torchrun_give_the_one_process_rows(images, weights, tmp_path):
    args = ["-m", "utils.embed", str(images / "train"), "--weights", str(weights), *COMMON, "--backend", "torch",
            "--batch-size", "4", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one")], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                          "--output", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout.strip().splitlines()[-1])["processes"] == 2
    (a, index_a, _), (b, index_b, _) = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert index_a == index_b and relative_error(b, np.asarray(a)) < 1e-5


def probe(feats, out, *extra) -> int:
    return probe_main([str(feats / "train"), "--val", str(feats / "val"), "--output", str(out), *extra])


def test_probe_reports_both_probes_and_its_best_pth_is_the_probe(images, feats, tmp_path, capsys):
    assert probe(feats, tmp_path / "out", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["knn"]) == {"1", "5", "10", "20"}  # k = 50 and 100 need more training rows than 30
    assert result["knn_top1"] == max(v["top1"] for v in result["knn"].values()) and "linear_top1" in result
    model = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(tmp_path / "out" / "best.pth"))
    assert model.pretrained_cfg["classes"] == list(CLASSES) and model.pretrained_cfg["input_size"] == (3, 64, 64)
    val, index, _ = rows(feats / "val")
    head = torch.load(tmp_path / "out" / "best.pth", weights_only=True)["model"]
    from_features = torch.from_numpy(np.asarray(val)) @ head["fc.weight"].T + head["fc.bias"]
    with torch.inference_mode():
        from_images = torch.cat([model(model.preprocess(images / "val" / p)[None]) for p, _ in index[1:]])
    assert relative_error(from_images.numpy(), from_features.numpy()) < 1e-4
    labels = torch.tensor([CLASSES.index(c) for _, c in index[1:]])
    assert 100 * (from_images.argmax(1) == labels).float().mean().item() == pytest.approx(result["linear_top1"])
    from utils import evaluate, export
    assert evaluate.main([str(images / "val"), "--weights", str(tmp_path / "out" / "best.pth"), "--json",
                          "--workers", "0", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == pytest.approx(result["linear_top1"])
    # The other tools take it with nothing else: an optimised copy, and a checked TorchScript export.
    x = torch.stack([model.preprocess(images / "val" / p) for p, _ in index[1:4]])
    with torch.inference_mode():
        assert relative_error(model.optimize_for_inference()(x).numpy(), model(x).numpy()) < 1e-4
    assert export.main([str(tmp_path / "probe.pt"), "--weights", str(tmp_path / "out" / "best.pth")]) == 0


def test_the_c_is_chosen_on_training_rows_alone(feats, tmp_path, capsys):
    """Two val folders, the second with its rows scrambled: the same C, the same held-out scores, the same head."""
    scrambled = tmp_path / "val"
    shutil.copytree(feats / "val", scrambled)
    values = np.load(scrambled / "features.npy")
    np.save(scrambled / "features.npy", values[::-1] * 3)
    results = []
    for val, out in ((feats / "val", tmp_path / "a"), (scrambled, tmp_path / "b")):
        assert probe_main([str(feats / "train"), "--val", str(val), "--output", str(out), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["C"] == results[1]["C"] and results[0]["linear_held_out_top1"] == results[1][
        "linear_held_out_top1"]
    heads = [torch.load(tmp_path / d / "best.pth", weights_only=True)["model"]["fc.weight"] for d in "ab"]
    assert torch.equal(*heads)


def test_the_linear_probe_reaches_scikit_learns_minimum_at_the_same_c():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x, y = torch.tensor(digits.data[:600], dtype=torch.float32), torch.tensor(digits.target[:600])
    c = 0.05
    weight, bias = linear.fit(x, y, 10, (c,))
    theirs = LogisticRegression(C=c, max_iter=10_000, tol=1e-8).fit(x.double().numpy(), y.numpy())

    def objective(w, b):
        loss = torch.nn.functional.cross_entropy(x.double() @ w + b, y)
        return (loss + w.pow(2).sum() / (2 * c * len(y))).item()

    ours, sklearns = objective(weight[0], bias[0]), objective(torch.tensor(theirs.coef_.T), torch.tensor(
        theirs.intercept_))
    assert ours <= sklearns + 1e-6
    held = torch.tensor(digits.data[600:900], dtype=torch.float32)
    predicted = torch.tensor(theirs.predict(held.double().numpy()))
    assert torch.equal(linear.predict(held, weight, bias)[0].argmax(1), predicted)


def test_knn_votes_are_weighted_by_similarity_and_the_temperature():
    # Two near rows of class 1 outvote three farther ones of class 0 once the votes are weighted:
    # uniform voting would say class 0.
    train = torch.tensor([[1.0, 0.02], [1.0, -0.02], [0.8, 0.6], [0.8, -0.6], [0.79, 0.61]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn.knn_hits(train, labels, query, torch.tensor([1]), 2, ks=(5,)) == {5: [1, 1]}
    assert knn.knn_hits(train, labels, query, torch.tensor([1]), 2, ks=(5,), temperature=100.0) == {5: [0, 1]}


def damage(kind: str, folder) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    if kind == "weights":
        meta["weights"]["sha256"] = "0" * 64
    elif kind == "transform":
        meta["transform"]["input_size"] = [3, 96, 96]
    elif kind == "incomplete":
        meta["complete"] = False
    (folder / "meta.json").write_text(json.dumps(meta))
    if kind == "classes":
        text = (folder / "index.csv").read_text()
        (folder / "index.csv").write_text(text.replace(",fox", ",wolf"))
    elif kind == "damaged":
        data = (folder / "features.npy").read_bytes()
        (folder / "features.npy").write_bytes(data[:len(data) // 2])
    elif kind == "non_finite":
        values = np.load(folder / "features.npy")
        values[3, 7] = np.nan
        np.save(folder / "features.npy", values)
    elif kind == "empty":
        np.save(folder / "features.npy", np.zeros((0, 512), np.float32))
        (folder / "index.csv").write_text("path,label\n")
        (folder / "meta.json").write_text(json.dumps({**meta, "rows": 0}))


REFUSALS = {"weights": "were embedded with different weights", "transform": "were embedded with different transform",
            "classes": "have different classes", "damaged": "features.npy or index.csv cannot be read",
            "non_finite": "1 row(s) hold NaN or infinity", "empty": "no rows",
            "incomplete": "not a complete features folder"}


@pytest.mark.parametrize("kind", REFUSALS)
def test_probe_refuses_features_it_cannot_use_in_one_line(feats, tmp_path, capsys, kind):
    val = tmp_path / "val"
    shutil.copytree(feats / "val", val)
    damage(kind, val)
    capsys.readouterr()
    assert probe_main([str(feats / "train"), "--val", str(val), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and REFUSALS[kind] in err[0], err
    assert not (tmp_path / "out").exists()


def test_knn_gives_the_same_hits_whatever_the_batches_of_val_rows(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    train, val = torch.randn(500, 16, generator=generator), torch.randn(300, 16, generator=generator)
    labels = torch.randint(0, 7, (500,), generator=generator)
    val_labels = torch.randint(0, 7, (300,), generator=generator)
    whole = knn.knn_hits(train, labels, val, val_labels, 7)
    monkeypatch.setattr(knn, "SIMILARITIES", 500 * 7)  # batches of 7 val rows, the last of 6
    assert knn.knn_hits(train, labels, val, val_labels, 7) == whole and sum(whole[10]) > 0
