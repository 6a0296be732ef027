"""Measure inference speed: plain eager float32 against optimize_for_inference and its peers, in one run.

    python -m utils.benchmark [--models ENTRY ... | all] [--batch-sizes 1 16] [--dtype float32 bfloat16]
                              [--compile] [--peers] [--no-channels-last] [--device cpu] [--json | --csv]
                              [--plot FILE.png]

For each model and batch size, the plain eager float32 model and each optimised variant run in turn,
round after round, so that the machine's ups and downs fall on all of them alike. ``--peers`` adds
ONNX Runtime and OpenVINO (those installed) running the model's ONNX export with as many threads as
torch, and ``backend="auto"``. Each row gives the median time of a batch, its spread, images/s, the
achieved GFLOP/s (two FLOPs per multiply-accumulate in the registry), the dense matrix-multiply
ceiling measured in the same run, the speed relative to the plain eager float32 model and to the
fastest peer, and the largest difference of its outputs from eager float32's (relative to the
largest output). Weights are random: speed does not depend on them. Entries that share an
architecture (ssl and swsl) are timed once.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from models import WEIGHTS, create_model
from utils.cli import DTYPES, batch_size_value, count, device_name, img_size_value, pick_device, positive
from utils.inference import backends
from utils.inference.optimize import optimize_for_inference
from utils.inference.timing import describe, gemm_gflops, matmul_functions, relative_error, time_interleaved

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PEERS = tuple(backends.PEERS)


@dataclass
class Row:
    entry: str
    batch_size: int
    variant: str  # "eager" (the plain model), "optimized" (backend="torch"), "onnxruntime", "openvino" or "auto"
    dtype: str
    channels_last: bool
    compiled: bool
    ms_per_batch: float  # median
    spread_pct: float  # (slowest - fastest) / median, over the repeats
    images_per_second: float
    gflops: float
    ceiling_gflops: float  # dense matrix multiply in the same dtype, same run
    ceiling_pct: float
    speedup: float  # over plain eager float32, same model and batch size
    vs_fastest_peer: float | None  # speed over the fastest of ONNX Runtime and OpenVINO in the same dtype
    max_error: float  # largest output difference from eager float32, relative to the largest output
    top1: float  # ImageNet-1k val top-1 measured with the published weights

    @property
    def label(self) -> str:
        if self.variant == "eager":
            return "eager fp32"
        if self.variant in PEERS:
            return f"{self.variant} {SHORT[self.dtype]}"
        return (f"{self.variant} {SHORT[self.dtype]}" + ("" if self.channels_last else " NCHW")
                + (" compiled" if self.compiled else ""))


def variants(dtypes: list[str], compile: bool, peers: list[str]) -> list[tuple[str, str, bool]]:
    """(variant, dtype, compiled) in the order they run and are reported."""
    torch_variants = [("optimized", d, c) for d in dtypes for c in ((False, True) if compile else (False,))]
    peer_variants = [(p, d, False) for d in dtypes for p in peers if p != "onnxruntime" or d == "float32"]
    auto = [("auto", d, False) for d in dtypes] if peers else []
    return [("eager", "float32", False), *torch_variants, *peer_variants, *auto]


def build(eager: torch.nn.Module, variant: str, dtype: str, compiled: bool, channels_last: bool) -> torch.nn.Module:
    if variant == "eager":
        return eager
    backend = "torch" if variant == "optimized" else variant
    return optimize_for_inference(eager, backend=backend, dtype=DTYPES[dtype], channels_last=channels_last,
                                  compile=compiled)


def benchmark(entries: list[str], batch_sizes: list[int], dtypes: list[str], channels_last: bool, compile: bool,
              device: torch.device, warmup: int, repeats: int, progress: bool = True,
              peers: list[str] = (), img_size: int = 224) -> list[Row]:
    # The matrix multiplies run in the same rounds as the models, so that they see the same machine.
    matmuls = {f"{path} {name}": f for name in dict.fromkeys(["float32", *dtypes])
               for path, f in matmul_functions(device, DTYPES[name]).items()}
    runs = variants(dtypes, compile, list(peers))
    timed: dict[tuple[str, int], dict[tuple, list[float]]] = {}
    errors: dict[tuple[str, int], dict[tuple, float]] = {}
    archs = {WEIGHTS[e].arch.name: e for e in reversed(entries)}  # arch -> the first entry that has it
    bar = tqdm(total=len(archs) * len(batch_sizes) * (warmup + repeats) * (len(runs) + len(matmuls)),
               desc="benchmark", unit="batch", disable=not progress or None)
    for arch, entry in archs.items():
        if compile:
            torch.compiler.reset()  # or, after 8 models, torch.compile would quietly fall back to eager
        eager = create_model(entry, pretrained=False).to(device)
        bar.set_postfix_str(f"{entry}: preparing")
        models = {v: build(eager, *v, channels_last) for v in runs}
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, 3, img_size, img_size, device=device)
            bar.set_postfix_str(f"{entry} batch {batch_size}")
            with torch.inference_mode():
                expected = eager(x)
                # Timed calls follow: the first call of "auto" (which times its candidates) is not among them.
                errors[arch, batch_size] = {v: relative_error(m(x), expected) for v, m in models.items()}
                timed[arch, batch_size] = time_interleaved(
                    {**{v: functools.partial(m, x) for v, m in models.items()}, **matmuls},
                    warmup, repeats, device, bar.update)
        del eager, models
    bar.close()

    rows = []
    for entry in entries:
        weight_set = WEIGHTS[entry]
        for batch_size in batch_sizes:
            times = timed[weight_set.arch.name, batch_size]
            ceilings = {d: max(gemm_gflops(device, statistics.median(times[f"{path} {d}"])) for path in ("mm", "conv"))
                        for d in ("float32", *dtypes)}
            baseline = statistics.median(times[runs[0]])
            fastest_peer = {d: min(statistics.median(times[v]) for v in runs if v[0] in PEERS and v[1] == d)
                            for d in dtypes if any(v[0] in PEERS and v[1] == d for v in runs)}
            for variant, dtype, compiled in runs:
                seconds = statistics.median(times[variant, dtype, compiled])
                spread = max(times[variant, dtype, compiled]) - min(times[variant, dtype, compiled])
                gflops = 2 * weight_set.arch.gmacs * batch_size / seconds
                peer = fastest_peer.get(dtype)
                rows.append(Row(entry, batch_size, variant, dtype,
                                channels_last and variant in ("optimized", "auto"), compiled,
                                ms_per_batch=seconds * 1e3, spread_pct=spread / seconds * 100,
                                images_per_second=batch_size / seconds, gflops=gflops,
                                ceiling_gflops=ceilings[dtype], ceiling_pct=gflops / ceilings[dtype] * 100,
                                speedup=baseline / seconds, vs_fastest_peer=None if peer is None else peer / seconds,
                                max_error=errors[weight_set.arch.name, batch_size][variant, dtype, compiled],
                                top1=weight_set.measured[0]))
    return rows


def markdown(rows: list[Row]) -> str:
    """A table with one line per architecture, batch size and variant: entries that share an
    architecture share their timing."""
    lines = ["| model | batch | variant | ms/batch (spread) | images/s | GFLOP/s | % of matmul ceiling | vs eager "
             "| vs fastest peer | max. rel. error |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    entries: dict[tuple, list[str]] = {}
    for r in rows:
        entries.setdefault((WEIGHTS[r.entry].arch.name, r.batch_size, r.label), []).append(f"`{r.entry}`")
    shown = set()
    for r in rows:
        key = (WEIGHTS[r.entry].arch.name, r.batch_size, r.label)
        if key in shown:
            continue
        shown.add(key)
        lines.append(f"| {', '.join(entries[key])} | {r.batch_size} | {r.label} | {r.ms_per_batch:.1f} "
                     f"(±{r.spread_pct / 2:.0f}%) | {r.images_per_second:.1f} | {r.gflops:.0f} | "
                     f"{r.ceiling_pct:.0f}% of {r.ceiling_gflops:.0f} | {r.speedup:.2f}x | "
                     + ("" if r.vs_fastest_peer is None else f"{r.vs_fastest_peer:.2f}x") + f" | {r.max_error:.0e} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str, img_size: int = 224) -> None:
    """Measured top-1 against images/s at the largest batch size: a line per entry through its variants."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch_size = max(r.batch_size for r in rows)
    rows = [r for r in rows if r.batch_size == batch_size]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for entry in dict.fromkeys(r.entry for r in rows):
        mine = sorted((r for r in rows if r.entry == entry), key=lambda r: r.images_per_second)
        ax.plot([r.images_per_second for r in mine], [r.top1 for r in mine], "-", color="0.8", zorder=1)
        ax.annotate(entry, (mine[0].images_per_second, mine[0].top1), fontsize=7, ha="right", va="center",
                    xytext=(-7, 0), textcoords="offset points")
    for label in dict.fromkeys(r.label for r in rows):
        mine = [r for r in rows if r.label == label]
        ax.scatter([r.images_per_second for r in mine], [r.top1 for r in mine], label=label, s=22, zorder=2)
    ax.set_xscale("log")
    low = min(r.images_per_second for r in rows)
    ax.set_xlim(low / 4, max(r.images_per_second for r in rows) * 1.3)
    ax.set_xlabel(f"images/s (batch {batch_size}, {img_size}x{img_size})")
    ax.set_ylabel("ImageNet-1k val top-1 (%), measured")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_models(names: list[str]) -> list[str]:
    if names == ["all"]:
        return list(WEIGHTS)
    unknown = [n for n in names if n not in WEIGHTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown)}; "
                                         f"choose from all, {', '.join(WEIGHTS)}")
    return list(dict.fromkeys(names))


def pick_peers(device: torch.device) -> list[str]:
    if device.type != "cpu":
        raise ValueError(f"--peers: ONNX Runtime and OpenVINO are measured on the CPU here, not on {device}")
    peers = [p for p in PEERS if backends.installed(p)]
    if not peers:
        raise ImportError("--peers needs onnxruntime or openvino: " + " or ".join(backends.PEERS.values()))
    return peers


def check_plot_path(parser: argparse.ArgumentParser, path: str) -> None:
    """Before the run, not after it: a bad --plot path would waste the whole measurement."""
    if os.path.splitext(path)[1].lower() not in (".png", ".svg", ".pdf"):
        parser.error(f"--plot {path}: the name must end in .png, .svg or .pdf")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"--plot {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        parser.error(f"--plot {path} is a folder: give a file name")
    try:  # can the plot be written there? Found out now, with an empty file that is removed again
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".plot-check."):
            pass
    except OSError as e:
        parser.error(f"--plot {path}: cannot write in {folder} ({e.strerror})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.benchmark", description=__doc__.split("\n\n")[0],
                                     epilog=f"entries: {', '.join(WEIGHTS)}")
    parser.add_argument("--models", nargs="+", default=["resnet50_swsl"], metavar="ENTRY",
                        help="entries to measure, or all (default: resnet50_swsl)")
    parser.add_argument("--batch-sizes", nargs="+", type=batch_size_value, default=[1, 16], metavar="N",
                        help="default: 1 (latency) and 16 (throughput)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"],
                        help="precisions of the optimised model (default float32)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="optimised models in channels_last (default: yes)")
    parser.add_argument("--compile", action="store_true", help="also measure each optimised model torch.compiled")
    parser.add_argument("--peers", action="store_true",
                        help="also measure ONNX Runtime and OpenVINO (those installed) and backend='auto' (CPU)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--img-size", type=img_size_value, default=224, metavar="N",
                        help="height and width of the input (default 224), e.g. a fine-tuned model's")
    parser.add_argument("--warmup", type=count, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--repeats", type=positive, default=7, help="timed rounds (default 7)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per row")
    output.add_argument("--csv", action="store_true", help="CSV with a header line")
    parser.add_argument("--plot", metavar="FILE.png", help="draw measured top-1 against images/s")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="accepted as by the other commands: the benchmark always uses random weights, "
                             "as speed does not depend on them, and needs no download")
    args = parser.parse_args(argv)
    try:
        entries = parse_models(args.models)
    except argparse.ArgumentTypeError as e:
        parser.error(f"--models: {e}")

    if args.plot:
        check_plot_path(parser, args.plot)

    try:
        device = pick_device(args.device)
        peers = pick_peers(device) if args.peers else []
        rows = benchmark(entries, args.batch_sizes, args.dtype, args.channels_last, args.compile, device,
                         args.warmup, args.repeats, peers=peers, img_size=args.img_size)
    except (ValueError, ImportError) as e:  # a device, precision or runtime this machine does not have
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = describe(device)
    if args.json:
        for row in rows:
            print(json.dumps({**asdict(row), "device": machine}))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=[*asdict(rows[0]), "device"])
        writer.writeheader()
        writer.writerows({**asdict(row), "device": machine} for row in rows)
    else:
        print(f"{machine}; {args.img_size}x{args.img_size} images, median of {args.repeats} rounds\n\n{markdown(rows)}")
    if args.plot:
        plot(rows, args.plot, machine, args.img_size)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
