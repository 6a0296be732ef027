"""python -m utils.benchmark and utils.system.timing: interleaved timing, the derived columns, the outputs
and the plot."""
import csv
import io
import json

import pytest
import torch

from models import WEIGHTS, create_model
from utils import benchmark
from utils.inference import speed_table
from utils.system import hardware, timing

CPU = torch.device("cpu")


def test_timing_is_round_robin_and_skips_the_warmup():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.time_interleaved(functions, warmup=2, repeats=3, device=torch.device("cpu"))
    assert calls == list("abc") * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


IMG_SIZE = 64  # the work of each row is counted at the size it runs at


def run(capsys, *args, models=("resnet18_ssl", "resnet18_swsl")):
    # --device cpu: the default would take a GPU where there is one.
    status = benchmark.main(["--models", *models, "--batch-sizes", "1", "2", "--device", "cpu",
                             "--warmup", "0", "--repeats", "2", "--img-size", str(IMG_SIZE), *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_rows_are_consistent(capsys, tmp_path):
    status, out, _ = run(capsys, "--dtype", "float32", "--json", "--plot", str(tmp_path / "plot.png"))
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["entry"], r["batch_size"], r["variant"]) for r in rows] == [
        (e, b, v) for e in ("resnet18_ssl", "resnet18_swsl") for b in (1, 2) for v in ("eager", "optimized")]
    # ResNet-18's work is all in its convolutions and head: at 64 px about (64/224)^2 of 224's, plus the head.
    gmacs = WEIGHTS["resnet18_ssl"].arch.gmacs
    model = create_model("resnet18_ssl", pretrained=False)
    assert speed_table.count_gmacs(model, 224, CPU) == pytest.approx(gmacs, abs=5e-4)
    at_64 = speed_table.count_gmacs(model, IMG_SIZE, CPU)
    assert gmacs * (IMG_SIZE / 224) ** 2 < at_64 < 1.1 * gmacs * (IMG_SIZE / 224) ** 2
    for r in rows:
        assert r["images_per_second"] == pytest.approx(r["batch_size"] / r["ms_per_batch"] * 1e3)
        assert r["gflops"] == pytest.approx(2 * at_64 * r["images_per_second"])
        assert r["ceiling_pct"] == pytest.approx(100 * r["gflops"] / r["ceiling_gflops"])
        assert r["top1"] == WEIGHTS[r["entry"]].measured[0] and r["spread_pct"] >= 0
        assert r["arch"] == WEIGHTS[r["entry"]].arch.name
        assert r["channels_last"] == (r["variant"] == "optimized") and "torch 2." in r["device"]
    for eager, optimized in zip(rows[::2], rows[1::2]):
        assert eager["speedup"] == 1.0 and eager["max_error"] == 0.0
        assert optimized["speedup"] == pytest.approx(eager["ms_per_batch"] / optimized["ms_per_batch"])
        assert 0 < optimized["max_error"] < 1e-4 and optimized["vs_fastest_peer"] is None
    # ssl and swsl share an architecture: timed once, reported for both.
    assert [r["ms_per_batch"] for r in rows[:4]] == [r["ms_per_batch"] for r in rows[4:]]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peers_run_in_the_same_rounds_and_are_checked_against_eager(capsys):
    status, out, _ = run(capsys, "--peers", "--json", models=("resnet18_ssl",))
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    for batch_size in (1, 2):
        mine = {r["variant"]: r for r in rows if r["batch_size"] == batch_size}
        assert list(mine) == ["eager", "optimized", "onnxruntime", "openvino", "auto"]
        fastest = min(mine[p]["ms_per_batch"] for p in ("onnxruntime", "openvino"))
        for r in mine.values():
            assert r["vs_fastest_peer"] == pytest.approx(fastest / r["ms_per_batch"])
            assert r["max_error"] < 1e-4  # every variant computes what eager float32 does
        assert max(mine[p]["vs_fastest_peer"] for p in ("onnxruntime", "openvino")) == pytest.approx(1.0)


def test_markdown_and_csv(capsys):
    status, out, _ = run(capsys, "--dtype", "float32", "--no-channels-last", "--img-size", "48")
    assert status == 0
    lines = out.splitlines()
    assert "threads, torch" in lines[0] and "; 48x48 images, median of 2 rounds" in lines[0]
    # One line per architecture, batch size and variant: ssl and swsl share theirs.
    assert lines[2].startswith("| model | batch | variant |") and "| vs fastest peer |" in lines[2]
    assert len(lines) == 4 + 4
    assert "| `resnet18_ssl`, `resnet18_swsl` | 1 | optimized fp32 NCHW |" in out and "| 1.00x |" in out
    status, out, _ = run(capsys, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and len(rows) == 8 and rows[0]["variant"] == "eager" and float(rows[1]["gflops"]) > 0


@pytest.mark.parametrize("args, message", [
    (["--models", "resnet19_ssl"], "--models: unknown model(s) resnet19_ssl; choose from all, resnet18_ssl"),
    (["--batch-sizes", "0"], "argument --batch-sizes: must be at least 1, got 0"),
    (["--dtype", "int4"], "--dtype: invalid choice: 'int4'"),
    (["--json", "--csv"], "not allowed with argument"),
    (["--plot", "/no/such/dir/plot.png"], "--plot /no/such/dir/plot.png: the folder /no/such/dir does not exist"),
    (["--plot", "plot.jpeg"], "--plot plot.jpeg: the name must end in .png, .svg or .pdf"),
    (["--img-size", "16"], "--img-size: must be at least 32 pixels"),
])
def test_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_plot_path_that_is_a_folder_is_refused_before_measuring(tmp_path, capsys):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--plot", str(tmp_path / "x.png"), "--models", "resnet18_ssl"])
    assert exit_.value.code == 2 and "x.png is a folder: give a file name" in capsys.readouterr().err


@pytest.mark.parametrize("flags, int8_ceiling", [({"avx2"}, False), ({"avx2", "avx512_vnni"}, True),
                                                  ({"avx2", "avx_vnni"}, True), ({"amx_int8"}, True)])
def test_an_int8_matmul_ceiling_is_measured_only_where_the_cpu_has_8_bit_dot_products(monkeypatch, flags,
                                                                                     int8_ceiling):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert speed_table.ceiling_dtypes(["float32", "int8"], CPU) == ["float32", "int8"][:1 + int8_ceiling]
    assert speed_table.ceiling_dtypes(["int8"], torch.device("cuda")) == ["float32"]


def test_int8_rows_stand_beside_the_float_peers_and_are_measured_against_the_fastest(capsys, monkeypatch):
    # No native bf16, and no VNNI: the integer GEMM is no ceiling there, and costs minutes at 2048^3.
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    status, out, _ = run(capsys, "--dtype", "int8", "--json", models=("resnet18_ssl",))
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    for batch_size in (1, 2):
        mine = {(r["variant"], r["dtype"]): r for r in rows if r["batch_size"] == batch_size}
        assert list(mine) == [("eager", "float32"), ("optimized", "float32"), ("onnxruntime", "float32"),
                              ("openvino", "float32"), ("onnxruntime", "int8"), ("openvino", "int8"),
                              ("auto", "float32"), ("auto", "int8")]
        fastest_float = min(mine[p, "float32"]["ms_per_batch"] for p in ("onnxruntime", "openvino"))
        for p in ("onnxruntime", "openvino", "auto"):
            r = mine[p, "int8"]
            assert r["vs_fastest_peer"] == pytest.approx(fastest_float / r["ms_per_batch"])
            assert r["ceiling_gflops"] is None and r["ceiling_pct"] is None  # none measured: no VNNI
        for p in ("onnxruntime", "openvino"):  # ("auto" may run a float candidate, where that is faster)
            assert 1e-4 < mine[p, "int8"]["max_error"] < 0.2  # quantized: close to eager float32, not equal
