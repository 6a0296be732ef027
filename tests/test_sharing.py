"""The formats the ecosystem shares: safetensors weights (weights=), the Hugging Face / timm model folder
(python -m utils.export DIR --format hf), and the license in every exported file.

timm cannot be imported beside the CPU torch the tests use, so the folder is read here by a loader written
from timm's documented format (config.json: architecture, num_classes, pretrained_cfg, label_names)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from models import WEIGHTS, create_model, finetuned
from models.registry import MEAN, STD
from models.resnet import BLOCKS, ResNet
from utils import export as export_command
from utils.inference.export import sample_batch
from utils.weights import CheckpointError, safetensors_file

from .conftest import REPO, random_state_dict, randomize_statistics, sha256

CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def finetuned_file(tmp_path_factory) -> Path:
    """A file as python -m utils.finetune saves it: resnet18_ssl with a 3-class head, described, at 64 px."""
    torch.manual_seed(0)
    model = create_model("resnet18_ssl", pretrained=False, num_classes=len(CLASSES))
    randomize_statistics(model.state_dict())
    description = finetuned.describe("resnet18_ssl", CLASSES, 64, 0.875, MEAN, STD,
                                      {"recipe": {"epochs": 3, "lr": 0.01}, "train": "photos/train",
                                       "result": {"epoch": 3, "val_top1": 91.25}})
    path = tmp_path_factory.mktemp("finetuned") / "best.pth"
    model.to(memory_format=torch.channels_last)  # as utils.finetune trains, and so saves, its weights
    torch.save({"model": model.state_dict(), finetuned.KEY: description}, path)
    return path


def test_the_same_weights_give_the_same_outputs_whatever_the_files_layout(finetuned_file, tmp_path):
    saved = torch.load(finetuned_file, weights_only=True)
    assert not saved["model"]["conv1.weight"].is_contiguous()  # channels_last in the file
    saved["model"] = {k: v.contiguous() for k, v in saved["model"].items()}
    torch.save(saved, tmp_path / "contiguous.pth")
    model = create_model("resnet18_ssl", weights=finetuned_file)
    assert all(t.is_contiguous() for t in model.state_dict().values())
    assert torch.equal(outputs(model), outputs(create_model("resnet18_ssl", weights=tmp_path / "contiguous.pth")))


def outputs(model, batch=None):
    with torch.no_grad():
        return model.eval()(sample_batch(model) if batch is None else batch)


def named_by_hash(path: Path) -> Path:
    """``path`` renamed to carry its SHA-256 prefix, as published files do."""
    return path.rename(path.with_name(f"{path.stem}-{sha256(path)[:8]}{path.suffix}"))


# --- weights= takes safetensors ---------------------------------------------------------------------------------

def test_a_safetensors_state_dict_loads_like_the_pth_and_its_name_is_verified(resnet18_checkpoint, tmp_path):
    state = torch.load(resnet18_checkpoint, weights_only=True)
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(state, path)  # as torchvision's or timm's state dict would be saved
    path = named_by_hash(path)
    expected = outputs(create_model("resnet18_ssl", weights=resnet18_checkpoint))
    assert torch.equal(outputs(create_model("resnet18_ssl", weights=path)), expected)
    wrong = path.with_name("resnet18-00000000.safetensors")
    path.rename(wrong)
    with pytest.raises(CheckpointError, match="SHA-256"):
        create_model("resnet18_ssl", weights=wrong)


def test_a_safetensors_url_downloads_verified_into_the_cache(resnet18_checkpoint, server, torch_home, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(torch.load(resnet18_checkpoint, weights_only=True), path)
    url = server.serve(named_by_hash(path))
    model = create_model("resnet18_ssl", weights=url)
    assert torch.equal(outputs(model), outputs(create_model("resnet18_ssl", weights=resnet18_checkpoint)))
    assert [p.name for p in (torch_home / "hub" / "checkpoints").glob("*.safetensors")] == [url.rsplit("/", 1)[1]]
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(b"\x00" * 64)  # an 8-byte header length of 0, then nothing: no safetensors file
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        create_model("resnet18_ssl", weights=server.serve(damaged))


def test_loading_never_ties_the_users_safetensors_file_to_the_model(resnet18_checkpoint, tmp_path):
    path = tmp_path / "mine.safetensors"
    safetensors.torch.save_file(torch.load(resnet18_checkpoint, weights_only=True), path)
    model = create_model("resnet18_ssl", weights=path)
    before = outputs(model)
    if Path("/proc/self/maps").exists():  # nothing of the file is mapped into this process
        assert str(path) not in Path("/proc/self/maps").read_text()
    with open(path, "r+b") as f:  # the user writes over their file in place...
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(os.path.getsize(path) // 2))
    assert torch.equal(outputs(model), before)  # ...and the model is unchanged


def test_a_damaged_safetensors_file_names_itself(resnet18_checkpoint, tmp_path):
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file(torch.load(resnet18_checkpoint, weights_only=True), path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="could not read the checkpoint .*cut.safetensors"):
        create_model("resnet18_ssl", weights=path)
    nan = random_state_dict("resnet18_ssl")
    nan["fc.bias"][0] = float("nan")
    safetensors.torch.save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite values in fc.bias"):
        create_model("resnet18_ssl", weights=tmp_path / "nan.safetensors")
    safetensors.torch.save_file(random_state_dict("resnet18_ssl"), tmp_path / "said.safetensors",
                                metadata={finetuned.KEY: "{not json"})
    with pytest.raises(ValueError, match="its pretrained_cfg is damaged"):
        create_model("resnet18_ssl", weights=tmp_path / "said.safetensors")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_safetensors_is_optional_reading_needs_no_package_and_writing_names_it(resnet18_checkpoint, tmp_path):
    path = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(torch.load(resnet18_checkpoint, weights_only=True), path)
    for weights in (resnet18_checkpoint, path):  # neither a .pth nor a .safetensors file imports the package
        done = run_python("import sys\nfrom models import create_model\n"
                          f"create_model('resnet18_ssl', weights={str(weights)!r})\n"
                          "print('safetensors' in sys.modules)")
        assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    done = run_python("import sys\nsys.modules['safetensors'] = None  # as if not installed\n"
                      "from models import create_model\nfrom utils.export import save_safetensors\n"
                      f"model = create_model('resnet18_ssl', weights={str(path)!r})\n"
                      f"save_safetensors(model, {str(tmp_path / 'out.safetensors')!r})")
    assert done.returncode == 1 and "pip install safetensors" in done.stderr.strip().splitlines()[-1], done.stderr


def test_the_reader_gives_what_the_safetensors_package_gives_for_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(2).half(), "bf16": torch.randn(5).bfloat16(),
               "f64": torch.randn(2, 1).double(), "i64": torch.arange(7), "i8": torch.arange(-3, 3).to(torch.int8),
               "bool": torch.tensor(True), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    safetensors.torch.save_file(tensors, tmp_path / "all.safetensors", metadata={"k": "v"})
    read, expected = safetensors_file.load(tmp_path / "all.safetensors"), safetensors.torch.load_file(
        tmp_path / "all.safetensors")
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape and torch.equal(read[name], tensor)
    assert safetensors_file.read_metadata(tmp_path / "all.safetensors") == {"k": "v"}


@pytest.mark.parametrize("damage, error", [("offsets past the end", "do not fit its shape and the file"),
                                           ("overlapping offsets", "do not fit its shape and the file"),
                                           ("cut short", "do not fit its shape and the file"),
                                           ("unknown dtype", "dtype 'F8_E4M3' is none that a model holds")])
def test_a_header_that_does_not_describe_its_bytes_is_refused(damage, error, tmp_path):
    safetensors.torch.save_file({"a": torch.randn(4), "b": torch.randn(4)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    if damage == "offsets past the end":
        header["b"]["data_offsets"] = [16, 48]
        header["b"]["shape"] = [8]
    elif damage == "overlapping offsets":
        header["b"]["data_offsets"] = [8, 24]
    elif damage == "cut short":
        body = body[:20]
    else:
        header["a"]["dtype"] = "F8_E4M3"
    text = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + body)
    with pytest.raises(ValueError, match=error):
        safetensors_file.load(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=f"could not read the checkpoint .*x.safetensors: ValueError: .*{error}"):
        create_model("resnet18_ssl", weights=tmp_path / "x.safetensors")


# --- a fine-tuned file, exported, keeps its description -----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_a_finetuned_file_exported_loads_back_with_nothing_else(finetuned_file, tmp_path, capsys, fmt):
    out = tmp_path / ("ft.safetensors" if fmt == "safetensors" else "ft-folder")
    args = [str(out), "--weights", str(finetuned_file)] + (["--format", "hf"] if fmt == "hf" else [])
    assert export_command.main(args) == 0, capsys.readouterr().err
    assert "loaded back with weights=OUTPUT, which holds the same weights exactly" in capsys.readouterr().out
    original = create_model("resnet18_ssl", weights=finetuned_file)
    # the hub entry, as a user loads it, without num_classes or input size
    loaded = torch.hub.load(str(REPO), "resnet18_ssl", source="local", weights=str(out))
    for key in ("classes", "num_classes", "input_size", "crop_pct", "resize_size", "mean", "std", "finetuning"):
        assert loaded.pretrained_cfg[key] == original.pretrained_cfg[key], key
    assert torch.equal(outputs(loaded), outputs(original))
    # and the commands default --model to it, as for the .pth
    assert export_command.main([str(tmp_path / "again.pt"), "--weights", str(out)]) == 0


# --- the Hugging Face / timm folder, read as timm reads it -------------------------------------------------------

# timm's architectures by the names it registers them under: (block, layers, groups, width per group).
TIMM_ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64), "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4), "resnext101_32x4d": ("bottleneck", (3, 4, 23, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_32x16d": ("bottleneck", (3, 4, 23, 3), 32, 16),
}


# The fields of timm's PretrainedCfg dataclass, which timm builds from config.json's pretrained_cfg: a key
# outside them is a TypeError there.
TIMM_PRETRAINED_CFG_FIELDS = {
    "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag", "custom_load",
    "input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct",
    "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "label_offset", "label_names", "label_descriptions",
    "pool_size", "test_pool_size", "first_conv", "classifier", "license", "description", "origin_url", "paper_name",
    "paper_ids", "notes"}
TIMM_CONFIG_KEYS = {"architecture", "num_classes", "num_features", "global_pool", "label_names", "label_descriptions",
                    "model_args", "pretrained_cfg"}


def timm_local_dir(folder: Path):
    """What ``timm.create_model("local-dir:FOLDER", pretrained=True)`` builds, by timm's documented format:
    config.json's pretrained_cfg, with num_classes and label_names from the top level overriding it; the
    network that "architecture" names, with num_classes outputs; model.safetensors loaded strictly; and the
    data config that timm.data.resolve_model_data_config takes from pretrained_cfg."""
    config = json.loads((folder / "config.json").read_text())
    assert config.keys() <= TIMM_CONFIG_KEYS and config["pretrained_cfg"].keys() <= TIMM_PRETRAINED_CFG_FIELDS
    pretrained_cfg = dict(config["pretrained_cfg"])
    pretrained_cfg["num_classes"] = config["num_classes"]
    if "label_names" in config:
        pretrained_cfg["label_names"] = config["label_names"]
    block, layers, groups, width = TIMM_ARCHITECTURES[config["architecture"]]
    model = ResNet(BLOCKS[block], layers, num_classes=pretrained_cfg["num_classes"], groups=groups,
                   width_per_group=width)
    model.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"), strict=True)
    data = {key: pretrained_cfg[key] for key in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    assert config["num_features"] == model.num_features and pretrained_cfg["classifier"] == "fc"
    return model.eval(), data, pretrained_cfg


@pytest.mark.parametrize("source", ["published", "fine-tuned"])
def test_the_folder_is_what_timm_reads_with_the_hub_entrys_outputs_and_data_config(source, finetuned_file,
                                                                                   resnet18_checkpoint, tmp_path):
    weights = finetuned_file if source == "fine-tuned" else resnet18_checkpoint
    folder = tmp_path / "folder"
    assert export_command.main([str(folder), "--format", "hf", "--model", "resnet18_ssl",
                                "--weights", str(weights)]) == 0
    entry = create_model("resnet18_ssl", weights=weights)
    cfg = entry.pretrained_cfg
    timm_model, data, pretrained_cfg = timm_local_dir(folder)
    assert torch.equal(outputs(timm_model, sample_batch(entry)), outputs(entry))
    size = cfg["input_size"][-1]
    assert data == {"input_size": [3, size, size], "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
                    "std": list(cfg["std"]), "crop_pct": cfg["crop_pct"], "crop_mode": "center"}
    assert math.floor(size / data["crop_pct"]) == cfg["resize_size"]  # timm's eval resize: the hub entry's
    names = pretrained_cfg["label_names"]
    assert names == (cfg["classes"] if source == "fine-tuned" else cfg["wnids"])
    assert pretrained_cfg["license"] == "cc-by-nc-4.0"


@pytest.mark.parametrize("source", ["published", "fine-tuned"])
def test_the_model_card_says_license_paper_accuracy_and_recipe(source, finetuned_file, cached_resnet18, tmp_path):
    weights = finetuned_file if source == "fine-tuned" else None  # None: the published file, from the cache
    folder = export_command.save_folder(create_model("resnet18_ssl", weights=weights), tmp_path / "f")
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in front.splitlines() if ":" in line}
    assert fields["license"] == "cc-by-nc-4.0" and fields["library_name"] == "timm"
    assert "- timm" in front.splitlines() and "- image-classification" in front.splitlines()
    w = WEIGHTS["resnet18_ssl"]
    assert "arXiv:1905.00546" in body and f"{w.reported[0]:.1f}" in body and f"{w.measured[0]:.3f}" in body
    if source == "fine-tuned":
        assert "cat, dog, fish" in body and "91.25" in body and "epochs:** 3" in body
        assert body.startswith("# Model card for resnet18_ssl fine-tuned on 3 classes")
    else:
        assert body.startswith(f"# Model card for {w.timm_name}") and w.url in body
        assert "head (fc) of its own" not in body
        model = create_model("resnet18_ssl", num_classes=4)  # a head of its own, put on after loading
        card = (export_command.save_folder(model, tmp_path / "g") / "README.md").read_text()
        assert f"{w.url} (SHA-256 {w.hash_prefix}...)" in card and "with a 4-class head (fc) of its own" in card


def test_the_card_gives_the_published_accuracy_only_for_weights_that_descend_from_them(finetuned_file, tmp_path):
    saved = torch.load(finetuned_file, weights_only=True)
    saved[finetuned.KEY]["finetuning"]["recipe"]["no_pretrained"] = True  # trained from random weights
    torch.save(saved, tmp_path / "scratch.pth")
    for weights, pretrained in ((tmp_path / "scratch.pth", True), (None, False)):
        model = create_model("resnet18_ssl", weights=weights, pretrained=pretrained)
        card = (export_command.save_folder(model, tmp_path / f"f{pretrained}") / "README.md").read_text()
        assert "random" in card.split("**Weights:**")[1].splitlines()[0]
        assert "ImageNet-1k validation accuracy" not in card and WEIGHTS["resnet18_ssl"].url not in card


def test_the_weights_file_is_as_readable_as_the_users_other_new_files(resnet18_checkpoint, tmp_path):
    folder = export_command.save_folder(create_model("resnet18_ssl", weights=resnet18_checkpoint), tmp_path / "f")
    os.umask(previous := os.umask(0o022))
    expected = 0o666 & ~previous
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(
        ("model.safetensors", "config.json", "README.md"), expected)


def test_a_folder_that_does_not_reproduce_the_model_leaves_the_folder_as_it_was(resnet18_checkpoint, tmp_path):
    folder = tmp_path / "out" / "f"
    export_command.save_folder(create_model("resnet18_ssl", weights=resnet18_checkpoint), folder)
    (folder / "notes.txt").write_text("mine")
    before = {p.name: sha256(p) for p in folder.iterdir()}
    dilated = create_model("resnet50_ssl", pretrained=False, replace_stride_with_dilation=[False, True, True])
    with pytest.raises(export_command.ExportError, match="gives other outputs than the model"):
        export_command.save_folder(dilated, folder)  # its weights cannot hold the dilation
    assert {p.name: sha256(p) for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["f"]  # no work folder left beside it


def exit_status(args: list[str]) -> int:
    """python -m utils.export's exit status, whether it returns it or argparse exits with it."""
    try:
        return export_command.main(args)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("name, args, message", [
    ("folder", ["--format", "hf", "--features-only"], "a weights file holds the whole network"),
    ("m.safetensors", ["--format", "onnx"], "the suffix .safetensors says safetensors, --format says onnx"),
    ("m.onnx", ["--format", "hf"], "the suffix .onnx says onnx, --format says hf"),
])
def test_export_refuses_what_cannot_be_written(name, args, message, tmp_path, capsys):
    out = tmp_path / name
    status = exit_status([str(out), "--model", "resnet18_ssl", "--no-pretrained", *args])
    assert status == 2 and message in capsys.readouterr().err and not out.exists()


def test_a_safetensors_name_with_a_hash_prefix_must_be_the_files(resnet18_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    status = exit_status([str(out / "r18-00000000.safetensors"), "--model", "resnet18_ssl",
                          "--weights", str(resnet18_checkpoint)])
    err = capsys.readouterr().err
    assert status == 1 and list(out.iterdir()) == [] and "export to r18.safetensors, then rename it" in err, err
    assert exit_status([str(out / "r18.safetensors"), "--model", "resnet18_ssl",
                        "--weights", str(resnet18_checkpoint)]) == 0
    create_model("resnet18_ssl", weights=named_by_hash(out / "r18.safetensors"))  # renamed as told, it verifies


def test_export_never_writes_over_the_weights_folder_it_reads(resnet18_checkpoint, tmp_path, capsys):
    folder = tmp_path / "f"
    export_command.save_folder(create_model("resnet18_ssl", weights=resnet18_checkpoint), folder)
    before = {p.name: sha256(p) for p in folder.iterdir()}
    for weights in (folder, folder / "model.safetensors"):
        with pytest.raises(SystemExit) as exit_:
            export_command.main([str(folder), "--format", "hf", "--model", "resnet18_ssl", "--weights", str(weights)])
        assert exit_.value.code == 2 and "writing there would" in capsys.readouterr().err
    assert {p.name: sha256(p) for p in folder.iterdir()} == before


# --- the license travels into every exported file ------------------------------------------------------------------

def read_by_its_own_tools(path: Path) -> dict[str, str]:
    """The string metadata of an exported file, as each format's own reader gives it."""
    keys = ("license", "entry", "pretrained_cfg")
    if path.suffix == ".onnx":
        import onnxruntime
        return dict(onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    .get_modelmeta().custom_metadata_map)
    if path.suffix == ".pt":
        files = dict.fromkeys(keys, "")
        torch.jit.load(path, _extra_files=files)
        return {k: v.decode() for k, v in files.items()}  # TorchScript gives them as bytes
    if path.suffix == ".pt2":
        files = dict.fromkeys(keys, "")
        torch.export.load(path, extra_files=files)
        return files
    if path.suffix == ".safetensors":
        with safetensors.safe_open(path, framework="pt") as f:
            return f.metadata()
    config = json.loads((path / "config.json").read_text())
    return {"license": config["pretrained_cfg"]["license"], "card": (path / "README.md").read_text()}


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit.* deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["m.onnx", "m.pt", "m.pt2", "m.safetensors", "folder"])
def test_the_license_travels_into_every_exported_file(name, finetuned_file, tmp_path):
    out = tmp_path / name
    assert export_command.main([str(out), "--weights", str(finetuned_file)]
                               + (["--format", "hf"] if name == "folder" else [])) == 0
    carried = read_by_its_own_tools(out)
    assert carried["license"].lower() == "cc-by-nc-4.0"
    if name == "folder":
        assert "license: cc-by-nc-4.0" in carried["card"]
    else:  # and what the model is: its entry, and its classes for a fine-tuned one
        assert carried["entry"] == "resnet18_ssl"
        assert json.loads(carried[finetuned.KEY])["classes"] == CLASSES
