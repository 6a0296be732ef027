"""python -m utils.classify and python -m utils.evaluate, checked against direct computation."""
import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from models import create_model
from utils import classify, evaluate
from utils.cli import set_input_size
from utils.images import files
from utils.inference.optimize import optimize_for_inference

from .conftest import REPO
from .test_images import SAMPLES, noise


@pytest.fixture(scope="module")
def model_and_weights(resnet18_checkpoint):
    model = create_model("resnet18_ssl", weights=resnet18_checkpoint)
    return model, str(resnet18_checkpoint)


def expected_top(model, path, k):
    with torch.inference_mode():
        probabilities = model(model.preprocess(path)[None]).softmax(dim=1)[0]
    top = probabilities.topk(k)
    return [model.pretrained_cfg["classes"][i] for i in top.indices], top.values.tolist()


def run_classify(capsys, *args, device="cpu"):
    """classify.main on ``device`` (the CPU, as the model the tests compare with; None for the default,
    which is a GPU where there is one)."""
    pinned = ["--device", device] if device and "--device" not in args else []
    status = classify.main([*args, "--model", "resnet18_ssl", "--workers", "0", *pinned])
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()] if "--json" in args else out, err


def test_classify_json_matches_the_model(model_and_weights, capsys, tmp_path):
    model, weights = model_and_weights
    status, rows, _ = run_classify(capsys, str(SAMPLES), "--weights", weights, "--json", "--topk", "3")
    assert status == 0 and [r["path"] for r in rows] == [str(SAMPLES / "chelsea.png"), str(SAMPLES / "rocket.jpg")]
    for row in rows:
        labels, probabilities = expected_top(model, row["path"], 3)
        assert row["model"] == "resnet18_ssl" and row["labels"] == labels
        assert row["probabilities"] == pytest.approx(probabilities, abs=1e-6)
        wnids = model.pretrained_cfg["wnids"]
        assert row["wnids"] == [wnids[model.pretrained_cfg["classes"].index(label)] for label in labels]


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_classify_with_another_backend_gives_the_same_answer(model_and_weights, capsys, backend):
    model, weights = model_and_weights
    # The default --device for onnxruntime: the CPU, also where there is a GPU. For "auto" it would be a GPU
    # there, computing in TF32: pinned to the CPU, as the model it is compared with.
    status, rows, _ = run_classify(capsys, str(SAMPLES), "--weights", weights, "--json", "--backend", backend,
                                   device=None if backend == "onnxruntime" else "cpu")
    assert status == 0 and len(rows) == 2
    for row in rows:
        labels, probabilities = expected_top(model, row["path"], 5)
        assert row["labels"] == labels and row["probabilities"] == pytest.approx(probabilities, abs=1e-5)


def test_classify_names_the_install_for_a_missing_backend(model_and_weights, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as where it is not installed
    status, _, err = run_classify(capsys, str(SAMPLES), "--weights", model_and_weights[1], "--backend", "openvino")
    assert status == 2 and "error: --backend openvino needs the openvino package: pip install openvino" in err


def test_classify_reports_bad_files_and_classifies_the_rest(model_and_weights, capsys, tmp_path):
    _, weights = model_and_weights
    (tmp_path / "broken.jpg").write_text("not an image")
    shutil.copy(SAMPLES / "chelsea.png", tmp_path / "cat.png")
    status, rows, err = run_classify(capsys, str(tmp_path / "*.*"), str(tmp_path / "missing.png"),
                                     "--weights", weights, "--json")
    assert status == 1
    by_path = {r["path"]: r for r in rows}
    assert "not a readable image" in by_path[str(tmp_path / "broken.jpg")]["error"]
    assert by_path[str(tmp_path / "missing.png")]["error"].endswith("no such file or directory")
    assert len(by_path[str(tmp_path / "cat.png")]["labels"]) == 5
    assert "broken.jpg: not a readable image" in err and "missing.png: no such file" in err


def test_glob_patterns_find_what_glob_finds_and_are_bounded_by_link_loops(tmp_path):
    import glob as glob_module

    root = tmp_path / "data"
    for name in ("a/b/x.jpg", "a/y.JPG", "c/z.png", "c/.hidden.jpg", ".dot/w.jpg", "top.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    patterns = ["**/*.jpg", "*/*.jpg", "a/**/*", "**/[!x]*.*", "c/?.png", "**/.*.jpg", "**"]
    for pattern in patterns:  # without loops, exactly what glob.glob(recursive=True) finds
        expected = sorted(p for p in glob_module.glob(str(root / pattern), recursive=True) if os.path.isfile(p))
        assert [str(p) for p in files.glob_files(str(root / pattern))] == expected, pattern
    for folder in ("a", "a/b", "c", ".dot"):  # a loop in each folder: glob's search grows exponentially
        (root / folder / "loop").symlink_to("..")
    code = f"from utils.classify import find_images; print(len(find_images([{str(root / '**/*.jpg')!r}])[0]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "2", done.stderr


def test_classify_text_output_and_default_samples(model_and_weights, capsys):
    model, weights = model_and_weights
    status, out, _ = run_classify(capsys, "--weights", weights, "--topk", "2")
    assert status == 0
    labels, _ = expected_top(model, SAMPLES / "rocket.jpg", 2)
    block = out.split(str(SAMPLES / "rocket.jpg"))[1]
    assert all(label in block for label in labels) and "%" in block


def test_classify_with_weights_that_do_not_load_exits_2(capsys, tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 512)}, tmp_path / "partial.pth")
    status, _, err = run_classify(capsys, "--weights", str(tmp_path / "partial.pth"))
    assert status == 2 and err.startswith("error: ") and "does not fit resnet18_ssl" in err


def test_classify_reports_a_named_pipe_without_blocking_and_classifies_the_rest(model_and_weights, capsys, tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    status, rows, err = run_classify(capsys, str(tmp_path / "pipe.jpg"), str(SAMPLES / "chelsea.png"),
                                     "--weights", model_and_weights[1], "--json")
    assert status == 1 and f"{tmp_path / 'pipe.jpg'}: not a regular file" in err
    assert [len(r.get("labels", [])) for r in rows] == [0, 5]


def test_classify_checks_its_inputs_before_loading_the_model(capsys, tmp_path):
    # The weights named do not exist: had the model been loaded first, the error would be about them.
    status, _, err = classify.main([str(tmp_path / "missing.png"), "--weights", "https://127.0.0.1:9/none.pth"]), \
        *capsys.readouterr()
    assert status == 1 and err.strip() == f"{tmp_path / 'missing.png'}: no such file or directory"


def test_a_precision_this_cpu_only_emulates_is_refused_in_the_commands_terms(model_and_weights, capsys, monkeypatch):
    from utils.system import hardware
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # a CPU without native bf16
    for main, args in ((classify.main, []), (evaluate.main, [str(SAMPLES)])):
        status = main([*args, "--weights", model_and_weights[1], "--device", "cpu", "--dtype", "bfloat16"])
        err = capsys.readouterr().err
        assert status == 2 and "use --dtype float32" in err and "dtype=" not in err, err


COMMANDS = {  # each command with the arguments it requires
    "classify": lambda tmp: [],
    "evaluate": lambda tmp: [str(tmp)],
    "export": lambda tmp: [str(tmp / "model.onnx")],
    "benchmark": lambda tmp: [],
    "finetune": lambda tmp: [str(tmp), "--output", str(tmp / "out")],
}
RUNNERS = ("classify", "evaluate", "benchmark", "finetune")  # the commands that take --device
BAD_VALUES = [
    (["--workers", "-3"], "argument --workers: must be 0 or more, got -3", ("classify", "evaluate", "finetune")),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device: use auto, cpu, cuda or cuda:N", RUNNERS),
    (["--device", "cuda:-1"], "argument --device: 'cuda:-1' is not a device", RUNNERS),
    (["--device", ""], "argument --device: '' is not a device", RUNNERS),
    (["--device", "cuda:99"], "argument --device: cuda:99: ", RUNNERS),  # no GPU here, or fewer than 100
    (["--batch-size", "99999999999999999999"], "argument --batch-size: must be at most 4096",
     ("classify", "evaluate", "finetune")),
    (["--batch-sizes", "99999999999999999999"], "argument --batch-sizes: must be at most 4096", ("benchmark",)),
    (["--weights", "nowhere.pth"], "argument --weights: nowhere.pth: no such file",
     ("classify", "evaluate", "export", "finetune")),
    (["--weights", "ftp://host/w.pth"], "argument --weights: ftp://host/w.pth: only http://, https:// and file://",
     ("classify", "evaluate", "export", "finetune")),
]


@pytest.mark.parametrize("command, args, message", [(c, a, m) for a, m, commands in BAD_VALUES for c in commands],
                         ids=[f"{c} {' '.join(a)}" for a, _, commands in BAD_VALUES for c in commands])
def test_bad_values_exit_2_with_argparses_one_line_error(command, args, message, capsys, tmp_path):
    main = importlib.import_module(f"utils.{command}").main
    with pytest.raises(SystemExit) as exit_:
        main([*COMMANDS[command](tmp_path), *args])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith(f"python -m utils.{command}: error: {message}"), last


def test_a_named_pipe_as_weights_is_refused_at_once(capsys, tmp_path):
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(SystemExit) as exit_:
        classify.main(["--weights", str(tmp_path / "pipe.pth")])
    assert exit_.value.code == 2 and "pipe.pth: not a regular file" in capsys.readouterr().err


def test_python_m_utils_classify(model_and_weights):
    _, weights = model_and_weights
    done = subprocess.run([sys.executable, "-m", "utils.classify", str(SAMPLES / "chelsea.png"), "--model",
                           "resnet18_ssl", "--weights", weights, "--json"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(SAMPLES / "chelsea.png")


@pytest.fixture(scope="module")
def val_dir(model_and_weights, tmp_path_factory):
    """An ImageFolder whose labels are chosen from the model's own predictions: some images in the folder
    of their top-1 class, some in that of their 3rd, the rest in a class outside their top 5."""
    model, _ = model_and_weights
    root, wnids = tmp_path_factory.mktemp("val"), model.pretrained_cfg["wnids"]
    for i in range(11):
        image = noise(180 + 13 * i, 260 - 7 * i, seed=i)
        with torch.inference_mode():
            ranked = model(model.preprocess(image)[None])[0].argsort(descending=True).tolist()
        label = ranked[0] if i % 3 == 0 else ranked[2] if i % 3 == 1 else ranked[10]
        folder = root / wnids[label]
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{i}.JPEG", quality=95)
    return root


def direct_accuracy(model, root):
    """Top-1 and top-5 hits computed without the tool."""
    index = {wnid: i for i, wnid in enumerate(model.pretrained_cfg["wnids"])}
    top1 = top5 = 0
    files = sorted(root.glob("*/*.JPEG"))
    for path in files:
        with torch.inference_mode():
            ranked = model(model.preprocess(path)[None])[0].topk(5).indices.tolist()
        label = index[path.parent.name]
        top1, top5 = top1 + (ranked[0] == label), top5 + (label in ranked)
    return top1, top5, len(files)


def run_evaluate(capsys, *args):
    """evaluate.main on the CPU (unless ``args`` say otherwise), as the model the tests compare with."""
    pinned = [] if "--device" in args else ["--device", "cpu"]
    status = evaluate.main([*args, "--model", "resnet18_ssl", "--json", "--workers", "0", "--batch-size", "4",
                            *pinned])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if status == 0 else None), err


def test_evaluate_equals_direct_computation(model_and_weights, val_dir, capsys):
    model, weights = model_and_weights
    status, result, _ = run_evaluate(capsys, str(val_dir), "--weights", weights)
    top1, top5, n = direct_accuracy(model, val_dir)
    assert status == 0 and 0 < top1 < top5 < n
    assert (result["top1_correct"], result["top5_correct"], result["images"]) == (top1, top5, n)
    assert result["top1"] == pytest.approx(100 * top1 / n) and result["images_per_second"] > 0


def test_evaluate_with_the_openvino_backend_counts_the_same(model_and_weights, val_dir, capsys):
    model, weights = model_and_weights
    status, result, _ = run_evaluate(capsys, str(val_dir), "--weights", weights, "--backend", "openvino")
    top1, top5, n = direct_accuracy(model, val_dir)
    assert status == 0 and result["backend"] == "openvino"
    assert (result["top1_correct"], result["top5_correct"], result["images"]) == (top1, top5, n)


def test_evaluate_limit_and_data_only(model_and_weights, val_dir, capsys):
    _, weights = model_and_weights
    status, result, _ = run_evaluate(capsys, str(val_dir), "--weights", weights, "--limit", "4")
    assert status == 0 and result["images"] == 4
    status, result, _ = run_evaluate(capsys, str(val_dir), "--data-only")
    assert status == 0 and result["images"] == 11 and "top1" not in result


def test_evaluate_refuses_folders_that_are_not_imagenet_ids(model_and_weights, tmp_path, capsys):
    _, weights = model_and_weights
    root = tmp_path / "val"  # not tmp_path itself, which holds the test's torch.hub cache
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        noise(64, 64).save(root / name / "a.png")
    status, _, err = run_evaluate(capsys, str(root), "--weights", weights)
    assert status == 2 and "2 folder(s) are not ImageNet-1k WordNet ids (cats, dogs)" in err
    status, _, err = run_evaluate(capsys, str(root), "--weights", weights, "--num-classes", "2")
    assert status == 2 and "has no trained 2-class head" in err  # its head has 1000 classes
    status, _, err = run_evaluate(capsys, str(root), "--num-classes", "2")
    assert status == 2 and "--num-classes needs --weights" in err


def test_evaluate_a_fine_tuned_model_of_its_own_classes(tmp_path, capsys):
    state_dict = create_model("resnet18_ssl", pretrained=False, num_classes=2).state_dict()
    torch.save(state_dict, tmp_path / "finetuned.pth")
    model = create_model("resnet18_ssl", weights=tmp_path / "finetuned.pth", num_classes=2)
    assert model.pretrained_cfg["head"] == "pretrained" and torch.equal(model.fc.weight, state_dict["fc.weight"])
    root = tmp_path / "data"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            noise(90, 70, seed=i).save(root / name / f"{i}.png")
    with torch.inference_mode():
        predicted = [model(model.preprocess(p)[None]).argmax().item() for p in sorted(root.glob("*/*.png"))]
    status, result, _ = run_evaluate(capsys, str(root), "--weights", str(tmp_path / "finetuned.pth"),
                                     "--num-classes", "2")
    assert status == 0 and result["top1_correct"] == sum(p == label for p, label in zip(predicted, [0, 0, 1, 1]))
    assert "top5" not in result and "top5_correct" not in result  # top-5 of 2 classes always holds the label


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_fails_on_an_unreadable_image_naming_it_in_one_line(model_and_weights, val_dir, tmp_path, workers):
    _, weights = model_and_weights
    root = tmp_path / "val"
    shutil.copytree(val_dir, root)
    bad = next(root.iterdir()) / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not really")
    # In a fresh process: worker processes forked from this one, which has loaded other runtimes, are not safe.
    done = subprocess.run([sys.executable, "-m", "utils.evaluate", str(root), "--model", "resnet18_ssl", "--weights",
                           weights, "--workers", str(workers), "--device", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [error] = [line for line in done.stderr.splitlines() if "error" in line.lower()]  # one line, besides progress
    assert error.startswith(f"error: {bad}: not a readable image") and error.endswith("remove or replace it")


def test_torchrun_two_processes_equal_one(model_and_weights, val_dir, tmp_path):
    _, weights = model_and_weights
    command = ["-m", "utils.evaluate", str(val_dir), "--model", "resnet18_ssl", "--weights", weights, "--json",
               "--workers", "0", "--batch-size", "2", "--device", "cpu"]
    single = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True)
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *command], cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-2000:]
    one, two = json.loads(single.stdout), json.loads(double.stdout.strip().splitlines()[-1])
    assert (one["processes"], two["processes"]) == (1, 2)
    for key in ("images", "top1_correct", "top5_correct", "top1", "top5"):
        assert one[key] == two[key], key


def test_torchrun_fails_cleanly_when_the_weights_are_missing(tmp_path, val_dir):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "utils.evaluate", str(val_dir), "--model", "resnet18_ssl", "--workers", "0",
                           "--weights", str(tmp_path / "missing.pth")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    # Every process meets the error: the first prints it, once, and none exits before it is out.
    assert done.returncode != 0 and error_lines(done.stderr) == [
        f"python -m utils.evaluate: error: argument --weights: {tmp_path / 'missing.pth'}: no such file"], done.stderr
    assert done.stderr.count("usage: python -m utils.evaluate") == 1, done.stderr


def error_lines(stderr: str) -> list[str]:
    """The commands' error lines (``error: ...``, argparse's ``python -m utils.X: error: ...``)."""
    return [line for line in stderr.splitlines() if re.match(r"(python -m utils\.\w+: )?error: ", line)]


def torchrun_evaluate(root, *args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "utils.evaluate", str(root), "--model", "resnet18_ssl", "--workers", "0",
                           "--device", "cpu", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


# What a process that fails inside a collective prints: Gloo's own error, which names no file.
DISTRIBUTED_FAILURE = ("Connection closed by peer", "DistBackendError", "[rank0]:", "[rank1]:")


def test_torchrun_fails_cleanly_when_the_weights_file_is_bad(tmp_path, val_dir):
    """A file that exists passes argparse in every process: the first meets the error while loading, and
    the others, waiting for it at the barrier, must not be left behind in it."""
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    done = torchrun_evaluate(val_dir, "--weights", bad)
    assert done.returncode != 0 and len(error_lines(done.stderr)) == 1, done.stderr[-3000:]
    assert error_lines(done.stderr)[0].startswith(f"error: {bad}"), done.stderr[-3000:]
    assert not any(failure in done.stderr for failure in DISTRIBUTED_FAILURE), done.stderr[-3000:]


def test_torchrun_stops_every_process_cleanly_when_one_meets_an_unreadable_image(model_and_weights, val_dir,
                                                                               tmp_path):
    root = tmp_path / "val"
    shutil.copytree(val_dir, root)
    files = sorted(root.glob("*/*.JPEG"))
    files[1].write_bytes(b"not a JPEG")  # in the second process's share only (every second image)
    done = torchrun_evaluate(root, "--weights", model_and_weights[1])
    assert done.returncode != 0, done.stderr[-3000:]
    # Said once, by the process that met it; the other stops with it, silently.
    assert done.returncode != 0 and len(error_lines(done.stderr)) == 1, done.stderr[-3000:]
    assert error_lines(done.stderr)[0].startswith(f"error: {files[1]}: not a readable image"), done.stderr[-3000:]
    assert not any(failure in done.stderr for failure in DISTRIBUTED_FAILURE), done.stderr[-3000:]


def test_device_auto_is_the_cpu_for_the_cpu_runtimes_even_with_a_gpu(monkeypatch):
    from utils.cli import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with a GPU
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("auto", "auto") == torch.device("cuda")  # "auto" on a GPU is the torch backend
    assert pick_device("auto", "onnxruntime") == pick_device("auto", "openvino") == torch.device("cpu")


def test_errors_name_the_commands_options_not_pythons(resnet18_checkpoint, capsys, tmp_path):
    from .test_reliability import refused_url

    bad = tmp_path / "resnet18-0123abcd.pth"  # a name that promises a hash the file does not have
    shutil.copyfile(resnet18_checkpoint, bad)
    for weights, message in ((str(bad), f"SHA-256 mismatch for --weights {bad}: expected a hash starting 0123abcd"),
                             (refused_url() + "w.pth", "download the file yourself and pass --weights <its path>")):
        status = classify.main(["--model", "resnet18_ssl", "--weights", weights, "--device", "cpu"])
        err = capsys.readouterr().err
        assert status == 2 and message in err and "weights=" not in err, err


# Every command tries out offline with --no-pretrained, and lists the entries in its --help.


@pytest.fixture
def offline(monkeypatch):
    """No published file can be fetched: the mirror refuses every connection."""
    from .test_reliability import refused_url
    monkeypatch.setenv("SEMI_SUPERVISED_WEIGHTS_MIRROR", refused_url())


def test_classify_no_pretrained_runs_offline_and_says_its_classes_are_meaningless(offline, capsys):
    assert classify.main(["--no-pretrained", "--model", "resnet18_ssl", "--workers", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# random weights (--no-pretrained): the classes are meaningless\n")
    assert str(SAMPLES / "chelsea.png") in out
    status, rows, _ = run_classify(capsys, "--no-pretrained", "--json", "--device", "cpu")
    assert status == 0 and len(rows) == 2 and all(r["pretrained"] is False for r in rows)


def test_evaluate_no_pretrained_runs_offline_and_says_so(offline, val_dir, capsys):
    status = evaluate.main([str(val_dir), "--no-pretrained", "--model", "resnet18_ssl", "--workers", "0",
                            "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0 and "resnet18_ssl (random weights (--no-pretrained): the accuracies are meaningless)" in out
    status, result, _ = run_evaluate(capsys, str(val_dir), "--no-pretrained", "--device", "cpu")
    assert status == 0 and result["pretrained"] is False and result["images"] == 11


def test_export_and_benchmark_no_pretrained_run_offline(offline, tmp_path, capsys):
    from utils import benchmark, export
    assert export.main([str(tmp_path / "r18.pt"), "--model", "resnet18_ssl", "--no-pretrained"]) == 0
    assert "random weights (--no-pretrained)" in capsys.readouterr().out
    assert benchmark.main(["--models", "resnet18_ssl", "--no-pretrained", "--batch-sizes", "1", "--warmup", "0",
                           "--repeats", "1", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["entry"] == "resnet18_ssl"


def test_no_pretrained_and_weights_exclude_each_other(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        classify.main(["--no-pretrained", "--weights", str(SAMPLES / "chelsea.png")])
    assert exit_.value.code == 2 and "argument --weights: not allowed with argument --no-pretrained" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", ["classify", "evaluate", "export", "benchmark", "finetune", "cache"])
def test_every_commands_help_lists_the_twelve_entries(command, capsys):
    from models import WEIGHTS
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"utils.{command}").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit_.value.code == 0 and all(entry in out for entry in WEIGHTS), out


def small(model):
    """``model`` at 64 px, as ``--img-size 64`` makes it: INT8 quantizes in a fraction of the time there."""
    model = copy.deepcopy(model)
    set_input_size(model, 64)
    return model


def test_evaluate_int8_reports_the_float32_top1_of_the_same_images_beside_it(model_and_weights, val_dir, capsys):
    model, weights = small(model_and_weights[0]), model_and_weights[1]
    status, result, _ = run_evaluate(capsys, str(val_dir), "--weights", weights, "--dtype", "int8", "--img-size", "64",
                                     "--calibration", str(val_dir), "--backend", "onnxruntime", "--device", "cpu")
    top1, top5, n = direct_accuracy(model, val_dir)
    assert status == 0 and result["dtype"] == "int8" and result["images"] == n
    assert (result["float32_top1_correct"], result["float32_top5_correct"]) == (top1, top5)
    # The INT8 counts are those of the INT8 model, on the same batches of 4.
    int8 = optimize_for_inference(model, backend="onnxruntime", dtype="int8",
                                  calibration=sorted(val_dir.glob("*/*.JPEG")))
    files = sorted(val_dir.glob("*/*.JPEG"))
    index = {wnid: i for i, wnid in enumerate(model.pretrained_cfg["wnids"])}
    hits = 0
    for batch in range(0, n, 4):
        with torch.inference_mode():
            top = int8(torch.stack([model.preprocess(f) for f in files[batch:batch + 4]])).argmax(1).tolist()
        hits += sum(t == index[f.parent.name] for t, f in zip(top, files[batch:batch + 4]))
    assert result["top1_correct"] == hits
    fidelity = result["int8_fidelity"]["onnxruntime"]
    assert fidelity["held_out"] and fidelity["images"] == 2  # 11 images: every fifth held out
    status = evaluate.main([str(val_dir), "--model", "resnet18_ssl", "--weights", weights, "--workers", "0",
                            "--dtype", "int8", "--calibration", str(val_dir), "--backend", "onnxruntime",
                            "--device", "cpu", "--img-size", "64"])
    out = capsys.readouterr().out
    assert status == 0 and f"int8 against float32 on the same images: top-1 {100 * hits / n:.3f}% against " \
                           f"{100 * top1 / n:.3f}%" in out


def test_classify_in_int8_answers_as_the_int8_model(model_and_weights, capsys):
    model, weights = small(model_and_weights[0]), model_and_weights[1]
    status, rows, _ = run_classify(capsys, str(SAMPLES), "--weights", weights, "--json", "--dtype", "int8",
                                   "--calibration", str(SAMPLES), "--backend", "openvino", "--img-size", "64")
    int8 = optimize_for_inference(model, backend="openvino", dtype="int8", calibration=SAMPLES)
    assert status == 0 and len(rows) == 2
    for row in rows:
        with torch.inference_mode():
            probabilities = int8(model.preprocess(row["path"])[None]).softmax(dim=1)[0]
        assert row["labels"] == [model.pretrained_cfg["classes"][i] for i in probabilities.topk(5).indices]


@pytest.mark.parametrize("args, message", [
    (["--dtype", "int8"], "error: --dtype int8 needs --calibration IMAGES: 50 to 300 images"),
    (["--calibration", "x.png"], "error: --calibration is for --dtype int8, not float32: leave it out"),
    (["--dtype", "int8", "--calibration", "nowhere"], "error: calibration: nowhere: no such file or directory"),
    (["--dtype", "int8", "--calibration", "x", "--device", "cuda"], "int8 runs on the CPU here"),  # on a GPU machine
    (["--dtype", "int8", "--calibration", ""], "error: calibration: '': an empty path (an unset shell variable?)"),
    (["--dtype", "int8", "--calibration", str(SAMPLES), "--backend", "torch"],
     "error: --dtype int8 runs in OpenVINO or ONNX Runtime: leave --backend out for the faster one installed, or "
     "use --backend openvino, onnxruntime or auto"),
])
def test_int8_options_are_checked_in_the_commands_terms(model_and_weights, val_dir, capsys, args, message):
    if "cuda" in args and not torch.cuda.is_available():
        message = "cuda: CUDA is not available here"
    for main, extra in ((classify.main, []), (evaluate.main, [str(val_dir)])):
        try:
            status = main([*extra, "--model", "resnet18_ssl", "--weights", model_and_weights[1], "--workers", "0",
                           *args])
        except SystemExit as e:  # argparse's own refusal
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and message in err and "Traceback" not in err, err
        assert "backend=" not in err and "dtype=" not in err, err  # the options' names, not Python's


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(model_and_weights, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    noise(64, 64, seed=0).save(tmp_path / "here.png")  # what searching the current folder would find
    status, out, err = run_classify(capsys, "", "--weights", model_and_weights[1])
    # Named as any path that names no image is (exit 1), never searched as the current folder.
    assert status == 1 and "an empty path (an unset shell variable?)" in err and "here.png" not in out, err


def test_evaluate_leaves_hidden_folders_out_as_fine_tuning_does(model_and_weights, val_dir, tmp_path, capsys):
    root = tmp_path / "val"
    shutil.copytree(val_dir, root)
    hidden = root / ".ipynb_checkpoints"
    hidden.mkdir()
    noise(64, 64, seed=1).save(hidden / "x.JPEG")
    status, with_hidden, _ = run_evaluate(capsys, str(root), "--weights", model_and_weights[1])
    _, without, _ = run_evaluate(capsys, str(val_dir), "--weights", model_and_weights[1])
    assert status == 0 and (with_hidden["images"], with_hidden["top1_correct"]) == (without["images"],
                                                                                     without["top1_correct"])
