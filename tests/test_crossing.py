"""A model loaded through torch.hub crosses into other processes: torch.save of the whole module read back
in a new process, multiprocessing's "spawn" (macOS's and Windows' default), and DataLoader workers that
call model.preprocess. Real processes, each of which has never imported the checkout."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

KINDS = {"classifier": {}, "pooled": {"num_classes": 0}, "feature maps": {"features_only": True}}
SAMPLE = REPO.parent / "shared" / "images"


def hub_model(checkout=REPO, **kwargs):
    torch.manual_seed(0)
    return torch.hub.load(str(checkout), "resnet18_ssl", source="local", pretrained=False, **kwargs).eval()


def outputs(model, x):
    with torch.inference_mode():
        out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def load_in_new_process(path, x_path, out_path, cwd):
    """torch.load of the whole model in a fresh interpreter, which runs it on the saved input."""
    code = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); x = torch.load(sys.argv[2]); "
            "out = m(x); torch.save([out] if torch.is_tensor(out) else list(out), sys.argv[3]); "
            "print(type(m).__name__, m.pretrained_cfg['entry'], type(m.preprocess).__name__)")
    return subprocess.run([sys.executable, "-c", code, str(path), str(x_path), str(out_path)], cwd=cwd,
                          env=same_threads(), capture_output=True, text=True, timeout=120)


def same_threads() -> dict:
    """The environment of a new interpreter that computes on as many threads as this one: the order of a
    convolution's sums, and so its last bits, may change with the number of threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.mark.parametrize("kind", KINDS)
def test_a_whole_model_saved_with_torch_save_loads_in_a_new_process(tmp_path, kind):
    model = hub_model(**KINDS[kind])
    assert type(model).__module__.startswith("_semi_supervised_hub_")  # the private package of hubconf.py
    x = torch.randn(2, 3, 64, 64)
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    done = load_in_new_process(tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "out.pt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [type(model).__name__, "resnet18_ssl", "Preprocess"]
    got = torch.load(tmp_path / "out.pt")
    assert all(torch.equal(g, e) for g, e in zip(got, outputs(model, x), strict=True))


def test_a_checkout_whose_hubconf_changed_still_loads_what_it_saved(tmp_path):
    """The private package's name changes with hubconf.py's time (a git pull, a copy): the pickle finds
    its classes through torch.hub.load of the checkout, not by that name."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "tests"))
    model = hub_model(checkout)
    torch.save(model, tmp_path / "model.pt")
    torch.save(x := torch.randn(1, 3, 64, 64), tmp_path / "x.pt")
    stat = (checkout / "hubconf.py").stat()
    os.utime(checkout / "hubconf.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    done = load_in_new_process(tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "out.pt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt")[0], outputs(model, x)[0])


def run_in_child(model, x, path, threads):
    torch.set_num_threads(threads)  # as many as here: see same_threads
    torch.save(outputs(model, x), path)  # a file: tensors sent through a queue die with the child


@pytest.mark.parametrize("kind", ["classifier", "feature maps"])
def test_a_model_passed_to_a_spawned_process_runs_there(tmp_path, kind):
    model, x = hub_model(**KINDS[kind]), torch.randn(1, 3, 64, 64)
    child = multiprocessing.get_context("spawn").Process(target=run_in_child,
                                                         args=(model, x, tmp_path / "out.pt", torch.get_num_threads()))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    got = torch.load(tmp_path / "out.pt")
    assert all(torch.equal(g, e) for g, e in zip(got, outputs(model, x), strict=True))


LOADER_SCRIPT = """
import sys, torch
from torch.utils.data import DataLoader, Dataset


class Photos(Dataset):
    def __init__(self, preprocess, paths):
        self.preprocess, self.paths = preprocess, paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(self.paths[i])


if __name__ == "__main__":
    checkout, paths = sys.argv[1], sys.argv[2:]
    model = torch.hub.load(checkout, "resnet18_ssl", source="local", pretrained=False)
    loader = DataLoader(Photos(model.preprocess, paths), batch_size=len(paths), num_workers=1,
                        multiprocessing_context="spawn")
    (batch,) = list(loader)
    assert torch.equal(batch, torch.stack([model.preprocess(p) for p in paths]))
    print("equal")
"""


def test_dataloader_workers_under_spawn_call_the_models_preprocess(tmp_path):
    """In a process of its own: a DataLoader's spawned workers inherit the pipes that connect a pytest-xdist
    worker to pytest, and end that worker when they exit."""
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT)
    paths = sorted(str(p) for p in SAMPLE.iterdir() if p.suffix in (".jpg", ".png"))
    done = subprocess.run([sys.executable, str(script), str(REPO), *paths], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "equal", done.stderr[-3000:]


OPTIMISED = {"torch": {}, "torch, contiguous": {"channels_last": False}, "onnxruntime": {"backend": "onnxruntime"},
             "openvino": {"backend": "openvino"}, "auto": {"backend": "auto"},
             "int8 openvino": {"dtype": "int8", "backend": "openvino"},
             "int8 onnxruntime": {"dtype": "int8", "backend": "onnxruntime"}}


@pytest.fixture(scope="module")
def optimised():
    """Each kind of optimised model (compile=True: tests/test_optimize.py), and their outputs here."""
    model, calibration = hub_model(), torch.randn(8, 3, 64, 64)
    models = {name: model.optimize_for_inference(**kwargs, **({"calibration": calibration} if "int8" in name else {}))
              for name, kwargs in OPTIMISED.items()}
    x = torch.randn(2, 3, 64, 64)
    return models, x, {name: outputs(m, x) for name, m in models.items()}


def run_all_in_child(models, x, path, threads):
    torch.set_num_threads(threads)
    torch.save({name: outputs(m, x) for name, m in models.items()}, path)


def assert_same_outputs(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:  # "auto" races its candidates again there, and may pick another
        for g, e in zip(got[name], expected[name], strict=True):
            assert (g - e).abs().max() <= 1e-5 * e.abs().max(), name


def test_optimised_models_pass_to_a_spawned_process_and_run_there_as_here(tmp_path, optimised):
    models, x, expected = optimised
    child = multiprocessing.get_context("spawn").Process(target=run_all_in_child,
                                                         args=(models, x, tmp_path / "out.pt", torch.get_num_threads()))
    child.start()
    child.join(timeout=180)
    assert child.exitcode == 0
    assert_same_outputs(torch.load(tmp_path / "out.pt"), expected)


def test_optimised_models_saved_with_torch_save_load_in_a_new_process(tmp_path, optimised):
    models, x, expected = optimised
    torch.save(models, tmp_path / "models.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; models = torch.load(sys.argv[1], weights_only=False); x = torch.load(sys.argv[2]); "
            "out = {k: m(x) for k, m in models.items()}; "
            "torch.save({k: [o] if torch.is_tensor(o) else list(o) for k, o in out.items()}, sys.argv[3]); "
            "print(*sorted({type(m).__name__ for m in models.values()}), models['int8 openvino'].int8_fidelity)")
    done = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / n) for n in ("models.pt", "x.pt", "out.pt"))],
                          cwd=tmp_path, env=same_threads(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:3] == ["AutoModel", "InferenceModel", "PeerModel"]
    assert "top1_agreement" in done.stdout  # the measured fidelity travels with the INT8 model
    assert_same_outputs(torch.load(tmp_path / "out.pt"), expected)
