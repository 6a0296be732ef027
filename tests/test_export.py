"""utils.inference.export and python -m utils.export: every architecture to TorchScript, torch.export and
ONNX, checked against eager."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.resnet import BLOCKS, ResNet
from utils import export as export_command
from utils.inference import export

from .conftest import REPO, randomize_statistics, sha256
from .test_optimize import trained_like

FORMATS = [".pt", ".pt2", ".onnx"]


@pytest.fixture(scope="module")
def resnext():
    """ResNeXt 32x4d with one grouped bottleneck per stage: the blocks of the four ResNeXt entries
    (and, with groups=1, of ResNet-50), in a quarter of ResNeXt-50's depth, which only repeats them."""
    torch.manual_seed(0)
    model = ResNet(BLOCKS["bottleneck"], [1, 1, 1, 1], groups=32, width_per_group=4)
    randomize_statistics(model.state_dict())
    return model.eval()


# The grouped bottleneck in every format; the basic block (ResNet-18) goes through every format in
# the backbone test below. The six architectures repeat these blocks, deeper or wider; test_optimize
# runs all six.
@pytest.mark.parametrize("suffix", FORMATS)
def test_a_classifier_exports_and_reproduces_eager(resnext, suffix, tmp_path):
    model = resnext
    path = export.export(model, tmp_path / f"resnext{suffix}")
    # Another batch size and image size than export's example: the exported graph is not fixed to them.
    error = export.check(model, path, torch.randn(3, 3, 96, 80))
    assert error < export.TOLERANCE
    out = export.load(path)(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in out] == [(2, 1000)]


@pytest.mark.parametrize("suffix", FORMATS)
def test_backbones_export_their_feature_maps(suffix, tmp_path):
    model = trained_like("resnet18_ssl", features_only=True, out_indices=(1, 3, 4))
    path = export.export(model, tmp_path / f"backbone{suffix}")
    export.check(model, path, export.sample_batch(model))
    shapes = [tuple(t.shape) for t in export.load(path)(torch.randn(1, 3, 128, 128))]
    assert shapes == [(1, 64, 32, 32), (1, 256, 8, 8), (1, 512, 4, 4)]
    if suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        assert [o.name for o in session.get_outputs()] == ["layer1", "layer3", "layer4"]


def test_check_fails_when_the_file_is_another_model(tmp_path):
    path = export.export(trained_like("resnet18_ssl"), tmp_path / "model.pt")
    other = trained_like("resnet18_ssl")
    torch.nn.init.normal_(other.fc.weight)
    with pytest.raises(export.ExportError, match=r"model.pt: outputs differ from the eager model's by .* more than"):
        export.check(other, path, torch.randn(1, 3, 64, 64))


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown format '.onx'; use one of .pt, .pt2, .onnx"):
        export.export(trained_like("resnet18_ssl"), tmp_path / "model.onx")


def test_python_m_utils_export(resnet18_checkpoint, tmp_path, capsys):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "utils.export", *args], cwd=REPO, capture_output=True, text=True)

    done = run(str(tmp_path / "r18.pt"), "--model", "resnet18_ssl", "--weights", str(resnet18_checkpoint))
    assert done.returncode == 0, done.stderr
    assert re.search(r"r18.pt \(torchscript, 44.\d MiB\): outputs on the sample photos equal the eager model's "
                     "within", done.stdout)
    missing = [str(tmp_path / "r18.pt2"), "--weights", str(tmp_path / "none.pth")]
    for args, message in (([str(tmp_path / "r18.tflite")], "must end in .pt, .pt2, .onnx"),
                          (missing, "none.pth: no such file")):
        with pytest.raises(SystemExit) as exit_:
            export_command.main([*args, "--model", "resnet18_ssl"])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r18.pt2").exists()


SPELLINGS = {  # every way --weights can name the file that OUTPUT is: (output, --weights), from tmp_path
    "the same path": lambda mine, tmp: (mine, str(mine)),
    "a file:// URL": lambda mine, tmp: (mine, mine.as_uri()),
    "a relative path": lambda mine, tmp: (mine, os.path.relpath(mine)),
    "~ (quoted, so the shell leaves it)": lambda mine, tmp: (mine, "~/" + os.path.relpath(mine, Path.home())),
    "a symbolic link as OUTPUT": lambda mine, tmp: (link(tmp / "link.pt", mine), str(mine)),
    "a symbolic link as --weights": lambda mine, tmp: (mine, str(link(tmp / "link.pth", mine))),
    "a hard link": lambda mine, tmp: (hard_link(tmp / "hard.pt", mine), str(mine)),
}


def link(path, target):
    path.symlink_to(target)
    return path


def hard_link(path, target):
    os.link(target, path)
    return path


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_export_never_writes_over_its_weights_however_they_are_named(spelling, resnet18_checkpoint, tmp_path,
                                                                     capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # so that ~ reaches tmp_path
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.pt"
    shutil.copyfile(resnet18_checkpoint, mine)
    output, weights = SPELLINGS[spelling](mine, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        export_command.main([str(output), "--model", "resnet18_ssl", "--weights", weights])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse's form: usage, then one line
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert last.startswith("python -m utils.export: error: ") and "is the --weights file: writing there would " \
                                                                     "destroy it" in last, last
    assert sha256(mine) == sha256(resnet18_checkpoint)


def test_export_never_writes_onto_a_directory(resnet18_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_command.main([str(tmp_path), "--model", "resnet18_ssl", "--weights", str(resnet18_checkpoint)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "is a directory: give a file name ending in .pt, .pt2, .onnx" in last
    assert tmp_path.is_dir()


def test_a_failed_export_leaves_the_previous_file_as_it_was(tmp_path):
    previous = tmp_path / "model.pt2"
    previous.write_bytes(b"the previous export")
    with pytest.raises(Exception):  # noqa: B017  (whatever the exporter raises)
        export.export(torch.nn.Sequential(NotExportable()), previous)
    assert previous.read_bytes() == b"the previous export" and sorted(tmp_path.iterdir()) == [previous]


@pytest.mark.parametrize("suffix, saver", [(".pt", "jit"), (".pt2", "export")])
def test_an_export_that_fails_halfway_through_writing_leaves_the_previous_file_as_it_was(tmp_path, monkeypatch,
                                                                                         suffix, saver):
    previous = tmp_path / f"model{suffix}"
    previous.write_bytes(b"the previous export")
    module = getattr(torch, saver)
    real = module.save

    def fails_halfway(program, f, *args, **kwargs):
        real(program, f, *args, **kwargs)  # written where the export writes...
        with open(f, "r+b") as out:
            out.truncate(os.path.getsize(f) // 2)  # ...then cut short, as by a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save", fails_halfway)
    with pytest.raises(OSError, match="No space left on device"):
        export.export(trained_like("resnet18_ssl"), previous)
    assert previous.read_bytes() == b"the previous export" and sorted(tmp_path.iterdir()) == [previous]


class NotExportable(torch.nn.Module):
    def forward(self, x):
        return torch.tensor(x.sum().item())  # data-dependent Python: torch.export refuses it


def test_the_self_check_fails_on_outputs_that_are_not_finite(tmp_path):
    model = trained_like("resnet18_ssl")
    path = export.export(model, tmp_path / "model.pt")
    with torch.no_grad():
        model.fc.bias[0] = float("nan")
    with pytest.raises(export.ExportError, match="the model's own outputs hold NaN or infinite values"):
        export.check(model, path, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("flaw", ["overflow", "mismatch"])
def test_an_export_that_fails_its_check_leaves_the_previous_file_as_it_was(tmp_path, capsys, monkeypatch, flaw):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pth"
    torch.save(trained_like("resnet18_ssl").state_dict(), good)
    command = ["keep.pt", "--model", "resnet18_ssl", "--img-size", "64", "--weights"]
    assert export_command.main([*command, str(good)]) == 0
    kept, files = sha256(tmp_path / "keep.pt"), sorted(tmp_path.iterdir())
    weights = good
    if flaw == "overflow":  # weights whose outputs overflow float32
        state = trained_like("resnet18_ssl").state_dict()
        state["fc.weight"].fill_(3e38)
        weights = tmp_path / "bad.pth"
        torch.save(state, weights)
        files.append(weights)
        expected = "the model's own outputs hold NaN or infinite"
    else:  # an exported file that does not reproduce the model
        real = export.load
        monkeypatch.setattr(export, "load", lambda path: (lambda x: [2 * y for y in real(path)(x)]))
        expected = "outputs differ from the eager model's"
    assert export_command.main([*command, str(weights)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "keep.pt was left as it was" in err and ".partial" not in err, err
    assert sha256(tmp_path / "keep.pt") == kept and sorted(tmp_path.iterdir()) == sorted(files)


def test_a_two_class_file_names_the_option_that_fits_it(tmp_path, capsys):
    torch.save(trained_like("resnet18_ssl", num_classes=2).state_dict(), tmp_path / "two_class.pth")
    assert export_command.main([str(tmp_path / "r18.pt"), "--model", "resnet18_ssl", "--weights",
                        str(tmp_path / "two_class.pth")]) == 2
    err = capsys.readouterr().err
    assert "Only the classifier differs: the file has a 2-class head, so pass --num-classes 2" in err
    assert "num_classes=" not in err and not (tmp_path / "r18.pt").exists()


def test_a_folder_that_cannot_be_written_is_one_line_with_the_real_reason(tmp_path, capsys):
    (tmp_path / "a file").write_text("in the way")
    status = export_command.main([str(tmp_path / "a file" / "m.onnx"), "--model", "resnet18_ssl", "--no-pretrained"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "error: cannot write" in err and "(File exists)" in err and "Traceback" not in err
